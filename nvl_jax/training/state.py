"""Trainable parameters, frozen variables and optimizer state, created directly on their shardings.

A model is split by the task's ``trainable`` filter into two ``nnx.State`` trees (the pure data
halves of ``nnx.split``): what the optimizer updates, and what stays fixed (a frozen LLM, random
state). The train step merges them with the graph definition inside ``jax.jit``. Every sharding
tree here mirrors its state tree leaf for leaf, so the same trees serve as jit in/out shardings
and as orbax restore targets.
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


def _target(a, s):
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Shapes and shardings of a model's trainable and frozen state and of the optimizer state."""

    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    param_shardings: nnx.State
    abstract_frozen: nnx.State
    frozen_shardings: nnx.State
    abstract_opt_state: optax.OptState
    opt_shardings: optax.OptState
    replicated: NamedSharding

    def restore_targets(self) -> tuple[nnx.State, optax.OptState]:
        """Abstract arrays carrying their target shardings, for orbax to restore onto."""
        return (jax.tree.map(_target, self.abstract_params, self.param_shardings),
                jax.tree.map(_target, self.abstract_opt_state, self.opt_shardings))

    def merge(self, params: nnx.State, frozen: nnx.State) -> nnx.Module:
        return nnx.merge(self.graphdef, params, frozen)


def _shardings(abstract: nnx.State, mesh: Mesh, rules: sharding_lib.Rules) -> nnx.State:
    return jax.tree.map(lambda v: v.replace(value=sharding_lib.variable_sharding(v, mesh, rules)), abstract,
                        is_leaf=_is_variable)


def plan(build: Callable[[], nnx.Module], trainable: nnx.filterlib.Filter, tx: optax.GradientTransformation,
         mesh: Mesh, rules: sharding_lib.Rules) -> StateLayout:
    """Lays out ``build()``'s variables by their logical axes and the optimizer state like them.

    Optimizer moments mirror the trainable parameters (same tree), so they take the parameters'
    shardings; scalars such as the step count are replicated. Nothing is allocated.
    """
    graphdef, abstract_params, abstract_frozen = nnx.split(nnx.eval_shape(build), trainable, ...)
    param_shardings = _shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = jax.tree.map(lambda x: param_shardings if _is_state(x) else replicated,
                                 abstract_opt_state, is_leaf=_is_state)
    return StateLayout(graphdef, abstract_params, param_shardings, abstract_frozen,
                       _shardings(abstract_frozen, mesh, rules), abstract_opt_state, opt_shardings, replicated)


def random_init(build: Callable[[], nnx.Module], trainable: nnx.filterlib.Filter,
                layout: StateLayout) -> tuple[nnx.State, nnx.State]:
    """``build()``'s random ``(trainable, frozen)`` state, each created on its own shards (no host copy)."""
    return jax.jit(lambda: nnx.split(build(), trainable, ...)[1:],
                   out_shardings=(layout.param_shardings, layout.frozen_shardings))()


def init_optimizer(tx: optax.GradientTransformation, params: nnx.State, layout: StateLayout) -> optax.OptState:
    """A fresh optimizer state on the parameters' shardings."""
    return jax.jit(tx.init, out_shardings=layout.opt_shardings)(params)
