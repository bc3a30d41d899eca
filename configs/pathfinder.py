r"""LRA Pathfinder: are the two markers of a 32x32 image joined by a dashed contour? 1024 pixels, 2 classes.

  python train.py --config=configs/pathfinder.py:attention=local
  python train.py --config=configs/pathfinder.py:attention=local,quick

Values follow the LRA paper (Tay et al., ICLR 2021: Section 2 for the task, the appendix for the
setup) and the LRA repo's lra_benchmarks/image/configs/pathfinder32/base_pathfinder32_config.py and
transformer_base.py. Where sources differ: the repo's base config has 1 layer, 2 heads and emb 32,
its transformer_base 1 layer, 4 heads and emb 128; we use 4 layers of 4 heads at the base config's
width (emb 32; a deliberate deviation in depth), with MLP 64 (2 x emb) and the base config's mean
pooling and fixed (sinusoidal) positions. Optimisation is the base config's: batch 512, lr 1e-3, one
epoch of warmup then cosine decay over 200 epochs of 160K examples, no weight decay. The contour
difficulty (the paper uses the hard split, contour length 14) is a data option (`config.data`).
"""
from __future__ import annotations

from configs import common

TRAIN_EXAMPLES = 160_000  # LRA repo: 160K train / 20K validation (/ 20K test)


def get_config(arg: str | None = None):
  """Pathfinder config; `arg`: 'attention=<variant>', 'quick' or 'tiny' (see configs/common.py)."""
  config, args = common.base_config('pathfinder', arg)

  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 32
  config.model.mlp_dim = 64
  config.model.classifier_dim = 64
  config.model.dropout_rate = 0.1
  config.model.pooling = 'mean'
  config.model.positional = 'sinusoidal'

  steps_per_epoch = TRAIN_EXAMPLES // 512
  config.train.batch_size = 512
  config.train.eval_batch_size = 512
  config.train.steps = steps_per_epoch * 200
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = steps_per_epoch
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0
  config.train.eval_every = steps_per_epoch
  config.train.checkpoint_every = steps_per_epoch * 5

  if args.quick:
    config.model.num_layers = 2
    common.quick_train(config, steps=300, eval_every=100, batch_size=32)
  if args.tiny:
    common.tiny(config)
  return common.finalize(config)
