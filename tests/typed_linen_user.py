"""A Linen model written as flax.linen's users write it, with the one import swapped:
`make test`'s mypy checks this file with `disallow_subclassing_any` and
`disallow_untyped_decorators` (pyproject.toml), so `nn.Module` and `nn.compact` must
reach type checkers as flax.linen's, not as `Any`; test_compat runs it.
"""

from typing import Any

import jax
import jax.numpy as jnp

from nnx_recurrent import compat as nn


class Tagger(nn.Module):
  """Embeddings, a bidirectional LSTM over padded sequences, a dense head."""

  hidden: int = 4
  classes: int = 3

  @nn.compact
  def __call__(self, tokens: jax.Array, seq_lengths: jax.Array) -> jax.Array:
    x = nn.Embed(10, 5, embedding_init=nn.initializers.normal(1.0))(tokens)
    x = nn.Bidirectional(nn.RNN(nn.LSTMCell(self.hidden)), nn.RNN(nn.GRUCell(self.hidden)))(
      x, seq_lengths=seq_lengths)
    x = nn.LayerNorm()(x)
    return nn.Dense(self.classes, kernel_init=nn.initializers.lecun_normal())(x)


def run(tokens: jax.Array, seq_lengths: jax.Array) -> tuple[Any, jax.Array]:
  """The variables for key 0 and the outputs."""
  model = Tagger()
  variables = model.init(jax.random.key(0), tokens, seq_lengths)
  out = model.apply(variables, tokens, seq_lengths)
  assert isinstance(out, jnp.ndarray)
  return variables, out
