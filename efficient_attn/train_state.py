"""The functional view of an NNX model that jitted steps and checkpoints work with.

A model is split once into a static `graphdef` and a model state, a dict of three `nnx.State`s:
  'params': every nnx.Param (what the optimizer updates),
  'rngs':   the RNG streams (nnx.RngState: keys and counters; dropout and random attention patterns
            draw from them, so they are checkpointed and resuming continues the same random stream),
  'other':  every other variable (none for the current models; kept so nothing is silently lost).
The train state adds the optimizer state and the step: {'step', 'params', 'rngs', 'other', 'opt_state'}.
Plain dicts (not dataclasses) so Orbax saves and restores them as nested mappings.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

MODEL_KEYS = ('params', 'rngs', 'other')


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, nnx.State]]:
  """(graphdef, model state) of `model`."""
  graphdef, params, rngs, other = nnx.split(model, nnx.Param, nnx.RngState, ...)
  return graphdef, {'params': params, 'rngs': rngs, 'other': other}


def merge_model(graphdef: nnx.GraphDef, model_state: dict[str, nnx.State]) -> nnx.Module:
  """A fresh model from a state. `copy=True` gives new Variables owned by the current trace, so a
  forward pass inside `jax.grad`/`jax.jit` may advance RNG counters without touching the inputs."""
  return nnx.merge(graphdef, model_state['params'], model_state['rngs'], model_state['other'],
                   copy=True)


def model_state_of(model: nnx.Module) -> dict[str, nnx.State]:
  """The model state of a (merged, possibly mutated) model: RNG counters included."""
  return split_model(model)[1]


def init_train_state(model_state: dict[str, nnx.State], tx: optax.GradientTransformation) -> dict:
  return {'step': jnp.zeros((), jnp.int32), **model_state,
          'opt_state': tx.init(model_state['params'])}


def model_part(state: dict[str, Any]) -> dict[str, nnx.State]:
  """The model state inside a train state."""
  return {k: state[k] for k in MODEL_KEYS}


def abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: the target of an Orbax restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
