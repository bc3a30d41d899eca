"""Model and attention configuration: defaults, validation and per-layer attention resolution.

Two ConfigDicts describe a model: `config.model` (see `model_config_defaults`) and `config.attention`
(see `attention_config_defaults`). Both are validated here and turned into plain Python values, so the
modules never see a ConfigDict and every attention instance is hashable (a static part of the graph).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

from efficient_attn.attention import api

POSITIONAL = ('learned', 'sinusoidal')
POOLING = ('cls', 'mean')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def model_config_defaults() -> ml_collections.ConfigDict:
  """Every model option with its default (the LRA Text setup of the reference code).

  Fields:
    num_layers: number of pre-LayerNorm Transformer blocks (int >= 1).
    num_heads: attention heads per block (int >= 1).
    emb_dim: model width; must be divisible by num_heads (head_dim = emb_dim // num_heads).
    mlp_dim: hidden width of each block's GELU MLP.
    dropout_rate: dropout on the embeddings and on every residual branch (attention and MLP
      outputs), applied only when `train=True`. In [0, 1).
    positional: 'learned' (a [max_length (+1 for CLS), emb_dim] table) or 'sinusoidal' (fixed).
    pooling: 'cls' (a CLS token with id vocab_size is prepended, so the token table has
      vocab_size + 1 rows, and its final state is the summary) or 'mean' (mean over real tokens,
      padding excluded). Ignored by the language model ('lm'), which pools nothing.
    classifier_dim: hidden width of the classification MLP (kinds 'classify' and 'pair').
    dtype: compute dtype, 'float32' or 'bfloat16'. Parameters are always float32; LayerNorm and
      softmax statistics are float32; logits are returned as float32.
    longformer_global_projections: if True, layers whose attention is 'longformer' recompute the rows
      of their global tokens with separate Q/K/V projections (initialised as copies of the local
      ones), as in the Longformer paper. No effect on other variants.
  """
  c = ml_collections.ConfigDict()
  c.num_layers = 4
  c.num_heads = 4
  c.emb_dim = 256
  c.mlp_dim = 1024
  c.dropout_rate = 0.1
  c.positional = 'learned'
  c.pooling = 'cls'
  c.classifier_dim = 1024
  c.dtype = 'float32'
  c.longformer_global_projections = False
  return c


def _option_type(hints: dict[str, Any], field: str) -> type:
  """The Python type a None-defaulted option takes (`Optional[int]` -> int), for a typed placeholder."""
  hint = hints.get(field, object)
  args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
  kind = typing.get_origin(args[0]) or args[0]
  if kind in (list, tuple):
    return tuple
  return kind if kind in (int, float, str, bool) else object


def _variant_defaults(name: str) -> dict[str, Any]:
  """The option defaults a registered variant declares (its dataclass fields).

  An option whose default is None (or that has none) becomes a typed placeholder: None until set, and
  still settable from the command line (ml_collections cannot override a plain None field).
  """
  cls = api.variant_class(name)
  try:
    hints = typing.get_type_hints(cls)
  except Exception:  # pylint: disable=broad-except  (unresolvable annotations: untyped placeholders)
    hints = {}
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      value = None
    if isinstance(value, list):
      value = tuple(value)
    if value is None:
      value = ml_collections.config_dict.placeholder(_option_type(hints, f.name))
    out[f.name] = value
  return out


def _check_attention_name(name: Any, where: str) -> None:
  names = api.attention_names()
  if name not in names:
    raise ValueError(f'{where}: unknown attention {name!r}; valid names: {", ".join(names)}.')


def attention_config_defaults(name: str = 'full') -> ml_collections.ConfigDict:
  """The attention config for a model whose layers all use variant `name`.

  Fields:
    name: the attention variant of every layer not overridden (see `ea.ATTENTION_NAMES`).
    options: keyword options of `name` (pre-filled with the variant's own defaults so each one can be
      set from the command line, e.g. `--config.attention.options.window=64`). None means "the
      variant's default" (such options are typed placeholders, settable from the command line).
    layer_overrides: a string of comma-separated `layer:name` items that give some layers another
      variant, e.g. '3:full' or '0:local,-1:full' (layer indices count from 0; negative ones from the
      end). Empty string: no override. From the command line:
      `--config.attention.layer_overrides=0:local,3:full`.
    variant_options: one ConfigDict of options per registered variant, used by the layers whose
      variant is that one (for `name` itself, `options` is applied on top). Lets a mixed model set
      the options of its override variants, e.g. `--config.attention.variant_options.local.window=8`.
  """
  _check_attention_name(name, 'attention_config_defaults')
  c = ml_collections.ConfigDict()
  c.name = name
  c.options = ml_collections.ConfigDict(_variant_defaults(name))
  c.layer_overrides = ''
  c.variant_options = ml_collections.ConfigDict(
      {n: ml_collections.ConfigDict(_variant_defaults(n)) for n in api.attention_names()})
  return c


# -- validation -------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
  """ConfigDict/dict/list values -> plain, hashable Python: lists become tuples."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_to_plain(v) for v in value)
  return value


def _get(config: Any, key: str, default: Any) -> Any:
  if isinstance(config, ml_collections.ConfigDict):
    return config.get(key, default)
  return config.get(key, default) if isinstance(config, Mapping) else default


def resolve_model_config(config: Any) -> dict[str, Any]:
  """Validates `config.model` (ConfigDict or dict; missing fields take their defaults)."""
  defaults = model_config_defaults().to_dict()
  given = _to_plain(config) if config is not None else {}
  if not isinstance(given, dict):
    raise ValueError(f'model config must be a ConfigDict or dict, got {type(config).__name__}.')
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f'Unknown model option(s) {", ".join(map(repr, unknown))}; '
                     f'valid options: {", ".join(defaults)}.')
  c = {**defaults, **given}
  for key in ('num_layers', 'num_heads', 'emb_dim', 'mlp_dim', 'classifier_dim'):
    if isinstance(c[key], bool) or not isinstance(c[key], int) or c[key] < 1:
      raise ValueError(f'model.{key} must be a positive integer, got {c[key]!r}.')
  if c['emb_dim'] % c['num_heads']:
    raise ValueError(f'model.emb_dim ({c["emb_dim"]}) must be divisible by model.num_heads '
                     f'({c["num_heads"]}): head_dim = emb_dim // num_heads.')
  rate = c['dropout_rate']
  if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
    raise ValueError(f'model.dropout_rate must be a number in [0, 1), got {rate!r}.')
  c['dropout_rate'] = float(rate)
  for key, valid in (('positional', POSITIONAL), ('pooling', POOLING), ('dtype', tuple(DTYPES))):
    if c[key] not in valid:
      raise ValueError(f'model.{key} must be one of {", ".join(map(repr, valid))}, got {c[key]!r}.')
  if not isinstance(c['longformer_global_projections'], bool):
    raise ValueError('model.longformer_global_projections must be a bool, got '
                     f'{c["longformer_global_projections"]!r}.')
  return c


