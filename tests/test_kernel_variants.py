"""block_local, linear, performer and nystrom: each equals its own `reference`, keeps the contract.

float32, relative error <= 1e-5 (max abs error over max abs of the reference), forward and the
gradients of a random cotangent, causal (where defined) and bidirectional, padded sequences, lengths
1 to 1000. Then: padding invariance under huge/NaN/inf padding, performer converging to softmax
attention with more features, features following the key, memory linear in the length, bfloat16
finiteness.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import api
from efficient_attn.attention import nystrom as nystrom_module
from test_attention import rel_err  # the same tolerance rule as the other attention tests

TOL = 1e-5
NAMES = ('block_local', 'linear', 'performer', 'nystrom')


def make(name, **changes):
  return ea.make_attention(name, **{**api.variant_class(name).small_options(2), **changes})


def causal_modes(name):
  return (False, True) if api.variant_class(name).supports_causal else (False,)


def inputs(seed, b, n, h, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (b, n, h, d), dtype) for key in keys)


def padding(n):
  """Batch element 1 loses its last n // 3 tokens (nothing at n = 1, 2)."""
  return jnp.arange(n)[None, :] < jnp.asarray([n, n - n // 3])[:, None]


@functools.lru_cache(maxsize=None)
def fast_and_reference(attn, causal):
  """Two jitted (q, k, v, pm, w) -> (out, vjp(w)) functions: the fast path and the reference."""

  def with_vjp(f):
    def run(q, k, v, pm, w):
      out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, padding_mask=pm, causal=causal,
                                           rng=jax.random.key(3)), q, k, v)
      return out, vjp(w)
    return jax.jit(run)

  return with_vjp(attn), with_vjp(attn.reference)


CASES = [(name, causal, n)
         for name in NAMES for causal in causal_modes(name) for n in (1, 7, 37, 100)]
CASES += [('block_local', True, 1000), ('linear', True, 1000), ('performer', True, 1000),
          ('nystrom', False, 1000)]


