"""The building blocks of the Transformer: projections, LayerNorm, MLP, self-attention, blocks.

Every parameter is float32 and carries a tuple of logical axis names as `out_sharding` metadata
(the current flax NNX spelling of the old `sharding_names`), e.g. ('embed', 'heads', 'kv'), so a
sharding module can map logical axes to a mesh later with `nnx.get_partition_spec` and logical axis
rules. The annotation is recorded, not applied: `eager_sharding=False`, because at creation time no
mesh (and no rule mapping 'embed' etc. to mesh axes) need exist.

Logical axes: 'vocab' (token table rows / LM classes), 'length' (learned positions), 'embed' (model
width), 'heads', 'kv' (head_dim), 'mlp' (MLP and classifier hidden width), 'classes' (class logits);
the weights of learned attention variants add the names of their `param_axes()` ('attn_projected',
'attn_blocks', 'attn_hidden', 'attn_rank'; rules in sharding.DEFAULT_RULES).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn import sharding
from efficient_attn.attention import sequence_parallel
from efficient_attn.attention.api import Attention
from efficient_attn.attention.dense import dense_attention

Initializer = Callable[..., jax.Array]
LAYER_NORM_EPSILON = 1e-6
# The evaluation key of a layer is fold_in(its 'attention' stream key, EVALUATION_KEY_INDEX);
# training draws fold_in(key, count) with count = 0, 1, 2, ..., which would need 2**32 - 1 draws to
# meet it.
EVALUATION_KEY_INDEX = 2**32 - 1

_LOG = logging.getLogger(__name__)
_WARNED_UNSPLIT: set[tuple[Any, ...]] = set()  # (attention, axis size, reason) already logged


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
               names: tuple[str, ...]) -> nnx.Param:
  """A float32 parameter with logical axis names `names` (one per dimension of `shape`)."""
  if len(names) != len(shape):
    raise ValueError(f'{len(names)} axis names {names} for a parameter of shape {tuple(shape)}.')
  return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), out_sharding=names,
                   eager_sharding=False)


def make_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """Dropout with its own fork of the 'dropout' stream (no stream needed when rate == 0)."""
  if rate == 0:
    return nnx.Dropout(0.0, rngs=None)
  try:
    stream = rngs['dropout']
  except KeyError as e:
    raise ValueError(f'dropout_rate={rate} needs a "dropout" (or "default") stream in rngs, e.g. '
                     'nnx.Rngs(params=0, dropout=1, attention=2).') from e
  return nnx.Dropout(rate, rngs=stream)


class Dense(nnx.Module):
  """x [..., in] -> [..., out] with kernel [in, out] and bias [out]."""

  def __init__(self, in_dim: int, out_dim: int, *, names: tuple[str, str], rngs: nnx.Rngs):
    self.kernel = make_param(rngs, nnx.initializers.xavier_uniform(), (in_dim, out_dim), names)
    self.bias = make_param(rngs, nnx.initializers.zeros_init(), (out_dim,), names[1:])

  def __call__(self, x: jax.Array) -> jax.Array:
    return (jnp.einsum('...i,io->...o', x, self.kernel[...].astype(x.dtype))
            + self.bias[...].astype(x.dtype))


class HeadsProjection(nnx.Module):
  """x [batch, length, embed] -> [batch, length, heads, head_dim]: kernel [embed, heads, kv], bias [heads, kv]."""

  def __init__(self, emb_dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
    self.kernel = make_param(rngs, init, (emb_dim, num_heads, head_dim), ('embed', 'heads', 'kv'))
    self.bias = make_param(rngs, nnx.initializers.zeros_init(), (num_heads, head_dim), ('heads', 'kv'))

  def __call__(self, x: jax.Array) -> jax.Array:
    return (jnp.einsum('ble,ehd->blhd', x, self.kernel[...].astype(x.dtype))
            + self.bias[...].astype(x.dtype))


class OutProjection(nnx.Module):
  """y [batch, length, heads, head_dim] -> [batch, length, embed]: kernel [heads, kv, embed], bias [embed]."""

  def __init__(self, num_heads: int, head_dim: int, emb_dim: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    self.kernel = make_param(rngs, init, (num_heads, head_dim, emb_dim), ('heads', 'kv', 'embed'))
    self.bias = make_param(rngs, nnx.initializers.zeros_init(), (emb_dim,), ('embed',))

  def __call__(self, y: jax.Array) -> jax.Array:
    return (jnp.einsum('blhd,hde->ble', y, self.kernel[...].astype(y.dtype))
            + self.bias[...].astype(y.dtype))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis [embed]; statistics in float32, output in `dtype`."""

  def __init__(self, emb_dim: int, *, dtype: Any, rngs: nnx.Rngs):
    self.scale = make_param(rngs, nnx.initializers.ones_init(), (emb_dim,), ('embed',))
    self.bias = make_param(rngs, nnx.initializers.zeros_init(), (emb_dim,), ('embed',))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPSILON)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Mlp(nnx.Module):
  """[..., embed] -> GELU(x W1 + b1) W2 + b2 -> [..., embed]; W1 [embed, mlp], W2 [mlp, embed]."""

  def __init__(self, emb_dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.wi = Dense(emb_dim, mlp_dim, names=('embed', 'mlp'), rngs=rngs)
    self.wo = Dense(mlp_dim, emb_dim, names=('mlp', 'embed'), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.wo(jax.nn.gelu(self.wi(x)))


def global_positions(positions: Sequence[int], length: int) -> np.ndarray:
  """Static global token positions inside a sequence of `length`, as the longformer variant reads
  them: positions past the sequence are ignored, duplicates removed. int32 [num_global], sorted."""
  kept = {p for p in positions if 0 <= p < length}
  return np.array(sorted(kept), np.int32)


def global_rows_attention(qg: jax.Array, k: jax.Array, v: jax.Array, positions: np.ndarray, *,
                          padding_mask: jax.Array, causal: bool) -> jax.Array:
  """Attention of a few global query rows over every real key, in O(|G| n) memory.

  Args:
    qg: [batch, num_global, heads, head_dim], the queries of the tokens at `positions`.
    k, v: [batch, length, heads, head_dim], keys and values of every token.
    positions: int [num_global], the sequence positions of the rows of `qg` (for `causal`).
    padding_mask: bool [batch, length], True for real tokens.
    causal: if True, the global token at position p sees only keys j <= p.

  Returns:
    [batch, num_global, heads, head_dim] in qg's dtype; zeros for global rows at padded positions.
  """
  visible = padding_mask[:, None, None, :]  # [b, 1, 1, n]
  if causal:
    keys = np.arange(k.shape[1])
    visible = visible & jnp.asarray(keys[None, :] <= positions[:, None])[None, None]  # [b,1,g,n]
  out = dense_attention(qg, k, v, mask=visible)  # scores are [b, h, g, n]: never n x n
  return jnp.where(padding_mask[:, positions][:, :, None, None], out, 0).astype(qg.dtype)


def has_global_tokens(attention: Attention) -> bool:
  """Whether the variant has global tokens: a `global_tokens` option holding sequence positions
  (longformer). Such a layer can recompute its global rows with own projections."""
  return any(f.name == 'global_tokens' for f in dataclasses.fields(type(attention)))


def evaluation_key(stream_key: jax.Array) -> jax.Array:
  """The fixed evaluation key of a layer whose 'attention' stream has key `stream_key` (the layer's
  fork: derived from the run's seed and the layer's place among the layers that draw keys)."""
  return jax.random.fold_in(stream_key, EVALUATION_KEY_INDEX)


def unsplit_reason(attention: Attention, length: int, size: int) -> str | None:
  """Why a layer with `attention` would run without sequence parallelism on a 'sequence' axis of
  `size` > 1 for a sequence of `length` (None: it is split)."""
  if attention.name not in sequence_parallel.SUPPORTED:  # no plan: lsh, the learned variants, ...
    return 'the variant has no sequence-parallel plan'
  if length % size and attention.name == 'bigbird':
    return (f'its random block layout depends on the length, and {length} is not a multiple of '
            f'the sequence axis size {size}')
  return None


def _warn_unsplit(attention: Attention, size: int, reason: str) -> None:
  """One warning line per (attention config, axis size, reason), however many layers and traces."""
  key = (attention, size, reason)
  if key in _WARNED_UNSPLIT:
    return
  _WARNED_UNSPLIT.add(key)
  _LOG.warning("Attention %r runs without sequence parallelism on the mesh's sequence axis of "
               'size %d (%s): every device holds the whole sequence, its memory per device is not '
               'split. Config: %r.', attention.name, size, reason, attention)


class SelfAttention(nnx.Module):
  """Multi-head self-attention through the public attention API, one variant per layer.

  Variants with random structure (`attention.needs_rng`) get a fresh key from this layer's own fork of
  the 'attention' rng stream on every training call, and in evaluation the fixed key
  `evaluation_key(stream key)`: derived from the run's seed (through the stream) and distinct per
  layer, so evaluation is deterministic for a seed.

  Variants with learned weights (`attention.learned`) get them from `attention.init` sized for
  `max_length` tokens (the longest sequence the layer sees, CLS included), as `nnx.Param`s in
  `self.variant_params` with the logical axis names of `attention.param_axes()`, so they train,
  shard, checkpoint and resume like every other weight; each call passes them as `params=`.

  With `global_projections` (variants with global tokens: `has_global_tokens`, i.e. longformer) the
  rows of the global tokens are recomputed with their own query/key/value projections (initialised
  as copies of the local ones) over every real token.
  """

  def __init__(self, emb_dim: int, num_heads: int, attention: Attention, *, layer_index: int,
               global_projections: bool, rngs: nnx.Rngs, max_length: int | None = None):
    head_dim = emb_dim // num_heads
    self.attention = attention
    self.layer_index = layer_index
    self.query = HeadsProjection(emb_dim, num_heads, head_dim, rngs=rngs)
    self.key = HeadsProjection(emb_dim, num_heads, head_dim, rngs=rngs)
    self.value = HeadsProjection(emb_dim, num_heads, head_dim, rngs=rngs)
    self.out = OutProjection(num_heads, head_dim, emb_dim, rngs=rngs)
    if attention.learned:
      if max_length is None:
        raise ValueError(f'Attention {attention.name!r} has learned weights sized by the sequence '
                         'length: SelfAttention needs max_length= (the longest sequence it sees).')
      values = attention.init(rngs.params(), length=int(max_length), heads=num_heads,
                              head_dim=head_dim)
      axes = attention.param_axes()
      self.variant_params = nnx.Dict({
          name: nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=tuple(axes[name]),
                          eager_sharding=False)
          for name, value in values.items()})
    self.global_tokens: tuple[int, ...] = ()
    if global_projections and has_global_tokens(attention):
      self.global_tokens = tuple(int(p) for p in getattr(attention, 'global_tokens', ()))
      self.global_query = nnx.clone(self.query)
      self.global_key = nnx.clone(self.key)
      self.global_value = nnx.clone(self.value)
    self.rng = nnx.data(None)
    if attention.needs_rng:
      try:
        self.rng = rngs['attention'].fork()
      except KeyError as e:
        raise ValueError(f'Attention {attention.name!r} has random structure: create the model with '
                         "an 'attention' (or 'default') stream in rngs, e.g. nnx.Rngs(params=0, "
                         'dropout=1, attention=2).') from e

  @property
  def has_global_projections(self) -> bool:
    return hasattr(self, 'global_query')

  def learned_params(self) -> dict[str, jax.Array] | None:
    """The variant's weights as arrays ({name: array}), None for variants without weights."""
    if not hasattr(self, 'variant_params'):
      return None
    return {name: param[...] for name, param in self.variant_params.items()}

  def attention_key(self, train: bool) -> jax.Array | None:
    """A fresh key from this layer's stream in training, `evaluation_key(stream key)` in
    evaluation."""
    if not self.attention.needs_rng:
      return None
    if train:
      return self.rng()
    return evaluation_key(self.rng.key[...])

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, padding_mask: jax.Array, *,
             causal: bool, rng: jax.Array | None) -> jax.Array:
    """The attention call on [batch, length, heads, head_dim]; split over the mesh's 'sequence' axis
    (`sequence_parallel_attention`) when it is > 1 and sequence parallelism is on (see
    `sharding.use_rules`). The length is padded (masked) to a multiple of the axis size. Variants
    without a sequence-parallel plan (lsh, the learned ones), and bigbird when its length would need
    that padding (its random layout depends on the length), run unsplit, with one warning."""
    size = sharding.sequence_axis_size()
    n = q.shape[1]
    params = self.learned_params()
    reason = unsplit_reason(self.attention, n, size) if size > 1 else None
    if size == 1 or reason is not None:
      if reason is not None:
        _warn_unsplit(self.attention, size, reason)
      if params is None:
        return self.attention(q, k, v, padding_mask=padding_mask, causal=causal, rng=rng)
      return self.attention(q, k, v, padding_mask=padding_mask, causal=causal, rng=rng,
                            params=params)
    pad = -n % size
    if pad:
      widths = ((0, 0), (0, pad), (0, 0), (0, 0))
      q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
      padding_mask = jnp.pad(padding_mask, ((0, 0), (0, pad)))
    y = sequence_parallel.sequence_parallel_attention(self.attention, q, k, v,
                                                      padding_mask=padding_mask, causal=causal,
                                                      rng=rng, axis='sequence')
    return y[:, :n]

  def __call__(self, x: jax.Array, padding_mask: jax.Array, *, causal: bool,
               train: bool) -> jax.Array:
    """x [batch, length, embed], padding_mask bool [batch, length] -> [batch, length, embed]."""
    # Logical-name constraints (a no-op without a mesh) keep q/k/v split by batch, length and heads.
    q, k, v = (sharding.constrain(p(x), sharding.ACTIVATION_BLHD)
               for p in (self.query, self.key, self.value))
    y = sharding.constrain(self.attend(q, k, v, padding_mask, causal=causal,
                                       rng=self.attention_key(train)), sharding.ACTIVATION_BLHD)
    if self.has_global_projections:
      positions = global_positions(self.global_tokens, x.shape[1])
      if positions.size:
        qg = self.global_query(x[:, positions])
        yg = global_rows_attention(qg, self.global_key(x), self.global_value(x), positions,
                                   padding_mask=padding_mask, causal=causal)
        y = y.at[:, positions].set(yg.astype(y.dtype))
    return sharding.constrain(self.out(y), sharding.ACTIVATION_BLE)