_OVERRIDE_ITEM = re.compile(r'^\s*(-?\d+)\s*:\s*([A-Za-z_][\w-]*)\s*$')


def parse_layer_overrides(overrides: Any, num_layers: int) -> dict[int, str]:
  """'0:local,-1:full' (or a {layer: name} mapping) -> {layer index in [0, num_layers): name}.

  Raises ValueError for a malformed item, a layer out of range, a layer given twice or an unknown
  variant name.
  """
  if overrides is None:
    return {}
  if isinstance(overrides, str):
    items = []
    for item in overrides.split(','):
      if not item.strip():
        continue
      match = _OVERRIDE_ITEM.match(item)
      if not match:
        raise ValueError(f'attention.layer_overrides: cannot parse {item.strip()!r}; expected '
                         "comma-separated 'layer:name' items, e.g. '3:full' or '0:local,-1:full'.")
      items.append((int(match.group(1)), match.group(2)))
  elif isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    raise ValueError('attention.layer_overrides must be a string like "0:local,3:full" or a '
                     f'{{layer: name}} mapping, got {overrides!r}.')
  out = {}
  for layer, name in items:
    if isinstance(layer, bool) or not isinstance(layer, int):
      raise ValueError(f'attention.layer_overrides: layer {layer!r} is not an integer.')
    if not -num_layers <= layer < num_layers:
      raise ValueError(f'attention.layer_overrides: layer {layer} is out of range for a model with '
                       f'{num_layers} layers (valid: {-num_layers}..{num_layers - 1}).')
    index = layer % num_layers
    if index in out:
      raise ValueError(f'attention.layer_overrides: layer {layer} (index {index}) is given twice.')
    _check_attention_name(name, f'attention.layer_overrides item {layer}:{name}')
    out[index] = name
  return out


def _options_for(config: Any, name: str, base: str) -> dict[str, Any]:
  variant_options = _to_plain(_get(config, 'variant_options', None) or {})
  options = dict(variant_options.get(name, {}) or {})
  if name == base:
    options.update(_to_plain(_get(config, 'options', None) or {}))
  # None stands for "the variant's own default" (it is how a required-free ConfigDict spells unset).
  return {k: v for k, v in options.items() if v is not None}


def resolve_layer_attentions(config: Any, num_layers: int) -> tuple[api.Attention, ...]:
  """One attention instance per layer from `config.attention` (ConfigDict or dict).

  Raises ValueError for unknown names, unknown fields, bad overrides and invalid options (the message
  names the layer and the variant).
  """
  if config is None:
    config = {}
  plain = _to_plain(config)
  if not isinstance(plain, dict):
    raise ValueError(f'attention config must be a ConfigDict or dict, got {type(config).__name__}.')
  valid_fields = ('name', 'options', 'layer_overrides', 'variant_options')
  unknown = sorted(set(plain) - set(valid_fields))
  if unknown:
    raise ValueError(f'Unknown attention config field(s) {", ".join(map(repr, unknown))}; '
                     f'valid fields: {", ".join(valid_fields)}.')
  base = plain.get('name', 'full')
  _check_attention_name(base, 'attention.name')
  for name in plain.get('variant_options') or {}:
    _check_attention_name(name, 'attention.variant_options')
  overrides = parse_layer_overrides(plain.get('layer_overrides', ''), num_layers)
  names = [overrides.get(i, base) for i in range(num_layers)]
  built: dict[str, api.Attention] = {}
  for i, name in enumerate(names):
    if name in built:
      continue
    options = _options_for(config, name, base)
    try:
      built[name] = api.make_attention(name, **options)
    except (TypeError, ValueError) as e:
      raise ValueError(f'attention for layer {i} ({name!r}, options {options}): {e}') from e
  return tuple(built[name] for name in names)
