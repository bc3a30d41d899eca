"""Config files: argument parsing, every task's config, LRA values, locking, one-line CLI errors."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

import efficient_attn as ea
from configs import common
from configs import image, listops, lm, pathfinder, retrieval, text
from efficient_attn import lra_reference
from efficient_attn import models
from efficient_attn import optimization
from efficient_attn import train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_CONFIGS = {'listops': listops, 'text': text, 'retrieval': retrieval, 'image': image,
                'pathfinder': pathfinder, 'lm': lm}


# -- argument parsing ------------------------------------------------------------------------------


def test_parse_arg_defaults_and_values():
  args = common.parse_arg(None, **common.ARG_DEFAULTS)
  assert (args.attention, args.quick, args.tiny) == ('full', False, False)
  args = common.parse_arg('attention=bigbird,quick', **common.ARG_DEFAULTS)
  assert (args.attention, args.quick) == ('bigbird', True)
  args = common.parse_arg(' quick=false , attention=local ', **common.ARG_DEFAULTS)
  assert (args.attention, args.quick) == ('local', False)
  typed = common.parse_arg('n=3,x=0.5', n=1, x=1.0)
  assert typed.n == 3 and isinstance(typed.n, int) and typed.x == 0.5


@pytest.mark.parametrize('arg, message', [
    ('quik', "Unknown config argument 'quik'"),
    ('attention=local,attention=full', 'given twice'),
    ('quick=maybe', 'true/false'),
    ('attention', 'needs a value'),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    common.parse_arg(arg, **common.ARG_DEFAULTS)


def test_parse_arg_type_errors():
  with pytest.raises(ValueError, match='integer'):
    common.parse_arg('n=x', n=1)


# -- every task config -----------------------------------------------------------------------------


@pytest.mark.parametrize('task', sorted(TASK_CONFIGS))
@pytest.mark.parametrize('arg', [None, 'quick', 'tiny', 'attention=local,quick'])
def test_every_task_config_builds_and_validates(task, arg):
  config = TASK_CONFIGS[task].get_config(arg)
  assert config.task == task and config.data.task == task
  train_lib.check_config(config)  # raises on anything the loop would reject
  models.resolve_model_config(config.model)
  attentions = models.resolve_layer_attentions(config.attention, config.model.num_layers)
  assert len(attentions) == config.model.num_layers
  expected = 'local' if arg and 'local' in arg else 'full'
  assert all(a.name == expected for a in attentions)
  assert dict(config.mesh) == {'data': -1, 'fsdp': 1, 'tensor': 1, 'sequence': 1}
  if arg in ('quick', 'tiny'):
    full = TASK_CONFIGS[task].get_config(None)
    assert config.train.steps < full.train.steps
    assert config.model.emb_dim <= full.model.emb_dim


@pytest.mark.parametrize('name', ea.ATTENTION_NAMES)
def test_attention_argument_gives_the_variant_with_its_defaults(name):
  config = listops.get_config(f'attention={name},quick')
  assert config.attention.name == name
  attentions = models.resolve_layer_attentions(config.attention, config.model.num_layers)
  assert {a.name for a in attentions} == {name}
  assert attentions[0] == ea.make_attention(name)  # every option at the variant's default
  assert train_lib.variant_name(config) == name
  # The defaults are discoverable: listed by describe_options (and so by every option error).
  described = models.describe_options(name)
  for option, default in models.variant_option_defaults(name).items():
    assert f'{option}={default!r}' in described
    assert getattr(attentions[0], option) == default


def test_attention_options_hold_only_what_is_set():
  """config.attention.options has every option of every variant, unset (None) until set."""
  config = listops.get_config('attention=local,quick')
  for name in ea.ATTENTION_NAMES:
    assert set(models.variant_option_defaults(name)) <= set(config.attention.options.keys())
  assert all(value is None for value in config.attention.options.values())
  assert 'variant_options' not in config.attention


# -- the attention knob from the command line ------------------------------------------------------


def cli_config(argv):
  """The config train.py builds from `argv` (config_flags, in process), checked like train.py."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  values, argv = flags.FlagValues(), ['train.py', *argv]
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config = values.config
  train_lib.check_config(config)
  return config, models.resolve_layer_attentions(config.attention, config.model.num_layers)


