"""The fused Pallas engine (interpret mode on this CPU) equals dense attention and the jnp engine.

float32, relative error <= 1e-5 (max abs error over max abs value of the reference), forward and the
gradients w.r.t. q, k, v, with padding and an odd length, for every fixed-pattern variant and both
causal settings; plus the engine-level contract (lse and its cotangent, per-head layouts, rows that see
nothing, tiling of large blocks), the Triton lowering of every kernel, and the GPU benchmark's smoke run.
Shapes are tiny because interpret mode is slow; every comparison is one compiled program.
"""
from __future__ import annotations

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import blocks
from efficient_attn.attention import engine
from efficient_attn.attention import pallas_engine
from efficient_attn.attention import patterns
from test_attention import rel_err  # the same tolerance rule as the jnp engine tests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import gpu_kernels  # pylint: disable=g-import-not-at-top,wrong-import-position

TOL = 1e-5
FIXED = ('full', 'chunked', 'local', 'dilated', 'longformer', 'strided', 'fixed', 'bigbird')
# Interpret-mode programs are large and only run once: cheaper XLA CPU code generation saves most of
# their compile time and does not change float32 results beyond rounding.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def small_options(name: str) -> dict:
  """Blocks of 8 and patterns that are really sparse at ~40 tokens."""
  return {
      'full': {},
      'chunked': dict(query_chunk=16, key_chunk=8),
      'local': dict(window=5, block_size=8),
      'dilated': dict(window=3, dilation=(1, 2), block_size=8),
      'longformer': dict(window=4, global_tokens=(0, 9, 50), block_size=8),
      'strided': dict(stride=6, block_size=8),
      'fixed': dict(stride=8, summary=3),
      'bigbird': dict(block_size=8, num_random_blocks=2),
  }[name]


def compiled(fn, *args):
  """jit(fn) compiled for args; float32 matmuls at full precision (on GPUs XLA would use TF32)."""
  with jax.default_matmul_precision('highest'):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def inputs(seed, shape, dtype=jnp.float32):
  return tuple(jax.random.normal(k, shape, dtype) for k in jax.random.split(jax.random.key(seed), 3))


@pytest.fixture
def pallas_calls(monkeypatch):
  """Counts calls of the fused engine, so a test knows the Pallas path really ran."""
  calls = []
  real = pallas_engine.block_sparse_attention

  def spy(*args, **kwargs):
    calls.append(kwargs.get('causal'))
    return real(*args, **kwargs)

  monkeypatch.setattr(pallas_engine, 'block_sparse_attention', spy)
  return calls


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('name', FIXED)
def test_variant_matches_dense_and_xla(name, causal, pallas_calls):
  b, n, h, d = 2, 37, 2, 8
  q, k, v = inputs(n + len(name), (b, n, h, d))
  pm = jnp.arange(n)[None, :] < jnp.asarray([n, n - 3])[:, None]  # batch 1 loses 3 tokens
  rng = jax.random.key(7)
  w = jax.random.normal(jax.random.key(1), q.shape)
  fused = ea.make_attention(name, implementation='pallas', **small_options(name))
  jnp_engine = ea.make_attention(name, implementation='xla', **small_options(name))

  def all_three(q, k, v):  # one compiled program: the fused kernels, the jnp engine, dense
    mask = fused.dense_mask(n, causal=causal, rng=rng, heads=h)[None] & pm[:, None, None, :]
    fns = [lambda q, k, v, a=a: a(q, k, v, padding_mask=pm, causal=causal, rng=rng)
           for a in (fused, jnp_engine)]
    fns.append(lambda q, k, v: ea.dense_attention(q, k, v, mask=mask) * pm[:, :, None, None])
    results = []
    for f in fns:
      out, vjp = jax.vjp(f, q, k, v)
      results.append((out,) + vjp(w))
    return results

  got, xla, dense = compiled(all_three, q, k, v)(q, k, v)
  assert pallas_calls and all(c == causal for c in pallas_calls)
  for what, a, x, r in zip(('out', 'dq', 'dk', 'dv'), got, xla, dense):
    assert rel_err(a, r) <= TOL, (what, 'vs dense')
    assert rel_err(a, x) <= TOL, (what, 'vs xla')


