"""The learned attention variants (linformer, sinkhorn, synthesizer) against their references.

Each fast path equals the variant's own `reference` (its O(n^2) definition, written apart) to
float32 rounding, forward and gradients with respect to q, k, v and the learned weights; padding,
causality, memory, errors. Tiny shapes: compile time dominates on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn.attention import learned

TOL = 1e-5
B, H, D = 2, 2, 8
LENGTHS = (1, 7, 37, 100)


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  assert scale > 1e-3, 'comparison on (near) zeros proves nothing'
  return float(np.max(np.abs(x - ref)) / scale)


def inputs(seed, b, n, h=H, d=D, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, n, h, d), dtype) for k in keys)


def padding(b, n):
  """Row 0 all real; row 1 (if any) loses its last 5 tokens (keeps at least one)."""
  return jnp.arange(n)[None, :] < jnp.asarray([n, max(1, n - 5)][:b])[:, None]


@functools.lru_cache(maxsize=None)
def value_and_grads(attn, causal, use_reference):
  """jit((q, k, v, params, mask, w) -> (out, d<out, w>/d(q, k, v, params))), cached per config."""
  fn = attn.reference if use_reference else attn

  def run(q, k, v, params, mask, w):
    f = lambda q, k, v, p: fn(q, k, v, padding_mask=mask, causal=causal, params=p)
    out, vjp = jax.vjp(f, q, k, v, params)
    return out, vjp(w)

  return jax.jit(run)


def assert_close(x, ref, what):
  """rel_err <= TOL; a reference that is (near) zero for a structural reason (synthesizer's dk, a
  softmax over a single key, sinkhorn's sorting net on one block) must be matched absolutely."""
  if np.max(np.abs(np.asarray(ref))) <= 1e-3:
    diff = np.abs(np.asarray(x, np.float64) - np.asarray(ref, np.float64))
    assert float(np.max(diff)) <= 1e-7, what
  else:
    assert rel_err(x, ref) <= TOL, what


def compare(attn, n, causal, *, b=B, seed=0, length=None):
  """Asserts fast == reference (forward, dq, dk, dv, d params); returns (out, grads)."""
  q, k, v = inputs(n + seed, b, n)
  params = attn.init(jax.random.key(seed + 1), length=length or max(n, 40), heads=H, head_dim=D)
  mask = padding(b, n)
  w = jax.random.normal(jax.random.key(seed + 2), q.shape)
  out, grads = value_and_grads(attn, causal, False)(q, k, v, params, mask, w)
  ref_out, ref_grads = value_and_grads(attn, causal, True)(q, k, v, params, mask, w)
  assert rel_err(out, ref_out) <= TOL
  for what, g, r in zip(('dq', 'dk', 'dv'), grads[:3], ref_grads[:3]):
    assert_close(g, r, what)
  for pname in params:
    assert_close(grads[3][pname], ref_grads[3][pname], pname)
  return out, grads


MAIN = [('linformer', dict(projected_length=8), (False,)),
        ('sinkhorn', dict(block_size=8), (False, True)),
        ('synthesizer', dict(mode='dense'), (False, True))]
OTHER = [('linformer', dict(projected_length=8, share_kv=True), (False,)),
         ('sinkhorn', dict(block_size=5, sinkhorn_iters=2, temperature=0.3), (False, True)),
         ('synthesizer', dict(mode='random'), (False, True)),
         ('synthesizer', dict(mode='factorized_random', rank=3), (False, True))]


@pytest.mark.parametrize('name, options, causals', MAIN, ids=[c[0] for c in MAIN])
@pytest.mark.parametrize('n', LENGTHS)
def test_fast_path_equals_reference(name, options, causals, n):
  attn = ea.make_attention(name, **options)
  for causal in causals:
    out, grads = compare(attn, n, causal)
    if n >= 37:  # the weights matter: their gradients are not zero
      assert all(float(jnp.max(jnp.abs(g))) > 1e-4 for g in grads[3].values())


@pytest.mark.parametrize('name, options, causals', OTHER,
                         ids=[f'{c[0]}-{"-".join(map(str, c[1].values()))}' for c in OTHER])
def test_other_options_equal_reference(name, options, causals):
  attn = ea.make_attention(name, **options)
  for causal in causals:
    compare(attn, 37, causal)


@pytest.mark.parametrize('name, options, causal', [
    ('linformer', dict(projected_length=16), False),
    ('sinkhorn', dict(block_size=32), True),
    ('synthesizer', dict(mode='factorized_random'), True),
], ids=['linformer', 'sinkhorn', 'synthesizer'])
def test_long_sequence_equals_reference(name, options, causal):
  compare(ea.make_attention(name, **options), 1000, causal, b=1, length=1000)


# -- padding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, options, causals', MAIN, ids=[c[0] for c in MAIN])
def test_padding_changes_nothing_at_real_positions(name, options, causals):
  attn = ea.make_attention(name, **options)
  b, n, real = 2, 30, 21
  q, k, v = inputs(3, b, n)
  params = attn.init(jax.random.key(4), length=n, heads=H, head_dim=D)
  pm = jnp.stack([jnp.arange(n) < real, jnp.zeros(n, bool)])  # row 1: all padding
  w = jax.random.normal(jax.random.key(5), q.shape)
  for causal in causals:
    run = value_and_grads(attn, causal, False)
    out, grads = run(q, k, v, params, pm, w)
    for junk in (1e30, jnp.nan, jnp.inf):
      fill = lambda x: jnp.where(pm[:, :, None, None], x, junk)
      out2, grads2 = run(fill(q), fill(k), fill(v), params, pm, w)
      assert rel_err(out2[0, :real], out[0, :real]) <= TOL
      assert float(jnp.max(jnp.abs(out2[0, real:]))) == 0 and float(jnp.max(jnp.abs(out2[1]))) == 0
      for g, g2 in zip(grads[:3], grads2[:3]):
        assert bool(jnp.all(jnp.isfinite(g2)))
        assert_close(g2[0, :real], g[0, :real], 'input gradient')
        assert float(jnp.max(jnp.abs(g2[:, real:]))) == 0 and float(jnp.max(jnp.abs(g2[1]))) == 0
      for pname in params:
        assert bool(jnp.all(jnp.isfinite(grads2[3][pname])))
        assert_close(grads2[3][pname], grads[3][pname], pname)
    # Padded keys are masked BEFORE the projection / balancing: the padded batch row gives what
    # the unpadded shorter sequence gives (LRA's and HF's Linformer would mix the padding in).
    short = jax.jit(lambda q, k, v: attn(q, k, v, causal=causal, params=params))(
        q[:1, :real], k[:1, :real], v[:1, :real])
    assert rel_err(out[0, :real], short[0]) <= TOL


# -- causality -------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, options', [('sinkhorn', dict(block_size=8)),
                                           ('sinkhorn', dict(block_size=5, sinkhorn_iters=3)),
                                           ('synthesizer', dict(mode='dense')),
                                           ('synthesizer', dict(mode='random'))])
