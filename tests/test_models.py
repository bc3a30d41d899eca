"""Tests of the Flax NNX models (efficient_attn.models): tiny shapes, every registered variant.

XLA compilation dominates the run time on CPU, so each test compiles one function that does all of its
forward and backward passes (`compiled`, with cheap compile options), prepares data with NumPy, and
builds models of the same few parameter shapes (eager initialisation compiles per shape).
"""
from __future__ import annotations

import logging

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import efficient_attn as ea
from efficient_attn import sharding
from efficient_attn.attention import api
from efficient_attn.models import (attention_config_defaults, count_params, create_model,
                                   model_config_defaults, parse_layer_overrides,
                                   resolve_layer_attentions)
from efficient_attn.models import layers

VOCAB = 11
CLASSES = 3
EMB, HEADS, MLP, CLASSIFIER = 16, 2, 32, 16
MAX_LENGTH = 40
LONG = 64  # the sequences of the every-variant test
# Halves XLA's CPU compile time; these tests check values, not speed.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

LEARNED = tuple(n for n in ea.ATTENTION_NAMES if api.variant_class(n).learned)


def small_options(name):
  """The variant's own options for sequences of tens of tokens (its class's `small_options`)."""
  return api.variant_class(name).small_options(HEADS)


def model_config(**changes):
  c = model_config_defaults()
  c.num_layers, c.num_heads, c.emb_dim, c.mlp_dim, c.classifier_dim = 2, HEADS, EMB, MLP, CLASSIFIER
  c.dropout_rate = 0.0
  c.update(changes)
  return c


def build(kind, name='full', *, attention=None, seed=0, max_length=MAX_LENGTH, **changes):
  attention = attention or {'name': name, 'options': small_options(name)}
  return create_model(model_config(**changes), attention, kind=kind, vocab_size=VOCAB,
                      num_classes=VOCAB if kind == 'lm' else CLASSES, max_length=max_length,
                      rngs=nnx.Rngs(params=seed, dropout=seed + 1, attention=seed + 2))