LISTOPS = os.path.join(REPO, 'configs', 'listops.py')


@pytest.mark.parametrize('argv, want', [
    # The variant changes after the config argument picked another (formerly: "Unknown option(s)
    # 'window' for attention 'bigbird'").
    ([f'--config={LISTOPS}:attention=local,tiny', '--config.attention.name=bigbird'],
     [('bigbird', {'block_size': 64})]),
    # Options before or after the name, in any order.
    ([f'--config={LISTOPS}:tiny', '--config.attention.options.window=8',
      '--config.attention.name=local'], [('local', {'window': 8})]),
    ([f'--config={LISTOPS}:tiny', '--config.attention.name=local',
      '--config.attention.options.window=8', '--config.attention.options.block_size=4'],
     [('local', {'window': 8, 'block_size': 4})]),
    # Tuples (and an int-or-tuple option, either way).
    ([f'--config={LISTOPS}:attention=dilated,tiny', "--config.attention.options.dilation=(1,2)"],
     [('dilated', {'dilation': (1, 2)})]),
    ([f'--config={LISTOPS}:attention=dilated,tiny', '--config.attention.options.dilation=3'],
     [('dilated', {'dilation': 3})]),
    ([f'--config={LISTOPS}:attention=longformer,tiny',
      "--config.attention.options.global_tokens=(0,5)"], [('longformer', {'global_tokens': (0, 5)})]),
    ([f'--config={LISTOPS}:attention=bigbird,tiny', '--config.attention.options.global_blocks=(0,)',
      '--config.attention.options.implementation=xla'],
     [('bigbird', {'global_blocks': (0,), 'implementation': 'xla'})]),
    # Per-layer overrides carry their own options; the base options do not apply to them.
    ([f'--config={LISTOPS}:attention=local,tiny', '--config.model.num_layers=3',
      '--config.attention.options.window=5',
      "--config.attention.layer_overrides=0:dilated(window=2, dilation=(1, 2)),-1:full"],
     [('dilated', {'window': 2, 'dilation': (1, 2)}), ('local', {'window': 5}), ('full', {})]),
])
def test_attention_knob_from_the_command_line(argv, want):
  _, attentions = cli_config(argv)
  assert [a.name for a in attentions] == [name for name, _ in want]
  for attention, (_, options) in zip(attentions, want):
    for key, value in options.items():
      assert getattr(attention, key) == value, (attention, key)


@pytest.mark.parametrize('argv, match', [
    # Formerly `Config error: "'window'"`.
    ([f'--config={LISTOPS}:attention=bigbird,tiny', '--config.attention.options.window=8'],
     r"attention option 'window' is not an option of 'bigbird' \(its options, with defaults: "
     r"block_size=64, num_random_blocks=3, global_blocks=\(0, -1\), implementation='auto'\); "
     r"set attention.name to a variant that has it, or leave attention.options.window unset"),
    ([f'--config={LISTOPS}:attention=local,tiny', '--config.model.num_layers=2',
      '--config.attention.layer_overrides=1:bigbird(window=8)'],
     r"layer 1 .*'window' is not an option of 'bigbird' .*remove it from attention.layer_overrides"),
    ([f'--config={LISTOPS}:tiny', '--config.attention.layer_overrides=0:local(8)'],
     'write them as option=value pairs'),
    ([f'--config={LISTOPS}:tiny', '--config.attention.name=nope'], "unknown attention 'nope'"),
    ([f'--config={LISTOPS}:attention=dilated,tiny', '--config.attention.options.dilation=(1,0)'],
     r"layer 0 \('dilated', options \{'dilation': \(1, 0\)\}\): dilated: dilation must be"),
])
def test_attention_knob_errors_say_what_to_write(argv, match):
  with pytest.raises(ValueError, match=match):
    cli_config(argv)


