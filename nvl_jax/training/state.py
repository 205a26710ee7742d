"""Model parameters and optimizer state, created directly on their shardings.

Parameters are an ``nnx.State`` (the pure data half of ``nnx.split``); the
training step merges them with the graph definition inside ``jax.jit``. Every
sharding tree here mirrors its state tree leaf for leaf, so the same trees serve
as jit in/out shardings and as orbax restore targets.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nvl_jax import sharding as sharding_lib


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shapes and shardings of a model's parameters and its optimizer state."""

    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    param_shardings: nnx.State
    abstract_opt_state: optax.OptState
    opt_shardings: optax.OptState
    replicated: NamedSharding

    def restore_targets(self) -> tuple[nnx.State, optax.OptState]:
        """Abstract arrays carrying their target shardings, for orbax to restore onto."""
        target = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        return (jax.tree.map(target, self.abstract_params, self.param_shardings),
                jax.tree.map(target, self.abstract_opt_state, self.opt_shardings))


def plan(build: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
         rules: sharding_lib.Rules) -> StateLayout:
    """Lays out ``build()``'s parameters by their logical axes and the optimizer state like them.

    Optimizer moments mirror the parameters (same tree), so they take the
    parameters' shardings; scalars such as the step count are replicated.
    """
    graphdef, abstract_params = nnx.split(nnx.eval_shape(build))
    param_shardings = jax.tree.map(
        lambda v: v.replace(value=sharding_lib.variable_sharding(v, mesh, rules)), abstract_params,
        is_leaf=_is_variable)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = jax.tree.map(lambda x: param_shardings if _is_state(x) else replicated,
                                 abstract_opt_state, is_leaf=_is_state)
    return StateLayout(graphdef, abstract_params, param_shardings, abstract_opt_state, opt_shardings, replicated)


def initialize(build: Callable[[], nnx.Module], tx: optax.GradientTransformation,
               layout: StateLayout) -> tuple[nnx.State, optax.OptState]:
    """Random parameters and a fresh optimizer state, each created on its own shards (no host copy)."""
    params = jax.jit(lambda: nnx.split(build())[1], out_shardings=layout.param_shardings)()
    opt_state = jax.jit(tx.init, out_shardings=layout.opt_shardings)(params)
    return params, opt_state