def _engine_case(block_q=12, block_k=12, head_dim=6, heads=2):
  """A raw engine call: per-head layout with filler and repeated slots, a row that sees nothing,
  padded keys, a predicate reading aux, and q/k of different block counts."""
  b, h, nq, nk = 2, heads, 3, 4
  keys = jax.random.split(jax.random.key(0), 3)
  qb = jax.random.normal(keys[0], (b, h, nq, block_q, head_dim))
  kb, vb = (jax.random.normal(key, (b, h, nk, block_k, head_dim)) for key in keys[1:])
  qpos = blocks.block_positions(nq, block_q) * 2  # queries at even positions: q and k differ
  kpos = blocks.block_positions(nk, block_k)
  kvalid = jnp.ones((b, nk, block_k), bool).at[1, -1, 5:].set(False)
  idx = jnp.asarray([[[0, 1, 2], [1, 2, 3], [3, 0, 0]],
                     [[2, 0, 2], [0, 3, 1], [1, 1, 2]]], jnp.int32)[:h]
  valid = jnp.asarray([[[True, True, False], [True, True, True], [False, False, False]],
                       [[True, True, True], [True, True, True], [True, True, True]]])[:h]
  valid = blocks.dedupe_slots(idx, valid)
  is_global = jnp.zeros(200, bool).at[jnp.asarray([3, 30])].set(True)
  kwargs = dict(kvalid=kvalid, qpos=qpos, kpos=kpos, idx=idx, valid=valid,
                visible=patterns.BandOrGlobal(7), aux=is_global)
  return (qb, kb, vb), kwargs


def test_engine_matches_xla_engine_with_lse_cotangent():
  causal = True
  (qb, kb, vb), kwargs = _engine_case()
  w_out = jax.random.normal(jax.random.key(2), qb.shape)
  w_lse = jax.random.normal(jax.random.key(3), qb.shape[:4])

  def both(qb, kb, vb):
    results = []
    for impl in ('pallas', 'xla'):
      f = lambda *x, impl=impl: engine.block_sparse_attention(*x, causal=causal, implementation=impl,
                                                              **kwargs)
      (out, lse), vjp = jax.vjp(f, qb, kb, vb)
      results.append((out, lse) + vjp((w_out, w_lse)))
    return results

  got, ref = compiled(both, qb, kb, vb)(qb, kb, vb)
  for what, a, r in zip(('out', 'lse', 'dq', 'dk', 'dv'), got, ref):
    if what == 'lse':  # compare the finite entries; rows that see nothing are MASK_VALUE in both
      assert np.array_equal(np.asarray(a) == ea.MASK_VALUE, np.asarray(r) == ea.MASK_VALUE)
      a, r = (jnp.where(r == ea.MASK_VALUE, 0.0, x) for x in (a, r))
    assert rel_err(a, r) <= TOL, what
  out, lse = got[:2]
  # Head 0's last query block has no valid slot: zeros and MASK_VALUE, finite gradients.
  assert float(jnp.max(jnp.abs(out[:, 0, 2]))) == 0.0
  assert bool(jnp.all(lse[:, 0, 2] == ea.MASK_VALUE))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in got[2:])


def test_large_blocks_are_split_into_tiles_and_steps(monkeypatch):
  """Blocks bigger than MAX_TILE run as several tiles (24 -> 32 = 2 tiles of 16), and every tile is
  walked in steps of STEP keys (forward, dq) or rows (dk/dv)."""
  monkeypatch.setattr(pallas_engine, 'MAX_TILE', 16)
  monkeypatch.setattr(pallas_engine, 'STEP', 8)
  assert pallas_engine.tiling(24) == (16, 2)
  (qb, kb, vb), kwargs = _engine_case(block_q=24, block_k=20, head_dim=8, heads=1)
  w = jax.random.normal(jax.random.key(4), qb.shape)

  def both(qb, kb, vb):
    results = []
    for impl in ('pallas', 'xla'):
      f = lambda *x, impl=impl: engine.block_sparse_attention(*x, causal=True, implementation=impl,
                                                              **kwargs)[0]
      out, vjp = jax.vjp(f, qb, kb, vb)
      results.append((out,) + vjp(w))
    return results

  got, ref = compiled(both, qb, kb, vb)(qb, kb, vb)
  for what, a, r in zip(('out', 'dq', 'dk', 'dv'), got, ref):
    assert rel_err(a, r) <= TOL, what


