"""Tests of the `lsh` (Reformer) attention against its exact dense equivalent, `dense_bias`.

Compiling dominates the time of these tests on CPU, so most of them reuse a few jitted functions at one
shape ([2, 13, 2, 8], bucket_size 4, 3 rounds), with the padding mask and the rng key as traced inputs.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient_attn.attention import lsh
from efficient_attn.attention.api import make_attention
from efficient_attn.attention.dense import MASK_VALUE, dense_attention

_ATTN = lsh.LSHAttention(bucket_size=4, num_hashes=3)
_SHAPE = dict(b=2, n=13, h=2, d=8)  # 4 chunks of 4, the last one 3/4 internal padding


def _inputs(seed, b, n, h, d, dtype=jnp.float32, pad_fraction=0.0):
  """q, k, v [b, n, h, d] and a padding mask [b, n] with about `pad_fraction` padded (position 0 real).

  Drawn with NumPy: eager jax.random ops would compile once per new shape.
  """
  gen = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(gen.standard_normal((b, n, h, d)), dtype) for _ in range(3))
  pm = gen.uniform(size=(b, n)) >= pad_fraction
  pm[:, 0] = True
  return q, k, v, jnp.asarray(pm)


def _rel_err(got, want):
  """max |got - want| / max |want|, on a reference that must be non-trivial (not all ~zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = np.max(np.abs(want))
  assert scale > 1e-3, f'trivial reference (max |want| = {scale})'
  return np.max(np.abs(got - want)) / scale


def _weights(shape):
  return jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compare(attn, causal, q, k, v, pm, rng, weights):
  """(lsh output, dense output, lsh grads, dense grads) of the read-out sum(sin(out) * weights).

  The dense side is `dense_attention` with `attn.dense_bias`; the read-out is non-linear so that every
  output matters to the gradients.
  """

  def lsh_out(q, k, v):
    return attn(q, k, v, causal=causal, rng=rng, padding_mask=pm)

  def dense_out(q, k, v):
    bias = attn.dense_bias(q, k, causal=causal, rng=rng, padding_mask=pm)
    return dense_attention(q, k, v, bias=bias)

  results = []
  for fn in (lsh_out, dense_out):
    out, pullback = jax.vjp(fn, q, k, v)
    results.append((out, pullback((jnp.cos(out.astype(jnp.float32)) * weights).astype(out.dtype))))
  (out, grads), (ref, ref_grads) = results
  return out, ref, grads, ref_grads


_dense_bias = jax.jit(lambda attn, q, k, causal, rng, pm: attn.dense_bias(
    q, k, causal=causal, rng=rng, padding_mask=pm), static_argnums=(0, 3))


def _check_matches_dense(attn, causal, q, k, v, pm, rng):
  """Asserts lsh == dense_attention(bias=dense_bias) in output and gradients; returns (out, grads)."""
  out, ref, grads, ref_grads = _compare(attn, causal, q, k, v, pm, rng, _weights(q.shape))
  real = np.asarray(pm)
  assert _rel_err(np.asarray(out)[real], np.asarray(ref)[real]) <= 1e-5
  assert np.all(np.asarray(out)[~real] == 0)
  for name, g, w in zip('qkv', grads, ref_grads):
    assert np.all(np.isfinite(g)), name
    assert _rel_err(g, w) <= 1e-5, name
  return out, grads


# (length, bucket_size, causal), each padded and unpadded: an odd length over 4 chunks (the last one mostly
# internal padding), shorter than one bucket, and two chunks (the wrap-around then points at the other).
@pytest.mark.parametrize('n,bucket_size,causal', [
    (13, 4, False),
    (13, 4, True),
    (7, 8, True),
    (8, 4, False),
])
def test_output_and_grads_match_dense_bias(n, bucket_size, causal):
  attn = lsh.LSHAttention(bucket_size=bucket_size, num_hashes=3)
  q, k, v, pm = _inputs(n, b=2, n=n, h=2, d=8, pad_fraction=0.3)
  assert not np.all(pm), 'the padded case must pad something'
  rng = jax.random.key(100 + n)
  _check_matches_dense(attn, causal, q, k, v, pm, rng)
  _check_matches_dense(attn, causal, q, k, v, jnp.asarray(np.ones(pm.shape, bool)), rng)


def test_dense_bias_counts_rounds_and_masks():
  q, k, _, pm = _inputs(0, **_SHAPE, pad_fraction=0.3)
  bias = np.asarray(_dense_bias(_ATTN, q, k, True, jax.random.key(3), pm))
  assert bias.shape == (2, 2, 13, 13) and bias.dtype == np.float32
  visible = bias > MASK_VALUE / 2
  counts = np.round(np.exp(np.where(visible, bias, 0.0))).astype(int)
  np.testing.assert_allclose(np.where(visible, bias, 0.0), np.where(visible, np.log(counts), 0.0),
                             rtol=0, atol=1e-6)
  assert counts[visible].min() >= 1 and counts[visible].max() <= 3
  assert np.any(counts[visible] > 1) and np.any(counts[visible] < 3)
  assert np.all(bias[~visible] == MASK_VALUE)
  assert not np.any(np.triu(visible, k=1))  # causal
  real = np.asarray(pm)[:, None, :]
  assert not np.any(visible & ~real[..., None, :])  # padded keys
  assert not np.any(visible & ~real[..., :, None])  # padded queries' rows
  assert np.all(np.any(visible, -1)[np.broadcast_to(real, visible.shape[:3])])  # real rows see something
  # Causal position 0 can only see itself, in every round.
  np.testing.assert_allclose(bias[..., 0, 0], math.log(3), rtol=1e-6)


def test_pattern_when_all_keys_share_a_direction():
  # Keys that are positive multiples of one vector share a bucket in every round, so the sort keeps position
  # order and the chunks are contiguous blocks: an independent check of hash + sort + chunk + look-back.
  b, n, h, d = _SHAPE.values()
  direction = np.random.default_rng(0).standard_normal((b, 1, h, d))
  k = jnp.asarray(direction * (1.0 + np.arange(n))[None, :, None, None], jnp.float32)
  block = np.arange(n) // 4
  chunks = block[-1] + 1
  near = (block[:, None] == block[None, :]) | (block[None, :] == (block[:, None] - 1) % chunks)
  for causal in (False, True):
    visible = near & ~np.eye(n, dtype=bool)
    if causal:
      visible &= np.tril(np.ones((n, n), bool))
    visible |= np.eye(n, dtype=bool) & ~visible.any(-1, keepdims=True)
    want = np.where(visible, math.log(3), MASK_VALUE)
    got = np.asarray(_dense_bias(_ATTN, k, k, causal, jax.random.key(5), jnp.ones((b, n), bool)))
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-6)


