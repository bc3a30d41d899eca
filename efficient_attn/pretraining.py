"""Self-pretraining on the task's own inputs, then fine-tuning (Amos, Berant and Gupta, "Never Train
from Scratch: Fair Comparison of Long-Sequence Models Requires Data-Driven Priors", ICLR 2024).

`config.pretrain` (configs/common.py `base_pretrain`) selects it:
  steps       pretraining steps (0: no pretraining stage), run in <workdir>/pretrain/ before the
              `train.steps` fine-tuning steps in <workdir>.
  objective   'auto' (masked for the bidirectional 'classify'/'pair' models, causal for 'lm'),
              'masked' (denoising: masked positions predicted, the loss on them only) or 'causal'
              (next-token prediction, every layer attending causally; needs variants with a causal
              form; the only objective for 'lm', whose model is causal).
  mask_rate   the expected fraction of real tokens masked (0.15 as BERT's).
  mean_span   the mean length of a masked span: spans start at a real token with probability
              mask_rate / mean_span and have geometric lengths of mean mean_span (1: single tokens).
              Every masked position reads the [MASK] id; padding is never masked nor predicted.
  init_from   a pretraining directory (<run>/pretrain, or the run directory holding it): fine-tune
              from its best checkpoint instead of pretraining here (pretrain.steps is then not run).

Vocabulary: whenever pretraining is configured (steps > 0 or init_from) for a 'classify' or 'pair'
task, the model's vocabulary has one more id, [MASK] = the task's vocab_size (the CLS token of
pooling 'cls' moves to vocab_size + 1), in both stages, so the embedding tables of the two stages
have the same shape. 'lm' pretrains causally and needs no [MASK] id: its vocabulary is unchanged.

Labels are never read: the pretraining streams take 'inputs' and 'mask' (and evaluation 'weights')
of each batch and nothing else, so a split without labels pretrains the same. Pair tasks
(retrieval) pretrain the shared encoder on both documents, as a batch of 2b sequences. For 'lm' the
pretraining objective is the task's own (next-token prediction on the inputs alone): its
fine-tuning starts from the whole pretrained model, the next-token head included, while the other
kinds fine-tune the pretrained encoder (embeddings, positions, blocks with any learned attention
weights, final norm) under a new classification head.

Masks are drawn on the host from (seed, step) for training and (seed, batch index) for validation,
so a resumed run masks the same positions and every validation scores the same corrupted inputs.
Under several processes each adds its process index to that key: each process holds other rows of
the global batch, and the same key would give all of them one mask pattern.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

OBJECTIVES = ('auto', 'masked', 'causal')
FIELDS = ('steps', 'objective', 'mask_rate', 'mean_span', 'init_from')
PRETRAIN_DIR = 'pretrain'  # the pretraining stage's directory inside a run's workdir
# Streams of the mask generator (np.random.default_rng([seed, stream, index])).
_TRAIN_STREAM, _EVAL_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class Spec:
  """The resolved pretraining options of a config (see the module docstring)."""

  steps: int
  objective: str  # 'masked' or 'causal'
  mask_rate: float
  mean_span: float
  init_from: str
  mask_id: int | None  # the [MASK] id (None for 'lm')


def section(config: ml_collections.ConfigDict) -> Any:
  return config.get('pretrain', None)


def configured(config: ml_collections.ConfigDict) -> bool:
  """Whether the run pretrains or fine-tunes pretrained weights (so reserves the [MASK] id)."""
  p = section(config)
  return p is not None and (p.get('steps', 0) > 0 or bool(p.get('init_from', '')))


def model_vocab_size(config: ml_collections.ConfigDict, kind: str, vocab_size: int) -> int:
  """The vocabulary of the models of a run: the task's, plus the [MASK] id when pretraining is
  configured for a 'classify' or 'pair' task."""
  return vocab_size + 1 if configured(config) and kind != 'lm' else vocab_size


def check_config(config: ml_collections.ConfigDict, kind: str | None = None) -> None:
  """ValueError naming the field and what is valid; `kind` (if known) checks the objective too."""
  p = section(config)
  if p is None:
    return
  missing = [k for k in FIELDS if k not in p]
  if missing:
    raise ValueError(f'config.pretrain lacks {", ".join(missing)} (see configs/common.py).')
  steps = p.steps
  if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 2**31:
    raise ValueError(f'pretrain.steps must be an integer >= 0 (0: no pretraining), got {steps!r}.')
  if p.objective not in OBJECTIVES:
    raise ValueError(f'pretrain.objective must be one of {", ".join(OBJECTIVES)}, got '
                     f'{p.objective!r}.')
  rate = p.mask_rate
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
    raise ValueError(f'pretrain.mask_rate must be a number in (0, 1), e.g. 0.15; got {rate!r}.')
  span = p.mean_span
  if isinstance(span, bool) or not isinstance(span, (int, float)) or span < 1:
    raise ValueError(f'pretrain.mean_span must be a number >= 1 (1: single tokens), got {span!r}.')
  if rate / span > 1:
    raise ValueError(f'pretrain.mask_rate / pretrain.mean_span must be <= 1, got {rate}/{span}.')
  if not isinstance(p.init_from, str):
    raise ValueError(f'pretrain.init_from must be a path (a string; empty: none), got '
                     f'{p.init_from!r}.')
  if kind == 'lm' and p.objective == 'masked' and configured(config):
    raise ValueError("pretrain.objective='masked' needs a bidirectional model, but the 'lm' model "
                     "is causal in every layer: use 'auto' or 'causal'.")


def resolve(config: ml_collections.ConfigDict, kind: str, vocab_size: int) -> Spec | None:
  """The pretraining Spec of a run (None if pretraining is not configured). ValueError if invalid.

  `vocab_size` is the task's (the [MASK] id is that number)."""
  if not configured(config):
    return None
  check_config(config, kind)
  p = section(config)
  objective = p.objective
  if objective == 'auto':
    objective = 'causal' if kind == 'lm' else 'masked'
  return Spec(steps=int(p.steps), objective=objective, mask_rate=float(p.mask_rate),
              mean_span=float(p.mean_span), init_from=p.init_from,
              mask_id=None if kind == 'lm' else int(vocab_size))