def test_options_keep_their_types_and_old_fields_say_what_replaced_them():
  config = listops.get_config('attention=local,tiny')
  with pytest.raises(TypeError):
    config.attention.options.window = 'eight'
  with pytest.raises(ValueError, match=r"layer_overrides='3:local\(window=8\)'"):
    models.resolve_layer_attentions({'name': 'full', 'variant_options': {}}, 1)
  assert models.variant_spec('local', {'window': 8, 'block_size': None}) == (
      'local(window=8, block_size=None)')
  assert models.layer_override_specs(' 0:local(window=8) , -1:full ', 4) == {
      0: ('local', {'window': 8}), 3: ('full', {})}


def test_unknown_variant_is_a_clear_error():
  with pytest.raises(ValueError, match=r"Unknown attention variant 'nope'; valid variants: full"):
    listops.get_config('attention=nope')


def test_config_is_locked_against_typos_but_fields_can_be_set():
  config = listops.get_config('quick')
  with pytest.raises(AttributeError, match='stpes'):
    config.train.stpes = 3
  with pytest.raises(AttributeError):
    config.new_section = 1
  config.train.steps = 3  # existing fields stay overridable (as --config.train.steps=3 does)
  assert config.train.steps == 3


LRA_TASKS = sorted(lra_reference.SETUPS)


def _field(config, dotted):
  node = config
  for key in dotted.split('.'):
    node = node[key]
  return node


@pytest.mark.parametrize('task', LRA_TASKS)
def test_lra_protocol_config_is_the_published_setup(task):
  """The default config (the sweep's `lra` protocol) holds every value of the independent record in
  efficient_attn/lra_reference.py (the configs keep their own literals and never read it)."""
  setup = lra_reference.SETUPS[task]
  config = TASK_CONFIGS[task].get_config()
  expected = setup.expected()
  assert {'model.num_layers', 'model.num_heads', 'model.emb_dim', 'model.mlp_dim',
          'train.batch_size', 'train.steps', 'optimizer.warmup_steps',
          'optimizer.learning_rate'} <= set(expected)
  for field, value in expected.items():
    got = _field(config, field)
    if isinstance(value, float):
      assert math.isclose(got, value, rel_tol=1e-12), (task, field, got, value)
    else:
      assert got == value and type(got) is type(value), (task, field, got, value)
  # Deviations are few and say why; not-modelled settings are not config fields.
  assert all(len(why) > 20 for _, why in setup.deviations.values())
  assert not set(setup.not_modelled) & set(config.model.keys())