def test_slot_classes_and_walks():
  """Empty slots are dropped, full ones come first, and the transposed walk lists every live pair."""
  nb, block = 6, 8
  pos = blocks.block_positions(nb, block)
  idx, valid = blocks.band_layout(nb, 2, 2)  # window 12 with blocks of 8: a-1..a+1 full, a+-2 partial
  cfg = pallas_engine.KernelConfig(
      heads=1, layout_heads=1, block_q=16, block_k=16, step_q=16, step_k=16, head_dim=16, scale=1.0,
      visible=patterns.Band(12), aux_tree=jax.tree.structure(()), aux_bool=(), causal=True,
      interpret=True)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 8)), constant_values=-1).reshape(-1)
  idx8 = jnp.pad(idx, ((0, 0), (0, 0), (0, 3)))
  valid8 = jnp.pad(valid, ((0, 0), (0, 0), (0, 3)))
  real = pad(jnp.zeros_like(pos)) + 1  # padding: -1 + 1 = 0
  cls = pallas_engine.classify_slots(cfg, idx8, valid8, pad(pos), pad(pos), (), (), real, real)
  # Brute force: visibility of every pair of every slot.
  i = np.arange(nb * block).reshape(nb, block)
  want = np.zeros(idx8.shape, int)
  for a in range(nb):
    for s in range(idx8.shape[-1]):
      if not valid8[0, a, s]:
        continue
      jj = i[int(idx8[0, a, s])]
      vis = (np.abs(i[a][:, None] - jj[None, :]) <= 12) & (jj[None, :] <= i[a][:, None])
      want[0, a, s] = pallas_engine.FULL if vis.all() else (
          pallas_engine.PARTIAL if vis.any() else pallas_engine.EMPTY)
  np.testing.assert_array_equal(np.asarray(cls), want)
  slots, bounds = pallas_engine.row_walk(idx8, cls)
  qblocks, col_bounds = pallas_engine.column_walk(idx8, cls, nb)
  pairs_rows, pairs_cols = set(), set()
  for a in range(nb):
    n_full, n_live = map(int, bounds[0, a])
    for t in range(n_live):
      c = int(slots[0, a, t])
      classes = {int(want[0, a, s]) for s in range(8) if int(idx8[0, a, s]) == c and valid8[0, a, s]}
      assert classes == {pallas_engine.FULL if t < n_full else pallas_engine.PARTIAL}
      pairs_rows.add((a, c, t < n_full))
  for c in range(nb):
    start, mid, end, _ = map(int, col_bounds[0, c])
    pairs_cols |= {(int(qblocks[0, e]), c, e < mid) for e in range(start, end)}
  assert pairs_rows == pairs_cols
  live = {(a, int(idx8[0, a, s])) for a in range(nb) for s in range(8)
          if want[0, a, s] != pallas_engine.EMPTY}
  assert {(a, c) for a, c, _ in pairs_rows} == live


def test_bfloat16_and_vmap():
  q, k, v = inputs(5, (2, 29, 2, 8), jnp.bfloat16)
  fused = ea.make_attention('local', window=6, block_size=8, implementation='pallas')
  ref = ea.make_attention('local', window=6, block_size=8, implementation='xla')

  def run(q, k, v):
    batched = jax.vmap(lambda q, k, v: fused(q[None], k[None], v[None], causal=True)[0])(q, k, v)
    return fused(q, k, v, causal=True), batched, ref(*(x.astype(jnp.float32) for x in (q, k, v)),
                                                      causal=True)

  out, batched, want = compiled(run, q, k, v)(q, k, v)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, want) <= 2e-2
  assert rel_err(batched, out) <= 1e-2


