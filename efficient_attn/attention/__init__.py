"""Attention variants behind one contract (docs/attention.md)."""
from efficient_attn.attention.api import Attention, attention_names, make_attention, register
from efficient_attn.attention.dense import MASK_VALUE, dense_attention
from efficient_attn.attention import variants as _variants  # noqa: F401  (registers the block-sparse variants)
from efficient_attn.attention import lsh as _lsh  # noqa: F401  (registers lsh)
from efficient_attn.attention import learned as _learned  # noqa: F401  (linformer, sinkhorn, synthesizer)
from efficient_attn.attention import kernelized as _kernelized  # noqa: F401  (linear, performer)
from efficient_attn.attention import nystrom as _nystrom  # noqa: F401  (registers nystrom)

ATTENTION_NAMES = attention_names()

__all__ = ['ATTENTION_NAMES', 'MASK_VALUE', 'Attention', 'attention_names', 'dense_attention',
           'make_attention', 'register']
