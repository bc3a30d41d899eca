"""The device mesh of a run and how arrays are placed on it.

`config.mesh` names four axes, in this order: data, fsdp, tensor, sequence. Their sizes multiply to the
number of devices; one size may be -1 ("all remaining devices").

Where things go is decided by logical-axis rules: every parameter carries logical axis names in its
`out_sharding` metadata (('embed', 'heads', 'kv'), ('embed', 'mlp'), ...; see models/layers.py), and
activations are constrained with names of their own ('activation_batch', 'activation_length', ...).
A rule maps one logical name to a mesh axis, a tuple of mesh axes, or None (replicated). The defaults
(`DEFAULT_RULES`, overridable per name with `config.sharding_rules`):

  parameters   'embed' -> fsdp (FSDP: every weight matrix has an 'embed' side, the model width), and
               Megatron tensor parallelism: 'heads' -> tensor (q/k/v column-split, out row-split by
               head), 'mlp' -> tensor (wi column-split, wo row-split). 'vocab', 'kv', 'length',
               'classes' and the learned attention weights' own axes ('attn_projected',
               'attn_blocks', 'attn_hidden', 'attn_rank') stay replicated.
  activations  batch -> (data, fsdp) (FSDP is data parallelism whose parameters are also sharded, so
               its axis carries batch rows too), length -> sequence, heads -> tensor.

A mesh axis of size 1 shards nothing, so one rule set serves every mesh. A name whose dimension is
not divisible by its mesh axes (or that would reuse a mesh axis already used by an earlier dimension
of the same array) is left replicated on those axes rather than failing: e.g. a 10-class head kernel
on fsdp=4. The optimizer state follows the parameters: optax's moments keep the parameters'
`nnx.Param` metadata, so `state_sharding` gives them the same specs.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')
BATCH_AXES = ('data', 'fsdp')
AXIS_TYPES = {'auto': jax.sharding.AxisType.Auto, 'explicit': jax.sharding.AxisType.Explicit}


def mesh_shape(mesh_config: Mapping[str, Any], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in MESH_AXES order, -1 resolved. Raises ValueError if they cannot fit `num_devices`."""
  given = dict(mesh_config)
  unknown = sorted(set(given) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'mesh: unknown axis {", ".join(map(repr, unknown))}; valid axes: '
                     f'{", ".join(MESH_AXES)}.')
  sizes = []
  for axis in MESH_AXES:
    size = given.get(axis, 1)
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f'mesh.{axis} must be a positive integer or -1, got {size!r}.')
    sizes.append(size)
  if sizes.count(-1) > 1:
    raise ValueError('mesh: at most one axis may be -1 (all remaining devices).')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh: the fixed axis sizes multiply to {known}, which does not divide the '
                       f'{num_devices} devices.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh: axis sizes {dict(zip(MESH_AXES, sizes))} multiply to '
                     f'{math.prod(sizes)}, but there are {num_devices} devices.')
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, Any], axis_types: str = 'auto') -> jax.sharding.Mesh:
  """The mesh over all devices (every process), axes MESH_AXES."""
  if axis_types not in AXIS_TYPES:
    raise ValueError(f'mesh_axis_types must be one of {", ".join(AXIS_TYPES)}, got {axis_types!r}.')
  shape = mesh_shape(mesh_config, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AXIS_TYPES[axis_types],) * len(MESH_AXES))


