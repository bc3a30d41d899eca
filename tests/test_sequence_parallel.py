"""Sequence-parallel attention equals the single-device call, forward and gradients, on 8 fake devices.

Fake CPU devices must be configured before JAX initialises, so every multi-device check runs in ONE
subprocess (this file executed as a script, XLA_FLAGS set in its environment: JAX start-up and the
compilations paid once) that prints a JSON report; the tests below assert on it. Argument errors are
checked in-process on a one-device mesh.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import efficient_attn as ea
from efficient_attn.attention.api import variant_class
from efficient_attn.attention.sequence_parallel import SUPPORTED, sequence_parallel_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
TOLERANCE = 1e-5  # float32, relative to the largest reference entry
MEMORY_RATIO_LIMIT = 0.25  # ideal 1/8; slack for the halo and replicated constants

# key -> (name, options, length). Shards hold length / 8 positions; each case stresses a different path.
CASES = {
    'full': ('full', {}, 96),
    'chunked': ('chunked', {'query_chunk': 8, 'key_chunk': 8}, 96),
    # A window of 30 over shards of 12: the halo takes three hops on each side.
    'local': ('local', {'window': 30}, 96),
    # A window beyond the whole sequence: the halo stops at the other shards (shards of 8 here).
    'local_wide': ('local', {'window': 90, 'block_size': 4}, 64),
    # Two head groups; window * dilation = 15 > 12: a two-hop halo whose width is a multiple of d.
    'dilated': ('dilated', {'window': 3, 'dilation': (2, 5)}, 96),
    # Global tokens on the first, a middle and the last shard; 200 lies past the end (ignored).
    'longformer': ('longformer', {'window': 5, 'global_tokens': (0, 37, 95, 200)}, 96),
    # Shards of 12 are not whole periods of 5: residue classes start at a different column per shard.
    'strided': ('strided', {'stride': 5}, 96),
    # Groups of 10 straddle shard edges.
    'fixed': ('fixed', {'stride': 10, 'summary': 3}, 96),
    # Shards of 12 are not whole blocks of 8: padded to 16 inside, cut back after.
    'bigbird': ('bigbird', {'block_size': 8, 'num_random_blocks': 2}, 96),
}
BATCH, HEADS, HEAD_DIM = 2, 2, 8
# Every other variant with a sequence-parallel plan: its class's small options.
CASES.update({name: (name, variant_class(name).small_options(HEADS), 96) for name in SUPPORTED
              if name not in {case[0] for case in CASES.values()}})
# A registered variant without a plan, for the error test (None if every variant has one).
UNSUPPORTED = next((name for name in ea.ATTENTION_NAMES if name not in SUPPORTED), None)
# Compiled memory of jit(grad) for `local`: one device against 8 shards.
MEMORY_CASE = ('local', {'window': 32}, 4096)


# --------------------------------------------------------------------------------------------------
# The subprocess (this file as a script)
# --------------------------------------------------------------------------------------------------


def _inputs(n, seed):
  """q, k, v, output cotangent [BATCH, n, HEADS, HEAD_DIM] and a padding mask with holes and a tail."""
  rs = np.random.RandomState(seed)
  q, k, v, ct = (rs.standard_normal((BATCH, n, HEADS, HEAD_DIM)).astype(np.float32) for _ in range(4))
  mask = np.ones((BATCH, n), bool)
  mask[0, 7:11] = False
  mask[1, 40] = False
  mask[1, n - 9:] = False
  return q, k, v, ct, mask


def _rel_errors(got, want):
  return [float(np.max(np.abs(np.asarray(g) - np.asarray(w))) / max(np.max(np.abs(np.asarray(w))),
                                                                     1e-30))
          for g, w in zip(got, want)]


def _compare(attn, n, causal, mesh, *, seed, rng=None, place=None, use_context_mesh=False):
  """Relative errors of (out, dq, dk, dv): sequence-parallel against `attn(...)` on one device."""
  q, k, v, ct, mask = _inputs(n, seed)

  def with_grads(fn):
    def run(q, k, v, ct):
      out, vjp = jax.vjp(fn, q, k, v)
      return (out,) + vjp(ct)
    return jax.jit(run)

  want = with_grads(lambda q, k, v: attn(q, k, v, padding_mask=mask, causal=causal, rng=rng))(
      q, k, v, ct)
  sp = lambda q, k, v: sequence_parallel_attention(
      attn, q, k, v, padding_mask=mask, causal=causal, rng=rng,
      mesh=None if use_context_mesh else mesh)
  # With explicit shardings the cotangent must be laid out like the output.
  args = (q, k, v, ct) if place is None else tuple(jax.device_put(x, place) for x in (q, k, v, ct))
  if use_context_mesh:
    with jax.set_mesh(mesh):
      got = with_grads(sp)(*args)
  else:
    got = with_grads(sp)(*args)
  return {
      'errors': _rel_errors(got, want),
      'scale': float(np.max(np.abs(np.asarray(want[0])))),
      'padded_rows_zero': bool(np.all(np.asarray(got[0])[~mask] == 0)),
  }


def _memory(mesh):
  """Compiled bytes (temp + arguments + outputs) of jit(grad) on one device and per device on `mesh`."""
  name, options, n = MEMORY_CASE
  attn = ea.make_attention(name, **options)
  shape = (1, n, HEADS, 16)
  single = jax.ShapeDtypeStruct(shape, jnp.float32)
  sharded = jax.ShapeDtypeStruct(shape, jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec(None, 'sequence')))

  def compiled_bytes(loss, spec):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    m = grad.trace(spec, spec, spec).lower().compile().memory_analysis()
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)

  one = compiled_bytes(lambda q, k, v: jnp.sum(attn(q, k, v, causal=True) ** 2), single)
  per_device = compiled_bytes(
      lambda q, k, v: jnp.sum(sequence_parallel_attention(attn, q, k, v, causal=True, mesh=mesh) ** 2),
      sharded)
  return {'single_bytes': one, 'per_device_bytes': per_device, 'ratio': per_device / one}


def _error_message(fn):
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


def report() -> dict:
  """Runs every multi-device check (needs DEVICES devices) and returns their results."""
  assert jax.device_count() == DEVICES, jax.devices()
  mesh = jax.make_mesh((DEVICES,), ('sequence',), axis_types=(AxisType.Explicit,))
  out = {'cases': {}}
  for key, (name, options, n) in CASES.items():
    attn = ea.make_attention(name, **options)
    rng = jax.random.key(7) if attn.needs_rng else None
    for causal in (False, True):
      out['cases'][f'{key}/causal={causal}'] = _compare(attn, n, causal, mesh, seed=n + causal, rng=rng)

  # A (data, sequence) mesh taken from jax.set_mesh, the batch sharded over `data`.
  mesh_2d = jax.make_mesh((2, DEVICES // 2), ('data', 'sequence'),
                          axis_types=(AxisType.Explicit, AxisType.Explicit))
  out['cases']['longformer/set_mesh_2d'] = _compare(
      ea.make_attention('longformer', window=3, global_tokens=(5, 50)), 64, True, mesh_2d, seed=1,
      place=NamedSharding(mesh_2d, PartitionSpec('data', 'sequence')), use_context_mesh=True)
  # Auto axis types work too (the compiler places the inputs).
  mesh_auto = jax.make_mesh((DEVICES,), ('sequence',), axis_types=(AxisType.Auto,))
  out['cases']['strided/auto_axes'] = _compare(ea.make_attention('strided', stride=4), 64, False,
                                               mesh_auto, seed=2)

  x = np.zeros((1, 60, 1, 4), np.float32)  # 60 is not divisible by 8
  out['indivisible_error'] = _error_message(
      lambda: sequence_parallel_attention(ea.make_attention('local', window=2), x, x, x, mesh=mesh))
  out['memory'] = _memory(mesh)
  return out


@functools.lru_cache(maxsize=None)
def _subprocess_report() -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             # Fake devices; light LLVM optimisation: these programs are tiny, compilation dominates.
             XLA_FLAGS=(f'--xla_force_host_platform_device_count={DEVICES} '
                        '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                        text=True, timeout=900, check=False)
  if proc.returncode:
    raise AssertionError(f'the multi-device subprocess failed:\n{proc.stderr[-6000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Tests on the report
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('key', list(CASES))
def test_matches_single_device(key, causal):
  result = _subprocess_report()['cases'][f'{key}/causal={causal}']
  assert result['scale'] > 0.1  # a real output to compare against
  for what, err in zip(('out', 'dq', 'dk', 'dv'), result['errors']):
    assert err <= TOLERANCE, (key, causal, what, err)
  assert result['padded_rows_zero']


@pytest.mark.parametrize('key', ['longformer/set_mesh_2d', 'strided/auto_axes'])
def test_other_meshes(key):
  result = _subprocess_report()['cases'][key]
  assert max(result['errors']) <= TOLERANCE, result


def test_indivisible_length_is_rejected():
  message = _subprocess_report()['indivisible_error']
  assert message is not None and 'not divisible' in message


def test_memory_falls_with_devices():
  mem = _subprocess_report()['memory']
  print(f'jit(grad) bytes: one device {mem["single_bytes"]}, per device at {DEVICES} shards '
        f'{mem["per_device_bytes"]} (ratio {mem["ratio"]:.3f})')
  assert mem['ratio'] <= MEMORY_RATIO_LIMIT, mem


# --------------------------------------------------------------------------------------------------
# In-process, on a one-device mesh
# --------------------------------------------------------------------------------------------------


def _one_device_mesh():
  return jax.make_mesh((1,), ('sequence',), axis_types=(AxisType.Explicit,))


def test_every_supported_variant_has_a_case():
  assert set(SUPPORTED) <= {name for name, _, _ in CASES.values()}
  assert set(SUPPORTED) <= set(ea.ATTENTION_NAMES)


def test_errors():
  x = jnp.zeros((1, 16, 2, 4))
  mesh = _one_device_mesh()
  if UNSUPPORTED is not None:
    with pytest.raises(ValueError, match=f"does not support '{UNSUPPORTED}'.*local"):
      sequence_parallel_attention(ea.make_attention(UNSUPPORTED), x, x, x, rng=None, mesh=mesh)
  with pytest.raises(ValueError, match="no axis 'seq'"):
    sequence_parallel_attention(ea.make_attention('local'), x, x, x, mesh=mesh, axis='seq')
  with pytest.raises(ValueError, match='needs a mesh'):
    sequence_parallel_attention(ea.make_attention('local'), x, x, x)
  with pytest.raises(ValueError, match='needs rng'):
    sequence_parallel_attention(ea.make_attention('bigbird'), x, x, x, mesh=mesh)
  with pytest.raises(ValueError, match='must be an Attention'):
    sequence_parallel_attention('local', x, x, x, mesh=mesh)
  with pytest.raises(ValueError, match='padding_mask'):
    sequence_parallel_attention(ea.make_attention('local'), x, x, x, padding_mask=jnp.ones((1, 3), bool),
                                mesh=mesh)


def test_one_device_mesh_matches():
  attn = ea.make_attention('fixed', stride=4, summary=1)
  q, k, v, _, mask = _inputs(48, seed=3)
  q, k, v = (jnp.asarray(x) for x in (q, k, v))  # attn(...) eagerly on NumPy arrays fails for `fixed`
  want = attn(q, k, v, padding_mask=mask, causal=True)
  got = jax.jit(lambda q, k, v: sequence_parallel_attention(
      attn, q, k, v, padding_mask=mask, causal=True, mesh=_one_device_mesh()))(q, k, v)
  assert max(_rel_errors([got], [want])) <= TOLERANCE


if __name__ == '__main__':  # the subprocess (PYTHONPATH=ROOT, fake devices in XLA_FLAGS)
  print(json.dumps(report()))
