"""Subprocess body of tests/test_multihost.py (one JAX process each; the test sets XLA_FLAGS).

  multihost_worker.py train <process_id> <port> <workdir> <cache_dir>
      joins a 2-process run (jax.distributed.initialize on localhost:<port>, 4 fake CPU devices each),
      trains ListOps tiny on the 8-device mesh fsdp=2, tensor=2, sequence=2 and checkpoints it; process 0
      prints results.json's dict as JSON on its last line.
  multihost_worker.py eval <workdir> <cache_dir>
      one process (4 fake devices): restores the best checkpoint on the mesh fsdp=2, tensor=2 and
      prints the test metrics as JSON.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficient_attn import sharding  # pylint: disable=g-import-not-at-top

# fsdp and tensor shard the parameters (so the checkpoint is sharded); sequence=2 runs the model's
# sequence-parallel attention (with the CLS token the length is odd: the padded path).
TRAIN_MESH = {'data': 1, 'fsdp': 2, 'tensor': 2, 'sequence': 2}
EVAL_MESH = {'data': 1, 'fsdp': 2, 'tensor': 2, 'sequence': 1}


def train(process_id: int, port: int, workdir: str, cache_dir: str) -> None:
  # Before anything asks JAX for devices.
  sharding.initialize_distributed(f'localhost:{port}', 2, process_id)
  import jax  # pylint: disable=import-outside-toplevel
  from configs import listops  # pylint: disable=import-outside-toplevel
  from efficient_attn import train_lib  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                                 jax.device_count())
  config = listops.get_config('attention=local,tiny')
  config.attention.options.window = 4
  config.model.emb_dim = 32
  config.model.num_heads = 4
  config.model.mlp_dim = 64
  config.model.num_layers = 2
  config.data.cache_dir = cache_dir
  config.train.progress_bar = False
  config.train.steps = 6
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.train.log_every = 3
  config.mesh = TRAIN_MESH
  results = train_lib.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(json.dumps({'results': results, 'files': sorted(os.listdir(workdir))}))
  else:
    print(json.dumps({'process': jax.process_index()}))


def evaluate(workdir: str, cache_dir: str) -> None:
  from efficient_attn import train_lib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(workdir, train_lib.CONFIG_FILE)
  with open(config_path) as f:
    saved = json.load(f)
  # The restoring process reads the data from its own cache (the run's path belongs to process 0).
  saved['data']['cache_dir'] = cache_dir
  with open(config_path, 'w') as f:
    json.dump(saved, f)
  metrics, record = train_lib.evaluate_workdir(workdir, 'test', mesh_config=EVAL_MESH)
  print(json.dumps({'metrics': metrics, 'record': record, 'devices': jax.device_count()}))


if __name__ == '__main__':
  if sys.argv[1] == 'train':
    train(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  elif sys.argv[1] == 'eval':
    evaluate(sys.argv[2], sys.argv[3])
  else:
    raise ValueError(f'unknown role {sys.argv[1]!r}')
