"""Data-parallel training of a bidirectional LSTM across processes (``jax.distributed``).

Every process runs this same program (JAX's multi-controller model): it joins
the others through ``jax.distributed.initialize``, builds the same model from
the same seed, and feeds its own share of every batch. The global batch is one
``jax.Array`` whose rows are split over all processes' devices (axis ``data``
of a mesh over ``jax.devices()``); the parameters and optimizer state are
replicated. The jitted training step computes the loss over the *global* batch,
and XLA sums the gradients across processes (gloo collectives on the CPU, NCCL
on GPUs), so every process applies the same update and the parameters stay
identical everywhere, equal to one process training on the whole batch
(``tests/test_multihost.py`` checks that to 1e-5).

The task: tell which of four frequencies a noisy sinusoid of random phase and
random length (``seq_lengths``, padded with zeros) has. The model is a fused
bidirectional ``nr.LSTM``, a masked mean over time (outputs at padding are
zero) and a linear layer.

Run it:

* on one machine, two processes on the CPU (this spawns them, with a free
  port on localhost as the coordinator)::

    python -m examples.multihost --num-processes 2

* on a cluster, one process per host (``host0`` runs process 0, which also
  serves as the coordinator; any free port)::

    python -m examples.multihost --coordinator host0:1234 --num-processes 4 --process-id 0 # host0
    python -m examples.multihost --coordinator host0:1234 --num-processes 4 --process-id 1 # host1
    ...

* under SLURM (``srun``), Open MPI (``mpirun``), on Cloud TPU VMs or GKE,
  without arguments: ``jax.distributed.initialize()`` reads the coordinator,
  the number of processes and each process's id from the environment. Under
  SLURM and Open MPI on GPUs each process takes one GPU by default (the one
  numbered by its local process id among those it sees), so start one task
  per GPU, each seeing all of its node's GPUs, e.g. on four nodes of 8 GPUs
  (docs/multihost.md)::

    srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 python -m examples.multihost

``--batch-size`` is the global batch: each process loads ``batch_size /
process_count`` rows of it, and it must divide evenly over all devices.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_recurrent as nr

FREQUENCIES = (0.3, 0.6, 0.9, 1.2)  # radians per step, one per class
NUM_CLASSES = len(FREQUENCIES)
IN_FEATURES = 1


# -- joining the other processes ---------------------------------------------------------
def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """``jax.distributed.initialize``, before any other JAX call; ``None`` arguments are
  detected from the environment (SLURM, Open MPI, Cloud TPU, GKE)."""
  # The CPU's cross-process collectives (gloo; without them a computation
  # spanning processes on the CPU fails). GPUs use NCCL, TPUs their own.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def data_mesh() -> Mesh:
  """A 1-D mesh over every process's devices, axis ``data``; ``jax.devices()`` lists each
  process's devices together, so each process's rows of a global batch are contiguous."""
  return Mesh(np.array(jax.devices()), ('data',))


def replicate(mesh: Mesh, *modules: nnx.Module) -> None:
  """Makes every array of each module's state one global array replicated on all devices
  (in place). Every process holds the same values: the modules are built from one seed.
  A PRNG key (a dropout stream's ``RngKey``), which NumPy cannot hold, goes over as its
  key data."""
  replicated = NamedSharding(mesh, P())

  def global_array(a: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(global_array(jax.random.key_data(a)),
                                      impl=jax.random.key_impl(a))
    return jax.make_array_from_process_local_data(replicated, np.asarray(a))

  for module in modules:
    nnx.update(module, jax.tree.map(global_array, nnx.state(module)))


def shard_rows(mesh: Mesh, *local: np.ndarray) -> list[jax.Array]:
  """Global arrays from this process's rows: rows split over axis ``data``, process 0's rows
  first (the order of ``data_mesh``)."""
  rows = NamedSharding(mesh, P('data'))
  return [jax.make_array_from_process_local_data(
    rows, a, (a.shape[0] * jax.process_count(), *a.shape[1:])) for a in local]


# -- data and model ----------------------------------------------------------------------
def synthetic_batch(seed: int, step: int, process: int, rows: int, max_len: int):
  """One process's rows of the global batch of ``step``: ``(x, lengths, labels)``.

  ``x`` is ``(rows, max_len, 1)``: ``sin(w t + phase) + noise`` for the ``length`` first
  steps and zeros after; ``w`` is the label's frequency. Each process draws its own rows
  (seeded by ``seed, step, process``), so no process loads the whole batch.
  """
  rng = np.random.default_rng((seed, step, process))
  labels = rng.integers(0, NUM_CLASSES, rows).astype(np.int32)
  lengths = rng.integers(max(1, max_len // 4), max_len + 1, rows).astype(np.int32)
  t = np.arange(max_len)[None, :]
  phase = rng.uniform(0, 2 * np.pi, (rows, 1))
  x = np.sin(np.asarray(FREQUENCIES)[labels][:, None] * t + phase)
  x = x + 0.3 * rng.normal(size=x.shape)
  x = np.where(t < lengths[:, None], x, 0.0)
  return x[..., None].astype(np.float32), lengths, labels


class Classifier(nnx.Module):
  """Bidirectional fused LSTM, masked mean over the valid steps, linear layer."""

  def __init__(self, hidden_features: int, *, rngs: nnx.Rngs):
    self.lstm = nr.LSTM(IN_FEATURES, hidden_features, bidirectional=True, rngs=rngs)
    self.head = nnx.Linear(2 * hidden_features, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    y = self.lstm(x, seq_lengths=lengths)  # (batch, time, 2 * hidden), zero at padding
    pooled = y.sum(axis=1) / jnp.maximum(lengths, 1)[:, None].astype(y.dtype)
    return self.head(pooled)


def loss_fn(model: Classifier, x, lengths, labels) -> jax.Array:
  logits = model(x, lengths)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model: Classifier, optimizer: nnx.Optimizer, x, lengths, labels) -> jax.Array:
  """One step on the global batch: the mean loss over all processes' rows; XLA all-reduces
  the gradients, and every process applies the same update to its replica."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, lengths, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model: Classifier, x, lengths, labels) -> jax.Array:
  return (model(x, lengths).argmax(-1) == labels).mean()


# -- the program -------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description='Data-parallel training of a bidirectional LSTM across processes.',
    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument('--coordinator', help="process 0's host:port (default: from the cluster's "
                 'environment, or a free port on localhost when spawning)')
  p.add_argument('--num-processes', type=int,
                 help='number of processes; without --coordinator and --process-id, spawn '
                 'them all on this machine')
  p.add_argument('--process-id', type=int, help="this process's id, 0 to num_processes - 1")
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch-size', type=int, default=64, help='global batch (all processes)')
  p.add_argument('--max-len', type=int, default=32)
  p.add_argument('--hidden', type=int, default=32)
  p.add_argument('--learning-rate', type=float, default=1e-2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--log-every', type=int, default=50)
  return p.parse_args(argv)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def spawn_local(argv: Sequence[str], num_processes: int) -> int:
  """Runs ``num_processes`` copies of this program on this machine (CPU unless
  ``JAX_PLATFORMS`` says otherwise), coordinated on a free local port; returns the
  first non-zero exit status, or 0. A failing process takes the others down with it."""
  env = dict(os.environ)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  address = f'localhost:{free_port()}'
  procs = [subprocess.Popen([sys.executable, '-m', 'examples.multihost', *argv,
                             '--coordinator', address, '--process-id', str(i)], env=env)
           for i in range(num_processes)]
  try:
    while True:
      codes = [p.poll() for p in procs]
      if any(codes):  # one failed: the others would wait for it in a collective
        return next(c for c in codes if c)
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()


def main(argv: Sequence[str] | None = None) -> float:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.coordinator is None and args.process_id is None and args.num_processes:
    status = spawn_local(argv, args.num_processes)
    if status:
      raise SystemExit(status)
    return float('nan')

  initialize(args.coordinator, args.num_processes, args.process_id)
  process, processes = jax.process_index(), jax.process_count()
  mesh = data_mesh()
  if args.batch_size % jax.device_count():
    raise SystemExit(f'--batch-size {args.batch_size} must divide evenly over '
                     f'{jax.device_count()} devices')
  rows = args.batch_size // processes  # this process's share of every batch
  log = print if process == 0 else (lambda *a, **k: None)
  log(f'{processes} processes, {jax.device_count()} devices; each process loads {rows} '
      f'of {args.batch_size} rows per step')

  model = Classifier(args.hidden, rngs=nnx.Rngs(args.seed))  # the same on every process
  optimizer = nnx.Optimizer(model, optax.adam(args.learning_rate), wrt=nnx.Param)
  replicate(mesh, model, optimizer)

  for step in range(args.steps):
    batch = synthetic_batch(args.seed, step, process, rows, args.max_len)
    loss = train_step(model, optimizer, *shard_rows(mesh, *batch))
    if step % args.log_every == 0 or step == args.steps - 1:
      log(f'step {step:4d}  loss {float(loss):.4f}')  # replicated: readable everywhere

  test = synthetic_batch(args.seed + 1, 0, process, rows, args.max_len)
  acc = float(accuracy(model, *shard_rows(mesh, *test)))
  log(f'test accuracy {acc:.3f} ({args.batch_size} sequences, chance {1 / NUM_CLASSES:.2f})')
  return acc


if __name__ == '__main__':
  main()