def test_causal_outputs_ignore_the_future(name, options):
  """Changing q/k/v after position t changes no output at positions <= t (the sorting net's
  summaries and the causal Sinkhorn balancing see no future block either)."""
  attn = ea.make_attention(name, **options)
  n, t = 40, 19
  q, k, v = inputs(6, 1, n)
  params = attn.init(jax.random.key(7), length=n, heads=H, head_dim=D)
  noise = inputs(8, 1, n)
  later = (jnp.arange(n) > t)[None, :, None, None]
  run = jax.jit(lambda q, k, v: attn(q, k, v, causal=True, params=params))
  out = run(q, k, v)
  changed = run(*(jnp.where(later, 3 * z, x) for x, z in zip((q, k, v), noise)))
  assert rel_err(changed[:, :t + 1], out[:, :t + 1]) <= TOL
  assert float(jnp.max(jnp.abs(changed[:, t + 1:] - out[:, t + 1:]))) > 1e-3


def test_sinkhorn_sorted_blocks_matter_and_balance():
  attn = ea.make_attention('sinkhorn', block_size=8)
  q, k, v = inputs(9, 1, 48)
  params = attn.init(jax.random.key(10), length=48, heads=H, head_dim=D)
  out = attn(q, k, v, params=params)
  # Without the sorted part, a query would attend to its own block alone.
  own_block = ea.make_attention('block_local', block_size=8)(q, k, v) if (
      'block_local' in ea.ATTENTION_NAMES) else None
  if own_block is not None:
    assert float(jnp.max(jnp.abs(out - own_block))) > 1e-3
  # Balancing: enough rounds give a doubly stochastic matrix; causal balancing keeps to c < a.
  logits = jax.random.normal(jax.random.key(11), (3, 6, 6)) * 2
  p = learned.sinkhorn_balance(logits, jnp.ones((6, 6), bool), 200, causal=False)
  np.testing.assert_allclose(np.sum(p, -1), 1, atol=1e-4)
  np.testing.assert_allclose(np.sum(p, -2), 1, atol=1e-4)
  allowed = jnp.tri(6, k=-1, dtype=bool)
  pc = learned.sinkhorn_balance(logits, allowed, 5, causal=True)
  assert float(jnp.max(jnp.abs(jnp.where(allowed, 0, pc)))) == 0
  assert bool(jnp.all(jnp.where(allowed, (pc > 0) & (pc <= 1 + 1e-6), True)))
  # Row a of the causal matrix depends on rows <= a only.
  other = logits.at[:, 4:].set(-logits[:, 4:])
  pc2 = learned.sinkhorn_balance(other, allowed, 5, causal=True)
  np.testing.assert_allclose(pc2[:, :4], pc[:, :4], atol=1e-6)


