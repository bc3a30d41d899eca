"""Model and attention configuration: defaults, validation and per-layer attention resolution.

Two ConfigDicts describe a model: `config.model` (see `model_config_defaults`) and `config.attention`
(see `attention_config_defaults`). Both are validated here and turned into plain Python values, so the
modules never see a ConfigDict and every attention instance is hashable (a static part of the graph).
"""
from __future__ import annotations

import ast
import dataclasses
import re
import types
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


def _option_type(hint: Any) -> type:
  """The type of a config placeholder for an option annotated `hint`.

  `Optional[int]` -> int, `tuple[int, ...]` -> tuple; a union of several kinds (`int | tuple[int,
  ...]`) or anything else -> object, which the command line parses as a Python literal.
  """
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) not in (typing.Union, types.UnionType):
    args = [hint]
  kinds = {typing.get_origin(a) or a for a in args}
  kinds = {tuple if k in (list, tuple) else k for k in kinds}
  if len(kinds) == 1:
    (kind,) = kinds
    if kind in (int, float, str, bool, tuple):
      return kind
  return object


def variant_option_defaults(name: str) -> dict[str, Any]:
  """{option: default} of a registered variant, in `api.option_names` order (None: computed).

  Raises:
    ValueError: for an unknown variant.
  """
  cls = api.variant_class(name)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  out = {}
  for option in api.option_names(name):
    f = fields[option]
    if f.default is not dataclasses.MISSING:
      value = f.default
    elif f.default_factory is not dataclasses.MISSING:
      value = f.default_factory()
    else:
      value = None
    out[option] = tuple(value) if isinstance(value, list) else value
  return out


def describe_options(name: str) -> str:
  """A variant's options and defaults, e.g. "window=128, block_size=None, implementation='auto'"."""
  return ', '.join(f'{k}={v!r}' for k, v in variant_option_defaults(name).items())


def _option_types() -> dict[str, type]:
  """{option: placeholder type} over every registered variant (typed differently -> object)."""
  types_: dict[str, type] = {}
  for name in api.attention_names():
    cls = api.variant_class(name)
    try:
      hints = typing.get_type_hints(cls)
    except Exception:  # pylint: disable=broad-except  (unresolvable annotations: untyped)
      hints = {}
    for option in api.option_names(name):
      kind = _option_type(hints.get(option, object))
      types_[option] = kind if types_.get(option, kind) is kind else object
  return dict(sorted(types_.items()))


def _check_attention_name(name: Any, where: str) -> None:
  names = api.attention_names()
  if name not in names:
    raise ValueError(f'{where}: unknown attention {name!r}; valid names: {", ".join(names)}.')


def attention_config_defaults(name: str = 'full') -> ml_collections.ConfigDict:
  """The attention config for a model whose layers all use variant `name`.

  Fields:
    name: the attention variant of every layer not in `layer_overrides` (see `ea.ATTENTION_NAMES`).
    options: the options of `name` that are set. It holds one field for every option of every
      registered variant, each None (unset: the variant's own default, see docs/attention.md) and
      typed, so any of them can be set from the command line in any order with `name`, e.g.
      `--config.attention.name=local --config.attention.options.window=64`, and tuples as
      `--config.attention.options.global_tokens='(0,5)'`. A set option that `name` does not take is
      an error when the config is resolved (the message lists the variant's options and defaults).
    layer_overrides: a string of comma-separated `layer:variant` or `layer:variant(option=value,
      ...)` items that give some layers another variant, with its own options (the base `options` do
      not apply to them), e.g. '3:full' or '0:local(window=8),-1:full'. Layer indices count from 0,
      negative ones from the end. Empty string: no override. From the command line:
      `--config.attention.layer_overrides='0:local(window=8),3:full'`.
  """
  _check_attention_name(name, 'attention_config_defaults')
  c = ml_collections.ConfigDict()
  c.name = name
  c.options = ml_collections.ConfigDict(
      {option: ml_collections.config_dict.placeholder(kind)
       for option, kind in _option_types().items()})
  c.layer_overrides = ''
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


_OVERRIDE_ITEM = re.compile(r'^\s*(-?\d+)\s*:\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$', re.DOTALL)
_OVERRIDE_HELP = ("expected comma-separated 'layer:variant' or 'layer:variant(option=value, ...)' "
                  "items, e.g. '3:full' or '0:local(window=8),-1:full'")


