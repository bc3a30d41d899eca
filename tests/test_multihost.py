"""Multi-host training with two local JAX processes (4 fake CPU devices each), then a restore on
another mesh in a single process. Subprocess bodies: tests/multihost_worker.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'multihost_worker.py')
TIMEOUT_S = 240


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def env_with(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_COORDINATOR_ADDRESS')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def last_json(text: str) -> dict:
  lines = [line for line in text.strip().splitlines() if line.startswith('{')]
  return json.loads(lines[-1])


def test_two_processes_train_and_one_restores_on_another_mesh(tmp_path):
  workdir = str(tmp_path / 'run')
  port = free_port()
  procs = [subprocess.Popen([sys.executable, WORKER, 'train', str(i), str(port), workdir,
                             str(tmp_path / f'cache{i}')], env=env_with(4),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT_S)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:  # never leave a process waiting on a dead peer
      if p.poll() is None:
        p.kill()
        p.communicate()
  for rc, out, err in outs:
    assert rc == 0, err[-4000:]
  chief = last_json(outs[0][1])
  results = chief['results']
  assert results['steps'] == 6 and results['best_step'] in (3, 6)
  assert 'metrics.jsonl' in chief['files'] and 'results.json' in chief['files']
  # Only process 0 writes metrics: one record per logged step, not two.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if 'train/loss' in line]
  assert steps == [3, 6], steps
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'latest'))) == ['3', '6']

  proc = subprocess.run([sys.executable, WORKER, 'eval', workdir, str(tmp_path / 'cache_eval')],
                        env=env_with(4), capture_output=True, text=True, timeout=TIMEOUT_S,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  restored = last_json(proc.stdout)
  assert restored['devices'] == 4
  assert restored['record']['step'] == results['best_step']
  assert restored['metrics']['accuracy'] == pytest.approx(results['test/accuracy'], abs=1e-6)
  assert restored['metrics']['loss'] == pytest.approx(results['test/loss'], rel=1e-5)
