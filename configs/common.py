"""What every task config shares: the argument parser and the config layout.

A config is an ml_collections.ConfigDict with these sections (each documented where it is filled in):

  task       the task name ('listops', 'text', 'retrieval', 'image', 'pathfinder', 'lm')
  seed       model init, dropout/attention randomness and the training data order
  rng_impl   the jax.random implementation ('threefry2x32' or 'rbg')
  data       `efficient_attn.data.default_data_config(task, quick, tiny)`
  model      `efficient_attn.models.model_config_defaults()` set to the task's published sizes
  attention  `efficient_attn.models.attention_config_defaults(name)`: `name` (the variant of every
             layer), `options` (the options of `name` that are set; unset ones take the variant's
             defaults) and `layer_overrides` ('3:full' or '0:local(window=8),-1:full')
  optimizer  AdamW with warmup and rsqrt or cosine decay, gradient clipping (`base_optimizer`)
  train      batch size, steps, logging/evaluation/checkpoint periods (`base_train`)
  pretrain   self-pretraining on the task's inputs before training (`base_pretrain`; off by default)
  mesh       device-mesh axis sizes: data, fsdp, tensor, sequence (-1 = all remaining devices)
  mesh_axis_types  'auto' or 'explicit' (jax.sharding.AxisType of every mesh axis)
  sharding_rules   logical axis name -> mesh axes (efficient_attn.sharding.DEFAULT_RULES)
  sequence_parallel  split attention over the 'sequence' mesh axis when it is > 1

Sources quoted in the task configs: "the LRA paper" is Tay et al., "Long Range Arena: A Benchmark
for Efficient Transformers", ICLR 2021 (Section 2 describes the tasks, the appendix their setups);
"the LRA repo" is google-research/long-range-arena, its per-task configs
(lra_benchmarks/<task>/configs/*.py, named in each config) and training scripts
(lra_benchmarks/<task>/train.py: Adam with beta1 0.9, beta2 0.98, eps 1e-9, decoupled weight decay,
no gradient clipping, and the learning-rate factors `constant * linear_warmup * rsqrt_decay` for the
text-like tasks).
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections

import efficient_attn
from efficient_attn import data as data_lib
from efficient_attn import models
from efficient_attn import sharding

# The arguments every `get_config(arg)` understands, with their defaults (and so their types):
#   attention=<variant>  every layer uses that variant, with the variant's default options;
#   quick                CPU-sized: a small model and a run of minutes on 2 cores;
#   tiny                 seconds: a toy model and a handful of steps, for tests and smoke checks;
#   pretrain             self-pretraining then fine-tuning in the same total number of steps: the
#                        task's step budget (train.steps, as `quick`/`tiny` set it) is split in
#                        half, pretrain.steps = train.steps // 2, train.steps the rest (`finalize`).
ARG_DEFAULTS = {'attention': 'full', 'quick': False, 'tiny': False, 'pretrain': False}

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config argument like 'attention=bigbird,quick' into a ConfigDict.

  Args:
    arg: comma-separated items, each `key=value` or a bare `key` (meaning key=True); None or '' gives
      the defaults.
    **defaults: every valid key with its default; a value is converted to the default's type (bool
      accepts true/false/1/0/yes/no/on/off).

  Returns:
    A ConfigDict with one field per key of `defaults`.

  Raises:
    ValueError: for an unknown key, a repeated key, or a value that does not convert.
  """
  values = dict(defaults)
  seen = set()
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, has_value, raw = item.partition('=')
    key, raw = key.strip(), raw.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; valid arguments: '
                       f'{", ".join(sorted(defaults))} (e.g. "attention=local,quick").')
    if key in seen:
      raise ValueError(f'Config argument {key!r} is given twice in {arg!r}.')
    seen.add(key)
    default = defaults[key]
    if isinstance(default, bool):
      if not has_value or raw.lower() in _TRUE:
        values[key] = True
      elif raw.lower() in _FALSE:
        values[key] = False
      else:
        raise ValueError(f'Config argument {key!r} takes true/false, got {raw!r}.')
    elif not has_value:
      raise ValueError(f'Config argument {key!r} needs a value: {key}=<value>.')
    elif isinstance(default, int):
      try:
        values[key] = int(raw)
      except ValueError:
        raise ValueError(f'Config argument {key!r} takes an integer, got {raw!r}.') from None
    elif isinstance(default, float):
      try:
        values[key] = float(raw)
      except ValueError:
        raise ValueError(f'Config argument {key!r} takes a number, got {raw!r}.') from None
    else:
      values[key] = raw
  return ml_collections.ConfigDict(values)


