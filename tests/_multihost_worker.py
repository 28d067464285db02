"""One of the two processes of ``tests/test_multihost.py`` (a script, not collected).

``python tests/_multihost_worker.py PORT PROCESS_ID OUT_DIR`` joins the other
process on ``localhost:PORT`` and, with ``examples/multihost.py``'s pieces,

1. trains the example's classifier (a fused bidirectional ``nr.LSTM`` with
   ``seq_lengths``) for ``STEPS`` SGD steps on a global batch whose rows are
   split between the two processes, parameters replicated;
2. calls the trained LSTM *outside* ``jit`` on global arrays: with sharded
   ``seq_lengths``, one of them past the time axis (not checked on the host,
   where each process sees only its own rows: it acts as the time axis, as
   under ``jit``); with replicated lengths past it (checked: every process
   holds them all and raises the same ValueError); and an ``nr.RNN`` with
   sharded ``segment_ids``;

and writes what it got to ``OUT_DIR/process{PROCESS_ID}.npz`` for the test to
compare with one process doing the same on the whole batch (:func:`reference`).
"""

from __future__ import annotations

import sys

import numpy as np

SEED, STEPS, LEARNING_RATE = 0, 3, 0.2
PROCESSES, ROWS, MAX_LEN, HIDDEN = 2, 3, 6, 4  # ROWS per process: global batch of 6


def batch(step: int, process: int):
  from examples import multihost

  return multihost.synthetic_batch(SEED, step, process, ROWS, MAX_LEN)


def global_batch(step: int):
  """The whole batch of ``step``: every process's rows in process order."""
  parts = [batch(step, p) for p in range(PROCESSES)]
  return [np.concatenate(a) for a in zip(*parts)]


def eager_lengths(lengths: np.ndarray) -> np.ndarray:
  """The lengths of the calls outside jit: each process's first row negative,
  which a check would refuse (unchecked, it acts as 0)."""
  return np.where(np.arange(len(lengths)) % ROWS == 0, -1, lengths).astype(np.int32)


def segment_ids(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Two packed segments per row: ids 1 and 2 split each row's valid steps, 0 after."""
  t = np.arange(x.shape[1])[None, :]
  return np.where(t < lengths[:, None], np.where(t < lengths[:, None] // 2, 1, 2), 0).astype(
    np.int32)


def build():
  """The example's classifier with an SGD optimizer, a GRU ``nr.RNN``, the training step.

  The parameters are random, drawn by NumPy from the seed: the same in every
  process, and no initializer to compile (one program per parameter shape)."""
  import optax
  from flax import nnx

  import nnx_recurrent as nr
  from examples import multihost
  from tests.random_params import random_module

  model = random_module(lambda: multihost.Classifier(HIDDEN, rngs=nnx.Rngs(SEED)), SEED)
  optimizer = nnx.Optimizer(model, optax.sgd(LEARNING_RATE), wrt=nnx.Param)
  rnn = random_module(
    lambda: nr.RNN(nr.GRUCell(multihost.IN_FEATURES, HIDDEN, rngs=nnx.Rngs(SEED))), SEED + 1)
  return model, optimizer, rnn, multihost.train_step


def params(model) -> dict[str, np.ndarray]:
  from flax import nnx

  return {'/'.join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def reference() -> dict[str, np.ndarray]:
  """One process, the whole batch: what every worker must have written (its own rows)."""
  from flax import nnx

  model, optimizer, rnn, train_step = build()
  initial = params(model)
  losses = [float(train_step(model, optimizer, *global_batch(step))) for step in range(STEPS)]
  x, lengths, _ = global_batch(STEPS)

  @nnx.jit  # the reference in one program (the workers call outside jit: the point)
  def outputs(model, rnn):
    # Negative acts as 0 (here checked: clipped by hand).
    return (model.lstm(x, seq_lengths=np.maximum(eager_lengths(lengths), 0)),
            rnn(x, segment_ids=segment_ids(x, lengths)))

  lstm, rnn_out = outputs(model, rnn)
  return {
    **{'initial/' + k: v for k, v in initial.items()},
    **{'params/' + k: v for k, v in params(model).items()},
    'losses': np.asarray(losses),
    'lstm': np.asarray(lstm),
    'rnn': np.asarray(rnn_out),
  }


def main(port: str, process: int, out_dir: str) -> None:
  import jax

  from examples import multihost

  multihost.initialize(f'localhost:{port}', PROCESSES, process)
  assert jax.process_count() == PROCESSES and jax.local_device_count() == 1, jax.devices()
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = multihost.data_mesh()
  model, optimizer, rnn, train_step = build()
  multihost.replicate(mesh, model, optimizer, rnn)
  losses = []
  for step in range(STEPS):
    inputs = multihost.shard_rows(mesh, *batch(step, process))
    losses.append(float(train_step(model, optimizer, *inputs)))  # replicated: readable

  def local(a: jax.Array) -> np.ndarray:
    """This process's rows of a global array (and a check that they are rows 3p..3p+2)."""
    (shard,) = a.addressable_shards
    assert shard.index[0] == slice(process * ROWS, (process + 1) * ROWS), shard.index
    return np.asarray(shard.data)

  # Outside jit, global arrays (the bug of issue 15 item 7: the checks fetched them).
  x_np, lengths_np, _ = batch(STEPS, process)
  x, lengths, ids = multihost.shard_rows(mesh, x_np, eager_lengths(lengths_np),
                                         segment_ids(x_np, lengths_np))
  assert not lengths.is_fully_addressable
  lstm_out = local(model.lstm(x, seq_lengths=lengths))
  rnn_out = local(rnn(x, segment_ids=ids))
  replicated = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P()), np.full(ROWS * PROCESSES, -1, np.int32))
  try:
    model.lstm(x, seq_lengths=replicated)
    error = ''
  except ValueError as e:
    error = str(e)

  np.savez(f'{out_dir}/process{process}.npz', losses=np.asarray(losses), lstm=lstm_out,
           rnn=rnn_out, error=np.asarray(error),
           **{'params/' + k: v for k, v in params(model).items()})


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