def test_bad_inputs_and_predicates_raise(monkeypatch):
  (qb, kb, vb), kwargs = _engine_case()
  with pytest.raises(ValueError, match='kvalid must have shape'):
    pallas_engine.block_sparse_attention(qb, kb, vb, **{**kwargs, 'kvalid': kwargs['kvalid'][:1]})
  with pytest.raises(ValueError, match='idx and valid'):
    pallas_engine.block_sparse_attention(qb, kb, vb, **{**kwargs, 'idx': kwargs['idx'][:, :1]})
  with pytest.raises(ValueError, match='aux leaves must be 1-D'):
    pallas_engine.block_sparse_attention(qb, kb, vb, **{**kwargs, 'aux': kwargs['aux'][None]})

  class Shifted:  # reads aux at a position other than the i / j it was given
    def __call__(self, i, j, aux):
      return aux[i + 1] | (i == j)

  with pytest.raises(ValueError, match=r'leaf\[i\] or leaf\[j\]'):
    pallas_engine.block_sparse_attention(qb, kb, vb, **{**kwargs, 'visible': Shifted()})
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  with pytest.raises(ValueError, match='not supported'):
    pallas_engine.default_interpret()


@pytest.mark.parametrize('name,dtype', [('longformer', jnp.bfloat16), ('bigbird', jnp.float32)])
def test_kernels_lower_to_triton(name, dtype, monkeypatch):
  """Compiled (non-interpret) mode lowers every kernel to Triton IR for CUDA, without a GPU here.

  This checks what the Pallas Triton lowering accepts (primitives, power-of-two tiles, dot shapes);
  building PTX and running it need a GPU (benchmarks/gpu_kernels.py).
  """
  monkeypatch.setattr(pallas_engine, 'default_interpret', lambda: False)
  options = dict(longformer=dict(window=100, global_tokens=(0, 700)),
                 bigbird=dict(block_size=96, num_random_blocks=2))[name]
  attn = ea.make_attention(name, implementation='pallas', **options)
  spec = jax.ShapeDtypeStruct((1, 1000, 2, 48), dtype)
  loss = lambda q, k, v: jnp.sum(attn(q, k, v, causal=True, rng=jax.random.key(0)).astype(
      jnp.float32))
  triton = jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')
  # The Triton lowering reads the target GPU from the device: jax 0.10 falls back to compute
  # capability 9.0 without one, jax >= 0.11 raises unless an abstract GPU device is in context
  # (an H200, the GPU benchmarks/gpu_kernels.py targets; capability 9.0 either way).
  gpu = jax.sharding.AbstractDevice(device_kind='NVIDIA H200', num_cores=None, platform='gpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=gpu)):
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=['cuda'],
                                 disabled_checks=[triton])(spec, spec, spec)
  kernels = re.findall(r'name = "(block_sparse_attention_\w+)"', exported.mlir_module())
  assert sorted(set(kernels)) == ['block_sparse_attention_classify', 'block_sparse_attention_dkdv',
                                  'block_sparse_attention_dq', 'block_sparse_attention_fwd']


def test_visible_pair_counts_match_dense_masks():
  n, heads, keys = 37, 2, 8
  rng = jax.random.key(0)
  for name in gpu_kernels.FIXED_PATTERNS:
    options = gpu_kernels.preset_options(name, keys)
    attn = ea.make_attention(name, **options)
    mask = jax.jit(lambda rng, a=attn: a.dense_mask(n, causal=True, rng=rng, heads=heads))(rng)
    want = int(jnp.sum(jnp.broadcast_to(mask, (heads, n, n))))
    assert gpu_kernels.visible_pairs(name, options, n, heads, True, rng) == want, name


def test_gpu_benchmark_smoke_run(tmp_path):
  result = gpu_kernels.main(['--smoke', '--variants', 'local', '--out', str(tmp_path)])
  assert result['ok']
  with open(tmp_path / 'gpu_kernels.json') as f:
    saved = json.load(f)
  rows = {(r['impl'], r['variant']): r for r in saved['rows']}
  for key in (('xla', 'local'), ('pallas', 'local'), ('dense', 'full')):
    assert rows[key]['fwd_s'] > 0 and rows[key]['fwd_bwd_tflops'] > 0, key
    assert rows[key]['temp_bytes'] > 0, key
  assert 'error' in rows[('cudnn', 'full')] or rows[('cudnn', 'full')]['fwd_s'] > 0
  table = (tmp_path / 'gpu_kernels.md').read_text()
  assert jax.__version__ in table and '| pallas | local |' in table
