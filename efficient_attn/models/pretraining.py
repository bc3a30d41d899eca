"""The pretraining model: a task model's encoder with a token-prediction head.

`create_pretraining_model` builds a `TokenPredictor` (efficient_attn/models/transformer.py, the
language model's class) whose `Encoder` is exactly the task model's of the same config (same
vocabulary, CLS choice, positions and blocks, under the attribute `encoder`), so the pretrained
`encoder` parameters have the paths and shapes of the fine-tuning model's and load into it one to
one (efficient_attn/pretraining.py). Its `head` projects every state onto the vocabulary, as the
language model's head does (for 'lm' the two heads are the same parameter).
"""
from __future__ import annotations

from flax import nnx

from efficient_attn.data.base import KINDS
from efficient_attn.models import config as config_lib
from efficient_attn.models.transformer import TokenPredictor

__all__ = ['TokenPredictor', 'create_pretraining_model', 'encoder_prepends_cls']


def encoder_prepends_cls(model_config, kind: str) -> bool:
  """Whether the task model of `kind` prepends a CLS token (pooling 'cls'; never for 'lm')."""
  return kind != 'lm' and config_lib.resolve_model_config(model_config)['pooling'] == 'cls'


def create_pretraining_model(model_config, attention_config, *, kind: str, vocab_size: int,
                             max_length: int, causal: bool, rngs: nnx.Rngs) -> TokenPredictor:
  """The pretraining model whose encoder is the one `create_model(model_config, attention_config,
  kind=kind, vocab_size=vocab_size, max_length=max_length, ...)` builds.

  Raises:
    ValueError: for an unknown kind, bad sizes or options, or causal=True with a variant that has
      no causal form.
  """
  if kind not in KINDS:
    raise ValueError(f'Unknown model kind {kind!r}; valid kinds: {", ".join(KINDS)}.')
  for name, value in (('vocab_size', vocab_size), ('max_length', max_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  config = config_lib.resolve_model_config(model_config)
  config['dtype'] = config_lib.DTYPES[config['dtype']]
  attentions = config_lib.resolve_layer_attentions(attention_config, config['num_layers'],
                                                    config['num_heads'])
  if causal:
    config_lib.require_causal(attentions, 'causal pretraining',
                              "set pretrain.objective='masked' (or 'auto')")
  return TokenPredictor(config, attentions, vocab_size=vocab_size, max_length=max_length,
                        prepend_cls=encoder_prepends_cls(model_config, kind), causal=causal,
                        rngs=rngs)
