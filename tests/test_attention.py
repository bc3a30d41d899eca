"""Every attention variant equals `dense_attention` under its own dense_mask / dense_bias.

float32, relative error <= 1e-5 (max abs error over max abs value of the reference, never on zeros),
forward and gradients, odd lengths, lengths below one block, batch and heads > 1, padding, causal.
Variants without a mask or bias (kernel and learned ones) are held to their own `reference`. Every
registered variant is tested with the settings of its class (`small_options`, `preset`, `needs_rng`,
`supports_causal`, `learned`, `quadratic`, `supports_pallas`), so a new one is picked up here.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import blocks
from efficient_attn.attention import engine
from efficient_attn.attention import patterns
from efficient_attn.attention.api import variant_class

TOL = 1e-5
NAMES = ea.ATTENTION_NAMES
# Linear in memory by design: all but the quadratic ones (full, synthesizer).
SPARSE = tuple(n for n in NAMES if not variant_class(n).quadratic)
# Run by the block engine (so by the fused kernel too).
ENGINE_NAMES = tuple(n for n in NAMES if variant_class(n).supports_pallas)


def small_options(name: str, heads: int) -> dict:
  """Options scaled for sequences of tens of tokens, so every pattern is really sparse there."""
  return variant_class(name).small_options(heads)


def has_dense_mask(attn) -> bool:
  """Whether the variant defines its pattern token by token (`dense_mask`)."""
  return type(attn).dense_mask is not ea.Attention.dense_mask


def has_dense_bias(attn) -> bool:
  """Whether it defines an additive bias of its own (patterns that depend on the data, like lsh)."""
  return type(attn).dense_bias is not ea.Attention.dense_bias


def causal_modes(name: str) -> tuple[bool, ...]:
  return (False, True) if variant_class(name).supports_causal else (False,)


def make(name: str, heads: int, length: int, head_dim: int):
  """(attention with the class's small options, its weights or None)."""
  attn = ea.make_attention(name, **small_options(name, heads))
  params = (attn.init(jax.random.key(11), length=length, heads=heads, head_dim=head_dim)
            if attn.learned else None)
  return attn, params


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  assert scale > 1e-3, 'comparison on (near) zeros proves nothing'
  return float(np.max(np.abs(x - ref)) / scale)


def inputs(seed, b, n, h, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(key, (b, n, h, d), dtype) for key in (kq, kk, kv))


def reference_fn(attn, q, k, causal, rng, pm, params=None):
  """The dense equivalent of `attn`: dense_attention with the variant's own mask or bias.

  Variants with neither (kernel and learned ones) are compared with their own `reference`.
  """
  heads = q.shape[2]
  key_ok = pm[:, None, None, :]
  if has_dense_mask(attn):
    mask = attn.dense_mask(q.shape[1], causal=causal, rng=rng, heads=heads)
    return lambda q, k, v: ea.dense_attention(q, k, v, mask=mask[None] & key_ok) * pm[:, :, None,
                                                                                        None]
  if has_dense_bias(attn):
    bias = attn.dense_bias(q, k, causal=causal, rng=rng, padding_mask=pm)
    return lambda q, k, v: ea.dense_attention(q, k, v, bias=bias, mask=key_ok) * pm[:, :, None, None]
  return lambda q, k, v: attn.reference(q, k, v, padding_mask=pm, causal=causal, rng=rng,
                                        params=params)


def is_dense(mask, causal: bool) -> bool:
  """Whether a dense mask [heads or 1, n, n] shows every key (every earlier one when causal)."""
  n = mask.shape[-1]
  return bool(jnp.all(mask | ~jnp.tril(jnp.ones((n, n), bool)))) if causal else bool(jnp.all(mask))


CASES = [  # (batch, length, heads, head_dim): odd lengths, shorter than one block, batch/heads > 1.
    (1, 5, 1, 8),
    (2, 99, 4, 8),
]


def value_and_grads(f, w):
  """jit(q, k, v -> (f(q, k, v), d<f, w>/d(q, k, v))): one compile for the forward and backward."""

  def run(q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(w)

  return jax.jit(run)


@pytest.mark.parametrize('name, causal', [(n, c) for n in NAMES for c in causal_modes(n)])
@pytest.mark.parametrize('case', CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_matches_dense_forward_and_grad(name, causal, case):
  b, n, h, d = case
  attn, params = make(name, h, n, d)
  q, k, v = inputs(n + h, b, n, h, d)
  # Padding: batch element 1 (if any) loses its last 3 tokens.
  pm = jnp.arange(n)[None, :] < jnp.asarray([n, n - 3][:b])[:, None]
  rng = jax.random.key(7)
  fast = lambda q, k, v: attn(q, k, v, padding_mask=pm, causal=causal, rng=rng, params=params)
  ref = reference_fn(attn, q, k, causal, rng, pm, params)
  if n >= 99 and has_dense_mask(attn):  # really sparse, or the test proves little
    mask = attn.dense_mask(n, causal=causal, rng=rng, heads=h)
    if is_dense(mask, causal):
      # Only full attention (dense whatever its options: full, chunked) may be dense here: at about
      # 32 keys per query over 1024 tokens every pattern is sparse.
      wide = ea.make_attention(name, **variant_class(name).preset(32))
      assert is_dense(wide.dense_mask(1024, causal=causal, rng=rng, heads=h), causal), (
          f'{name}: small_options leave the pattern dense at n={n}')
  w = jax.random.normal(jax.random.key(1), q.shape)
  out_fast, grads_fast = value_and_grads(fast, w)(q, k, v)
  out_ref, grads_ref = value_and_grads(ref, w)(q, k, v)
  assert rel_err(out_fast, out_ref) <= TOL
  for g_fast, g_ref in zip(grads_fast, grads_ref):
    if attn.learned and not np.any(np.asarray(g_ref)):
      # A learned variant may ignore an input by design (the synthesizer never reads the keys):
      # then its gradient is exactly zero on both paths.
      assert not np.any(np.asarray(g_fast))
      continue
    assert rel_err(g_fast, g_ref) <= TOL


@pytest.mark.parametrize('window', [0, 3, 11])
@pytest.mark.parametrize('causal', [False, True])
def test_local_equals_jax_local_window(window, causal):
  q, k, v = inputs(0, 2, 45, 2, 8)
  ours = ea.make_attention('local', window=window, block_size=8)(q, k, v, causal=causal)
  size = (window, 0) if causal else (window, window)
  theirs = jax.nn.dot_product_attention(q, k, v, local_window_size=size, is_causal=causal)
  assert rel_err(ours, theirs) <= TOL


def test_dense_masks_follow_the_contract_table():
  n, heads = 23, 2
  table = {
      'full': lambda i, j, h: True,
      'chunked': lambda i, j, h: True,
      'local': lambda i, j, h: abs(i - j) <= 3,
      'dilated': lambda i, j, h: (i - j) % (1, 3)[h] == 0 and abs(i - j) <= 2 * (1, 3)[h],
      'longformer': lambda i, j, h: abs(i - j) <= 2 or i in (0, 17) or j in (0, 17),
      'strided': lambda i, j, h: abs(i - j) <= 4 or (i - j) % 4 == 0,
      'fixed': lambda i, j, h: i // 5 == j // 5 or j % 5 >= 5 - 2,
  }
  opts = {'local': dict(window=3), 'dilated': dict(window=2, dilation=(1, 3)),
          'longformer': dict(window=2, global_tokens=(0, 17, 40)), 'strided': dict(stride=4),
          'fixed': dict(stride=5, summary=2)}
  for name, visible in table.items():
    attn = ea.make_attention(name, **opts.get(name, {}))
    for causal in (False, True):
      got = np.asarray(attn.dense_mask(n, causal=causal, heads=heads))
      for h in range(heads):
        want = np.array([[visible(i, j, h) and (j <= i or not causal) for j in range(n)]
                         for i in range(n)])
        assert (got[min(h, got.shape[0] - 1)] == want).all(), (name, causal, h)


def test_bigbird_mask_follows_the_contract():
  bs, n, heads, r = 4, 42, 2, 2
  attn = ea.make_attention('bigbird', block_size=bs, num_random_blocks=r, global_blocks=(0, -1))
  rng = jax.random.key(5)
  mask = np.asarray(attn.dense_mask(n, rng=rng, heads=heads))
  nb = -(-n // bs)
  glob = {0, nb - 1}
  for h in range(heads):
    blocks = mask[h, ::bs, ::bs]  # block-level view
    for a in range(nb):
      if a in glob:
        assert blocks[a].all()
        continue
      fixed = {b for b in range(nb) if abs(a - b) <= 1 or b in glob}
      extra = {b for b in range(nb) if blocks[a, b]} - fixed
      assert all(blocks[a, b] for b in fixed)
      assert len(extra) == r  # distinct, disjoint from window and global blocks
    for i, j in itertools.product(range(n), repeat=2):  # constant on blocks
      assert mask[h, i, j] == blocks[i // bs, j // bs]
  # Random blocks differ between heads, between keys; the same key reproduces them.
  assert not (mask[0] == mask[1]).all()
  other = np.asarray(attn.dense_mask(n, rng=jax.random.key(6), heads=heads))
  assert not (other == mask).all()
  assert (np.asarray(attn.dense_mask(n, rng=jax.random.key(5), heads=heads)) == mask).all()


@pytest.mark.parametrize('name', NAMES)
def test_padding_invariance_and_fully_padded_rows(name):
  b, n, h, d = 2, 30, 2, 8
  attn, params = make(name, h, n, d)
  q, k, v = inputs(2, b, n, h, d)
  pm = jnp.stack([jnp.arange(n) < 21, jnp.zeros(n, bool)])  # row 1 entirely padding
  rng = jax.random.key(0)
  run = value_and_grads(lambda q, k, v: attn(q, k, v, padding_mask=pm, rng=rng, params=params), q)
  out, grads = run(q, k, v)
  noise = inputs(9, b, n, h, d)
  swap = lambda x, y: jnp.where(pm[:, :, None, None], x, 100 * y)
  out2, _ = run(swap(q, noise[0]), swap(k, noise[1]), swap(v, noise[2]))
  assert rel_err(out2[0, :21], out[0, :21]) <= TOL
  assert float(jnp.max(jnp.abs(out[0, 21:]))) == 0.0 and float(jnp.max(jnp.abs(out[1]))) == 0.0
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(g[1]))) == 0.0


def test_engine_row_that_sees_nothing_gives_zeros_and_finite_grads():
  b, h, nb, block, d = 1, 2, 3, 4, 8
  q, k, v = (x.reshape(b, h, nb, block, d) for x in inputs(4, b, h * nb * block, 1, d))
  pos = blocks.block_positions(nb, block)
  idx, valid = blocks.all_blocks_layout(nb, nb)
  kvalid = jnp.ones((b, nb, block), bool)

  def run(q, k, v):
    out, lse = engine.block_sparse_attention(q, k, v, kvalid=kvalid, qpos=pos, kpos=pos, idx=idx,
                                             valid=valid, visible=patterns.MinGap(8))
    return out, lse

  out, lse = run(q, k, v)
  rows_seeing_nothing = np.abs(np.arange(nb * block)[:, None] - np.arange(nb * block)) >= 8
  empty = ~rows_seeing_nothing.any(-1)
  assert empty.any() and (~empty).any()
  flat = np.asarray(out).reshape(b, h, -1, d)
  assert np.all(flat[:, :, empty] == 0)
  assert np.all(np.asarray(lse).reshape(b, h, -1)[:, :, empty] == ea.MASK_VALUE)
  grads = jax.grad(lambda *x: jnp.sum(run(*x)[0] ** 2) + jnp.sum(jnp.where(
      jnp.asarray(~empty).reshape(nb, block), run(*x)[1], 0.0)), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize('static,causal', [(blocks.Shifts((-2, 0, 1)), False),
                                           (blocks.band_shifts(1, 0), True),
                                           (blocks.all_blocks_layout, True)])
def test_static_layouts_equal_their_index_form(static, causal):
  """The static layouts (shifted slices, shared slices) give what the same layout does by index:
  values, lse and grads, with padded keys, a predicate, causal and uneven query/key block counts."""
  b, h, block, d = 2, 2, 4, 8
  nq, nk = 5, 4
  q = inputs(7, b, h * nq * block, 1, d)[0].reshape(b, h, nq, block, d)
  k, v = (x.reshape(b, h, nk, block, d) for x in inputs(8, b, h * nk * block, 1, d)[1:])
  qpos, kpos = blocks.block_positions(nq, block), blocks.block_positions(nk, block)
  kvalid = jnp.asarray(np.random.RandomState(0).rand(b, nk, block) > 0.2)
  idx, valid = static(nq, nk)
  common = dict(kvalid=kvalid, qpos=qpos, kpos=kpos, visible=patterns.Band(9), causal=causal)

  def loss(fn):
    def f(q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out * jnp.cos(out)) + jnp.sum(jnp.where(lse > -1e20, jnp.sin(lse), 0.0))
    return f

  for step in (None, 1):
    fast = lambda q, k, v: engine.block_sparse_attention(q, k, v, layout=static, step=step, **common)
    slow = lambda q, k, v: engine.block_sparse_attention(q, k, v, idx=idx, valid=valid, **common)
    for x, ref in zip(fast(q, k, v), slow(q, k, v)):
      assert rel_err(x, ref) <= TOL
    grads = jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, jax.grad(loss(slow), argnums=(0, 1, 2))(q, k, v)):
      assert rel_err(g, g_ref) <= TOL


def test_banded_variants_use_no_gather_or_scatter():
  """local (and dilated, the band of strided, block_local) read their key blocks as slices: the
  compiled forward+backward holds no gather and no scatter (the index path's cost on CPU)."""
  q = inputs(0, 1, 64, 2, 8)[0]
  for name, options in (('local', dict(window=5, block_size=8)), ('block_local', dict(block_size=8))):
    attn = ea.make_attention(name, **options)
    hlo = jax.jit(jax.grad(lambda q: jnp.sum(attn(q, q, q)))).lower(q).compile().as_text()
    assert ' gather(' not in hlo and ' scatter(' not in hlo, name


def test_static_layout_arguments_are_checked():
  x = jnp.zeros((1, 1, 2, 4, 8))
  pos = blocks.block_positions(2, 4)
  common = dict(kvalid=jnp.ones((1, 2, 4), bool), qpos=pos, kpos=pos)
  idx, valid = blocks.all_blocks_layout(2, 2)
  with pytest.raises(ValueError, match='either idx and valid, or a static layout'):
    engine.block_sparse_attention(x, x, x, idx=idx, valid=valid, layout=blocks.all_blocks_layout,
                                  **common)
  with pytest.raises(ValueError, match='must divide'):
    engine.block_sparse_attention(x, x, x, layout=blocks.band_shifts(1, 1), step=2, **common)
  with pytest.raises(ValueError, match='distinct'):
    blocks.Shifts((0, 1, 0))


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_close_to_float32(name):
  b, n, h, d = 1, 64, 2, 16
  attn, params = make(name, h, n, d)
  q, k, v = inputs(3, b, n, h, d)
  rng = jax.random.key(2)
  causal = attn.supports_causal
  run = jax.jit(lambda q, k, v: attn(q, k, v, causal=causal, rng=rng, params=params))
  f32 = run(q, k, v)
  bf16 = run(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert bf16.dtype == jnp.bfloat16
  assert rel_err(bf16.astype(jnp.float32), f32) <= 1e-2 * 3  # bf16 has 8 bits of mantissa


@pytest.mark.parametrize('name', NAMES)
def test_jit_does_not_retrace_and_vmap_checkpoint_work(name):
  h = 2
  attn, params = make(name, h, 24, 8)
  traces = []

  @jax.jit
  def f(q, k, v, rng):
    traces.append(1)
    return attn(q, k, v, causal=attn.supports_causal, rng=rng, params=params)

  q, k, v = inputs(0, 2, 24, h, 8)
  out1 = f(q, k, v, jax.random.key(0))
  out2 = f(*inputs(1, 2, 24, h, 8), jax.random.key(1))
  assert len(traces) == 1 and not np.allclose(out1, out2)
  key = jax.random.key(0)
  per_example = jax.jit(jax.vmap(
      lambda q, k, v: attn(q[None], k[None], v[None], rng=key, params=params)[0]))
  batched = jax.jit(lambda q, k, v: attn(q, k, v, rng=key, params=params))
  assert rel_err(per_example(q, k, v), batched(q, k, v)) <= TOL
  loss = lambda q: jnp.sum(jnp.sin(attn(q, k, v, rng=key, params=params)))
  ckpt = jax.jit(jax.grad(jax.checkpoint(loss)))
  plain = jax.jit(jax.grad(loss))
  assert rel_err(ckpt(q), plain(q)) <= TOL


@pytest.mark.parametrize('name', [n for n in NAMES if variant_class(n).needs_rng])
def test_random_patterns_follow_the_key(name):
  attn, params = make(name, 2, 64, 8)
  q, k, v = inputs(0, 1, 64, 2, 8)
  run = jax.jit(lambda q, k, v, rng: attn(q, k, v, rng=rng, params=params))
  a = run(q, k, v, jax.random.key(0))
  assert np.array_equal(a, run(q, k, v, jax.random.key(0)))
  assert not np.allclose(a, run(q, k, v, jax.random.key(1)))
  with pytest.raises(ValueError, match='rng'):
    attn(q, k, v)


@pytest.mark.parametrize('name, options, match', [
    ('nope', {}, 'valid names'),
    ('local', dict(window=-1), 'window'),
    ('local', dict(block_size=0), 'block_size'),
    ('local', dict(block_size=2.5), 'block_size'),
    ('local', dict(windw=3), 'valid options: window'),
    ('strided', dict(stride=0), 'stride'),
    ('fixed', dict(stride=4, summary=5), 'summary'),
    ('dilated', dict(dilation=0), 'dilation'),
    ('dilated', dict(dilation=()), 'dilation'),
    ('bigbird', dict(block_size=-4), 'block_size'),
    ('longformer', dict(global_tokens=5), 'global_tokens'),
    ('chunked', dict(key_chunk=0), 'key_chunk'),
])
def test_bad_options_raise(name, options, match):
  with pytest.raises(ValueError, match=match):
    ea.make_attention(name, **options)


def test_bad_inputs_raise():
  q, k, v = inputs(0, 1, 8, 3, 4)
  with pytest.raises(ValueError, match='not divisible'):
    ea.make_attention('dilated', dilation=(1, 2))(q, k, v)
  with pytest.raises(ValueError, match='same shape'):
    ea.make_attention('local')(q, k[:, :5], v[:, :5])
  with pytest.raises(ValueError, match='k and v'):
    ea.make_attention('local')(q, k, v[..., :2])
  with pytest.raises(ValueError, match='padding_mask'):
    ea.make_attention('local')(q, k, v, padding_mask=jnp.ones((1, 7), bool))
  with pytest.raises(ValueError, match=r'\[batch, length, heads, head_dim\]'):
    ea.make_attention('full')(q[0], k[0], v[0])


# Options that see a few hundred keys per query at n = 2048 (memory test): each class's preset.
MEMORY_KEYS = 256


@functools.lru_cache(maxsize=None)
def compiled_temp_bytes(name, options, n, h=2, d=32):
  attn = ea.make_attention(name, **dict(options))
  params = attn.init(jax.random.key(0), length=n, heads=h, head_dim=d) if attn.learned else None
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
  loss = lambda q, k, v, params: jnp.sum(attn(q, k, v, causal=False, rng=jax.random.key(0),
                                              params=params))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return grad.lower(q, q, q, params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name', SPARSE)
def test_memory_grows_linearly_and_stays_far_below_full(name):
  options = tuple(variant_class(name).preset(MEMORY_KEYS).items())
  small = compiled_temp_bytes(name, options, 2048)
  large = compiled_temp_bytes(name, options, 4096)
  full = compiled_temp_bytes('full', (), 4096)
  assert large / small <= 2.2, (small, large)
  assert large <= full / 4, (large, full)


EXPLICIT_MESH_SCRIPT = r'''
import jax, jax.numpy as jnp, numpy as np
import efficient_attn as ea
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
from efficient_attn.attention.api import variant_class
q = np.random.RandomState(0).randn(4, 40, 2, 8).astype(np.float32)
with jax.set_mesh(mesh):
  qs = jax.device_put(q, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  for name in ea.ATTENTION_NAMES:
    if not variant_class(name).supports_pallas:  # the block engine's variants
      continue
    attn = ea.make_attention(name, **variant_class(name).small_options(2))
    causal = variant_class(name).supports_causal
    grad = jax.jit(jax.grad(lambda q: jnp.sum(attn(q, q, q, causal=causal,
                                                   rng=jax.random.key(0)))))(qs)
    assert grad.sharding.spec[0] == 'data', grad.sharding
    print(name, 'ok')
'''


def test_engine_under_an_explicit_batch_sharded_mesh():
  """Scan carries and global-row placement keep the batch sharding (2 fake devices, subprocess)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2')
  done = subprocess.run([sys.executable, '-c', EXPLICIT_MESH_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.split() == [word for name in ENGINE_NAMES for word in (name, 'ok')]
  assert {'local', 'longformer', 'bigbird'} <= set(ENGINE_NAMES)
