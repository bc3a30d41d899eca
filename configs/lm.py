r"""Byte-level causal language modelling (enwik8, a local corpus, or the Python standard library).

  python train.py --config=configs/lm.py:attention=local
  python train.py --config=configs/lm.py:attention=strided,quick

Not an LRA task: it tests the variants causally. The metric is bits per byte on the validation split
(lower is better; the best checkpoint is the lowest). The corpus and the window length are data options
(`config.data`, default corpus: the running Python's standard library, so it works offline). The model
is a small GPT-style decoder; the optimisation is the usual AdamW recipe for such models (peak lr 6e-4,
1000 warmup steps, cosine decay to 10%, weight decay 0.1, clipping 1.0) rather than LRA's.
"""
from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
  """LM config; `arg`: 'attention=<variant>', 'quick' or 'tiny' (see configs/common.py)."""
  config, args = common.base_config('lm', arg)

  config.model.num_layers = 6
  config.model.num_heads = 8
  config.model.emb_dim = 512
  config.model.mlp_dim = 2048
  config.model.dropout_rate = 0.1
  config.model.positional = 'learned'

  config.train.batch_size = 32
  config.train.steps = 20_000
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_steps = 1000
  config.optimizer.learning_rate = 6e-4
  config.optimizer.end_learning_rate_factor = 0.1
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.train.eval_every = 1000
  config.train.max_eval_batches = 50  # validation on 50 batches; test always on the whole split
  config.train.checkpoint_every = 1000

  if args.quick:
    common.quick_model(config, mlp_dim=256, classifier_dim=config.model.classifier_dim)
    config.model.dropout_rate = 0.0
    common.quick_train(config, steps=300, eval_every=100, batch_size=16)
    config.optimizer.learning_rate = 2e-3
    config.train.max_eval_batches = 10
  if args.tiny:
    common.tiny(config)
  return common.finalize(config, args)