# -- memory ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def temp_bytes(name, options, n, h=2, d=32):
  attn = ea.make_attention(name, **dict(options))
  q = jax.ShapeDtypeStruct((1, n, h, d), jnp.float32)
  params = jax.eval_shape(lambda: attn.init(jax.random.key(0), length=n, heads=h, head_dim=d))
  loss = lambda q, k, v, p: jnp.sum(attn(q, k, v, params=p))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
  return grad.lower(q, q, q, params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('name, options', [('linformer', (('projected_length', 256),)),
                                           ('sinkhorn', (('block_size', 128),))])
def test_memory_grows_linearly(name, options):
  small, large = temp_bytes(name, options, 4096), temp_bytes(name, options, 8192)
  assert large / small <= 2.3, (small, large)
  assert large <= temp_bytes('full', (), 8192) / 4


# -- API -------------------------------------------------------------------------------------------


def test_init_param_axes_presets():
  for name in ('linformer', 'sinkhorn', 'synthesizer'):
    cls = ea.make_attention(name).__class__
    assert cls.learned and not cls.supports_pallas
    for options in ({}, cls.small_options(H), cls.preset(256)):
      attn = ea.make_attention(name, **options)
      params = attn.init(jax.random.key(0), length=50, heads=H, head_dim=D)
      axes = attn.param_axes()
      assert set(params) == set(axes)
      for pname, x in params.items():
        assert x.dtype == jnp.float32 and len(axes[pname]) == x.ndim
  assert ea.make_attention('synthesizer').quadratic
  assert not ea.make_attention('linformer').supports_causal
  assert ea.make_attention('sinkhorn').supports_causal
  assert ea.make_attention('linformer', **learned.Linformer.preset(256)).projected_length == 256
  assert ea.make_attention('sinkhorn', **learned.Sinkhorn.preset(256)).block_size == 128
  assert set(ea.make_attention('linformer', share_kv=True).param_axes()) == {'E'}
  big = ea.make_attention('synthesizer', mode='random', max_length=60)
  assert big.init(jax.random.key(0), length=50, heads=H, head_dim=D)['logits'].shape == (H, 60, 60)
  with pytest.raises(ValueError, match='max_length'):
    ea.make_attention('synthesizer', max_length=30).init(jax.random.key(0), length=50, heads=H,
                                                         head_dim=D)


def test_errors():
  q, k, v = inputs(0, 1, 12)
  lin = ea.make_attention('linformer', projected_length=4)
  params = lin.init(jax.random.key(0), length=12, heads=H, head_dim=D)
  with pytest.raises(ValueError, match='future'):
    lin(q, k, v, causal=True, params=params)
  with pytest.raises(ValueError, match='future'):
    lin.reference(q, k, v, causal=True, params=params)
  for name in ('linformer', 'sinkhorn', 'synthesizer'):
    attn = ea.make_attention(name)
    with pytest.raises(ValueError, match='learned weights'):
      attn(q, k, v)
    good = attn.init(jax.random.key(0), length=12, heads=H, head_dim=D)
    missing = dict(list(good.items())[1:])
    with pytest.raises(ValueError, match='params lack'):
      attn(q, k, v, params=missing)
    other = (ea.make_attention(name, projected_length=5) if name == 'linformer' else attn)
    with pytest.raises(ValueError, match='shape'):  # made for another k, or other heads
      attn(q, k, v, params=other.init(jax.random.key(0), length=12, heads=H + 1, head_dim=D))
    long = inputs(0, 1, 100)  # beyond 12 tokens (sinkhorn: beyond the 64 of its one block)
    with pytest.raises(ValueError, match='longer than'):
      attn(*long, params=good)
  for name, options in [('linformer', dict(projected_length=0)), ('linformer', dict(share_kv=1)),
                        ('sinkhorn', dict(block_size=0)), ('sinkhorn', dict(sinkhorn_iters=0)),
                        ('sinkhorn', dict(temperature=0.0)), ('synthesizer', dict(mode='mlp')),
                        ('synthesizer', dict(max_length=0)), ('synthesizer', dict(rank=0))]:
    with pytest.raises(ValueError, match=next(iter(options))):
      ea.make_attention(name, **options)


@pytest.mark.parametrize('name, options', [('linformer', dict(projected_length=8)),
                                           ('sinkhorn', dict(block_size=8)),
                                           ('synthesizer', dict(mode='dense'))])
def test_jit_vmap_checkpoint_and_bfloat16(name, options):
  attn = ea.make_attention(name, **options)
  causal = attn.supports_causal
  params = attn.init(jax.random.key(0), length=24, heads=H, head_dim=D)
  traces = []

  @jax.jit
  def f(q, k, v, p):
    traces.append(1)
    return attn(q, k, v, causal=causal, params=p)

  q, k, v = inputs(0, 2, 24)
  out1 = f(q, k, v, params)
  out2 = f(*inputs(1, 2, 24), params)
  assert len(traces) == 1 and not np.allclose(out1, out2)
  per_example = jax.jit(jax.vmap(lambda q, k, v: attn(q[None], k[None], v[None],
                                                    params=params)[0]))
  assert rel_err(per_example(q, k, v), f(q, k, v, params) if not causal else
                 jax.jit(lambda q, k, v: attn(q, k, v, params=params))(q, k, v)) <= TOL
  loss = lambda q, p: jnp.sum(jnp.sin(attn(q, k, v, params=p)))
  ckpt = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(q, params)
  plain = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, params)
  for a, b in zip(jax.tree.leaves(ckpt), jax.tree.leaves(plain)):
    assert rel_err(a, b) <= TOL
  bf16 = f(*(x.astype(jnp.bfloat16) for x in (q, k, v)), params)
  assert bf16.dtype == jnp.bfloat16
  assert rel_err(bf16.astype(jnp.float32), out1) <= 3e-2