def batch_parallelism(mesh: jax.sharding.Mesh) -> int:
  """How many ways a batch is split: the product of the BATCH_AXES sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# -- logical-axis rules ----------------------------------------------------------------------------

Rules = Mapping[str, tuple[str, ...]]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # Parameters (names from models/layers.py).
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'mlp': ('tensor',),
    'kv': (),
    'vocab': (),
    'length': (),
    'classes': (),
    # The weights of learned attention variants (attention/learned.py; their 'heads' axes follow
    # 'heads' above, like the q/k/v heads they meet): linformer's projected length, sinkhorn's block
    # slots, synthesizer's hidden width and rank. Small: replicated.
    'attn_projected': (),
    'attn_blocks': (),
    'attn_hidden': (),
    'attn_rank': (),
    # Activations.
    'activation_batch': BATCH_AXES,
    'activation_length': ('sequence',),
    'activation_embed': (),
    'activation_heads': ('tensor',),
    'activation_kv': (),
}

# Logical names of the activations the model constrains ([batch, length, embed] and
# [batch, length, heads, head_dim]).
ACTIVATION_BLE = ('activation_batch', 'activation_length', 'activation_embed')
ACTIVATION_BLHD = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')


def _as_axes(name: str, value: Any) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    # 'fsdp', 'data,fsdp' or '' (replicated): the form a config field set from the command line has.
    value = tuple(a.strip() for a in value.split(',') if a.strip())
  try:
    axes = tuple(value)
  except TypeError:
    axes = None
  if axes is None or not all(isinstance(a, str) for a in axes):
    raise ValueError(f'sharding_rules.{name} must be a mesh axis name, a list of them or None, '
                     f'got {value!r}.')
  bad = [a for a in axes if a not in MESH_AXES]
  if bad:
    raise ValueError(f'sharding_rules.{name}: unknown mesh axis {", ".join(map(repr, bad))}; valid '
                     f'axes: {", ".join(MESH_AXES)}.')
  if len(set(axes)) != len(axes):
    raise ValueError(f'sharding_rules.{name} repeats a mesh axis: {axes}.')
  return axes


def make_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, tuple[str, ...]]:
  """DEFAULT_RULES with `overrides` (logical name -> mesh axis | [axes] | 'axis,axis' | '' | None;
  '' and None mean replicated) applied.

  Raises:
    ValueError: an unknown logical name or mesh axis.
  """
  rules = dict(DEFAULT_RULES)
  for name, value in dict(overrides or {}).items():
    if name not in DEFAULT_RULES:
      raise ValueError(f'sharding_rules: unknown logical axis {name!r}; valid names: '
                       f'{", ".join(DEFAULT_RULES)}.')
    rules[name] = _as_axes(name, value)
  return rules


def config_rules(config: Any) -> dict[str, tuple[str, ...]]:
  """The rules of a run config: `config.sharding_rules` (optional) over DEFAULT_RULES."""
  overrides = config.get('sharding_rules', None)
  if overrides is not None and hasattr(overrides, 'to_dict'):
    overrides = overrides.to_dict()
  return make_rules(overrides)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                    rules: Rules | None = None) -> PartitionSpec:
  """The PartitionSpec of an array of `shape` whose dimensions have logical `names`.

  Mesh axes of size 1, axes already used by an earlier dimension, and axes that do not divide the
  dimension (after the ones kept before them) are dropped, so the spec is always valid.
  """
  rules = DEFAULT_RULES if rules is None else rules
  if len(names) != len(shape):
    raise ValueError(f'{len(names)} logical names {tuple(names)} for an array of shape '
                     f'{tuple(shape)}.')
  used: set[str] = set()
  entries = []
  for name, dim in zip(names, shape):
    if name is not None and name not in rules:
      raise ValueError(f'No sharding rule for logical axis {name!r}; known: {", ".join(rules)}.')
    kept = []
    ways = 1
    for axis in (() if name is None else rules[name]):
      size = mesh_shape.get(axis, 1)
      if size == 1 or axis in used or dim % (ways * size):
        continue
      kept.append(axis)
      ways *= size
    used.update(kept)
    entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while entries and entries[-1] is None:
    entries.pop()
  return PartitionSpec(*entries)


def _auto_axes(mesh) -> dict[str, int]:
  """{name: size} of the mesh's Auto axes."""
  return {name: size for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
          if kind == jax.sharding.AxisType.Auto}


def _variable_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  names = variable.get_metadata().get('out_sharding', None)
  return None if names is None else tuple(names)


