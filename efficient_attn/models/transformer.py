"""The encoder and the three task models: classifier, dual-encoder pair classifier, causal LM.

Call convention (all kinds): `model(inputs, mask, *, train)` with int `inputs`, bool `mask` (True for
real tokens) and a Python bool `train` (dropout and fresh random attention patterns only when True).
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention.api import Attention
from efficient_attn.data.base import KINDS
from efficient_attn.models import config as config_lib
from efficient_attn.models import layers


def sinusoidal_positions(length: int, emb_dim: int) -> np.ndarray:
  """float32 [length, emb_dim]: sin on the first half of the features, cos on the second."""
  half = emb_dim // 2
  inv_freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) / max(half, 1)))
  angles = np.arange(length, dtype=np.float64)[:, None] * inv_freq[None, :]
  table = np.zeros((length, emb_dim), np.float64)
  table[:, :half] = np.sin(angles)
  table[:, half:2 * half] = np.cos(angles)  # an odd emb_dim leaves the last feature at 0
  return table.astype(np.float32)


def _check_train(train: Any) -> bool:
  if not isinstance(train, bool):
    raise ValueError(f'train must be a Python bool (static under jit), got {train!r}.')
  return train


def _check_inputs(inputs: jax.Array, mask: jax.Array | None, ndim: int, what: str):
  inputs = jnp.asarray(inputs)
  if inputs.ndim != ndim or not jnp.issubdtype(inputs.dtype, jnp.integer):
    raise ValueError(f'{what} model: inputs must be integer token ids of rank {ndim}, got '
                     f'{inputs.dtype} {inputs.shape}.')
  if mask is None:
    mask = jnp.ones(inputs.shape, bool)
  mask = jnp.asarray(mask)
  if mask.shape != inputs.shape:
    raise ValueError(f'{what} model: mask must have the shape of inputs {inputs.shape}, got '
                     f'{mask.shape}.')
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise ValueError(f'{what} model: mask must be bool (True for real tokens) or 0/1 integers, got '
                     f'dtype {mask.dtype}.')
  return inputs, mask != 0


class Encoder(nnx.Module):
  """Token + position embeddings, pre-LayerNorm blocks, final LayerNorm.

  `encode(inputs [b, L], mask [b, L])` returns (states [b, L', emb], mask [b, L']) where L' = L + 1
  with a CLS token prepended (`prepend_cls=True`, id vocab_size at position 0), else L' = L.
  """

  def __init__(self, config: dict[str, Any], attentions: tuple[Attention, ...], *, vocab_size: int,
               max_length: int, prepend_cls: bool, rngs: nnx.Rngs):
    self.prepend_cls = prepend_cls
    self.vocab_size = vocab_size
    self.max_length = max_length
    self.dtype = config['dtype']
    self.positional = config['positional']
    emb_dim = config['emb_dim']
    rows = vocab_size + 1 if prepend_cls else vocab_size
    self.token_embedding = layers.make_param(rngs, nnx.initializers.normal(1.0), (rows, emb_dim),
                                             ('vocab', 'embed'))
    positions = max_length + 1 if prepend_cls else max_length
    if self.positional == 'learned':
      self.position_embedding = layers.make_param(rngs, nnx.initializers.normal(0.02),
                                                  (positions, emb_dim), ('length', 'embed'))
    self.embedding_dropout = layers.make_dropout(config['dropout_rate'], rngs)
    self.blocks = nnx.List([
        layers.Block(config, attention, layer_index=i, rngs=rngs, max_length=positions)
        for i, attention in enumerate(attentions)
    ])
    self.final_norm = layers.LayerNorm(emb_dim, dtype=self.dtype, rngs=rngs)

  def __call__(self, inputs: jax.Array, mask: jax.Array, *, causal: bool,
               train: bool) -> tuple[jax.Array, jax.Array]:
    b, length = inputs.shape
    if length > self.max_length:
      raise ValueError(f'input length {length} exceeds the model max_length {self.max_length}.')
    if self.prepend_cls:
      # Built *like* the first column, so they keep the batch sharding under an explicit mesh.
      cls = jnp.full_like(inputs[:, :1], self.vocab_size)
      inputs = jnp.concatenate([cls, inputs], axis=1)
      mask = jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
    n = inputs.shape[1]
    x = jnp.take(self.token_embedding[...], inputs, axis=0)
    if self.positional == 'learned':
      x = x + self.position_embedding[:n][None]
    else:
      x = x + jnp.asarray(sinusoidal_positions(n, x.shape[-1]))[None]
    x = self.embedding_dropout(x.astype(self.dtype), deterministic=not train)
    for block in self.blocks:
      x = block(x, mask, causal=causal, train=train)
    return self.final_norm(x), mask


def pool(states: jax.Array, mask: jax.Array, pooling: str) -> jax.Array:
  """states [b, n, e], mask [b, n] -> [b, e]: the CLS state (position 0) or the masked mean."""
  if pooling == 'cls':
    return states[:, 0]
  weights = mask.astype(jnp.float32)[..., None]
  total = jnp.sum(states.astype(jnp.float32) * weights, axis=1)
  return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(states.dtype)


class ClassifierHead(nnx.Module):
  """[b, in] -> GELU MLP -> float32 logits [b, num_classes] (the last projection in float32)."""

  def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, *, rngs: nnx.Rngs):
    self.hidden = layers.Dense(in_dim, hidden_dim, names=('embed', 'mlp'), rngs=rngs)
    self.logits = layers.Dense(hidden_dim, num_classes, names=('mlp', 'classes'), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.logits(jax.nn.gelu(self.hidden(x)).astype(jnp.float32))


class Classifier(nnx.Module):
  """kind 'classify': inputs int [b, L], mask bool [b, L] -> logits float32 [b, num_classes]."""

  def __init__(self, config, attentions, *, vocab_size, num_classes, max_length, rngs):
    self.pooling = config['pooling']
    self.encoder = Encoder(config, attentions, vocab_size=vocab_size, max_length=max_length,
                           prepend_cls=self.pooling == 'cls', rngs=rngs)
    self.head = ClassifierHead(config['emb_dim'], config['classifier_dim'], num_classes, rngs=rngs)

  def __call__(self, inputs, mask=None, *, train: bool):
    train = _check_train(train)
    inputs, mask = _check_inputs(inputs, mask, 2, 'classify')
    states, mask = self.encoder(inputs, mask, causal=False, train=train)
    return self.head(pool(states, mask, self.pooling))


class PairClassifier(nnx.Module):
  """kind 'pair' (dual encoder): inputs int [b, 2, L], mask [b, 2, L] -> logits float32 [b, classes].

  One shared encoder embeds both sequences (as one batch of 2b); the pooled u, v are combined as
  [u, v, u * v, u - v] and classified by an MLP.
  """

  def __init__(self, config, attentions, *, vocab_size, num_classes, max_length, rngs):
    self.pooling = config['pooling']
    self.encoder = Encoder(config, attentions, vocab_size=vocab_size, max_length=max_length,
                           prepend_cls=self.pooling == 'cls', rngs=rngs)
    self.head = ClassifierHead(4 * config['emb_dim'], config['classifier_dim'], num_classes,
                               rngs=rngs)

  def __call__(self, inputs, mask=None, *, train: bool):
    train = _check_train(train)
    inputs, mask = _check_inputs(inputs, mask, 3, 'pair')
    b, two, length = inputs.shape
    if two != 2:
      raise ValueError(f'pair model: inputs must be [batch, 2, length], got {inputs.shape}.')
    states, mask = self.encoder(inputs.reshape(2 * b, length), mask.reshape(2 * b, length),
                                causal=False, train=train)
    pooled = pool(states, mask, self.pooling).reshape(b, 2, -1)
    u, v = pooled[:, 0], pooled[:, 1]
    return self.head(jnp.concatenate([u, v, u * v, u - v], axis=-1))


class TokenPredictor(nnx.Module):
  """inputs int [b, L], mask bool [b, L] -> logits float32 [b, L', vocab_size]: the `Encoder` with a
  float32 projection of every state onto the vocabulary.

  L' = L + 1 when the encoder prepends a CLS token (its state comes first), else L. With
  `causal=True` every layer attends causally (state t has seen the tokens up to t), else
  bidirectionally. It serves as the language model (`LanguageModel`) and as the self-pretraining
  model (efficient_attn/models/pretraining.py), whose `encoder` has the task model's parameter paths.
  `what` names the model in input errors.
  """

  def __init__(self, config, attentions, *, vocab_size: int, max_length: int, prepend_cls: bool,
               causal: bool, rngs: nnx.Rngs, what: str = 'pretraining'):
    self.causal = bool(causal)
    self.what = what
    self.encoder = Encoder(config, attentions, vocab_size=vocab_size, max_length=max_length,
                           prepend_cls=prepend_cls, rngs=rngs)
    self.head = layers.Dense(config['emb_dim'], vocab_size, names=('embed', 'vocab'), rngs=rngs)

  def __call__(self, inputs, mask=None, *, train: bool):
    train = _check_train(train)
    inputs, mask = _check_inputs(inputs, mask, 2, self.what)
    states, _ = self.encoder(inputs, mask, causal=self.causal, train=train)
    # The vocabulary projection runs in float32: logits feed a softmax over the whole vocabulary.
    return self.head(states.astype(jnp.float32))


class LanguageModel(TokenPredictor):
  """kind 'lm' (causal decoder): inputs int [b, L], mask [b, L] -> logits float32 [b, L, vocab].

  Every layer attends with causal=True, whatever the variant; logits at position t predict token t+1.
  """

  def __init__(self, config, attentions, *, vocab_size, num_classes, max_length, rngs):
    del num_classes  # equals vocab_size (checked in create_model)
    super().__init__(config, attentions, vocab_size=vocab_size, max_length=max_length,
                     prepend_cls=False, causal=True, rngs=rngs, what='lm')


_MODELS = {'classify': Classifier, 'pair': PairClassifier, 'lm': LanguageModel}


def create_model(model_config, attention_config, *, kind: str, vocab_size: int, num_classes: int,
                 max_length: int, rngs: nnx.Rngs) -> nnx.Module:
  """Builds the model of `kind` ('classify' | 'pair' | 'lm').

  Args:
    model_config: ConfigDict or dict of model options (see `model_config_defaults`); missing fields
      take their defaults, unknown ones raise.
    attention_config: ConfigDict or dict (see `attention_config_defaults`).
    kind: 'classify' -> model(inputs [b, L], mask [b, L], *, train) -> logits [b, num_classes];
      'pair' -> model(inputs [b, 2, L], mask [b, 2, L], *, train) -> logits [b, num_classes];
      'lm' -> model(inputs [b, L], mask [b, L], *, train) -> logits [b, L, vocab_size] (causal).
    vocab_size: token ids must lie in [0, vocab_size), padding included (an id outside the table
      embeds as NaN); with pooling 'cls', id vocab_size is the CLS token.
    num_classes: number of classes; for 'lm' it must equal vocab_size.
    max_length: the longest input length L the model accepts (sizes learned positions).
    rngs: nnx.Rngs with streams 'params', 'dropout' (if dropout_rate > 0) and 'attention' (if a
      layer's variant has random structure); a 'default' stream stands in for missing ones.

  Returns:
    The nnx.Module. Run it under `nnx.jit(..., static_argnames='train')` (or split/merge + jax.jit,
    carrying the updated rng state back out) so that each training step gets fresh keys.
  """
  if kind not in _MODELS:
    raise ValueError(f'Unknown model kind {kind!r}; valid kinds: {", ".join(KINDS)}.')
  for name, value in (('vocab_size', vocab_size), ('num_classes', num_classes),
                      ('max_length', max_length)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if kind == 'lm' and num_classes != vocab_size:
    raise ValueError(f"kind 'lm' predicts tokens: num_classes ({num_classes}) must equal "
                     f'vocab_size ({vocab_size}).')
  if not isinstance(rngs, nnx.Rngs):
    raise ValueError(f'rngs must be an nnx.Rngs, got {type(rngs).__name__}.')
  config = config_lib.resolve_model_config(model_config)
  config['dtype'] = config_lib.DTYPES[config['dtype']]
  attentions = config_lib.resolve_layer_attentions(attention_config, config['num_layers'],
                                                    config['num_heads'])
  return _MODELS[kind](config, attentions, vocab_size=int(vocab_size),
                       num_classes=int(num_classes), max_length=int(max_length), rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """The number of scalar parameters (nnx.Param leaves) in `model`."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