def _split_top_level(text: str) -> list[str]:
  """'0:local(window=8),1:dilated(dilation=(1, 2))' -> its items (commas inside brackets kept)."""
  items, depth, start, quote = [], 0, 0, ''
  for i, ch in enumerate(text):
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  items.append(text[start:])
  return [item for item in items if item.strip()]


def _parse_spec(spec: str, where: str) -> tuple[str, dict[str, Any]]:
  """'local(window=8, dilation=(1, 2))' -> ('local', {'window': 8, 'dilation': (1, 2)}).

  Values are Python literals; a bare word is a string (implementation=xla).
  """
  match = _OVERRIDE_ITEM.match(f'0:{spec}')
  if not match:
    raise ValueError(f'{where}: cannot parse {spec.strip()!r}; {_OVERRIDE_HELP}.')
  name, inner = match.group(2), match.group(3)
  options = {}
  if inner is not None and inner.strip():
    try:
      call = ast.parse(f'_({inner})', mode='eval').body
    except SyntaxError:
      call = None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
      raise ValueError(f'{where}: cannot parse the options of {spec.strip()!r}; write them as '
                       "option=value pairs, e.g. '0:local(window=8, block_size=16)'.")
    for kw in call.keywords:
      if isinstance(kw.value, ast.Name):
        options[kw.arg] = kw.value.id
        continue
      try:
        options[kw.arg] = ast.literal_eval(kw.value)
      except ValueError:
        raise ValueError(f'{where}: option {kw.arg} of {spec.strip()!r} is not a Python literal '
                         '(a number, a string, a tuple such as (0, 5), True/False).') from None
  return name, _to_plain(options)


def variant_spec(name: str, options: Mapping[str, Any] | None = None) -> str:
  """('local', {'window': 8}) -> "local(window=8)": a `layer_overrides` item after its 'layer:'."""
  if not options:
    return name
  return f'{name}({", ".join(f"{k}={v!r}" for k, v in options.items())})'


def layer_override_specs(overrides: Any, num_layers: int) -> dict[int, tuple[str, dict[str, Any]]]:
  """'0:local(window=8),-1:full' -> {0: ('local', {'window': 8}), num_layers - 1: ('full', {})}.

  `overrides` is such a string or a {layer: 'variant' or 'variant(option=value, ...)'} mapping; the
  keys of the result are layer indices in [0, num_layers).

  Raises:
    ValueError: for a malformed item, a layer out of range, a layer given twice or an unknown
      variant name (option names and values are checked when the layer's attention is built).
  """
  if overrides is None:
    return {}
  if isinstance(overrides, str):
    items = []
    for item in _split_top_level(overrides):
      match = _OVERRIDE_ITEM.match(item)
      if not match:
        raise ValueError(f'attention.layer_overrides: cannot parse {item.strip()!r}; '
                         f'{_OVERRIDE_HELP}.')
      items.append((int(match.group(1)), item.split(':', 1)[1]))
  elif isinstance(overrides, Mapping):
    items = list(overrides.items())
  else:
    raise ValueError('attention.layer_overrides must be a string like "0:local(window=8),3:full" '
                     f'or a {{layer: variant}} mapping, got {overrides!r}.')
  out = {}
  for layer, spec in items:
    if isinstance(layer, bool) or not isinstance(layer, int):
      raise ValueError(f'attention.layer_overrides: layer {layer!r} is not an integer.')
    if not isinstance(spec, str):
      raise ValueError(f'attention.layer_overrides: layer {layer} must map to a variant string '
                       f"like 'local' or 'local(window=8)', got {spec!r}.")
    where = f'attention.layer_overrides item {layer}:{spec.strip()}'
    if not -num_layers <= layer < num_layers:
      raise ValueError(f'attention.layer_overrides: layer {layer} is out of range for a model with '
                       f'{num_layers} layers (valid: {-num_layers}..{num_layers - 1}).')
    index = layer % num_layers
    if index in out:
      raise ValueError(f'attention.layer_overrides: layer {layer} (index {index}) is given twice.')
    name, options = _parse_spec(spec, where)
    _check_attention_name(name, where)
    out[index] = (name, options)
  return out


