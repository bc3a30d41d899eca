r"""LRA Image: CIFAR-10 as a sequence of 1024 grayscale pixels (256 levels), 10 classes.

  python train.py --config=configs/image.py:attention=local
  python train.py --config=configs/image.py:attention=local,quick

Values follow the LRA paper (Tay et al., ICLR 2021: Section 2 for the task, the appendix for the
setup) and the LRA repo's lra_benchmarks/image/configs/cifar10/base_cifar10_config.py and
transformer_base.py. Where sources differ: revisions of the repo's Transformer config vary (emb 32
to 128, MLP 64 to 128, lr 2.5e-4 to 1e-3); we use one layer as the repo does, with 8 heads, emb 128,
MLP 128 and dropout 0.3, and the base config's optimisation (lr 5e-4, cosine, 1 epoch of warmup, no
weight decay, 200 epochs of batch 256 = 35K steps).
The default (no `quick`/`tiny`) is that setup, checked against efficient_attn/lra_reference.py by
tests/test_configs.py.
"""
from __future__ import annotations

from configs import common

TRAIN_EXAMPLES = 45_000  # LRA: 45K train / 5K validation / 10K test


def get_config(arg: str | None = None):
  """Image config; `arg`: 'attention=<variant>', 'quick' or 'tiny' (see configs/common.py)."""
  config, args = common.base_config('image', arg)

  # Model (LRA repo cifar10 configs, see the docstring): 1 layer, 8 heads, emb 128, dropout 0.3, CLS
  # pooling, learned positions.
  config.model.num_layers = 1
  config.model.num_heads = 8
  config.model.emb_dim = 128
  config.model.mlp_dim = 128
  config.model.classifier_dim = 128
  config.model.dropout_rate = 0.3
  config.model.pooling = 'cls'
  config.model.positional = 'learned'

  # Optimisation (LRA repo base_cifar10_config): batch 256, 200 epochs, lr 5e-4, linear warmup of one
  # epoch then cosine decay, no weight decay, no clipping.
  steps_per_epoch = TRAIN_EXAMPLES // 256
  config.train.batch_size = 256
  config.train.eval_batch_size = 256
  config.train.steps = steps_per_epoch * 200
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = steps_per_epoch
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 0.0
  config.train.eval_every = steps_per_epoch  # LRA: once per epoch
  config.train.checkpoint_every = steps_per_epoch * 5

  if args.quick:
    common.quick_model(config, num_layers=config.model.num_layers)  # LRA image: 1 layer
    config.model.dropout_rate = 0.1
    common.quick_train(config, steps=300, eval_every=100, batch_size=32)
    config.optimizer.learning_rate = 1e-3
  if args.tiny:
    common.tiny(config)
  return common.finalize(config, args)
