"""Calls written as users write them, with annotations: `make test`'s mypy checks this
file (pyproject.toml, [tool.mypy] files), and test_dropin runs it.

Each ``assert_type`` states what a user's type checker must infer: the carries of
flax.nnx's cells as flax.nnx annotates them (not ``Any``); NumPy arrays (what
``pack_sequences`` returns, what the docs pass) accepted by the sequence layers;
``nr.interop`` and ``nr.compat`` as modules (not ``Any``), and
``from_torch``'s result used as the layer it is; compat's LSTM cells' carries as
flax.linen annotates them.
"""

from typing import Any, assert_type

import jax
import numpy as np
from flax import nnx

import nnx_recurrent as nr


def cell_carries(x: jax.Array) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
  """Each cell's carry and step as flax.nnx's cells annotate them."""
  Pair = tuple[jax.Array, jax.Array]
  lstm = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  carry = assert_type(lstm.initialize_carry(x.shape), Pair)
  assert_type(lstm(carry, x), tuple[Pair, jax.Array])
  for pair_cell in (nr.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0)),
                    nr.LayerNormLSTMCell(3, 4, rngs=nnx.Rngs(0))):
    assert_type(pair_cell(pair_cell.initialize_carry(x.shape), x), tuple[Pair, jax.Array])
  for cell in (nr.GRUCell(3, 4, rngs=nnx.Rngs(0)), nr.SimpleCell(3, 4, rngs=nnx.Rngs(0)),
               nr.MGUCell(3, 4, rngs=nnx.Rngs(0)), nr.LayerNormGRUCell(3, 4, rngs=nnx.Rngs(0))):
    h = assert_type(cell.initialize_carry(x.shape), jax.Array)
    assert_type(cell(h, x), tuple[jax.Array, jax.Array])
  image = jax.numpy.ones((2, 5, 5, 3))
  conv_lstm = nr.ConvLSTMCell(3, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
  assert_type(conv_lstm(conv_lstm.initialize_carry(image.shape), image), tuple[Pair, jax.Array])
  conv_gru = nr.ConvGRUCell(3, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
  assert_type(conv_gru(conv_gru.initialize_carry(image.shape), image),
              tuple[jax.Array, jax.Array])
  (c, h), y = lstm(carry, x, rngs=jax.random.key(0))  # the options: this package's cells
  return (c, h), y


def sequence_layers() -> tuple[nr.RNN, nr.LSTM, nr.Bidirectional, nr.StackedRNN]:
  """A layer of each kind, for :func:`numpy_sequences`."""
  return (nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))), nr.LSTM(3, 4, rngs=nnx.Rngs(0)),
          nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))),
                           nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(1)))),
          nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))),
                        nr.LSTM(4, 4, rngs=nnx.Rngs(0))))


def numpy_sequences(seqs: list[np.ndarray],
                    layers: tuple[nr.RNN, nr.LSTM, nr.Bidirectional, nr.StackedRNN]) -> list[Any]:
  """NumPy inputs, lengths and ids, as pack_sequences returns them and the docs pass them."""
  x, ids = nr.pack_sequences(seqs, max_length=6)
  lengths = np.array([len(s) for s in seqs[:2]])
  rnn, lstm, bi, stack = layers
  padded = np.ones((2, 6, 3), np.float32)
  return [
    *nr.unpack_sequences(rnn(x, segment_ids=ids), ids),
    lstm(x, segment_ids=ids), bi(x, segment_ids=ids), stack(x, segment_ids=ids),
    rnn(padded, seq_lengths=lengths), lstm(padded, seq_lengths=lengths),
    bi(padded, seq_lengths=lengths), stack(padded, seq_lengths=lengths),
  ]


def submodules() -> tuple[str, str]:
  """``nr.interop`` and ``nr.compat`` (loaded on first use) are modules to type checkers."""
  return assert_type(nr.interop.__name__, str), assert_type(nr.compat.__name__, str)


def from_torch_layer(torch_lstm: Any, x: np.ndarray) -> tuple[Any, int]:
  """from_torch's result is called and read as the layer it converts to (the docs)."""
  lstm = nr.interop.from_torch(torch_lstm)
  carry, y = lstm(x, return_carry=True)
  return y, lstm.num_layers


def linen_carries(key: jax.Array, x: jax.Array) -> Any:
  """compat's LSTM cells as flax.linen annotates them (its Array: jax.Array or Any)."""
  from flax.typing import Array as LinenArray

  from nnx_recurrent import compat

  LinenPair = tuple[LinenArray, LinenArray]
  carry = assert_type(compat.LSTMCell(4).initialize_carry(key, x.shape), LinenPair)
  cell = compat.OptimizedLSTMCell(4)
  assert_type(cell.initialize_carry(key, x.shape), LinenPair)
  variables = cell.init(key, carry, x)
  return cell.apply(variables, carry, x)


def linen_step(cell: Any, carry: Any, x: jax.Array) -> Any:
  """Type-checked only (a Linen cell is called inside a module's method): the step's types."""
  from flax.typing import Array as LinenArray

  from nnx_recurrent import compat

  optimized: compat.OptimizedLSTMCell = cell
  return assert_type(optimized(carry, x), tuple[tuple[LinenArray, LinenArray], LinenArray])