@pytest.mark.parametrize('name, causal, n', CASES)
def test_matches_reference_forward_and_grads(name, causal, n):
  h = 1 if n >= 1000 else 2
  attn = make(name)
  q, k, v = inputs(n, 2, n, h, 8)
  pm = padding(n)
  w = jax.random.normal(jax.random.key(1), q.shape)
  fast, ref = fast_and_reference(attn, causal)
  out_fast, grads_fast = fast(q, k, v, pm, w)
  out_ref, grads_ref = ref(q, k, v, pm, w)
  assert out_fast.shape == q.shape and out_fast.dtype == q.dtype
  assert rel_err(out_fast, out_ref) <= TOL
  for i, (g_fast, g_ref) in enumerate(zip(grads_fast, grads_ref)):
    if n == 1 and i < 2:  # one key: the output is v, so dq and dk are zero (up to rounding)
      assert float(jnp.max(jnp.abs(g_fast))) <= 1e-6 and float(jnp.max(jnp.abs(g_ref))) <= 1e-6
    else:
      assert rel_err(g_fast, g_ref) <= TOL
  assert not np.any(np.asarray(out_fast[1, n - n // 3:]))  # zeros at padded queries


@pytest.mark.parametrize('options', [dict(kernel='relu'), dict(redraw=False)])
@pytest.mark.parametrize('causal', [False, True])
def test_performer_other_options_match_reference(options, causal):
  attn = make('performer', **options)
  q, k, v = inputs(0, 2, 37, 2, 8)
  w = jax.random.normal(jax.random.key(1), q.shape)
  fast, ref = fast_and_reference(attn, causal)
  (out_fast, grads_fast), (out_ref, grads_ref) = (f(q, k, v, padding(37), w) for f in (fast, ref))
  for x, y in zip((out_fast,) + grads_fast, (out_ref,) + grads_ref):
    assert rel_err(x, y) <= TOL


@pytest.mark.parametrize('name, causal', [(n, c) for n in NAMES for c in causal_modes(n)])
def test_padding_contents_change_nothing(name, causal):
  b, n, h, d = 2, 30, 2, 8
  attn = make(name)
  q, k, v = inputs(2, b, n, h, d)
  pm = jnp.stack([jnp.arange(n) < 21, jnp.zeros(n, bool)])  # row 1 entirely padding
  w = jax.random.normal(jax.random.key(4), q.shape)
  fast, _ = fast_and_reference(attn, causal)
  out, grads = fast(q, k, v, pm, w)
  assert float(jnp.max(jnp.abs(out[0, 21:]))) == 0.0 and float(jnp.max(jnp.abs(out[1]))) == 0.0
  real = pm[:, :, None, None]
  for fill in (1e30, -1e30, jnp.nan, jnp.inf):
    spoil = lambda x: jnp.where(real, x, fill)
    out2, grads2 = fast(spoil(q), spoil(k), spoil(v), pm, w)
    assert np.array_equal(np.asarray(out2), np.asarray(out)), fill
    for g, g2 in zip(grads, grads2):
      assert bool(jnp.all(jnp.isfinite(g2))), fill
      assert rel_err(jnp.where(real, g2, 0), jnp.where(real, g, 0)) <= TOL


def test_block_local_equals_dense_attention_under_its_mask():
  n, bs = 45, 8
  attn = ea.make_attention('block_local', block_size=bs)
  mask = np.asarray(attn.dense_mask(n, heads=2))
  want = np.array([[i // bs == j // bs for j in range(n)] for i in range(n)])
  assert mask.shape == (1, n, n) and (mask[0] == want).all()
  assert (np.asarray(attn.dense_mask(n, causal=True))[0] == (want & np.tri(n, dtype=bool))).all()
  q, k, v = inputs(5, 2, n, 2, 8)
  pm = padding(n)
  for causal in (False, True):
    m = jnp.asarray(attn.dense_mask(n, causal=causal))[None] & pm[:, None, None, :]
    dense = ea.dense_attention(q, k, v, mask=m) * pm[:, :, None, None]
    assert rel_err(attn(q, k, v, padding_mask=pm, causal=causal), dense) <= TOL
  # block_size >= length: one chunk, i.e. full attention.
  whole = ea.make_attention('block_local', block_size=64)(q, k, v, padding_mask=pm)
  assert rel_err(whole, ea.make_attention('full')(q, k, v, padding_mask=pm)) <= TOL


def test_performer_approaches_softmax_attention_and_follows_the_key():
  q, k, v = inputs(6, 1, 64, 2, 16)
  # Scores of std ~0.5: the positive features' variance grows as exp(|q + k|^2 / sqrt(d)), so with
  # unit-normal q, k at d = 16 a few thousand features would still be noisy.
  q, k = 0.5 * q, 0.5 * k
  exact = ea.dense_attention(q, k, v)

  def error(features):
    attn = ea.make_attention('performer', num_features=features)
    run = jax.jit(lambda rng: attn(q, k, v, rng=rng))
    return np.mean([rel_err(run(jax.random.key(s)), exact) for s in range(4)])

  few, many = error(64), error(1024)
  assert many < 0.5 * few, (few, many)
  attn = make('performer')
  phi = jax.jit(lambda rng: attn.feature_map(k, rng=rng, is_query=False))
  a, b = phi(jax.random.key(0)), phi(jax.random.key(1))
  assert a.shape == (1, 64, 2, 16) and bool(jnp.all(a >= 0))
  assert np.array_equal(a, phi(jax.random.key(0))) and not np.allclose(a, b)
  fixed = ea.make_attention('performer', redraw=False, num_features=16)
  assert np.array_equal(fixed.feature_map(k, rng=None, is_query=False),
                        fixed.feature_map(k, rng=jax.random.key(1), is_query=False))
  w = attn.projection(jax.random.key(0), 2, 8)  # 16 features = two orthogonal blocks of 8 rows
  for block in (w[:, :8], w[:, 8:]):
    unit = block / jnp.linalg.norm(block, axis=-1, keepdims=True)
    gram = jnp.einsum('hid,hjd->hij', unit, unit)
    assert float(jnp.max(jnp.abs(gram - jnp.eye(8)))) < 1e-5


def test_performer_orthogonal_features_are_qr_with_a_positive_r_diagonal():
  from efficient_attn.attention import kernelized  # pylint: disable=g-import-not-at-top
  g = jax.random.normal(jax.random.key(3), (2, 3, 16, 16), jnp.float32)
  q = kernelized.orthonormal_columns(g)
  qr_q, qr_r = np.linalg.qr(np.asarray(g, np.float64))
  expected = qr_q * np.sign(np.diagonal(qr_r, axis1=-2, axis2=-1))[..., None, :]
  assert rel_err(q, expected) < 1e-5
  eye = np.einsum('...ki,...kj->...ij', np.asarray(q, np.float64), np.asarray(q, np.float64))
  assert np.abs(eye - np.eye(16)).max() < 1e-5


def test_performer_training_step_has_no_lapack_call():
  """Several LAPACK QR calls in one CPU program (one per layer) deadlocked a 4-layer Performer's
  training step; the features are orthogonalised with matmuls instead."""
  attn = ea.make_attention('performer', num_features=32)
  q = jnp.ones((1, 8, 2, 16))

  def loss(q, key):
    return sum(jnp.sum(attn(q, q, q, rng=jax.random.fold_in(key, i))) for i in range(3))

  hlo = jax.jit(jax.grad(loss)).lower(q, jax.random.key(0)).as_text()
  assert 'custom_call' not in hlo and 'lapack' not in hlo.lower()


def test_linear_feature_map_is_elu_plus_one():
  attn = ea.make_attention('linear')
  x = jnp.linspace(-3, 3, 24).reshape(1, 3, 2, 4)
  want = np.where(np.asarray(x) > 0, np.asarray(x) + 1, np.exp(np.asarray(x)))
  assert rel_err(attn.feature_map(x, rng=None, is_query=True), want) <= TOL


def test_nystrom_with_a_landmark_per_token_is_softmax_attention():
  """m >= real tokens: each real token is a landmark, F A^+ B = A A^+ A = A (pinv converged)."""
  n, h, d = 12, 2, 8
  q, k, v = (0.5 * x for x in inputs(8, 2, n, h, d))  # well-conditioned softmax matrices
  pm = padding(n)
  attn = ea.make_attention('nystrom', num_landmarks=16, pinv_iters=40)
  exact = ea.dense_attention(q, k, v, mask=pm[:, None, None, :]) * pm[:, :, None, None]
  assert rel_err(attn(q, k, v, padding_mask=pm), exact) <= 1e-4
  a = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, 8, 8)), axis=-1)
  assert rel_err(nystrom_module.iterative_pinv(a, 40), jnp.linalg.pinv(a)) <= 1e-4


def test_nystrom_landmarks_cover_the_real_tokens_only():
  real = jnp.asarray([[True] * 7 + [False] * 3, [True, False] * 5])
  x = jnp.arange(10, dtype=jnp.float32)[None, :, None, None] * jnp.ones((2, 1, 1, 1))
  means, valid = nystrom_module.segment_landmarks(x, real, 4)
  assert valid.tolist() == [[True] * 4, [True] * 4]
  # 7 real tokens in 4 segments: ranks {0,1} {2,3} {4,5} {6}; row 1: tokens {0,2} {4} {6} {8}.
  assert np.allclose(means[0, :, 0, 0], [0.5, 2.5, 4.5, 6])
  assert np.allclose(means[1, :, 0, 0], [1, 4, 6, 8])
  _, valid = nystrom_module.segment_landmarks(x, real.at[0, 2:].set(False), 4)
  # 2 real tokens: segments 0 * 4 // 2 and 1 * 4 // 2.
  assert valid[0].tolist() == [True, False, True, False]


@pytest.mark.parametrize('name', NAMES)
def test_jit_vmap_and_checkpoint(name):
  attn = make(name)
  traces = []

  @jax.jit
  def f(q, k, v, rng):
    traces.append(1)
    return attn(q, k, v, rng=rng)

  q, k, v = inputs(0, 2, 24, 2, 8)
  out1 = f(q, k, v, jax.random.key(0))
  out2 = f(*inputs(1, 2, 24, 2, 8), jax.random.key(1))
  assert len(traces) == 1 and not np.allclose(out1, out2)
  key = jax.random.key(0)
  per_example = jax.jit(jax.vmap(lambda q, k, v: attn(q[None], k[None], v[None], rng=key)[0]))
  assert rel_err(per_example(q, k, v), attn(q, k, v, rng=key)) <= TOL
  loss = lambda q: jnp.sum(jnp.sin(attn(q, k, v, rng=key)))
  assert rel_err(jax.jit(jax.grad(jax.checkpoint(loss)))(q), jax.jit(jax.grad(loss))(q)) <= TOL


@functools.lru_cache(maxsize=None)
def compiled_temp_bytes(name, causal, n, h=2, d=32):
  cls = api.variant_class(name)
  attn = ea.make_attention(name, **cls.preset(128 if name == 'block_local' else 512))
  spec = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v, causal=causal, rng=jax.random.key(0)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name, causal', [(n, c) for n in NAMES for c in causal_modes(n)
                                          if n != 'block_local' or not c])
def test_memory_grows_linearly(name, causal):
  small = compiled_temp_bytes(name, causal, 4096)
  large = compiled_temp_bytes(name, causal, 8192)
  assert large / small <= 2.3, (small, large)
  full = compiled_temp_bytes('full', False, 8192)
  assert large <= full / 8, (large, full)


@pytest.mark.parametrize('causal', [False, True])
def test_performer_bfloat16_long_sequence_stays_finite(causal):
  n = 4096
  attn = make('performer', chunk_size=128)
  q, k, v = (3 * x for x in inputs(9, 1, n, 2, 16, jnp.bfloat16))  # large logits
  loss = lambda q, k, v: jnp.sum(attn(q, k, v, causal=causal, rng=jax.random.key(0))
                                 .astype(jnp.float32) ** 2)
  out = jax.jit(lambda q, k, v: attn(q, k, v, causal=causal, rng=jax.random.key(0)))(q, k, v)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32)))) > 0
  for g in grads:
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