def lra_rsqrt_peak(base_learning_rate: float, warmup_steps: int) -> float:
  """The peak of LRA's `constant * linear_warmup * rsqrt_decay` schedule: base / sqrt(warmup).

  LRA's factor is base * min(1, step / warmup) / sqrt(max(step, warmup)); our 'rsqrt' schedule is
  parameterised by its peak instead (reached at the end of warmup), e.g. 0.05 / sqrt(1000) ~ 1.58e-3.
  """
  return base_learning_rate / math.sqrt(warmup_steps)


def base_optimizer() -> ml_collections.ConfigDict:
  """Optimizer defaults (LRA train.py's Adam, with decoupled weight decay as optax.adamw)."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-3  # the PEAK learning rate (end of warmup)
  c.schedule = 'rsqrt'  # 'rsqrt' (LRA text tasks), 'cosine' (LRA image tasks) or 'constant'
  c.warmup_steps = 1000  # linear warmup from 0 to the peak
  c.end_learning_rate_factor = 0.0  # cosine only: final lr = factor * peak
  c.b1 = 0.9  # LRA train.py
  c.b2 = 0.98  # LRA train.py
  c.eps = 1e-9  # LRA train.py
  # Decoupled weight decay (flax.optim.Adam's weight_decay in LRA, = optax.adamw's), applied to
  # matrices only (ndim >= 2): LRA decayed biases and LayerNorm scales too, which only hurts.
  c.weight_decay = 0.1
  # Global-norm clipping (0 = off). LRA used none; 1.0 costs nothing and guards the long-sequence
  # runs against the occasional spike (a deliberate deviation).
  c.grad_clip_norm = 1.0
  return c


def base_train() -> ml_collections.ConfigDict:
  """Training-loop defaults; task configs set the batch size, steps and periods."""
  c = ml_collections.ConfigDict()
  c.batch_size = 32  # GLOBAL batch (all processes and devices together)
  c.steps = 5000  # optimizer updates
  c.eval_batch_size = 32  # global; evaluation batches are padded with weight-0 rows
  c.max_eval_batches = -1  # validation batches per evaluation (-1 = the whole split)
  c.log_every = 50  # train metrics (loss, accuracy, lr, steps/s, tokens/s, memory)
  c.eval_every = 500  # validation (also at the last step); picks the best checkpoint
  c.checkpoint_every = 1000  # latest-checkpoint period (also at the last step and on SIGTERM)
  c.keep_checkpoints = 2  # latest checkpoints kept (the best one is kept separately)
  c.async_checkpointing = True  # Orbax writes in the background while training continues
  c.progress_bar = True  # tqdm bar on process 0
  return c


def base_pretrain() -> ml_collections.ConfigDict:
  """Self-pretraining on the task's own training inputs, then fine-tuning (Amos, Berant and Gupta,
  "Never Train from Scratch", ICLR 2024); efficient_attn/pretraining.py describes it in full.

  Off by default (steps 0, no init_from). With steps > 0 a run first pretrains for `steps` updates
  in <workdir>/pretrain/ (the best checkpoint: the lowest validation denoising loss), then trains on
  the task for train.steps updates from the pretrained encoder under a new head. Both stages use
  config.optimizer (each with its own warmup and decay over its steps) and the train.* batch sizes
  and periods. Pretraining reads the inputs only, never the labels. Whenever pretraining is
  configured, 'classify'/'pair' models reserve one more vocabulary id, [MASK] = the task's
  vocab_size, in both stages.
  """
  c = ml_collections.ConfigDict()
  c.steps = 0  # pretraining updates (0: none); the `pretrain` config argument sets half the budget
  # 'auto': 'masked' for the bidirectional classify/pair models, 'causal' for 'lm'; 'masked'
  # (denoising: masked positions predicted, the loss on them only); 'causal' (next token).
  c.objective = 'auto'
  c.mask_rate = 0.15  # expected fraction of real tokens masked (padding never is)
  c.mean_span = 1.0  # mean masked-span length (geometric; 1 = single tokens, as BERT)
  # A pretraining directory (<run>/pretrain or the <run> holding it): fine-tune from its best
  # checkpoint instead of pretraining here (pretrain.steps is then not run). Same model sizes and
  # learned attention weights required; weightless variants mix (pretrain full, fine-tune local).
  c.init_from = ''
  return c


def base_config(task: str, arg: str | None) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """The config of `task` with every section at its default, and the parsed `arg`.

  Task configs then set the task's published hyper-parameters and call `finalize`.

  Raises:
    ValueError: for a bad `arg` or an unknown attention variant.
  """
  args = parse_arg(arg, **ARG_DEFAULTS)
  if args.attention not in efficient_attn.ATTENTION_NAMES:
    raise ValueError(f'Unknown attention variant {args.attention!r}; valid variants: '
                     f'{", ".join(efficient_attn.ATTENTION_NAMES)}.')
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  # jax.random implementation of every key of the run (model init, dropout, random attention):
  # 'threefry2x32' (JAX's default: portable across backends) or 'rbg' (compiles several times faster
  # on CPU and runs faster on accelerators; reproducible on one backend only).
  config.rng_impl = 'threefry2x32'
  config.data = data_lib.default_data_config(task, quick=args.quick, tiny=args.tiny)
  config.model = models.model_config_defaults()
  config.attention = models.attention_config_defaults(args.attention)
  config.optimizer = base_optimizer()
  config.train = base_train()
  config.pretrain = base_pretrain()
  # Data parallel over every device by default; the other axes are there so that later sharding
  # rules (FSDP, tensor and sequence parallelism) only need new sizes, not a new config layout.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1, 'sequence': 1})
  config.mesh_axis_types = 'auto'  # 'auto': XLA propagates shardings; 'explicit': sharding in types
  # Logical axis -> mesh axes ('a,b' for several, '' for replicated); docs/scaling.md. E.g.
  # --config.sharding_rules.vocab=tensor.
  config.sharding_rules = ml_collections.ConfigDict(
      {name: ','.join(axes) for name, axes in sharding.DEFAULT_RULES.items()})
  # With mesh.sequence > 1, split every attention layer's sequence over the 'sequence' axis.
  config.sequence_parallel = True
  return config, args


def quick_model(config: ml_collections.ConfigDict, *, num_layers: int = 2, num_heads: int = 4,
                emb_dim: int = 64, mlp_dim: int = 128, classifier_dim: int = 128) -> None:
  """The CPU-sized transformer of the quick configs (2 layers, 4 heads, width 64 by default)."""
  config.model.update(num_layers=num_layers, num_heads=num_heads, emb_dim=emb_dim, mlp_dim=mlp_dim,
                      classifier_dim=classifier_dim)


def quick_train(config: ml_collections.ConfigDict, *, steps: int, eval_every: int,
                batch_size: int = 32, warmup_steps: int | None = None) -> None:
  """Shrinks the loop for a 2-core CPU: few steps, frequent logging, one mid-run checkpoint."""
  config.train.steps = steps
  config.train.batch_size = batch_size
  config.train.eval_batch_size = max(batch_size, 64)
  config.train.eval_every = eval_every
  config.train.log_every = max(1, min(50, eval_every // 2))
  config.train.checkpoint_every = max(eval_every, steps // 2)
  config.optimizer.warmup_steps = (warmup_steps if warmup_steps is not None
                                   else max(1, steps // 10))


def tiny(config: ml_collections.ConfigDict) -> None:
  """A toy model and ten steps: seconds on a CPU, for tests and smoke checks of a variant."""
  config.rng_impl = 'rbg'  # threefry's RNG programs would dominate the compile time here
  config.model.num_layers = 1
  config.model.num_heads = 2
  config.model.emb_dim = 16
  config.model.mlp_dim = 32
  config.model.classifier_dim = 16
  config.model.dropout_rate = 0.1
  config.train.steps = 10
  config.train.batch_size = 8
  config.train.eval_batch_size = 16
  config.train.log_every = 2
  config.train.eval_every = 4
  config.train.checkpoint_every = 5
  config.train.max_eval_batches = -1
  config.optimizer.warmup_steps = 2
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = 'cosine'


def finalize(config: ml_collections.ConfigDict,
             args: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Applies the `pretrain` argument and locks the config (overriding a field that does not exist,
  a typo, is then an error).

  `pretrain` splits the step budget the task config set: the scratch run's train.steps = N becomes
  pretrain.steps = N // 2 and train.steps = N - N // 2, so pretraining + fine-tuning take the same
  total number of updates as training from scratch (ListOps quick: 800 = 400 + 400; Pathfinder
  quick: 100 = 50 + 50). Periods and warmup stay as set (each stage warms up over the same
  optimizer.warmup_steps).
  """
  if args is not None and args.get('pretrain', False):
    total = config.train.steps
    if total < 2:
      raise ValueError(f'the pretrain argument splits train.steps in two stages; {total} is too '
                       'few.')
    config.pretrain.steps = total // 2
    config.train.steps = total - total // 2
  config.lock()
  return config
