"""Cells written as flax.nnx's users write them, with annotations: `make test`'s mypy
checks this file (pyproject.toml, [tool.mypy] files), and test_dropin runs it.

A flax.nnx-style subclass of ``nr.RNNCellBase`` overrides ``__call__`` and
``initialize_carry`` with flax.nnx's signatures, which ``RNNCellBase`` presents to type
checkers (flax.nnx's ``RNNCellBase`` holds the same class, ``FlaxStyleCell``, without an
error); this package's cells take the options and a PRNG key besides.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import nnx_recurrent as nr


class FlaxStyleCell(nr.RNNCellBase):
  """A cell as flax.nnx's docs write one: h' = tanh(W [x, h])."""

  def __init__(self, in_features: int, hidden_features: int, *, rngs: nnx.Rngs) -> None:
    self.dense = nnx.Linear(in_features + hidden_features, hidden_features, rngs=rngs)
    self.hidden_features = hidden_features

  def __call__(self, carry: jax.Array, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = jnp.tanh(self.dense(jnp.concatenate([inputs, carry], axis=-1)))
    return h, h

  def initialize_carry(self, input_shape: tuple[int, ...],
                       rngs: nnx.Rngs | nnx.RngStream | None = None,
                       carry_init: Any = None) -> jax.Array:
    return jnp.zeros((*input_shape[:-1], self.hidden_features))

  @property
  def num_feature_axes(self) -> int:
    return 1


class StepCell(nr.RNNCellBase):
  """A cell as this package's docs write one: ``step``, sizes given to the base."""

  def __init__(self, in_features: int, hidden_features: int, *, rngs: nnx.Rngs) -> None:
    super().__init__(in_features, hidden_features, rngs=rngs)
    self.dense = nnx.Linear(in_features + hidden_features, hidden_features, rngs=rngs)

  def step(self, carry: jax.Array, inputs: jax.Array,
           recurrent_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    h = jnp.tanh(self.dense(jnp.concatenate([inputs, carry], axis=-1)))
    return h, h


def run(x: jax.Array, seq_lengths: jax.Array) -> dict[str, Any]:
  """Each cell through ``nr.RNN``, and the package's cells with their options."""
  flax_style = FlaxStyleCell(x.shape[-1], 4, rngs=nnx.Rngs(0))
  step_cell = StepCell(x.shape[-1], 4, rngs=nnx.Rngs(0))
  lstm = nr.LSTMCell(x.shape[-1], 4, rngs=nnx.Rngs(0), dropout_rate=0.5)
  batch = x.shape[:1] + x.shape[2:]
  carry = lstm.initialize_carry(batch, rngs=jax.random.key(1), carry_init=nnx.initializers.ones)
  masks = lstm.dropout_masks(batch, rngs=jax.random.key(2))
  _, y = lstm(carry, x[:, 0], dropout_masks=masks)
  return {
    'flax_style': nr.RNN(flax_style)(x, seq_lengths=seq_lengths),
    'step': nr.RNN(step_cell)(x, seq_lengths=seq_lengths),
    'lstm_step': y,
    'cells': (flax_style, step_cell),
  }
