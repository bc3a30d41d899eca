"""The pretraining model: a task model's encoder with a token-prediction head.

`TokenPredictor` builds the `Encoder` exactly as the task model of the same config does (same
vocabulary, CLS choice, positions and blocks, under the attribute `encoder`), so the pretrained
`encoder` parameters have the paths and shapes of the fine-tuning model's and load into it one to
one (efficient_attn/pretraining.py). Its `head` projects every state onto the vocabulary, as the
language model's head does (for 'lm' the two heads are the same parameter).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from efficient_attn.data.base import KINDS
from efficient_attn.models import config as config_lib
from efficient_attn.models import layers
from efficient_attn.models.transformer import Encoder, _check_inputs, _check_train


class TokenPredictor(nnx.Module):
  """inputs int [b, L], mask bool [b, L] -> logits float32 [b, L', vocab_size].

  L' = L + 1 when the encoder prepends a CLS token (its state comes first), else L. With
  `causal=True` every layer attends causally (state t has seen the tokens up to t), else
  bidirectionally.
  """

  def __init__(self, config, attentions, *, vocab_size: int, max_length: int, prepend_cls: bool,
               causal: bool, rngs: nnx.Rngs):
    self.causal = bool(causal)
    self.encoder = Encoder(config, attentions, vocab_size=vocab_size, max_length=max_length,
                           prepend_cls=prepend_cls, rngs=rngs)
    self.head = layers.Dense(config['emb_dim'], vocab_size, names=('embed', 'vocab'), rngs=rngs)

  def __call__(self, inputs, mask=None, *, train: bool):
    train = _check_train(train)
    inputs, mask = _check_inputs(inputs, mask, 2, 'pretraining')
    states, _ = self.encoder(inputs, mask, causal=self.causal, train=train)
    # float32 projection: the logits feed a softmax over the whole vocabulary.
    return self.head(states.astype(jnp.float32))


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
    for i, attention in enumerate(attentions):
      if not attention.supports_causal:
        raise ValueError(f"layer {i}: attention {attention.name!r} has no causal form, so causal "
                         "pretraining cannot use it; set pretrain.objective='masked' (or 'auto').")
  return TokenPredictor(config, attentions, vocab_size=vocab_size, max_length=max_length,
                        prepend_cls=encoder_prepends_cls(model_config, kind), causal=causal,
                        rngs=rngs)