def parse_layer_overrides(overrides: Any, num_layers: int) -> dict[int, str]:
  """'0:local(window=8),-1:full' (or a mapping) -> {layer index: variant name}; see
  `layer_override_specs`, which also returns each override's options."""
  return {i: name for i, (name, _) in layer_override_specs(overrides, num_layers).items()}


def _check_option_names(name: str, options: Mapping[str, Any], fix: str) -> None:
  """Raises ValueError if `options` has one that variant `name` does not take; `fix` says where."""
  valid = api.option_names(name)
  for option in options:
    if option not in valid:
      raise ValueError(f'attention option {option!r} is not an option of {name!r} (its options, '
                       f'with defaults: {describe_options(name)}); {fix.format(option=option)}.')


# Fields of older configs and what to write instead.
_REPLACED_FIELDS = {
    'variant_options': "the options of an override go with it: attention.layer_overrides="
                       "'3:local(window=8)'; attention.options are those of attention.name",
}


def resolve_layer_attentions(config: Any, num_layers: int,
                             num_heads: int | None = None) -> tuple[api.Attention, ...]:
  """One attention instance per layer from `config.attention` (ConfigDict or dict).

  With `num_heads`, each variant also checks that its options fit that many heads (per-head
  dilations), so a mismatch fails with the config rather than at the first step.

  Layers not in `layer_overrides` get `name` with the set (not None) `options`; overridden layers
  get their own variant with the options written in the override.

  Raises:
    ValueError: for unknown names, unknown fields, bad overrides and invalid options (the message
      names the layer and the variant, and lists the variant's options with their defaults).
  """
  if config is None:
    config = {}
  plain = _to_plain(config)
  if not isinstance(plain, dict):
    raise ValueError(f'attention config must be a ConfigDict or dict, got {type(config).__name__}.')
  for field, instead in _REPLACED_FIELDS.items():
    if field in plain:
      raise ValueError(f'attention.{field} no longer exists: {instead}.')
  valid_fields = ('name', 'options', 'layer_overrides')
  unknown = sorted(set(plain) - set(valid_fields))
  if unknown:
    raise ValueError(f'Unknown attention config field(s) {", ".join(map(repr, unknown))}; '
                     f'valid fields: {", ".join(valid_fields)}.')
  base = plain.get('name', 'full')
  _check_attention_name(base, 'attention.name')
  options = plain.get('options') or {}
  if not isinstance(options, Mapping):
    raise ValueError(f'attention.options must be a ConfigDict or dict of options, got {options!r}.')
  # None is "unset": the variant's own default.
  base_options = {k: v for k, v in options.items() if v is not None}
  overrides = layer_override_specs(plain.get('layer_overrides', ''), num_layers)
  specs = [overrides.get(i, (base, base_options)) for i in range(num_layers)]
  base_fix = ('set attention.name to a variant that has it, or leave attention.options.{option} '
              'unset')
  if all(i in overrides for i in range(num_layers)):  # checked even when no layer uses them
    _check_option_names(base, base_options, base_fix)
  built: dict[Any, api.Attention] = {}
  out = []
  for i, (name, layer_options) in enumerate(specs):
    key = (name, tuple(sorted(layer_options.items())))
    if key not in built:
      fix = (f"remove it from attention.layer_overrides item {i}:{name}(...)" if i in overrides
             else base_fix)
      try:
        _check_option_names(name, layer_options, fix)
        built[key] = api.make_attention(name, **layer_options)
        if num_heads is not None:
          built[key].check_heads(num_heads)
      except (TypeError, ValueError) as e:
        raise ValueError(f'attention for layer {i} ({name!r}, options {layer_options}): {e}') from e
    out.append(built[key])
  return tuple(out)


def require_causal(attentions, what: str, remedy: str = 'pick a variant that has one') -> None:
  """ValueError unless every layer's attention has a causal form (`what` needs it: the message
  names it, the first layer without one, the variants that have one, and `remedy`)."""
  for i, attention in enumerate(attentions):
    if not attention.supports_causal:
      causal = [n for n in api.attention_names() if api.variant_class(n).supports_causal]
      raise ValueError(f'{what} needs causal attention, but layer {i} uses {attention.name!r}, '
                       f'which has no causal form; {remedy} (causal: {", ".join(causal)}).')
