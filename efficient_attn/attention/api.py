"""The public attention contract: a registry of variants behind `make_attention(name, **options)`.

Each variant is a frozen dataclass whose fields are its options (so an instance is hashable and can be a
static argument of `jax.jit`). Subclasses implement `_attend` (the fast path) and `dense_mask` or
`dense_bias` (the O(n^2) definition the fast path is tested against), or override `reference` where the
definition is not a mask (kernel and learned variants). Shapes follow `jax.nn.dot_product_attention`:
q, k, v are [batch, length, heads, head_dim]. The contract is written out in docs/attention.md.

What the rest of the project needs to know about a variant lives on its class, so a new variant is
registered in one place and picked up by the model, the configs, the benchmark and the tests:
`needs_rng`, `supports_causal`, `supports_pallas`, `learned` (has weights: `init` / `params=`),
`quadratic` (materialises n x n by design), `small_options` (options that make the pattern really
sparse at tens of tokens, for tests and smoke runs) and `preset` (options that see about `keys` keys per
query, for benchmarks).
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from efficient_attn.attention.dense import MASK_VALUE, dense_attention

_REGISTRY: dict[str, type['Attention']] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes `cls` a frozen dataclass reachable as `make_attention(name)`.

  A `dense_mask` the class defines is wrapped so that its arguments are checked (`length` and `heads`
  ints >= 1, `causal` a bool, `rng` a key) before the variant's own code runs.
  """

  def wrap(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    cls.name = name
    if 'dense_mask' in cls.__dict__:
      cls.dense_mask = _checked_dense_mask(cls.__dict__['dense_mask'])
    _REGISTRY[name] = cls
    return cls

  return wrap


def _checked_dense_mask(fn):
  if getattr(fn, 'checks_arguments', False):
    return fn

  @functools.wraps(fn)
  def dense_mask(self, length, *, causal=False, rng=None, heads=None):
    length = check_length(self.name, 'dense_mask: length', length)
    if heads is not None:
      heads = check_length(self.name, 'dense_mask: heads', heads)
    causal = check_causal(self.name, causal)
    if rng is not None:
      rng = check_key(self.name, rng)
    return fn(self, length, causal=causal, rng=rng, heads=heads)

  dense_mask.checks_arguments = True
  return dense_mask


def attention_names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def variant_class(name: str) -> type['Attention']:
  """The registered class of `name` (its dataclass fields are the options, with their defaults)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown attention {name!r}; valid names: {", ".join(_REGISTRY)}.')
  return _REGISTRY[name]


def option_names(name: str) -> tuple[str, ...]:
  """The variant's own options first, then the shared `implementation`."""
  names = [f.name for f in dataclasses.fields(_REGISTRY[name])]
  return tuple(n for n in names if n != 'implementation') + ('implementation',)


def make_attention(name: str, **options: Any) -> 'Attention':
  """Builds the attention variant `name` with `options` (see the table in docs/attention.md)."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown attention {name!r}; valid names: {", ".join(_REGISTRY)}.')
  valid = option_names(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(
        f'Unknown option(s) {", ".join(map(repr, unknown))} for attention {name!r}; '
        f'valid options: {", ".join(valid) if valid else "none"}.')
  return _REGISTRY[name](**options)


def check_positive_int(variant: str, option: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{variant}: {option} must be a positive integer, got {value!r}.')


def check_nonnegative_int(variant: str, option: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{variant}: {option} must be an integer >= 0, got {value!r}.')


IMPLEMENTATIONS = ('auto', 'xla', 'pallas')

# -- call arguments -------------------------------------------------------------------------------
# Input dtypes the variants are written for (softmax statistics in float32 whatever the input);
# float64 arrays exist only with jax_enable_x64 (otherwise jnp.asarray makes them float32).
INPUT_DTYPES = tuple(np.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))


def check_length(variant: str, what: str, value: Any) -> int:
  """`value` as a Python int >= 1 (any integer type, not bool), or ValueError naming `what`."""
  try:
    n = operator.index(value)
  except TypeError:
    n = None
  if isinstance(value, (bool, np.bool_)) or n is None or n < 1:
    raise ValueError(f'{variant}: {what} must be an integer >= 1, got {value!r}.')
  return n


def check_causal(variant: str, causal: Any) -> bool:
  """`causal` as a Python bool. It is static (it selects the pattern), so a traced value is refused."""
  if isinstance(causal, (bool, np.bool_)):
    return bool(causal)
  if isinstance(causal, jax.core.Tracer):
    raise ValueError(f'{variant}: causal must be a Python bool known at trace time, got a traced '
                     'value; pass it as a static argument (e.g. jax.jit(..., static_argnames=...)).')
  if (isinstance(causal, (np.ndarray, jax.Array)) and causal.shape == ()
      and causal.dtype == np.bool_):
    return bool(causal)
  raise ValueError(f'{variant}: causal must be True or False, got {causal!r}.')


def check_key(variant: str, rng: Any):
  """`rng` if it is a jax.random key: a new-style `jax.random.key(seed)` (a scalar of key dtype) or a
  legacy `jax.random.PRNGKey(seed)` (uint32 [2], or [4] for the 'rbg' implementations)."""
  dtype = getattr(rng, 'dtype', None)
  shape = getattr(rng, 'shape', None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    if shape == ():
      return rng
  elif dtype == np.uint32 and shape in ((2,), (4,)):
    return rng
  got = (f'an array of dtype {dtype} and shape {shape}' if dtype is not None
         else f'{type(rng).__name__} {rng!r}')
  raise ValueError(f'{variant}: rng must be one jax.random key, jax.random.key(seed) (or a legacy '
                   f'jax.random.PRNGKey(seed)), got {got}.')


def check_padding_mask(variant: str, padding_mask: Any, shape: tuple[int, int]):
  """The padding mask as a bool array [batch, length] (True for real tokens), or None.

  Accepts bool arrays, 0/1 integer arrays (as tokenizers give them) and array-likes (lists) of
  either. Integer values are checked when the mask is concrete; a traced integer mask (under jit)
  can only be checked for its dtype and reads as `mask != 0`. Float masks are refused: 0.5 is not a
  yes or a no.
  """
  if padding_mask is None:
    return None
  if not hasattr(padding_mask, 'dtype'):
    try:
      padding_mask = np.asarray(padding_mask)
    except ValueError as e:
      raise ValueError(f'{variant}: padding_mask must be a bool array [batch, length], got '
                       f'{type(padding_mask).__name__} ({e}).') from None
  dtype, mask_shape = padding_mask.dtype, tuple(padding_mask.shape)
  if mask_shape != tuple(shape):
    raise ValueError(f'{variant}: padding_mask must be [batch, length] = {tuple(shape)}, '
                     f'got {mask_shape}.')
  if dtype != np.bool_:
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f'{variant}: padding_mask must be bool (True for real tokens) or 0/1 '
                       f'integers, got dtype {dtype}; pass a bool mask, e.g. padding_mask=mask > 0.')
    if not isinstance(padding_mask, jax.core.Tracer):
      values = np.asarray(padding_mask)
      if values.size and not np.all((values == 0) | (values == 1)):
        raise ValueError(f'{variant}: an integer padding_mask must hold only 0 and 1 (1 for real '
                         f'tokens), got values {np.unique(values)[:8].tolist()}; pass a bool mask.')
  return jnp.asarray(padding_mask, bool)


@dataclasses.dataclass(frozen=True)
class Attention:
  """Base class of every variant. Call it as `attn(q, k, v, padding_mask=None, causal=False, rng=None)`.

  `implementation` (every variant): 'xla' runs the jnp block engine, 'pallas' the fused Pallas kernel
  (GPU Triton kernels; interpret mode on CPU; not TPU), 'auto' the best proven on the current backend
  (today the jnp engine everywhere: docs/kernels.md).

  Inputs are checked at this boundary (`_prepare`): q, k, v float32, bfloat16 or float16 (float64 with
  jax_enable_x64), every dimension >= 1; `causal` a Python or NumPy bool (static); `padding_mask`
  bool or 0/1 integers, array-likes converted (a traced integer mask under jit reads as mask != 0);
  `rng` a jax.random key. Anything else is a ValueError naming the argument. Padded positions of q,
  k, v are zeroed before any variant runs, so whatever they hold (NaN, inf) changes nothing at real
  positions, in the output or the gradients (which are zero at padded positions).

  Differentiation: reverse mode (`jax.grad`, `jax.vjp`) for every variant. Forward mode (`jax.jvp`,
  `jax.jacfwd`, Hessians) only for variants written in plain jnp (`full` on the xla path, the kernel
  variants, ...): the block engine and lsh's permutation define their backward with `jax.custom_vjp`,
  and JAX raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function" for them.
  """

  name: ClassVar[str] = ''
  needs_rng: ClassVar[bool] = False  # True for variants with random structure (bigbird, lsh, performer).
  supports_pallas: ClassVar[bool] = True  # runs on the block engine, so the fused kernel applies
  supports_causal: ClassVar[bool] = True  # False: causal=True raises (linformer)
  learned: ClassVar[bool] = False  # True: has weights, from `init`, passed back as `params=`
  quadratic: ClassVar[bool] = False  # True: O(n^2) memory by design (full, synthesizer)
  implementation: str = 'auto'

  @classmethod
  def small_options(cls, heads: int = 2) -> dict[str, Any]:
    """Options under which the pattern is really sparse at tens of tokens (tests, smoke runs).

    `heads` lets per-head options (dilations) fit the head count. Default: the variant's own defaults.
    """
    del heads
    return {}

  @classmethod
  def preset(cls, keys: int = 512) -> dict[str, Any]:
    """Options under which a query sees about `keys` keys (the benchmark's like-for-like setting)."""
    del keys
    return {}

  def __post_init__(self):
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f'{self.name}: implementation must be one of {", ".join(IMPLEMENTATIONS)}, '
                       f'got {self.implementation!r}.')
    if self.implementation == 'pallas' and not self.supports_pallas:
      raise ValueError(f'{self.name}: implementation="pallas" is not available for this variant; '
                       'use "xla" or "auto".')
    self.validate()

  @property
  def impl(self) -> str:
    """The engine actually used: 'xla' or 'pallas' ('auto' resolved for the default backend)."""
    if self.implementation != 'auto':
      return self.implementation
    from efficient_attn.attention import engine  # pylint: disable=g-import-not-at-top
    return engine.auto_implementation() if self.supports_pallas else 'xla'

  def validate(self) -> None:
    """Raises ValueError for invalid option values. Subclasses extend it."""

  def check_heads(self, heads: int) -> None:
    """Raises ValueError if the options do not fit `heads` attention heads (per-head options)."""
    del heads

  # -- public API ---------------------------------------------------------------------------------

  def init(self, rng, *, length: int, heads: int, head_dim: int) -> dict[str, Any]:
    """The variant's learned weights for sequences of up to `length` tokens ({} for most variants).

    Pass them back as `attn(..., params=params)`; `param_axes` names their logical axes.
    """
    del rng, length, heads, head_dim
    return {}

  def param_axes(self) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of every array `init` returns (for sharding rules); {} without weights."""
    return {}

  def __call__(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """Attention output [batch, length, heads, head_dim], q's dtype; zeros at padded queries."""
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    if self.learned:
      out = self._attend(q, k, v, padding_mask=padding_mask, causal=causal, rng=rng, params=params)
    else:
      out = self._attend(q, k, v, padding_mask=padding_mask, causal=causal, rng=rng)
    return jnp.where(padding_mask[:, :, None, None], out, 0).astype(q.dtype)

  def reference(self, q, k, v, *, padding_mask=None, causal=False, rng=None, params=None):
    """The variant's O(n^2) definition, written apart from its fast path (equal to float32 rounding).

    Default: `dense_attention` under `dense_bias` (itself `dense_mask` for pattern variants), padded
    keys masked out, zeros at padded queries. Kernel and learned variants override it.
    """
    q, k, v, padding_mask, causal, rng, params = self._prepare(q, k, v, padding_mask, causal, rng,
                                                               params)
    bias = self.dense_bias(q, k, causal=causal, rng=rng, padding_mask=padding_mask)
    out = dense_attention(q, k, v, bias=bias, mask=padding_mask[:, None, None, :])
    return jnp.where(padding_mask[:, :, None, None], out, 0).astype(q.dtype)

  def dense_mask(self, length: int, *, causal: bool = False, rng=None, heads: int | None = None):
    """bool [heads or 1, length, length]: True where query i may attend key j (padding not included)."""
    raise NotImplementedError(f'{self.name} is described by dense_bias, not dense_mask.')

  def dense_bias(self, q, k, *, causal: bool = False, rng=None, padding_mask=None):
    """Additive float32 bias [1 or batch, heads or 1, length, length]: `attn(q, k, v)` equals
    `dense_attention(q, k, v, bias=...)` at real positions (padded keys still need masking by the
    caller; `padding_mask` matters only to variants whose pattern depends on it, like lsh)."""
    self._check_inputs(q, k, k, padding_mask)
    mask = self.dense_mask(q.shape[1], causal=causal, rng=rng, heads=q.shape[2])
    return jnp.where(mask, 0.0, MASK_VALUE)[None].astype(jnp.float32)

  # -- for subclasses -----------------------------------------------------------------------------

  def _attend(self, q, k, v, *, padding_mask, causal, rng):
    raise NotImplementedError

  def _prepare(self, q, k, v, padding_mask, causal, rng, params):
    """Checked, normalised call arguments shared by `__call__` and `reference`.

    q, k, v are zeroed at padded positions here, once for every variant, so that whatever they hold
    there (NaN, inf, 1e30) never reaches the arithmetic: `0 * NaN` inside a matmul would otherwise
    leak into real outputs, and a NaN score of a padded query into the gradients of real keys. A
    `where` also makes the gradients with respect to padded entries exactly zero.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    padding_mask = self._check_inputs(q, k, v, padding_mask)
    rng = self._check_rng(rng)
    causal = check_causal(self.name, causal)
    if causal and not self.supports_causal:
      raise ValueError(f'Attention {self.name!r} is bidirectional only: causal=True is not defined '
                       'for it (see docs/attention.md).')
    if self.learned and params is None:
      raise ValueError(f'Attention {self.name!r} has learned weights: pass params=attn.init(rng, '
                       'length=..., heads=..., head_dim=...).')
    b, n = q.shape[:2]
    if padding_mask is None:
      padding_mask = jnp.ones((b, n), bool)
    else:
      real = padding_mask[:, :, None, None]
      q, k, v = (jnp.where(real, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    return q, k, v, padding_mask, causal, rng, params

  def _check_rng(self, rng):
    """`rng`, checked to be a jax.random key; None is refused where the variant needs a key."""
    if rng is None:
      if self.needs_rng:
        raise ValueError(
            f'Attention {self.name!r} has random structure and needs rng=jax.random.key(...) '
            '(the same key reproduces the same pattern).')
      return None
    return check_key(self.name, rng)

  def _check_inputs(self, q, k, v, padding_mask):
    """Checks shapes and dtypes; returns the padding mask as bool [batch, length] (None if None)."""
    for arg, x in (('q', q), ('k', k), ('v', v)):
      if getattr(x, 'ndim', None) != 4:
        raise ValueError(f'{self.name}: {arg} must be [batch, length, heads, head_dim], got shape '
                         f'{getattr(x, "shape", None)}.')
      if x.dtype not in INPUT_DTYPES:
        raise ValueError(f'{self.name}: {arg} must be float32, bfloat16 or float16 (float64 with '
                         f'jax_enable_x64), got dtype {x.dtype}; cast it, e.g. {arg}.astype('
                         'jnp.float32).')
    if k.shape != v.shape:
      raise ValueError(f'{self.name}: k and v must have the same shape, got {k.shape} and {v.shape}.')
    if q.shape != k.shape:
      raise ValueError(f'{self.name}: self-attention needs q and k of the same shape '
                       f'[batch, length, heads, head_dim], got {q.shape} and {k.shape}.')
    for axis, what in enumerate(('batch', 'length', 'heads', 'head_dim')):
      if q.shape[axis] < 1:
        raise ValueError(f'{self.name}: {what} must be >= 1, got q of shape {q.shape}.')
    return check_padding_mask(self.name, padding_mask, q.shape[:2])
