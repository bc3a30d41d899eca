r"""LRA Retrieval: do two ACL Anthology papers (4K bytes each) cite one another? A dual encoder.

  python train.py --config=configs/retrieval.py:attention=bigbird
  python train.py --config=configs/retrieval.py:attention=bigbird,quick

Values follow the LRA paper (Tay et al., ICLR 2021: Section 2 for the task, the appendix for the
setup) and the LRA repo's lra_benchmarks/matching/configs/base_match_config.py. Where sources
differ: the paper combines the pooled vectors as [u, v, u*v, u-v], the repo code only concatenated
them; our model does the former (a model property, see efficient_attn/models). The repo's warmup
(8000 steps) is longer than its run (5000 steps), so its learning rate never stops rising (it ends
at 0.05 * 5000 / 8000 / sqrt(8000) ~ 3.5e-4); we keep that schedule as published.
The default (no `quick`/`tiny`) is the published setup, fixed (sinusoidal) positions included,
checked against efficient_attn/lra_reference.py by tests/test_configs.py.
"""
from __future__ import annotations

from configs import common


def get_config(arg: str | None = None):
  """Retrieval config; `arg`: 'attention=<variant>', 'quick' or 'tiny' (see configs/common.py)."""
  config, args = common.base_config('retrieval', arg)

  # Model (LRA repo base_match_config): 4 layers, 4 heads, emb 128, MLP 512, CLS pooling.
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.emb_dim = 128
  config.model.mlp_dim = 512
  config.model.classifier_dim = 512
  config.model.dropout_rate = 0.1
  config.model.pooling = 'cls'
  # LRA's TransformerEncoder default (learn_pos_emb=False), not overridden by the repo's config.
  config.model.positional = 'sinusoidal'

  # Optimisation (LRA repo base_match_config + train.py): batch 32, 5K steps, base lr 0.05 with 8000
  # warmup steps and rsqrt decay (peak parameter 0.05 / sqrt(8000), see the docstring), weight decay
  # 0.1.
  config.train.batch_size = 32
  config.train.steps = 5000
  config.optimizer.schedule = 'rsqrt'
  config.optimizer.warmup_steps = 8000
  config.optimizer.learning_rate = common.lra_rsqrt_peak(0.05, 8000)
  config.optimizer.weight_decay = 0.1
  config.train.eval_every = 500
  config.train.checkpoint_every = 500

  if args.quick or args.tiny:
    config.model.positional = 'learned'  # the cheaper runs keep the learned table they had
  if args.quick:
    common.quick_model(config)
    common.quick_train(config, steps=300, eval_every=100, batch_size=16)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = 'cosine'
  if args.tiny:
    common.tiny(config)
  return common.finalize(config, args)
