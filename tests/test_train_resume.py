"""Interrupted runs, as real processes: SIGKILL part-way then resume == uninterrupted; SIGTERM saves.

The runs use train.py on `configs/listops.py:attention=bigbird,tiny` (dropout and BigBird's random
blocks both draw from the checkpointed NNX RNG streams, so an exact resume needs all of it restored).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import listops
from efficient_attn import data
from efficient_attn import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measurements that depend on the machine's speed, not on the computation.
TIMING_KEYS = ('steps_per_sec', 'tokens_per_sec', 'peak_memory_bytes',
               'host_memory_bytes')


def _argv(cache_dir: str, workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'train.py'),
          f'--config={REPO}/configs/listops.py:attention=bigbird,tiny',
          f'--config.data.cache_dir={cache_dir}', '--config.train.progress_bar=False',
          '--config.attention.options.block_size=4', '--config.attention.options.num_random_blocks=1',
          f'--workdir={workdir}', *overrides]


def _env(**extra: str) -> dict[str, str]:
  return dict(os.environ, JAX_PLATFORMS='cpu', **extra)


def _generate_data(cache_dir: str) -> None:
  # Once, here: two processes generating the same cache at once would race.
  config = listops.get_config('tiny')
  config.data.cache_dir = cache_dir
  data.load_task(config.data)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'process ended (status {proc.returncode}) before the awaited state:\n'
                           f'{proc.stderr.read()[-3000:] if proc.stderr else ""}')
    if time.time() - start > timeout:
      raise AssertionError('timed out')
    time.sleep(0.05)


def restore_state_arrays(step_dir: str):
  """({path: array}, Orbax item metadata) of the train state saved in `step_dir` (a checkpoint
  step's directory), restored onto this process's first device whatever mesh saved it."""
  path = os.path.join(step_dir, 'state')
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = checkpointer.restore(path, target)
  checkpointer.close()
  out = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[jax.tree_util.keystr(key_path)] = np.asarray(leaf)
  return out, metadata


def _latest_state(workdir: str) -> tuple[int, dict[str, np.ndarray], tuple[int, ...]]:
  """(step, {path: array}, saved mesh shape) of the newest 'latest' checkpoint, restored onto this
  process's first device whatever mesh saved it."""
  directory = os.path.join(workdir, 'checkpoints', 'latest')
  step = max(int(name) for name in os.listdir(directory) if name.isdigit())
  out, metadata = restore_state_arrays(os.path.join(directory, str(step)))
  mesh_shape = tuple(int(n) for n in metadata['step'].sharding.shape)
  return step, out, mesh_shape


def _without_timing(record: dict) -> dict:
  return {k: v for k, v in record.items() if not any(t in k for t in TIMING_KEYS)}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
  cache = str(tmp_path / 'cache')
  _generate_data(cache)
  overrides = ['--config.train.steps=20', '--config.train.checkpoint_every=5',
               '--config.train.eval_every=5', '--config.train.log_every=5']
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  # Both runs at once (2 cores): the uninterrupted one, and one killed once its step-10 checkpoint
  # is complete (Orbax renames a finished checkpoint into place, so the directory means done).
  proc_straight = subprocess.Popen(_argv(cache, straight, *overrides), env=_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc = subprocess.Popen(_argv(cache, killed, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: os.path.isdir(os.path.join(killed, 'checkpoints', 'latest', '10')), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(killed, 'results.json'))
  killed_at = max(r['step'] for r in metrics_lib.read_metrics(killed))
  assert 10 <= killed_at < 20

  resumed = subprocess.run(_argv(cache, killed, *overrides), env=_env(), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  out, err = proc_straight.communicate(timeout=600)
  assert proc_straight.returncode == 0, err[-3000:]
  assert out.strip().splitlines()[-1].split(' -- ')[0] == (
      resumed.stdout.strip().splitlines()[-1].split(' -- ')[0])

  # Same final parameters, optimizer state, RNG state and step, bit for bit.
  step_a, state_a, _ = _latest_state(straight)
  step_b, state_b, _ = _latest_state(killed)
  assert step_a == step_b == 20
  assert state_a.keys() == state_b.keys()
  assert any('rngs' in k for k in state_a) and any('opt_state' in k for k in state_a)
  for key in state_a:
    np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)

  # Same metrics: every logged record (timings aside) and the final results.
  records_a = [_without_timing(r) for r in metrics_lib.read_metrics(straight)]
  records_b = [_without_timing(r) for r in metrics_lib.read_metrics(killed)]
  assert records_a == records_b
  with open(os.path.join(straight, 'results.json')) as f:
    results_a = _without_timing(json.load(f))
  with open(os.path.join(killed, 'results.json')) as f:
    results_b = _without_timing(json.load(f))
  assert results_a == results_b


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  """On 2 CPU devices (a data-parallel mesh of 2), a SIGTERM mid-run saves the current step."""
  cache = str(tmp_path / 'cache')
  _generate_data(cache)
  workdir = str(tmp_path / 'run')
  overrides = ['--config.train.steps=100000', '--config.train.checkpoint_every=100000',
               '--config.train.eval_every=100000', '--config.train.log_every=2']
  proc = subprocess.Popen(
      _argv(cache, workdir, *overrides),
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=2'), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)

  def trained_a_few_steps():
    records = metrics_lib.read_metrics(workdir) if os.path.exists(workdir) else []
    return any(r['step'] >= 4 for r in records)

  _wait_for(trained_a_few_steps, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  message = [line for line in err.splitlines() if 'Interrupted by SIGTERM' in line]
  assert len(message) == 1, err[-3000:]
  step = int(message[0].split('checkpoint at step ')[1].split('.')[0])
  assert 4 <= step < 100000
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == [str(step)]
  saved_step, state, mesh_shape = _latest_state(workdir)
  assert saved_step == step and int(state["['step']"]) == step
  assert mesh_shape == (2, 1, 1, 1)  # data parallel over the 2 devices
