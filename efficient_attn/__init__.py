"""efficient-attn: sub-quadratic attention variants for JAX, exact and linear in memory."""
from efficient_attn.attention import (ATTENTION_NAMES, MASK_VALUE, Attention, dense_attention,
                                      make_attention)

__all__ = ['ATTENTION_NAMES', 'MASK_VALUE', 'Attention', 'dense_attention', 'make_attention']
