"""Modules with random parameters, built without running (compiling) initializers.

Tests that do not care how parameters are initialised (checkpoints, sharding,
interop) build the module abstractly with ``nnx.eval_shape`` and fill every
parameter from NumPy: no XLA compilation per parameter shape, which dominates
the run time of small tests on CPU. Biases get random values too, so a
conversion that drops one cannot pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def random_module(factory: Callable[[], nnx.Module], seed: int = 0, scale: float = 0.5,
                  sharding: Callable[[nnx.State], object] | None = None):
  """``factory()`` with normal(0, ``scale``) parameters drawn by NumPy from ``seed``.

  Non-parameter state (dropout RNG streams) gets key ``seed`` and count 0.
  ``sharding(abstract_state)``, if given, returns shardings (a matching tree or
  one sharding) to ``jax.device_put`` the state with.
  """
  graphdef, state = nnx.split(nnx.eval_shape(factory))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(seed)
    if not jnp.issubdtype(leaf.dtype, jnp.floating):  # RNG counts
      return np.zeros(leaf.shape, leaf.dtype)
    return np.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

  values = jax.tree_util.tree_map(fill, state)
  if sharding is not None:
    values = jax.device_put(values, sharding(state))
  else:  # not jnp.asarray: that compiles a program (jit(stage)) per shape and dtype
    values = jax.device_put(values)
  return nnx.merge(graphdef, values)


def random_linen_variables(module, *args, seed: int = 0, scale: float = 0.5, **kwargs):
  """The variables flax.linen's ``module.init(key, *args, **kwargs)`` makes, with
  normal(0, ``scale``) values drawn by NumPy from ``seed`` (its initializers, run
  op by op, would compile per shape; an init also compiles the scan)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
    lambda s: np.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


# Zero kernel initializers for tests that overwrite the parameters anyway: the
# default ones (orthogonal...) cost one compilation per parameter shape.
ZERO_INIT = dict(kernel_init=nnx.initializers.zeros_init(),
                 recurrent_kernel_init=nnx.initializers.zeros_init())


def randomize_params(module: nnx.Module, seed: int = 0, scale: float = 0.5) -> nnx.Module:
  """Overwrites every ``nnx.Param`` of ``module`` (biases too) with normal(0, ``scale``) values
  drawn by NumPy from ``seed``, in place, and returns the module."""
  rng = np.random.default_rng(seed)
  nnx.update(module, jax.device_put(jax.tree_util.tree_map(  # no compile (see random_module)
    lambda v: np.asarray(scale * rng.normal(size=v.shape), v.dtype),
    nnx.state(module, nnx.Param))))
  return module
