"""User cells (flax.nnx's style) that more than one test file runs."""

from __future__ import annotations

from flax import nnx


class SowingCell(nnx.LSTMCell):
  """A flax.nnx cell that sows its output at each step (``Module.sow``)."""

  def __call__(self, carry, x):
    carry, h = super().__call__(carry, x)
    self.sow(nnx.Intermediate, 'h', h)
    return carry, h