@pytest.mark.parametrize('name, options, match', [
    ('block_local', dict(block_size=0), 'block_size'),
    ('linear', dict(chunk_size=0), 'chunk_size'),
    ('performer', dict(num_features=0), 'num_features'),
    ('performer', dict(kernel='gauss'), "'softmax', 'relu'"),
    ('performer', dict(redraw='yes'), 'redraw'),
    ('performer', dict(implementation='pallas'), 'pallas'),
    ('nystrom', dict(num_landmarks=-1), 'num_landmarks'),
    ('nystrom', dict(pinv_iters=0), 'pinv_iters'),
    ('nystrom', dict(conv_kernel=33), 'valid options: num_landmarks'),
])
def test_bad_options_raise(name, options, match):
  with pytest.raises(ValueError, match=match):
    ea.make_attention(name, **options)


def test_bad_calls_raise():
  q, k, v = inputs(0, 1, 8, 2, 4)
  with pytest.raises(ValueError, match='bidirectional only'):
    ea.make_attention('nystrom')(q, k, v, causal=True)
  with pytest.raises(ValueError, match='rng'):
    ea.make_attention('performer')(q, k, v)
  out = ea.make_attention('performer', redraw=False)(q, k, v)  # a fixed draw needs no key
  assert bool(jnp.all(jnp.isfinite(out)))
