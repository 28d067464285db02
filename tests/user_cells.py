"""User cells (flax.nnx's style) that more than one test file runs."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class SowingCell(nnx.LSTMCell):
  """A flax.nnx cell that sows its output at each step (``Module.sow``)."""

  def __call__(self, carry, x):
    carry, h = super().__call__(carry, x)
    self.sow(nnx.Intermediate, 'h', h)
    return carry, h


def lora_swapped(cell, name='dense_h', rank=2):
  """``cell`` after nnx's LoRA surgery on its projection ``name``: an
  ``nnx.LoRALinear`` with the same kernel and bias and a nonzero adapter."""
  linear = getattr(cell, name)
  lora = nnx.LoRALinear(linear.in_features, linear.out_features, lora_rank=rank,
                        use_bias=linear.bias is not None, rngs=nnx.Rngs(1))
  nnx.update(lora, nnx.state(linear))
  lora.lora.lora_b[...] = jnp.ones_like(lora.lora.lora_b[...])
  setattr(cell, name, lora)
  return cell