# -- masking (host side) ---------------------------------------------------------------------------


def span_mask(mask: np.ndarray, rate: float, mean_span: float,
              rng: np.random.Generator) -> np.ndarray:
  """bool [b, L]: positions to mask, only where `mask` (bool [b, L], True for real tokens) is True.

  A span starts at each position with probability rate / mean_span; its length is geometric with
  mean `mean_span` (always 1 when mean_span == 1); spans are cut at the padding. The expected masked
  fraction is about `rate` (a little less where spans overlap).
  """
  mask = np.asarray(mask, bool)
  starts = rng.random(mask.shape) < rate / mean_span
  lengths = (np.ones(mask.shape, np.int64) if mean_span == 1
             else rng.geometric(1.0 / mean_span, size=mask.shape))
  position = np.arange(mask.shape[-1], dtype=np.int64)
  # A position is covered when some span starting at or before it ends after it.
  ends = np.maximum.accumulate(np.where(starts, position + lengths, 0), axis=-1)
  return (position < ends) & mask


def _flatten(x: np.ndarray, kind_pair: bool) -> np.ndarray:
  return x.reshape((-1,) + x.shape[2:]) if kind_pair else x


def make_batch(batch: Mapping[str, np.ndarray], spec: Spec, *, prepend_cls: bool,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A pretraining batch from the 'inputs', 'mask' (and 'weights', if present) of a task batch.

  Returns {'inputs' int32 [B, L] (masked positions set to the [MASK] id for 'masked'),
  'mask' bool [B, L], 'targets' int32 [B, L], 'token_weights' float32 [B, L]}, with B = b (2b for a
  pair batch [b, 2, L]: both documents). Targets line up with the model's logits after
  `align_logits`: for 'masked' the original token at each position (weight 1 where masked); for
  'causal' the next token (the token itself when a CLS state comes first).
  """
  inputs = np.asarray(batch['inputs'])
  pair = inputs.ndim == 3
  inputs = _flatten(inputs, pair).astype(np.int32)
  mask = _flatten(np.asarray(batch['mask']), pair).astype(bool)
  row_weights = np.ones(inputs.shape[:1], np.float32)
  if 'weights' in batch:  # evaluation: 0 for filler rows
    w = np.asarray(batch['weights'], np.float32)
    row_weights = np.repeat(w, 2) if pair else w
  if spec.objective == 'masked':
    masked = span_mask(mask, spec.mask_rate, spec.mean_span, rng)
    corrupted = np.where(masked, np.int32(spec.mask_id), inputs).astype(np.int32)
    targets, weights = inputs, masked.astype(np.float32)
  else:
    corrupted = inputs
    if prepend_cls:  # the CLS state predicts token 0, state t the token t
      targets, weights = inputs, mask.astype(np.float32)
    else:  # state t predicts token t + 1; the last state predicts nothing
      targets = np.concatenate([inputs[:, 1:], np.zeros_like(inputs[:, :1])], axis=1)
      weights = np.concatenate([mask[:, 1:], np.zeros_like(mask[:, :1])], axis=1)
      weights = weights.astype(np.float32)
  return {'inputs': corrupted, 'mask': mask, 'targets': targets.astype(np.int32),
          'token_weights': (weights * row_weights[:, None]).astype(np.float32)}


def _inputs_only(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # What pretraining may read of a task batch; the labels never go further.
  return {k: batch[k] for k in ('inputs', 'mask', 'weights') if k in batch}


def _mask_rng(seed: int, stream: int, index: int, process_index: int) -> np.random.Generator:
  # Process 0 keeps the single-process key, so one process masks exactly as before.
  key = [int(seed), stream, int(index)] + ([int(process_index)] if process_index else [])
  return np.random.default_rng(key)


def train_stream(batches: Iterator[Mapping[str, np.ndarray]], spec: Spec, *, seed: int,
                 start_step: int, prepend_cls: bool,
                 process_index: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Pretraining batches from the training stream `batches` (which starts at `start_step`): batch
  s is masked with np.random.default_rng([seed, 1, s]) (process p > 0: [seed, 1, s, p]), so a
  resumed stream masks the same."""
  step = int(start_step)
  for batch in batches:
    rng = _mask_rng(seed, _TRAIN_STREAM, step, process_index)
    yield make_batch(_inputs_only(batch), spec, prepend_cls=prepend_cls, rng=rng)
    step += 1


def eval_stream(batches: Iterator[Mapping[str, np.ndarray]], spec: Spec, *, seed: int,
                prepend_cls: bool, process_index: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Validation pretraining batches: batch i masked with default_rng([seed, 2, i]) (process p > 0:
  [seed, 2, i, p]), the same in every evaluation (the denoising loss of two evaluations compares
  the same corrupted inputs)."""
  for i, batch in enumerate(batches):
    rng = _mask_rng(seed, _EVAL_STREAM, i, process_index)
    yield make_batch(_inputs_only(batch), spec, prepend_cls=prepend_cls, rng=rng)


# -- objective (device side) -----------------------------------------------------------------------


def align_logits(logits: jax.Array, length: int, objective: str) -> jax.Array:
  """The model's logits [B, L', V] (L' = L, or L + 1 with a CLS state first) -> [B, L, V] in line
  with the batch's 'targets': the last L states for 'masked' (the CLS state predicts nothing), the
  first L for 'causal'."""
  return logits[:, -length:] if objective == 'masked' else logits[:, :length]


def batch_sums(objective: str, logits: jax.Array,
               batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """'loss_sum' (nats), 'correct', 'count' over the predicted positions (token_weights > 0)."""
  targets = batch['targets']
  logits = align_logits(logits, targets.shape[1], objective).astype(jnp.float32)
  weights = batch['token_weights'].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {'loss_sum': jnp.sum(nll * weights), 'correct': jnp.sum(correct * weights),
          'count': jnp.sum(weights)}


def transferred_keys(kind: str) -> tuple[str, ...]:
  """The top-level parameter groups fine-tuning takes from the pretrained model."""
  return ('encoder', 'head') if kind == 'lm' else ('encoder',)