def batch(shape, real_lengths, seed=0):
  """Random tokens in [1, VOCAB) with trailing padding (id 0): (inputs int32, mask bool), NumPy."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=shape).astype(np.int32)
  mask = np.arange(shape[-1]) < np.asarray(real_lengths)[..., None]
  return np.where(mask, tokens, 0).astype(np.int32), mask


def repad(inputs, mask, seed=1):
  """The same real tokens with other (random, in-vocabulary) ids at the padded positions."""
  other = np.random.default_rng(seed).integers(1, VOCAB, size=inputs.shape).astype(np.int32)
  return np.where(mask, inputs, other)


def compiled(fn):
  """`fn(*models, *args, **static)` under jax.jit through nnx.split/merge (FAST_COMPILE options).

  Keyword arguments are static. The models' new state (rng stream counters) is written back after
  every call, as a training loop built on split/merge must do.
  """
  cache = {}

  def call(models, *args, **static):
    graphdef, state = nnx.split(models)
    key = (graphdef, tuple(sorted(static.items())))
    if key not in cache:

      def pure(state, *args):
        merged = nnx.merge(graphdef, state)
        return fn(*merged, *args, **static), nnx.state(merged)

      cache[key] = jax.jit(pure, compiler_options=FAST_COMPILE)
    out, state = cache[key](state, *args)
    nnx.update(models, state)
    return jax.tree.map(np.asarray, out)

  return call


def ce_loss(model, inputs, mask, labels):
  logits = model(inputs, mask, train=True)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_finite_nonzero(tree):
  leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  assert sum(float(np.sum(np.abs(x))) for x in leaves) > 0


def eval_shape(model, inputs, mask):
  """The output shape/dtype of an evaluation call, traced but not compiled."""
  return jax.eval_shape(lambda x, m: model(x, m, train=False), inputs, mask)


# -- every variant: classifier (CLS pooling) and causal LM ------------------------------------------


@compiled
def classify(classifier, inputs, mask, train=False):
  return classifier(inputs, mask, train=train)


@compiled
def classify_and_lm(classifier, lm, cls_inputs, cls_mask, lm_inputs, lm_mask, train=False):
  return classifier(cls_inputs, cls_mask, train=train), lm(lm_inputs, lm_mask, train=train)


@pytest.mark.parametrize('name', ea.ATTENTION_NAMES)
def test_variant_padding_invariance_and_causality(name):
  variant = api.variant_class(name)
  # 64 tokens: long enough for the variants' small_options to be sparse (and random) patterns.
  n = LONG
  classifier = build('classify', name, pooling='cls', max_length=n)
  inputs, mask = batch((2, n), [n, 45])
  t = 30  # the LM token that gets changed
  changed = inputs.copy()
  changed[:, t] = inputs[:, t] % (VOCAB - 1) + 1  # another real token id
  cls_x, cls_m = np.concatenate([inputs, repad(inputs, mask)]), np.concatenate([mask, mask])
  lm_x = np.concatenate([inputs, repad(inputs, mask), changed])
  lm_m = np.concatenate([mask, mask, mask])
  if variant.supports_causal:
    lm = build('lm', name, max_length=n)
    models = (classifier, lm)
    run = lambda: classify_and_lm(models, cls_x, cls_m, lm_x, lm_m)
  else:
    # Bidirectional only (linformer, nystrom): the causal LM refuses it when called.
    with pytest.raises(ValueError, match='causal'):
      eval_shape(build('lm', name, max_length=n), inputs, mask)
    run = lambda: (classify((classifier,), cls_x, cls_m), None)
  cls_logits, lm_logits = run()
  assert cls_logits.shape == (4, CLASSES) and cls_logits.dtype == np.float32
  assert np.all(np.isfinite(cls_logits))
  # Padded token ids change nothing at real positions.
  np.testing.assert_allclose(cls_logits[2:], cls_logits[:2], rtol=1e-5, atol=1e-5)
  if variant.supports_causal:
    assert lm_logits.shape == (6, n, VOCAB) and lm_logits.dtype == np.float32
    assert np.all(np.isfinite(lm_logits))
    np.testing.assert_allclose(lm_logits[2:4][mask], lm_logits[:2][mask], rtol=1e-5, atol=1e-5)
    # Changing token t changes no logit before t (and does change some from t on).
    assert max_diff(lm_logits[4:, t:], lm_logits[:2, t:]) > 1e-4
    if name != 'lsh':
      # Reformer LSH sorts the whole sequence by hash bucket, so a later token can move an earlier
      # one into another chunk: its causal mask holds (the probe test checks that causal=True
      # reaches every layer), but the chunking itself sees the future. A property of LSH, not of
      # the model.
      np.testing.assert_allclose(lm_logits[4:, :t], lm_logits[:2, :t], rtol=1e-5, atol=1e-5)

  if variant.needs_rng:
    # Evaluation uses fixed keys; every training call draws fresh ones.
    again = run()
    np.testing.assert_array_equal(again[0], cls_logits)
    if variant.supports_causal:
      np.testing.assert_array_equal(again[1], lm_logits)
    train_a = classify((classifier,), cls_x, cls_m, train=True)
    train_b = classify((classifier,), cls_x, cls_m, train=True)
    assert max_diff(train_a, train_b) > 1e-6


def test_pair_dual_encoder_mean_pooling_dropout_and_grads():
  pair = build('pair', pooling='mean', dropout_rate=0.1)
  inputs, mask = batch((2, 2, 12), [[12, 7], [5, 12]])
  both_x, both_m = np.concatenate([inputs, repad(inputs, mask)]), np.concatenate([mask, mask])
  labels = np.array([0, 2])

  @compiled
  def run(pair):
    logits = pair(both_x, both_m, train=False)
    # The dual encoder by hand: one shared encoder, masked mean pooling, [u, v, u*v, u-v].
    states, smask = pair.encoder(inputs.reshape(4, 12), mask.reshape(4, 12), causal=False,
                                 train=False)
    pooled = jnp.sum(states * smask[..., None], 1) / jnp.sum(smask, 1, keepdims=True)
    u, v = pooled.reshape(2, 2, -1)[:, 0], pooled.reshape(2, 2, -1)[:, 1]
    by_hand = pair.head(jnp.concatenate([u, v, u * v, u - v], -1))
    loss, grads = nnx.value_and_grad(ce_loss)(pair, inputs, mask, labels)
    return logits, by_hand, loss, grads

  logits, by_hand, loss_a, grads = run((pair,))
  again, _, loss_b, _ = run((pair,))
  assert logits.shape == (4, CLASSES) and logits.dtype == np.float32
  np.testing.assert_allclose(logits[2:], logits[:2], rtol=1e-5, atol=1e-5)  # padding invariance
  np.testing.assert_allclose(logits[:2], by_hand, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(again, logits)  # no dropout in evaluation
  assert abs(float(loss_a) - float(loss_b)) > 1e-6  # fresh dropout masks every training step
  assert_finite_nonzero(grads)


def test_bfloat16_compute_and_grads():
  inputs, mask = batch((2, 16), [16, 11])
  f32 = build('classify', pooling='mean')
  bf16 = build('classify', pooling='mean', dtype='bfloat16')
  lm = build('lm', dtype='bfloat16', dropout_rate=0.1)

  @compiled
  def run(f32, bf16, lm):
    return (f32(inputs, mask, train=False), bf16(inputs, mask, train=False),
            nnx.value_and_grad(ce_loss)(lm, inputs, mask, inputs))

  want, got, (loss, grads) = run((f32, bf16, lm))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)  # same params, bf16 compute
  assert np.isfinite(loss)
  assert_finite_nonzero(grads)
  lm_out = eval_shape(lm, inputs, mask)
  assert lm_out.shape == (2, 16, VOCAB) and lm_out.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))


def test_nnx_jit_does_not_retrace():
  model = build('classify', dropout_rate=0.1)
  inputs, mask = batch((2, 16), [16, 9])
  traces = []

  @nnx.jit(static_argnames='train')
  def forward(model, inputs, mask, train):
    traces.append(train)
    return model(inputs, mask, train=train)

  step_a, step_b = forward(model, inputs, mask, True), forward(model, inputs, mask, True)
  assert traces == [True]  # the rng streams advance without a retrace
  assert max_diff(step_a, step_b) > 1e-6


# -- what each layer's attention receives -----------------------------------------------------------


@pytest.fixture
def probe(monkeypatch):
  """Registers '_probe' on a copy of the registry (restored after the test); returns its records.

  '_probe' has random structure (needs_rng): each query sees a random half of the keys drawn from
  `rng`. Every call records causal (at trace time) and, through ordered debug callbacks that also work
  under jit, the padding mask and the key it got.
  """
  monkeypatch.setattr(api, '_REGISTRY', dict(api._REGISTRY))
  records = {'causal': [], 'calls': []}

  def record(padding_mask, key_data):
    records['calls'].append((np.asarray(padding_mask), np.asarray(key_data)))

  class Probe(api.Attention):
    needs_rng = True

    def dense_mask(self, length, *, causal=False, rng=None, heads=None):
      mask = jax.random.bernoulli(rng, 0.5, (heads or 1, length, length)) | jnp.eye(length, dtype=bool)
      return mask & jnp.tril(mask) if causal else mask

    def _attend(self, q, k, v, *, padding_mask, causal, rng):
      records['causal'].append(causal)
      jax.debug.callback(record, padding_mask, jax.random.key_data(rng), ordered=True)
      mask = self.dense_mask(q.shape[1], causal=causal, rng=rng, heads=q.shape[2])
      return ea.dense_attention(q, k, v, mask=mask[None] & padding_mask[:, None, None, :])

  api.register('_probe')(Probe)
  return records


def test_probe_masks_causal_and_keys_reach_every_layer(probe):
  classifier = build('classify', '_probe', pooling='cls', dropout_rate=0.1)
  lm = build('lm', '_probe', pooling='cls', dropout_rate=0.1, seed=10)  # the LM ignores pooling
  inputs, mask = batch((2, 16), [16, 10])
  traces = []

  @compiled
  def run(classifier, lm, train):
    traces.append(train)
    return classifier(inputs, mask, train=train), lm(inputs, mask, train=train)

  models = (classifier, lm)
  eval_a, eval_b = run(models, train=False), run(models, train=False)
  train_a, train_b = run(models, train=True), run(models, train=True)
  jax.effects_barrier()
  assert traces == [False, True]  # same shapes: no retrace, even as the rng streams advance
  # classifier layers 0, 1 then LM layers 0, 1, per trace.
  assert probe['causal'] == [False, False, True, True] * 2
  with_cls = np.concatenate([np.ones((2, 1), bool), mask], axis=1)
  assert len(probe['calls']) == 16
  for i, (padding_mask, _) in enumerate(probe['calls']):
    np.testing.assert_array_equal(padding_mask, with_cls if i % 4 < 2 else mask)

  for a, b in zip(eval_a, eval_b):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(train_a, train_b):
    assert max_diff(a, b) > 1e-6
  keys = [tuple(k.ravel()) for _, k in probe['calls']]

  def evaluation_key(seed, layer):
    # Layer i's stream is the i-th fork of the model's 'attention' stream, fold_in(key(seed), i);
    # its evaluation key is fold_in(stream key, 2**32 - 1), never a training draw (counts stay
    # below 2**32 - 1).
    stream = jax.random.fold_in(jax.random.key(seed), layer)
    return tuple(np.asarray(jax.random.key_data(jax.random.fold_in(stream, 2**32 - 1))).ravel())

  # The classifier's attention stream has seed 2 (build(seed=0)), the LM's seed 12 (build(seed=10)).
  fixed = [evaluation_key(2, 0), evaluation_key(2, 1), evaluation_key(12, 0), evaluation_key(12, 1)]
  assert keys[:8] == fixed * 2  # evaluation: from the run's seed and the layer, the same every call
  assert len(set(fixed)) == 4  # distinct per layer and per seed
  assert len(set(keys[8:])) == 8  # training: fresh per layer and per step (the two models' seeds differ)
  assert not set(keys[8:]) & set(fixed)


def test_missing_rng_streams_raise(probe):
  with pytest.raises(ValueError, match="'attention'"):
    create_model(model_config(), {'name': '_probe'}, kind='classify', vocab_size=VOCAB,
                 num_classes=CLASSES, max_length=16, rngs=nnx.Rngs(params=0))
  with pytest.raises(ValueError, match='dropout'):
    create_model(model_config(dropout_rate=0.1), {'name': 'full'}, kind='classify',
                 vocab_size=VOCAB, num_classes=CLASSES, max_length=16, rngs=nnx.Rngs(params=0))


# -- per-layer overrides ----------------------------------------------------------------------------


def layer_attentions(model):
  return [block.attention.attention for block in model.encoder.blocks]


def test_layer_overrides_build_mixed_model():
  base = 'local' if 'local' in ea.ATTENTION_NAMES else 'chunked'
  config = attention_config_defaults(base)
  for key, value in small_options(base).items():
    config.options[key] = value
  config.layer_overrides = '-1:full'  # as from --config.attention.layer_overrides=-1:full
  model = build('classify', attention=config, num_layers=3)
  assert [a.name for a in layer_attentions(model)] == [base, base, 'full']
  assert layer_attentions(model)[0] == ea.make_attention(base, **small_options(base))
  inputs, mask = batch((2, 20), [20, 15])
  assert eval_shape(model, inputs, mask).shape == (2, CLASSES)

  # An override variant takes its options from the override item.
  config = attention_config_defaults('full')
  first_option, value = next(iter(small_options(base).items()))
  config.layer_overrides = f'0:{base}({first_option}={value!r})'
  attentions = layer_attentions(build('classify', attention=config))
  assert attentions[0].name == base and attentions[1].name == 'full'
  assert getattr(attentions[0], first_option) == value


def test_parse_layer_overrides():
  assert parse_layer_overrides('', 4) == {}
  assert parse_layer_overrides(' 0:full , -1:full ', 4) == {0: 'full', 3: 'full'}
  assert parse_layer_overrides({2: 'full'}, 4) == {2: 'full'}


@pytest.mark.parametrize('overrides, match', [
    ('2:full', 'out of range'),
    ('-3:full', 'out of range'),
    ('x:full', 'cannot parse'),
    ('full', 'cannot parse'),
    ('0:', 'cannot parse'),
    ('0:nope', "unknown attention 'nope'"),
    ('0:full,0:full', 'given twice'),
    ('1:full,-1:full', 'given twice'),
    (3, 'must be a string'),
])
def test_bad_layer_overrides_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    build('classify', attention={'name': 'full', 'layer_overrides': overrides})


# -- Longformer's global projections ----------------------------------------------------------------

def test_longformer_global_projections_match_direct_recomputation():
  options = dict(window=2, global_tokens=(0, 9, 99))  # 99 lies past the sequence: ignored
  attention = {'name': 'longformer', 'options': options}
  plain = build('classify', attention=attention)
  model = build('classify', attention=attention, longformer_global_projections=True)
  layer = model.encoder.blocks[0].attention
  assert layer.has_global_projections and not plain.encoder.blocks[0].attention.has_global_projections
  assert count_params(model) == count_params(plain) + 2 * 3 * (EMB * EMB + EMB)

  # Initialised as copies of the local projections: the same function as without them.
  inputs, mask = batch((2, 20), [20, 8])  # position 9 is padding in the second row
  np.testing.assert_allclose(*classify_and_lm((model, plain), inputs, mask, inputs, mask),
                             rtol=1e-5, atol=1e-5)

  # Give the global projections their own values, then recompute one layer by hand.
  keys = iter(jax.random.split(jax.random.key(7), 6))
  for proj in (layer.global_query, layer.global_key, layer.global_value):
    proj.kernel[...] = jax.random.normal(next(keys), proj.kernel.shape) * 0.3
    proj.bias[...] = jax.random.normal(next(keys), proj.bias.shape) * 0.1
  x = np.random.default_rng(3).normal(size=(2, 20, EMB)).astype(np.float32)
  attn = ea.make_attention('longformer', **options)
  n, g = x.shape[1], np.array([0, 9])

  @compiled
  def run(layer):
    results = []
    for causal in (False, True):
      got = layer(x, mask, causal=causal, train=False)
      q, k, v = layer.query(x), layer.key(x), layer.value(x)
      visible = attn.dense_mask(n, causal=causal)[None] & mask[:, None, None, :]
      y = ea.dense_attention(q, k, v, mask=visible)
      every = mask[:, None, None, :] & (jnp.tril(jnp.ones((n, n), bool))[g] if causal else True)
      yg = ea.dense_attention(layer.global_query(x)[:, g], layer.global_key(x),
                              layer.global_value(x), mask=every)
      y = jnp.where(mask[:, :, None, None], y.at[:, g].set(yg), 0)  # padded rows are zeros
      local_only = layer.out(attn(q, k, v, padding_mask=mask, causal=causal))
      results.append((got, layer.out(y), local_only))
    return results

  for got, want, local_only in run((layer,)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The global rows really changed (so the comparison tests the recomputation); no other row did.
    assert max_diff(local_only[0, g], got[0, g]) > 1e-3
    np.testing.assert_allclose(local_only[:, 1:9], got[:, 1:9], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(local_only[:, 10:], got[:, 10:], rtol=1e-4, atol=1e-5)


def test_global_projections_ignored_for_other_variants():
  # The capability is the variant's `global_tokens` option, not its name.
  assert [n for n in ea.ATTENTION_NAMES if layers.has_global_tokens(ea.make_attention(n))] == (
      ['longformer'] if 'longformer' in ea.ATTENTION_NAMES else [])
  model = build('classify', 'full', longformer_global_projections=True)
  assert not model.encoder.blocks[0].attention.has_global_projections
  assert count_params(model) == count_params(build('classify', 'full'))


def test_global_rows_attention_is_linear_in_length():
  q = jnp.ones((1, 2, 2, 4))
  k = v = jnp.ones((1, 64, 2, 4))
  hlo = jax.jit(lambda q, k, v: layers.global_rows_attention(
      q, k, v, np.array([0, 5]), padding_mask=jnp.ones((1, 64), bool), causal=True)).lower(
          q, k, v).as_text()
  assert '64x64' not in hlo and '2x64' in hlo


# -- parameters ------------------------------------------------------------------------------------


def test_params_have_logical_axis_names():
  model = build('pair')
  state = nnx.state(model, nnx.Param)
  for path, param in nnx.to_flat_state(state):
    names = param.get_metadata('out_sharding')
    assert isinstance(names, tuple) and len(names) == param[...].ndim, path
    assert param[...].dtype == jnp.float32
  block = model.encoder.blocks[0]
  expected = [
      (block.attention.query.kernel, (EMB, HEADS, EMB // HEADS), ('embed', 'heads', 'kv')),
      (block.attention.value.bias, (HEADS, EMB // HEADS), ('heads', 'kv')),
      (block.attention.out.kernel, (HEADS, EMB // HEADS, EMB), ('heads', 'kv', 'embed')),
      (block.mlp.wi.kernel, (EMB, MLP), ('embed', 'mlp')),
      (block.mlp.wo.kernel, (MLP, EMB), ('mlp', 'embed')),
      (model.encoder.token_embedding, (VOCAB + 1, EMB), ('vocab', 'embed')),  # + the CLS row
      (model.encoder.position_embedding, (MAX_LENGTH + 1, EMB), ('length', 'embed')),
      (model.head.hidden.kernel, (4 * EMB, CLASSIFIER), ('embed', 'mlp')),  # [u, v, u*v, u-v]
  ]
  for param, shape, names in expected:
    assert param.shape == shape and param.get_metadata('out_sharding') == names
  specs = nnx.get_partition_spec(state)
  assert tuple(specs['encoder']['blocks'][0]['attention']['key']['kernel'].get_value()) == (
      'embed', 'heads', 'kv')


def test_count_params_matches_formula():
  e, m, c, n = EMB, MLP, CLASSIFIER, MAX_LENGTH
  per_layer = 2 * 2 * e + 4 * (e * e + e) + (e * m + m + m * e + e)
  head = e * c + c + c * CLASSES + CLASSES
  cls_model = build('classify', pooling='cls')
  assert count_params(cls_model) == (VOCAB + 1) * e + (n + 1) * e + 2 * per_layer + 2 * e + head
  mean_sin = build('classify', pooling='mean', positional='sinusoidal')
  assert count_params(mean_sin) == VOCAB * e + 2 * per_layer + 2 * e + head
  inputs, mask = batch((2, n), [n, 5])
  assert eval_shape(mean_sin, inputs, mask).shape == (2, CLASSES)


# -- configs and errors -----------------------------------------------------------------------------


def test_attention_config_defaults_hold_variant_defaults():
  every_option = {o for n in ea.ATTENTION_NAMES for o in api.option_names(n)}
  for name in ea.ATTENTION_NAMES:
    config = attention_config_defaults(name)
    assert config.name == name and config.layer_overrides == ''
    # One unset field per option of any variant; unset options resolve to the variant's defaults.
    assert set(config.options.keys()) == every_option
    assert all(config.options[o] is None for o in every_option)
    assert resolve_layer_attentions(config, 1) == (ea.make_attention(name),)
  with pytest.raises(ValueError, match="unknown attention 'nope'"):
    attention_config_defaults('nope')
  assert isinstance(model_config_defaults(), ml_collections.ConfigDict)


def test_none_default_options_are_settable_placeholders():
  config = attention_config_defaults('local')
  assert config.options.block_size is None  # a typed placeholder: unset means the variant's default
  assert resolve_layer_attentions(config, 1)[0].block_size is None
  config.options.block_size = 16  # what --config.attention.options.block_size=16 does
  config.options.window = 5
  (attention,) = resolve_layer_attentions(config, 1)
  assert attention.block_size == 16 and attention.window == 5
  with pytest.raises(TypeError):
    config.options.block_size = 'sixteen'  # the placeholder keeps its type
  with pytest.raises(ValueError, match='variant_options no longer exists'):
    resolve_layer_attentions({'name': 'local', 'variant_options': {}}, 1)


@pytest.mark.parametrize('changes, match', [
    (dict(emb_dim=15), 'divisible'),
    (dict(num_layers=0), 'num_layers'),
    (dict(pooling='max'), 'pooling'),
    (dict(positional='rotary'), 'positional'),
    (dict(dtype='float16'), 'dtype'),
    (dict(dropout_rate=1.0), 'dropout_rate'),
])
def test_bad_model_config_raises(changes, match):
  with pytest.raises(ValueError, match=match):
    build('classify', **changes)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='Unknown model option'):
    create_model({'num_layer': 2}, {'name': 'full'}, kind='classify', vocab_size=VOCAB,
                 num_classes=CLASSES, max_length=16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown attention 'nope'"):
    build('classify', attention={'name': 'nope'})
  with pytest.raises(ValueError, match='layer 0'):
    build('classify', attention={'name': 'full', 'options': {'window': 3}})
  with pytest.raises(ValueError, match='Unknown attention config field'):
    build('classify', attention={'name': 'full', 'overrides': '0:full'})
  with pytest.raises(ValueError, match='kind'):
    create_model(model_config(), {'name': 'full'}, kind='regress', vocab_size=VOCAB,
                 num_classes=CLASSES, max_length=16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='num_classes'):
    create_model(model_config(), {'name': 'full'}, kind='lm', vocab_size=VOCAB,
                 num_classes=CLASSES, max_length=16, rngs=nnx.Rngs(0))
  model = build('classify')
  inputs, mask = batch((2, MAX_LENGTH + 1), [MAX_LENGTH + 1, 3])
  with pytest.raises(ValueError, match='max_length'):
    model(inputs, mask, train=False)
  inputs, mask = inputs[:, :16], mask[:, :16]
  with pytest.raises(ValueError, match='train'):
    model(inputs, mask, train=jnp.array(True))
  with pytest.raises(ValueError, match='mask'):
    model(inputs, mask[:, :15], train=False)
  with pytest.raises(ValueError, match='inputs'):
    build('pair')(inputs, mask, train=False)


# -- learned attention weights ---------------------------------------------------------------------


@pytest.mark.parametrize('name', LEARNED)
def test_learned_attention_weights_are_params_that_train(name):
  model = build('classify', name, pooling='cls')
  attn = ea.make_attention(name, **small_options(name))
  axes = attn.param_axes()
  # Sized for the longest sequence a layer sees: max_length + the CLS token.
  want = jax.eval_shape(lambda: attn.init(jax.random.key(0), length=MAX_LENGTH + 1, heads=HEADS,
                                          head_dim=EMB // HEADS))
  assert axes and set(axes) == set(want)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  specs = nnx.get_partition_spec(state)
  for i, block in enumerate(model.encoder.blocks):
    assert set(block.attention.variant_params.keys()) == set(axes)
    for pname, names in axes.items():
      param = flat[('encoder', 'blocks', i, 'attention', 'variant_params', pname)]
      assert isinstance(param, nnx.Param)
      assert param.shape == want[pname].shape and param[...].dtype == jnp.float32
      assert param.get_metadata('out_sharding') == names
      spec = specs['encoder']['blocks'][i]['attention']['variant_params'][pname].get_value()
      assert tuple(spec) == names
      for logical in names:  # every logical name has a sharding rule
        assert logical in sharding.DEFAULT_RULES

  inputs, mask = batch((2, 24), [24, 17])
  labels = np.array([0, 2])
  weights = model.encoder.blocks[0].attention.variant_params
  before = {pname: np.asarray(p[...]) for pname, p in weights.items()}

  @compiled
  def sgd_step(model):
    loss, grads = nnx.value_and_grad(ce_loss)(model, inputs, mask, labels)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))
    return loss, grads['encoder']['blocks'][0]['attention']['variant_params']

  loss, grads = sgd_step((model,))
  assert np.isfinite(loss)
  assert_finite_nonzero(grads)
  after = model.encoder.blocks[0].attention.variant_params
  for pname, value in before.items():
    assert max_diff(after[pname][...], value) > 1e-6, pname  # the step changed every weight


def test_unsplit_variants_log_one_warning(monkeypatch, caplog):
  # A 'sequence' axis of 2 (as under a mesh) without devices: only the unsplit path is taken here.
  monkeypatch.setattr(sharding, 'sequence_axis_size', lambda: 2)
  monkeypatch.setattr(layers, '_WARNED_UNSPLIT', set())
  model = build('classify', 'linformer', pooling='cls')  # two layers, one config
  inputs, mask = batch((2, 24), [24, 17])
  with caplog.at_level(logging.WARNING, logger=layers.__name__):
    eval_shape(model, inputs, mask)
    eval_shape(model, inputs, mask)
  lines = [r.getMessage() for r in caplog.records
           if 'without sequence parallelism' in r.getMessage()]
  assert len(lines) == 1, lines
  assert "'linformer'" in lines[0] and 'not split' in lines[0]
  if 'lsh' in ea.ATTENTION_NAMES:
    assert 'plan' in layers.unsplit_reason(ea.make_attention('lsh'), 24, 2)
  if 'bigbird' in ea.ATTENTION_NAMES:  # unsplit only when the length needs padding to the axis
    assert 'multiple' in layers.unsplit_reason(ea.make_attention('bigbird'), 25, 2)
    assert layers.unsplit_reason(ea.make_attention('bigbird'), 24, 2) is None
  if 'local' in ea.ATTENTION_NAMES:
    assert layers.unsplit_reason(ea.make_attention('local'), 25, 2) is None


def test_linformer_classifier_trains_through_train_and_evaluate(tmp_path):
  from configs import listops  # pylint: disable=import-outside-toplevel
  from efficient_attn import data  # pylint: disable=import-outside-toplevel
  from efficient_attn import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from efficient_attn import train_lib  # pylint: disable=import-outside-toplevel
  from efficient_attn import train_state as ts  # pylint: disable=import-outside-toplevel
  from test_train_resume import _latest_state  # pylint: disable=import-outside-toplevel

  config = listops.get_config('attention=linformer,tiny')
  config.data.cache_dir = str(tmp_path / 'cache')
  config.train.progress_bar = False
  config.attention.options.projected_length = 8
  config.model.dropout_rate = 0.0
  for key, value in dict(steps=3, eval_every=3, checkpoint_every=3, log_every=1).items():
    config.train[key] = value
  workdir = str(tmp_path / 'run')
  results = train_lib.train_and_evaluate(config, workdir)
  assert results['steps'] == 3 and np.isfinite(results['test/loss'])
  losses = [r['train/loss'] for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]
  assert len(losses) == 3 and all(np.isfinite(losses))

  # The checkpoint holds the projections (and their optimizer moments), trained away from the init.
  step, saved, _ = _latest_state(workdir)
  assert step == 3
  initial = ts.split_model(train_lib.build_model(config, data.load_task(config.data),
                                                 train_lib.default_components()))[1]['params']
  e_init = np.asarray(initial['encoder']['blocks'][0]['attention']['variant_params']['E'][...])
  params_e = [k for k in saved if 'variant_params' in k and "['E']" in k and 'opt_state' not in k]
  assert len(params_e) == 1, sorted(saved)
  assert saved[params_e[0]].shape == e_init.shape == (8, config.data.max_length + 1)
  assert max_diff(saved[params_e[0]], e_init) > 1e-6
  assert any('variant_params' in k and 'opt_state' in k for k in saved)