def test_lra_record_matches_the_published_numbers_it_cites():
  """Spot checks of the record itself against the LRA repo's config files (values restated here)."""
  s = lra_reference.SETUPS
  assert (s['listops'].model['num_layers'], s['listops'].model['mlp_dim']) == (4, 1024)
  assert 'model.num_layers' in s['listops'].paper_differs  # the paper's 6 layers
  assert (s['image'].steps, s['image'].warmup_steps) == (45_000 // 256 * 200, 45_000 // 256)
  assert (s['pathfinder'].steps, s['pathfinder'].batch_size) == (160_000 // 512 * 200, 512)
  assert math.isclose(s['listops'].peak_learning_rate, 0.05 / math.sqrt(1000))
  assert s['image'].peak_learning_rate == 5e-4


def test_listops_follows_the_lra_setup():
  c = listops.get_config()
  assert (c.model.num_layers, c.model.num_heads, c.model.emb_dim, c.model.mlp_dim) == (4, 8, 512,
                                                                                      1024)
  assert (c.train.batch_size, c.train.steps) == (32, 5000)
  assert c.data.max_length == 2000
  assert c.optimizer.schedule == 'rsqrt' and c.optimizer.warmup_steps == 1000
  assert math.isclose(c.optimizer.learning_rate, 0.05 / math.sqrt(1000))
  assert (c.optimizer.b1, c.optimizer.b2) == (0.9, 0.98) and c.optimizer.weight_decay > 0
  # The rsqrt schedule peaks at the end of warmup (~1.6e-3) and then decays as 1/sqrt(step).
  lr = optimization.learning_rate_schedule(c.optimizer, c.train.steps)
  assert math.isclose(float(lr(999)), 0.05 / math.sqrt(1000), rel_tol=1e-5)
  assert math.isclose(float(lr(3999)), 0.05 / math.sqrt(4000), rel_tol=1e-5)
  assert float(lr(0)) < float(lr(500)) < float(lr(999))


def test_other_tasks_follow_their_published_sizes():
  t = text.get_config()
  assert (t.model.num_layers, t.model.num_heads, t.model.emb_dim, t.model.mlp_dim) == (4, 4, 256,
                                                                                      1024)
  assert t.train.steps == 20_000
  r = retrieval.get_config()
  assert (r.model.num_layers, r.model.num_heads, r.model.emb_dim, r.model.mlp_dim) == (4, 4, 128,
                                                                                      512)
  i = image.get_config()
  assert (i.model.num_layers, i.model.emb_dim, i.train.batch_size) == (1, 128, 256)
  assert i.optimizer.schedule == 'cosine' and i.model.dropout_rate == 0.3
  p = pathfinder.get_config()
  assert (p.model.num_layers, p.model.num_heads, p.model.emb_dim) == (4, 4, 32)


def test_quick_and_tiny_keep_their_cheaper_documented_settings():
  """The lra defaults changed positions (listops, text, retrieval) and pathfinder's MLP/dropout to
  the published ones; the quick and tiny runs keep what they were measured with."""
  for module in (listops, text, retrieval):
    for arg in ('quick', 'tiny'):
      assert module.get_config(arg).model.positional == 'learned', (module.__name__, arg)
  q = pathfinder.get_config('quick')
  assert (q.model.num_layers, q.model.mlp_dim, q.model.dropout_rate) == (2, 64, 0.1)


# -- the command line ------------------------------------------------------------------------------


def test_cli_config_errors_are_one_line():
  """Each bad config exits with status 2 and one line on stderr naming the problem, not a traceback.

  The cases run as parallel processes (each exits before any training).
  """
  cases = {
      'typo': (['--config.train.stpes=3'], "unknown config field 'stpes'"),
      'variant': ([f'--config={REPO}/configs/listops.py:attention=nope'],
                  "Unknown attention variant 'nope'; valid variants:"),
      'option': ([f'--config={REPO}/configs/listops.py:attention=local,tiny',
                  '--config.attention.options.window=-1'], 'window must be'),
      'value': (['--config.train.steps=abc'], 'flag --config.train.steps=abc'),
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = {
      name: subprocess.Popen(
          [sys.executable, os.path.join(REPO, 'train.py'), *argv, '--workdir=/nonexistent/run'],
          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for name, (argv, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, (name, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith('Config error: '), (name, err[-3000:])
    assert cases[name][1] in lines[0], (name, lines[0])
  assert not os.path.exists('/nonexistent/run')


@pytest.mark.parametrize('variant', ['linformer', 'nystrom'])
def test_lm_with_a_variant_without_causal_form_is_a_config_error(variant):
  # It used to pass the check and fail at the first traced step, after loading the data, with a
  # traceback and exit code 1.
  config = lm.get_config(f'attention={variant},tiny')
  with pytest.raises(train_lib.ConfigError, match=f"'lm' task.*{variant}.*no causal form") as e:
    train_lib.check_config(config)
  assert 'causal: full, chunked' in str(e.value)
  train_lib.check_config(lm.get_config('attention=local,tiny'))  # a causal variant is fine
  train_lib.check_config(listops.get_config(f'attention={variant},tiny'))  # bidirectional tasks
