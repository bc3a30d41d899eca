"""Sharding over a device mesh: logical-axis rules, mesh equivalence with one device, memory.

The mesh checks run on 8 fake CPU devices in ONE subprocess (tests/sharding_check.py; the device
count must be set before JAX starts), which prints its findings as JSON; the tests below read them.
The rule functions are tested in-process (no devices needed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

import efficient_attn as ea
from efficient_attn import sharding

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-5


# -- rules (in-process) ----------------------------------------------------------------------------


def test_logical_to_spec_applies_fsdp_and_tensor_rules():
  mesh = {'data': 2, 'fsdp': 2, 'tensor': 2, 'sequence': 1}
  assert sharding.logical_to_spec(('embed', 'heads', 'kv'), (32, 4, 8), mesh) == P('fsdp', 'tensor')
  assert sharding.logical_to_spec(('mlp', 'embed'), (64, 32), mesh) == P('tensor', 'fsdp')
  assert sharding.logical_to_spec(('vocab', 'embed'), (17, 32), mesh) == P(None, 'fsdp')
  # Activations: batch over (data, fsdp), length over sequence (size 1 here: dropped).
  assert sharding.logical_to_spec(sharding.ACTIVATION_BLE, (8, 64, 32), mesh) == P(('data', 'fsdp'))
  seq = {'data': 2, 'fsdp': 1, 'tensor': 1, 'sequence': 4}
  assert sharding.logical_to_spec(sharding.ACTIVATION_BLHD, (8, 64, 4, 8), seq) == P('data',
                                                                                     'sequence')


def test_logical_to_spec_drops_axes_that_do_not_divide_or_repeat():
  mesh = {'data': 1, 'fsdp': 4, 'tensor': 2, 'sequence': 1}
  # 10 classes on fsdp=4 would not divide: that dimension stays replicated.
  assert sharding.logical_to_spec(('embed', 'classes'), (10, 3), mesh) == P()
  # 'heads' of 3 on tensor=2: replicated, the embed side still sharded.
  assert sharding.logical_to_spec(('embed', 'heads', 'kv'), (32, 3, 8), mesh) == P('fsdp')
  # A rule set that maps two names to the same mesh axis uses it once.
  rules = sharding.make_rules({'mlp': 'fsdp'})
  assert sharding.logical_to_spec(('embed', 'mlp'), (32, 64), mesh, rules) == P('fsdp')


def test_make_rules_overrides_and_rejects_bad_names():
  rules = sharding.make_rules({'embed': None, 'mlp': ['fsdp', 'tensor']})
  assert rules['embed'] == () and rules['mlp'] == ('fsdp', 'tensor')
  assert rules['heads'] == ('tensor',)
  strings = sharding.make_rules({'vocab': 'tensor', 'activation_batch': 'data, fsdp', 'mlp': ''})
  assert strings['vocab'] == ('tensor',) and strings['activation_batch'] == ('data', 'fsdp')
  assert strings['mlp'] == ()
  with pytest.raises(ValueError, match='unknown logical axis'):
    sharding.make_rules({'embedding': 'fsdp'})
  with pytest.raises(ValueError, match='unknown mesh axis'):
    sharding.make_rules({'embed': 'model'})
  with pytest.raises(ValueError, match='repeats'):
    sharding.make_rules({'embed': ('fsdp', 'fsdp')})
  with pytest.raises(ValueError, match='logical names'):
    sharding.logical_to_spec(('embed',), (3, 4), {'fsdp': 2})


def test_multi_process_requested_reads_the_environment():
  assert not sharding.multi_process_requested({})
  assert not sharding.multi_process_requested({'JAX_NUM_PROCESSES': '1'})
  assert sharding.multi_process_requested({'JAX_NUM_PROCESSES': '4'})
  assert sharding.multi_process_requested({'EFFICIENT_ATTN_DISTRIBUTED': '1'})
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES'):
    sharding.multi_process_requested({'JAX_NUM_PROCESSES': 'two'})
  # A single-process run never initialises the distributed runtime.
  assert sharding.initialize_distributed(environ={}) is False
  assert sharding.initialize_distributed(environ={'JAX_NUM_PROCESSES': '1'}) is False
  with pytest.raises(ValueError, match='JAX_PROCESS_ID'):
    sharding.initialize_distributed(environ={'JAX_NUM_PROCESSES': '2'})


# -- 8 fake devices (one subprocess) ---------------------------------------------------------------


@pytest.fixture(scope='module')
def report():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'sharding_check.py')], env=env,
                        capture_output=True, text=True, timeout=480, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_mesh_matches_one_device(report):
  bad = [c for c in report['cases']
         if not (c['loss_rel'] <= TOLERANCE and c['grad_rel'] <= TOLERANCE)]
  assert not bad, bad
  meshes = {c['mesh'] for c in report['cases']}
  assert {'fsdp=8', 'data=2,fsdp=2,tensor=2', 'sequence=8', 'data=2,sequence=4',
          'fsdp=2,tensor=2,sequence=2'} <= meshes
  covered = {v for c in report['cases'] if c['mesh'] == 'data=2,fsdp=2,tensor=2'
             for v in c['variants']}
  assert covered == set(ea.ATTENTION_NAMES)  # every registered variant, learned weights included
  seq = {v for c in report['cases'] if c['mesh'] == 'sequence=8' for v in c['variants']}
  assert seq == {'full', 'chunked', 'local', 'dilated', 'longformer', 'strided', 'fixed', 'bigbird'}


def test_parameters_are_sharded_by_the_rules(report):
  by_mesh = {c['mesh']: c for c in report['cases']}
  assert by_mesh['data=2,fsdp=2,tensor=2']['query_kernel_spec'] == "P('fsdp', 'tensor')"
  assert by_mesh['data=2,fsdp=2,tensor=2']['mlp_wo_spec'] == "P('tensor', 'fsdp')"
  assert by_mesh['fsdp=8']['query_kernel_spec'] == "P('fsdp',)"
  # Without fsdp or tensor axes, parameters stay replicated.
  assert by_mesh['data=2,sequence=4']['query_kernel_spec'] == 'P()'


def test_optimizer_state_follows_the_parameters(report):
  opt = report['optimizer']
  assert opt['param'] == opt['mu'] == opt['nu'] == "P('fsdp', 'tensor')"
  assert opt['mu_shard_shape'] == [opt['full_shape'][0] // 2, opt['full_shape'][1] // 2]


def test_sequence_parallel_step_memory_shrinks(report):
  mem = report['memory']
  print('sequence-parallel memory:', mem)
  assert mem['per_device_bytes_8_shards'] <= mem['single_bytes'] / 4, mem
