"""The attention API at its boundary: padded contents never matter, bad inputs are ValueErrors.

- Whatever padded positions hold (NaN, inf, 1e30), outputs and gradients at real positions equal the
  clean run's and everything is finite, for every registered variant (the registry is iterated, so
  variants added later are covered), on the fast path, on `reference` and on the Pallas engine.
- bigbird with `num_random_blocks=0` (window and global blocks only) works and equals dense.
- Invalid inputs raise a ValueError naming the argument; valid array-likes are accepted.
- Forward-mode autodiff: where it is unsupported (custom_vjp engines), JAX's message is what users see.

Tiny shapes; one compile per variant (poison values are new inputs of the same jitted function).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention.api import variant_class

TOL = 1e-5
B, N, H, D = 2, 12, 2, 8
# Row 0: a padded tail; row 1: a hole in the middle and a padded tail.
PM = np.ones((B, N), bool)
PM[0, 9:] = False
PM[1, 3:5] = False
PM[1, 8:] = False
POISONS = (np.nan, np.inf, -np.inf, 1e30)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  assert scale > 1e-3, 'comparison on (near) zeros proves nothing'
  return float(np.max(np.abs(x - ref)) / scale)


def inputs(seed, shape=(B, N, H, D)):
  gen = np.random.default_rng(seed)
  return tuple(jnp.asarray(gen.standard_normal(shape), jnp.float32) for _ in range(4))


def build(name, implementation='auto'):
  attn = ea.make_attention(name, implementation=implementation,
                           **variant_class(name).small_options(H))
  params = attn.init(jax.random.key(3), length=N, heads=H, head_dim=D) if attn.learned else None
  return attn, params


@functools.lru_cache(maxsize=None)
def padded_runner(name, implementation, use_reference):
  """jit(q, k, v, w -> (out, (dq, dk, dv))) of the variant (or its reference) under PM."""
  attn, params = build(name, implementation)
  fn = attn.reference if use_reference else attn
  rng = jax.random.key(0)

  def run(q, k, v, w):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, padding_mask=jnp.asarray(PM), rng=rng,
                                          params=params), q, k, v)
    return out, vjp(w)

  return jax.jit(run)


def poisoned(x, value):
  return jnp.where(jnp.asarray(PM)[:, :, None, None], x, jnp.float32(value))


def check_padding_never_matters(run, poisons=POISONS):
  q, k, v, w = inputs(0)
  clean_out, clean_grads = run(q, k, v, w)
  real = PM
  for value in poisons:
    out, grads = run(poisoned(q, value), poisoned(k, value), poisoned(v, value), w)
    out = np.asarray(out)
    assert np.all(np.isfinite(out)), value
    assert np.all(out[~real] == 0), value
    assert rel_err(out[real], np.asarray(clean_out)[real]) <= TOL, value
    for arg, g, g_clean in zip('qkv', grads, clean_grads):
      g = np.asarray(g)
      assert np.all(np.isfinite(g)), (value, arg)
      assert np.all(g[~real] == 0), (value, arg)  # the output does not depend on padded entries
      g_clean = np.asarray(g_clean)[real]
      if np.all(g_clean == 0):  # an input the variant does not read (synthesizer's q and k)
        assert np.all(g[real] == 0), (value, arg)
      else:
        assert rel_err(g[real], g_clean) <= TOL, (value, arg)


@pytest.mark.parametrize('use_reference', [False, True], ids=['fast', 'reference'])
@pytest.mark.parametrize('name', ea.ATTENTION_NAMES)
def test_padded_contents_never_reach_real_outputs_or_gradients(name, use_reference):
  check_padding_never_matters(padded_runner(name, 'auto', use_reference))


# Interpret mode is slow: the Pallas engine is checked on two variants (the band and the per-head
# random layout), forward and backward, with the worst poison.
@pytest.mark.parametrize('name', ['local', 'bigbird'])
def test_padded_contents_never_matter_on_the_pallas_engine(name):
  check_padding_never_matters(padded_runner(name, 'pallas', False), poisons=(np.nan,))


# --------------------------------------------------------------------------------------------------
# bigbird without random blocks
# --------------------------------------------------------------------------------------------------


def test_bigbird_without_random_blocks_is_window_plus_global_and_needs_no_key():
  bs, n = 4, 30
  attn = ea.make_attention('bigbird', block_size=bs, num_random_blocks=0, global_blocks=(0, -1))
  nb = -(-n // bs)
  a, b = np.arange(n)[:, None] // bs, np.arange(n)[None, :] // bs
  want = (np.abs(a - b) <= 1) | np.isin(a, (0, nb - 1)) | np.isin(b, (0, nb - 1))
  for causal in (False, True):
    got = np.asarray(attn.dense_mask(n, causal=causal, heads=2))
    assert got.shape == (2, n, n)
    lower = np.arange(n)[None, :] <= np.arange(n)[:, None]
    assert (got == (want & (lower if causal else True))[None]).all(), causal
  assert (np.asarray(attn.dense_mask(n, rng=jax.random.key(1), heads=2)) == want).all()
  q, k, v, w = inputs(1, (2, n, 2, 8))
  pm = jnp.arange(n)[None, :] < jnp.asarray([n, n - 7])[:, None]

  @jax.jit
  def both(q, k, v):
    results = []
    for fn in (attn, attn.reference):
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, padding_mask=pm, causal=True), q, k, v)
      results.append((out,) + vjp(w))
    return results

  fast, ref = both(q, k, v)
  for x, y in zip(fast, ref):
    assert rel_err(x, y) <= TOL


SEQUENCE_PARALLEL_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
import efficient_attn as ea
from efficient_attn.attention.sequence_parallel import sequence_parallel_attention
mesh = jax.make_mesh((2,), ('sequence',), axis_types=(jax.sharding.AxisType.Explicit,))
gen = np.random.default_rng(0)
q, k, v, ct = (gen.standard_normal((2, 40, 2, 8)).astype(np.float32) for _ in range(4))
mask = np.ones((2, 40), bool)
mask[1, 31:] = False
attn = ea.make_attention('bigbird', block_size=8, num_random_blocks=0, global_blocks=(0,))
def with_grads(fn):
  def run(q, k, v, ct):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(run)
for causal in (False, True):
  want = with_grads(lambda q, k, v: attn(q, k, v, padding_mask=mask, causal=causal))(q, k, v, ct)
  got = with_grads(lambda q, k, v: sequence_parallel_attention(
      attn, q, k, v, padding_mask=mask, causal=causal, mesh=mesh))(q, k, v, ct)
  print(max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want)))
# NaN and inf at padded positions change nothing at real ones under sequence parallelism either.
local = ea.make_attention('local', window=3, block_size=8)
dirty = [np.where(mask[:, :, None, None], x, bad) for x, bad in ((q, np.nan), (k, np.inf), (v, np.nan))]
want = with_grads(lambda q, k, v: local(q, k, v, padding_mask=mask, causal=True))(q, k, v, ct)
got = with_grads(lambda q, k, v: sequence_parallel_attention(
    local, q, k, v, padding_mask=mask, causal=True, mesh=mesh))(*dirty, ct)
real = mask[:, :, None, None]
assert all(np.all(np.isfinite(np.where(real, g, 0))) for g in got), 'non-finite at real positions'
print(max(float(np.max(np.abs(np.where(real, g - w, 0))) / np.max(np.abs(w)))
          for g, w in zip(got, want)))
'''


def test_bigbird_without_random_blocks_under_sequence_parallelism():
  """Two fake devices (subprocess): the sequence-parallel plan equals the one-device call, for
  bigbird without random blocks and for local with NaN/inf at the padded positions."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2')
  done = subprocess.run([sys.executable, '-c', SEQUENCE_PARALLEL_SCRIPT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  errors = [float(x) for x in done.stdout.split()]
  assert len(errors) == 3 and max(errors) <= TOL, errors


# --------------------------------------------------------------------------------------------------
# Invalid and valid call arguments
# --------------------------------------------------------------------------------------------------

_Q, _K, _V, _ = inputs(2, (1, 8, 2, 8))
_LOCAL = ea.make_attention('local', window=2, block_size=8)
_BIGBIRD = ea.make_attention('bigbird', block_size=4, num_random_blocks=1)


@pytest.mark.parametrize('call, match', [
    (lambda: _LOCAL(_Q.astype(jnp.int32), _K, _V), 'q must be float32'),
    (lambda: _LOCAL(_Q, _K.astype(jnp.int32), _V.astype(jnp.int32)), 'k must be float32'),
    (lambda: _LOCAL(_Q, _K, _V.astype(jnp.complex64)), 'v must be float32'),
    (lambda: _LOCAL(_Q, _K, _V, causal='no'), 'causal must be True or False'),
    (lambda: _LOCAL(_Q, _K, _V, causal=1), 'causal must be True or False'),
    (lambda: _LOCAL(_Q, _K, _V, causal=None), 'causal must be True or False'),
    (lambda: _LOCAL(_Q, _K, _V, padding_mask=jnp.full((1, 8), 0.5)), 'padding_mask must be bool'),
    (lambda: _LOCAL(_Q, _K, _V, padding_mask=[[0.0] * 8]), 'padding_mask must be bool'),
    (lambda: _LOCAL(_Q, _K, _V, padding_mask=np.full((1, 8), 2)), 'padding_mask must hold only 0'),
    (lambda: _LOCAL(_Q, _K, _V, padding_mask=[[1] * 7]), r'padding_mask must be \[batch, length\]'),
    (lambda: jax.jit(lambda m: _LOCAL(_Q, _K, _V, padding_mask=m))(jnp.ones((1, 8))),
     'padding_mask must be bool'),
    (lambda: _BIGBIRD(_Q, _K, _V, rng=0), 'rng must be one jax.random key'),
    (lambda: _BIGBIRD(_Q, _K, _V, rng=jax.random.split(jax.random.key(0))), 'rng must be one'),
    (lambda: _LOCAL(_Q, _K, _V, rng=np.float32(1)), 'rng must be one jax.random key'),
    (lambda: _BIGBIRD.dense_mask(16, rng=7, heads=2), 'rng must be one jax.random key'),
    (lambda: _LOCAL(_Q[:0], _K[:0], _V[:0]), 'batch must be >= 1'),
    (lambda: _LOCAL(_Q[..., :0], _K[..., :0], _V[..., :0]), 'head_dim must be >= 1'),
    (lambda: _LOCAL(_Q[:, :, :0], _K[:, :, :0], _V[:, :, :0]), 'heads must be >= 1'),
    (lambda: _LOCAL.dense_mask(-3), 'length must be an integer >= 1'),
    (lambda: _LOCAL.dense_mask(0), 'length must be an integer >= 1'),
    (lambda: _LOCAL.dense_mask(4.0), 'length must be an integer >= 1'),
    (lambda: _LOCAL.dense_mask(4, heads=0), 'heads must be an integer >= 1'),
    (lambda: _LOCAL.dense_mask(4, causal='yes'), 'causal must be True or False'),
    (lambda: _LOCAL.dense_bias(_Q[:, :0], _K[:, :0]), 'length must be >= 1'),
    (lambda: ea.make_attention('lsh').dense_bias(_Q[:, :0], _K[:, :0], rng=jax.random.key(0)),
     'length must be >= 1'),
    (lambda: ea.make_attention('lsh').dense_bias(_Q, _K, rng=jax.random.key(0), causal='no'),
     'causal must be True or False'),
])
def test_invalid_inputs_raise_value_errors_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bool_like_inputs_are_accepted_and_mean_the_same():
  pm = np.arange(8)[None] < 6
  want = _LOCAL(_Q, _K, _V, padding_mask=pm, causal=True)
  for mask in (pm.astype(np.int32), pm.astype(int).tolist(), pm.tolist()):
    assert np.array_equal(_LOCAL(_Q, _K, _V, padding_mask=mask, causal=True), want)
  for causal in (np.bool_(True), np.array(True)):
    assert np.array_equal(_LOCAL(_Q, _K, _V, padding_mask=pm, causal=causal), want)
  # Under jit an integer mask is traced: only its dtype can be checked, and it reads as mask != 0.
  traced = jax.jit(lambda m: _LOCAL(_Q, _K, _V, padding_mask=m, causal=True))
  assert np.array_equal(traced(jnp.asarray(pm, jnp.int32)), want)
  assert _LOCAL.dense_mask(np.int64(5)).shape == (1, 5, 5)
  # A legacy uint32 key gives the same pattern as the new-style key it wraps.
  mask = jax.jit(lambda rng: _BIGBIRD.dense_mask(16, rng=rng, heads=2))
  assert np.array_equal(mask(jax.random.PRNGKey(4)), mask(jax.random.key(4)))


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_are_accepted(dtype):
  out = _LOCAL(*(x.astype(dtype) for x in (_Q, _K, _V)))
  assert out.dtype == dtype
  assert rel_err(out.astype(jnp.float32), _LOCAL(_Q, _K, _V)) <= 1e-2


# --------------------------------------------------------------------------------------------------
# Forward-mode autodiff
# --------------------------------------------------------------------------------------------------

# The block engine (and lsh's permutation) define their gradients with jax.custom_vjp, which JAX
# cannot push tangents through: jax.jvp (and jacfwd, hessians) of these variants raise JAX's TypeError.
# Variants written in plain jnp (`full` on the xla path, the kernel variants, ...) support it.
CUSTOM_VJP = ('chunked', 'local', 'dilated', 'longformer', 'strided', 'fixed', 'bigbird', 'lsh')
JVP_MESSAGE = "can't apply forward-mode autodiff (jvp) to a custom_vjp function"


@pytest.mark.parametrize('name', ea.ATTENTION_NAMES)
def test_forward_mode_works_or_raises_jax_custom_vjp_error(name):
  """jvp either agrees with the vjp (<w, J t> == <J^T w, t>) or raises JAX's custom_vjp TypeError."""
  attn, params = build(name)
  q, k, v, t = inputs(5, (1, N, H, D))
  w = inputs(6, (1, N, H, D))[0]
  f = lambda q: attn(q, k, v, causal=attn.supports_causal, rng=jax.random.key(0), params=params)

  @jax.jit
  def both_sides(q, t, w):
    _, tangent = jax.jvp(f, (q,), (t,))
    _, vjp = jax.vjp(f, q)
    return jnp.sum(w * tangent), jnp.sum(vjp(w)[0] * t)

  try:
    lhs, rhs = both_sides(q, t, w)
  except TypeError as e:
    assert JVP_MESSAGE in str(e), str(e)
    return
  assert name not in CUSTOM_VJP
  assert abs(float(lhs) - float(rhs)) <= 1e-5 * max(abs(float(lhs)), 1.0)