def state_sharding(state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
  """The NamedSharding of every leaf of a (train or model) state, a tree of the same structure.

  Variables with logical names (the parameters and the optimizer moments built from them) are
  sharded by `rules` (default DEFAULT_RULES); everything else (step, optimizer counts, RNG keys and
  counters) is replicated.

  Only Auto mesh axes (the default `mesh_axis_types='auto'`) take part: under Explicit axes the
  sharding is part of every array's type, and a weight's 'embed' side sharded over fsdp would meet
  a batch sharded over fsdp in the same einsum, which explicit mode rejects; there the parameters
  stay replicated (data parallelism), as before these rules.
  """
  mesh_sizes = _auto_axes(mesh)

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = _variable_names(leaf)
      return jax.tree.map(
          lambda x: NamedSharding(mesh, PartitionSpec() if names is None or len(names) != len(
              x.shape) else logical_to_spec(names, x.shape, mesh_sizes, rules)), leaf)
    return replicated(mesh)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_state(state: Any, mesh: jax.sharding.Mesh, rules: Rules | None = None) -> Any:
  """ShapeDtypeStructs of `state` (arrays or ShapeDtypeStructs) carrying the shardings of
  `state_sharding`: the target of a checkpoint restore onto `mesh`, whatever mesh saved it."""
  shardings = state_sharding(state, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


# -- activations -----------------------------------------------------------------------------------

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar('rules', default=None)
_SEQUENCE_PARALLEL: contextvars.ContextVar[bool] = contextvars.ContextVar('sequence_parallel',
                                                                           default=True)


@contextlib.contextmanager
def use_rules(rules: Rules | None = None, *, sequence_parallel: bool = True) -> Iterator[None]:
  """Within: `constrain` maps activation names with `rules`, and the model's attention layers use
  sequence-parallel attention when the current mesh has a 'sequence' axis > 1 and
  `sequence_parallel` is True. Must be active while the model is traced (jit traces lazily)."""
  token = _ACTIVE_RULES.set(DEFAULT_RULES if rules is None else rules)
  token_sp = _SEQUENCE_PARALLEL.set(bool(sequence_parallel))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)
    _SEQUENCE_PARALLEL.reset(token_sp)


def _current_mesh():
  """The mesh set with `jax.set_mesh` if it has this module's axes, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """`x` constrained to the sharding its logical `names` give on the current mesh.

  A no-op without a mesh of MESH_AXES (`jax.set_mesh`), and on Explicit mesh axes (their shardings
  travel with the array types already). Why at all: XLA's propagation otherwise may pick a layout
  that keeps, e.g., the full sequence on every device after an embedding gather.
  """
  mesh = _current_mesh()
  if mesh is None:
    return x
  rules = _ACTIVE_RULES.get() or DEFAULT_RULES
  auto = _auto_axes(mesh)
  if not auto:
    return x
  spec = logical_to_spec(names, x.shape, auto, rules)
  return jax.lax.with_sharding_constraint(x, spec)


def sequence_axis_size() -> int:
  """The size of the current mesh's 'sequence' axis if sequence parallelism is on, else 1."""
  mesh = _current_mesh()
  if mesh is None or not _SEQUENCE_PARALLEL.get():
    return 1
  return int(dict(zip(mesh.axis_names, mesh.axis_sizes))['sequence'])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis over BATCH_AXES, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def place_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays split over the batch axes.

  Every process passes its own contiguous block of rows (as `train_batches`/`eval_batches` yield
  them); `jax.make_array_from_process_local_data` stitches them into one global array.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


# -- multi-process ---------------------------------------------------------------------------------

# Environment variables that configure a multi-process run. With JAX_NUM_PROCESSES > 1, every
# process also sets JAX_PROCESS_ID (0..n-1) and JAX_COORDINATOR_ADDRESS (host:port of process 0).
# EFFICIENT_ATTN_DISTRIBUTED=1 instead lets JAX detect the cluster itself (Cloud TPU pod slices,
# SLURM, Open MPI, Kubernetes): `jax.distributed.initialize()` without arguments.
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
ENV_AUTO = 'EFFICIENT_ATTN_DISTRIBUTED'


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
  raw = env.get(name, '')
  if not raw:
    return None
  try:
    value = int(raw)
  except ValueError as e:
    raise ValueError(f'{name} must be an integer, got {raw!r}.') from e
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')
  return value


def multi_process_requested(environ: Mapping[str, str] | None = None) -> bool:
  """Whether the environment asks for more than one process: JAX_NUM_PROCESSES > 1, or
  EFFICIENT_ATTN_DISTRIBUTED=1 (cluster auto-detection)."""
  import os  # pylint: disable=import-outside-toplevel
  env = os.environ if environ is None else environ
  count = _env_int(env, ENV_NUM_PROCESSES, 1)
  if count is not None:
    return count > 1
  return env.get(ENV_AUTO, '').lower() in ('1', 'true', 'yes')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize` once, only for a multi-process run; safe to call again.

  Arguments given win; missing ones come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. With EFFICIENT_ATTN_DISTRIBUTED=1 and no count, JAX detects the cluster. A single
  process (nothing configured, or a count of 1) initialises nothing. Must run before anything asks
  JAX for its devices. Returns whether JAX is now multi-process.
  """
  import os  # pylint: disable=import-outside-toplevel
  env = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  if num_processes is None:
    num_processes = _env_int(env, ENV_NUM_PROCESSES, 1)
  if num_processes is None:
    if not multi_process_requested(env):
      return False
    jax.distributed.initialize()  # cluster auto-detection (TPU pod slice, SLURM, ...)
    return jax.process_count() > 1
  if num_processes == 1:
    return False
  if process_id is None:
    process_id = _env_int(env, ENV_PROCESS_ID, 0)
  coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
  if process_id is None or coordinator_address is None:
    raise ValueError(f'A run of {num_processes} processes needs {ENV_PROCESS_ID} and '
                     f'{ENV_COORDINATOR} (host:port of process 0) in every process.')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return jax.process_count() > 1