def test_hashing_is_angular_lsh_in_both_code_paths():
  # bucket_size 2 with 64 buckets over 16 chunks makes `_hash` go through its chunked (lax.map) path.
  b, h, r, n, d, nb, bs = 2, 3, 2, 32, 8, 64, 2
  gen = np.random.default_rng(0)
  k = jnp.asarray(gen.standard_normal((b, h, n, d)), jnp.float32)
  rotations = jnp.asarray(gen.standard_normal((h, r, d, nb // 2)), jnp.float32)
  real = np.ones((b, n), bool)
  real[1, 5] = False
  xr = np.einsum('bhnd,hrdk->bhrnk', np.asarray(k, np.float64), np.asarray(rotations, np.float64))
  want = np.argmax(np.concatenate([xr, -xr], -1), -1)
  want[1, :, :, 5] = nb
  chunked = jax.jit(lsh._hash, static_argnums=3)(k, real, rotations, bs)
  whole = jax.jit(lsh._hash, static_argnums=3)(k, real, rotations, n)  # one chunk: one einsum
  np.testing.assert_array_equal(chunked, want)
  np.testing.assert_array_equal(whole, want)
  assert len(np.unique(want)) > 8  # buckets are actually spread


def test_padding_invariance():
  q, k, v, pm = _inputs(1, **_SHAPE, pad_fraction=0.3)
  real = np.array(pm)
  real[0, 5:8] = False  # a run of padding in the middle too
  pm = jnp.asarray(real)
  rng = jax.random.key(9)
  junk = np.where(np.arange(13)[None, :, None, None] % 2 == 0, np.nan, 1e4)
  spoil = lambda x: jnp.asarray(np.where(real[:, :, None, None], x, junk), jnp.float32)
  for causal in (False, True):
    clean, clean_grads = _check_matches_dense(_ATTN, causal, q, k, v, pm, rng)
    dirty, _, dirty_grads, _ = _compare(_ATTN, causal, spoil(q), spoil(k), spoil(v), pm, rng,
                                        _weights(q.shape))
    np.testing.assert_array_equal(clean, dirty)
    for g, dirty_g in zip(clean_grads, dirty_grads):
      np.testing.assert_array_equal(g, dirty_g)
      assert np.all(np.asarray(dirty_g)[~real] == 0)


def test_padded_tokens_sort_after_every_real_one():
  # 13 real tokens, seen three ways at one rotation draw (16 slots, 4 chunks, 4 buckets each time): length 13
  # (internally padded to 16), length 16 with the last 3 padded by the user, and length 16 with 3 padded in
  # the middle. Padded tokens sort last whatever their keys, so the real tokens' sorted order, chunks and
  # (without causality) pattern are the same in all three.
  q, k, _, _ = _inputs(10, **_SHAPE)
  junk = np.random.default_rng(11).standard_normal((2, 3, 2, 8))
  rng = jax.random.key(4)
  want = np.asarray(_dense_bias(_ATTN, q, k, False, rng, jnp.asarray(np.ones((2, 13), bool))))

  trailing = lambda x: jnp.asarray(np.concatenate([x, junk], 1), jnp.float32)
  pm = jnp.asarray(np.broadcast_to(np.arange(16) < 13, (2, 16)))
  got = np.asarray(_dense_bias(_ATTN, trailing(q), trailing(k), False, rng, pm))
  np.testing.assert_array_equal(got[..., :13, :13], want)

  middle = lambda x: jnp.asarray(np.concatenate([x[:, :5], junk, x[:, 5:]], 1), jnp.float32)
  real = np.r_[0:5, 8:16]
  pm = jnp.asarray(np.broadcast_to(np.isin(np.arange(16), real), (2, 16)))
  got = np.asarray(_dense_bias(_ATTN, middle(q), middle(k), False, rng, pm))
  np.testing.assert_array_equal(got[..., real, :][..., real], want)


def test_queries_that_see_nothing_give_zeros_and_finite_grads():
  q, k, v, _ = _inputs(2, **_SHAPE)
  pm = jnp.asarray(np.arange(2)[:, None] == np.zeros((1, 13)))  # the second sequence is all padding
  rng = jax.random.key(0)
  out, grads = _check_matches_dense(_ATTN, False, q, k, v, pm, rng)
  assert np.all(np.asarray(out[1]) == 0)
  for g in grads:
    assert np.all(np.asarray(g[1]) == 0)
  ref = _compare(_ATTN, False, q, k, v, pm, rng, _weights(q.shape))[1]
  assert np.all(np.asarray(ref[1]) == 0)


def test_same_rng_reproduces_and_new_rng_changes_the_pattern():
  q, k, v, pm = _inputs(3, **_SHAPE)
  w = _weights(q.shape)
  run = lambda key: _compare(_ATTN, False, q, k, v, pm, jax.random.key(key), w)[0]
  bias = lambda key: np.asarray(_dense_bias(_ATTN, q, k, False, jax.random.key(key), pm))
  np.testing.assert_array_equal(run(1), run(1))
  np.testing.assert_array_equal(bias(1), bias(1))
  assert np.mean(bias(1) != bias(2)) > 0.05
  assert _rel_err(run(2), run(1)) > 1e-3


def test_missing_rng_raises():
  q, k, v, _ = _inputs(0, b=1, n=5, h=1, d=4)
  with pytest.raises(ValueError, match='rng'):
    _ATTN(q, k, v)
  with pytest.raises(ValueError, match='rng'):
    _ATTN.dense_bias(q, k)


@pytest.mark.parametrize('options,option', [
    ({'bucket_size': 0}, 'bucket_size'),
    ({'bucket_size': -4}, 'bucket_size'),
    ({'bucket_size': 2.5}, 'bucket_size'),
    ({'bucket_size': True}, 'bucket_size'),
    ({'num_hashes': 0}, 'num_hashes'),
    ({'num_hashes': '2'}, 'num_hashes'),
    ({'num_buckets': 3}, 'num_buckets'),
    ({'num_buckets': 0}, 'num_buckets'),
    ({'num_buckets': True}, 'num_buckets'),
    ({'num_buckets': 4.0}, 'num_buckets'),
    ({'hashes': 2}, 'hashes'),
])
def test_bad_options_raise(options, option):
  with pytest.raises(ValueError, match=option):
    make_attention('lsh', **options)


def test_bad_inputs_raise():
  q, k, v, _ = _inputs(0, b=1, n=5, h=1, d=4)
  with pytest.raises(ValueError, match='padding_mask'):
    _ATTN.dense_bias(q, k, rng=jax.random.key(0), padding_mask=jnp.ones((1, 4), bool))
  with pytest.raises(ValueError, match='same shape'):
    _ATTN(q, k[:, :4], v[:, :4], rng=jax.random.key(0))


def test_bfloat16_close_to_float32():
  q, k, v, pm = _inputs(4, **_SHAPE, dtype=jnp.bfloat16, pad_fraction=0.2)
  rng, w = jax.random.key(0), _weights(q.shape)
  out, _, grads, _ = _compare(_ATTN, True, q, k, v, pm, rng, w)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  # The same (bf16-representable) values in float32 hash identically, so only the arithmetic differs.
  f32 = lambda x: x.astype(jnp.float32)
  ref, _, ref_grads, _ = _compare(_ATTN, True, f32(q), f32(k), f32(v), pm, rng, w)
  assert _rel_err(out, ref) <= 1e-2
  for g, ref_g in zip(grads, ref_grads):
    assert _rel_err(g, ref_g) <= 2e-2  # gradients pass through more bf16 roundings than the output


def test_jit_does_not_retrace():
  traces = []

  @jax.jit
  def f(q, k, v, pm, rng):
    traces.append(None)  # runs only while tracing
    return _ATTN(q, k, v, causal=True, rng=rng, padding_mask=pm)

  q, k, v, pm = _inputs(5, **_SHAPE, pad_fraction=0.2)
  q2, k2, v2, pm2 = _inputs(6, **_SHAPE, pad_fraction=0.2)
  first = f(q, k, v, pm, jax.random.key(0))
  second = f(q2, k2, v2, pm2, jax.random.key(1))
  assert len(traces) == 1
  want = _compare(_ATTN, True, q2, k2, v2, pm2, jax.random.key(1), _weights(q.shape))[0]
  np.testing.assert_allclose(second, want, rtol=1e-6, atol=1e-6)
  assert _rel_err(second, first) > 1e-3


def test_vmap_and_checkpoint_agree():
  (q, k, v, pm), (q2, k2, v2, pm2) = _inputs(7, **_SHAPE, pad_fraction=0.2), _inputs(8, **_SHAPE)
  rng, w = jax.random.key(3), _weights(q.shape)

  @jax.jit
  def vmapped_and_checkpointed(qs, ks, vs, pms):
    outs = jax.vmap(lambda q, k, v, pm: _ATTN(q, k, v, rng=rng, padding_mask=pm))(qs, ks, vs, pms)
    loss = lambda q, k, v: jnp.sum(jnp.sin(_ATTN(q, k, v, rng=rng, padding_mask=pms[0])) * w)
    return outs, jax.grad(jax.checkpoint(loss), (0, 1, 2))(qs[0], ks[0], vs[0])

  stack = lambda a, b: jnp.asarray(np.stack([a, b]))
  outs, grads = vmapped_and_checkpointed(stack(q, q2), stack(k, k2), stack(v, v2), stack(pm, pm2))
  for i, args in enumerate(((q, k, v, pm), (q2, k2, v2, pm2))):
    want = _compare(_ATTN, False, *args, rng, w)[0]
    np.testing.assert_allclose(outs[i], want, rtol=1e-6, atol=1e-6)
  want_grads = _compare(_ATTN, False, q, k, v, pm, rng, w)[2]
  for g, want_g in zip(grads, want_grads):
    np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-6)


def test_backward_has_no_scatter():
  # The unsort is a gather with a custom VJP: autodiff of a plain gather would emit scatter-adds.
  x = jnp.ones((1, 13, 2, 8))
  loss = lambda q, k, v: jnp.sum(_ATTN(q, k, v, causal=True, rng=jax.random.key(0)))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).as_text()
  assert 'gather' in hlo and 'scatter' not in hlo


def _grad_temp_bytes(attn, n):
  x = jax.ShapeDtypeStruct((1, n, 1, 16), jnp.float32)
  loss = lambda q, k, v, rng: jnp.sum(attn(q, k, v, causal=True, rng=rng))
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x, jax.random.key(0)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_grad_memory_is_linear_in_length():
  attn = lsh.LSHAttention(bucket_size=64, num_hashes=2)
  small, large = _grad_temp_bytes(attn, 2048), _grad_temp_bytes(attn, 4096)
  assert small < 2048 * 2048 * 4  # less than one [n, n] float32 array
  assert large <= 2.2 * small, (small, large)