class Block(nnx.Module):
  """Pre-LayerNorm block: x + drop(attn(LN(x))), then x + drop(mlp(LN(x))). [b, n, e] -> [b, n, e]."""

  def __init__(self, config: dict[str, Any], attention: Attention, *, layer_index: int,
               rngs: nnx.Rngs, max_length: int | None = None):
    dtype = config['dtype']
    self.attention_norm = LayerNorm(config['emb_dim'], dtype=dtype, rngs=rngs)
    self.attention = SelfAttention(config['emb_dim'], config['num_heads'], attention,
                                   layer_index=layer_index,
                                   global_projections=config['longformer_global_projections'],
                                   rngs=rngs, max_length=max_length)
    self.mlp_norm = LayerNorm(config['emb_dim'], dtype=dtype, rngs=rngs)
    self.mlp = Mlp(config['emb_dim'], config['mlp_dim'], rngs=rngs)
    self.dropout = make_dropout(config['dropout_rate'], rngs)

  def __call__(self, x: jax.Array, padding_mask: jax.Array, *, causal: bool,
               train: bool) -> jax.Array:
    # The residual stream (for block 0: the embeddings) split by batch and length on the mesh.
    x = sharding.constrain(x, sharding.ACTIVATION_BLE)
    h = self.attention(self.attention_norm(x), padding_mask, causal=causal, train=train)
    x = x + self.dropout(h, deterministic=not train)
    h = self.mlp(self.mlp_norm(x))
    return x + self.dropout(h, deterministic=not train)
