"""Two processes on localhost under ``jax.distributed`` train like one process.

Two workers (``tests/_multihost_worker.py``, one CPU device each, gloo
collectives) train ``examples/multihost.py``'s classifier, a fused bidirectional
``nr.LSTM`` with ``seq_lengths``, on a batch split between them, and call the
layers outside ``jit`` on global arrays. Meanwhile this process trains the same
model on the whole batch; the losses, the parameters and the outputs must agree
to float tolerance (the only difference is the order of the gradient sums).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import _multihost_worker as worker

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180  # per run of both workers; they take a few seconds
ATOL = 1e-5


def _gloo_available() -> bool:
  """Whether this jaxlib has the CPU's cross-process collectives (gloo)."""
  from jax._src import lib

  ext = getattr(lib, '_jax', None) or getattr(lib, 'xla_extension', None)
  return hasattr(ext, 'make_gloo_tcp_collectives')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_workers(out_dir: Path) -> list[subprocess.Popen]:
  env = dict(os.environ)
  env['PYTHONPATH'] = str(ROOT) + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_NUMPY_RANK_PROMOTION'] = 'raise'  # as the suite's conftest.py
  # One CPU device per process, whatever the caller's XLA_FLAGS say.
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split()
                              if not f.startswith('--xla_force_host_platform_device_count'))
  port = _free_port()
  procs = []
  for i in range(worker.PROCESSES):
    log = open(out_dir / f'process{i}.log', 'w')  # the child keeps its own descriptor
    procs.append(subprocess.Popen(
      [sys.executable, str(ROOT / 'tests' / '_multihost_worker.py'), str(port), str(i),
       str(out_dir)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    log.close()
  return procs


def _wait(procs: list[subprocess.Popen], out_dir: Path) -> None:
  """Waits for all workers; if one fails or time runs out, kills the rest (which would
  otherwise wait for it in a collective) and fails with every worker's output."""
  deadline = time.monotonic() + TIMEOUT_S
  while True:
    codes = [p.poll() for p in procs]
    if all(c == 0 for c in codes):
      return
    if any(codes) or time.monotonic() > deadline:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
      logs = '\n'.join(f'--- process {i} (exit {p.returncode}):\n'
                       + (out_dir / f'process{i}.log').read_text()
                       for i, p in enumerate(procs))
      why = 'failed' if any(codes) else f'timed out after {TIMEOUT_S} s'
      pytest.fail(f'multi-process workers {why}:\n{logs}')
    time.sleep(0.05)


def test_two_processes_train_like_one_process_on_the_whole_batch(tmp_path):
  if not _gloo_available():
    pytest.skip('this jaxlib has no gloo CPU collectives (make_gloo_tcp_collectives)')
  procs = _run_workers(tmp_path)
  try:
    expected = worker.reference()  # the whole batch in this process, while the workers run
  finally:
    _wait(procs, tmp_path)

  moved = max(np.abs(expected['params/' + k[len('initial/'):]] - v).max()
              for k, v in expected.items() if k.startswith('initial/'))
  assert moved > 1e-2, 'the reference did not train'
  rows = worker.ROWS
  for i in range(worker.PROCESSES):
    got = np.load(tmp_path / f'process{i}.npz')
    param_keys = sorted(k for k in got.files if k.startswith('params/'))
    assert param_keys == sorted(k for k in expected if k.startswith('params/'))
    for k in param_keys:
      np.testing.assert_allclose(got[k], expected[k], atol=ATOL, rtol=0, err_msg=f'{i} {k}')
    np.testing.assert_allclose(got['losses'], expected['losses'], atol=ATOL, rtol=0)
    # Outside jit, global seq_lengths / segment_ids: this process's rows of the outputs.
    own = slice(i * rows, (i + 1) * rows)
    np.testing.assert_allclose(got['lstm'], expected['lstm'][own], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got['rnn'], expected['rnn'][own], atol=ATOL, rtol=0)
    assert str(got['error']).startswith(
      'LSTM: `seq_lengths` expected non-negative lengths, got minimum -1'), str(got['error'])


# -- examples/multihost.py's own pieces, in this process (mutation audit) ------------------
# The two-process test above computes its reference with the example's functions; these
# check the functions themselves against NumPy and the program's wiring with fakes.
def test_synthetic_batch_follows_its_formula():
  """``sin(w t + phase) + 0.3 noise`` for the first ``length`` steps, zeros after, drawn in
  the documented order from ``(seed, step, process)``; lengths from ``max_len // 4`` to
  ``max_len`` inclusive."""
  from examples import multihost

  x, lengths, labels = multihost.synthetic_batch(3, 5, 1, 4, 8)
  rng = np.random.default_rng((3, 5, 1))
  want_labels, want_lengths = rng.integers(0, 4, 4), rng.integers(2, 9, 4)
  phase, noise = rng.uniform(0, 2 * np.pi, (4, 1)), rng.normal(size=(4, 8))
  t = np.arange(8)
  want = np.sin(np.array([0.3, 0.6, 0.9, 1.2])[want_labels][:, None] * t + phase) + 0.3 * noise
  want[t[None, :] >= want_lengths[:, None]] = 0.0
  np.testing.assert_array_equal(labels, want_labels)
  np.testing.assert_array_equal(lengths, want_lengths)
  assert x.shape == (4, 8, 1) and x.dtype == np.float32
  np.testing.assert_allclose(x[..., 0], want, rtol=1e-6, atol=1e-6)
  _, many, _ = multihost.synthetic_batch(0, 0, 0, 500, 8)
  assert sorted(set(many.tolist())) == [2, 3, 4, 5, 6, 7, 8]


def test_classifier_loss_and_accuracy_against_numpy():
  """Masked mean over the valid steps, then the linear layer; the mean cross-entropy; the
  share of rows whose largest logit is the label."""
  from flax import nnx

  from examples import multihost
  from tests.random_params import random_module

  model = random_module(lambda: multihost.Classifier(3, rngs=nnx.Rngs(0)), 1)
  x, lengths, _ = multihost.synthetic_batch(0, 0, 0, 3, 6)

  @nnx.jit  # one program for all four (the accuracy's own jit is inlined)
  def run(model, labels):
    return (model.lstm(x, seq_lengths=lengths), model(x, lengths),
            multihost.loss_fn(model, x, lengths, labels),
            multihost.accuracy(model, x, lengths, labels))

  y, got_logits, _, _ = run(model, np.zeros(3, np.int32))
  pooled = np.asarray(y, np.float64).sum(1) / lengths[:, None]  # y is zero at padding
  logits = pooled @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
  np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-6)
  pred = logits.argmax(-1)
  labels = np.array([pred[0], pred[1], (pred[2] + 1) % 4], np.int32)  # two of three right
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  _, _, loss, acc = run(model, labels)
  assert float(loss) == pytest.approx(-log_p[np.arange(3), labels].mean(), rel=1e-5)
  assert float(acc) == pytest.approx(2 / 3)


def test_replicate_carries_a_dropout_streams_key_over():
  """``replicate`` on modules with dropout: the ``RngKey`` of the dropout stream (which
  NumPy cannot hold: a TypeError before) becomes a replicated key array like every other
  leaf, with the key data, counts and parameters it had."""
  import jax
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import nnx_recurrent as nr
  from examples import multihost

  mesh = multihost.data_mesh()
  layers = (nr.LSTM(1, 4, num_layers=2, dropout_rate=0.3, rngs=nnx.Rngs(0, dropout=7)),
            nr.RNN(nr.GRUCell(1, 4, zoneout_rate=0.2, rngs=nnx.Rngs(1, dropout=8))))

  def values(module):
    return {path: np.asarray(jax.random.key_data(v[...])
                             if jax.dtypes.issubdtype(v[...].dtype, jax.dtypes.prng_key)
                             else v[...])
            for path, v in nnx.to_flat_state(nnx.state(module))}

  before = [values(m) for m in layers]
  assert all(any(isinstance(v, nnx.RngKey) for _, v in nnx.to_flat_state(nnx.state(m)))
             for m in layers)
  multihost.replicate(mesh, *layers)
  for module, want in zip(layers, before):
    state = nnx.to_flat_state(nnx.state(module))
    for _, v in state:
      assert v[...].sharding.is_equivalent_to(NamedSharding(mesh, P()), v[...].ndim), v
    got = values(module)
    assert got.keys() == want.keys()
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))


def test_main_trains_on_its_share_and_tests_on_a_new_seed(monkeypatch, capsys):
  """``main`` in one process (no ``jax.distributed``), the training step and accuracy faked:
  the batches it draws, the steps it logs, Adam at the default learning rate, the test batch
  from ``seed + 1``, and the batch size checked against the devices."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from examples import multihost
  from tests.random_params import random_module

  joined, steps, tested, built = [], [], [], []
  monkeypatch.setattr(multihost, 'initialize', lambda *a: joined.append(a))
  classifier = multihost.Classifier

  def build(hidden, rngs):  # random parameters: no initializer to compile
    built.append(hidden)
    return random_module(lambda: classifier(hidden, rngs=nnx.Rngs(0)))

  monkeypatch.setattr(multihost, 'Classifier', build)
  monkeypatch.setattr(multihost.jax, 'device_count', lambda: 2)  # a batch split in two

  def train_step(model, optimizer, x, lengths, labels):
    if not steps:  # Adam's first update is -lr * g / |g|: -0.01 for every parameter
      before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
      nnx.jit(lambda model, optimizer: optimizer.update(model, jax.tree.map(
        lambda p: jnp.full_like(p, 2.0), nnx.state(model, nnx.Param))))(model, optimizer)
      moved = jax.tree.map(lambda a, b: np.asarray(a) - b, nnx.state(model, nnx.Param), before)
      for delta in jax.tree.leaves(moved):
        np.testing.assert_allclose(delta, -0.01, rtol=1e-4)
    steps.append([np.asarray(a) for a in (x, lengths, labels)])
    return jnp.float32(0.5)

  def accuracy(model, x, lengths, labels):
    tested.append([np.asarray(a) for a in (x, lengths, labels)])
    return jnp.float32(0.75)

  monkeypatch.setattr(multihost, 'train_step', train_step)
  monkeypatch.setattr(multihost, 'accuracy', accuracy)
  args = ['--steps', '4', '--batch-size', '4', '--max-len', '5', '--hidden', '2',
          '--log-every', '2', '--seed', '7']
  assert multihost.main(args) == 0.75
  assert joined == [(None, None, None)] and built == [2]
  assert len(steps) == 4
  for step, got in enumerate(steps):  # one process: all 4 rows of each batch
    for a, b in zip(got, multihost.synthetic_batch(7, step, 0, 4, 5)):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(tested[0], multihost.synthetic_batch(8, 0, 0, 4, 5)):
    np.testing.assert_array_equal(a, b)
  out = capsys.readouterr().out.splitlines()
  assert [line.split('  loss')[0] for line in out if line.startswith('step')] == [
    'step    0', 'step    2', 'step    3']
  assert out[-1] == 'test accuracy 0.750 (4 sequences, chance 0.25)'
  with pytest.raises(SystemExit, match='--batch-size 3 must divide evenly over 2 devices'):
    multihost.main([*args, '--batch-size', '3'])


class FakeProcess:
  """A ``subprocess.Popen`` whose ``poll`` returns ``codes`` in turn (the last one for ever)."""

  def __init__(self, cmd, env, codes):
    self.cmd, self.env, self.codes, self.killed, self.waited = cmd, env, list(codes), False, False

  def poll(self):
    if self.killed:
      return -9
    return self.codes.pop(0) if len(self.codes) > 1 else self.codes[0]

  def kill(self):
    self.killed = True

  def wait(self):
    self.waited = True


def fake_spawning(monkeypatch, *codes):
  """``examples.multihost`` with fake processes (process ``i`` polls ``codes[i]``) and no
  sleeping; returns the list the processes go to."""
  import types

  from examples import multihost

  procs = []

  def popen(cmd, env):
    procs.append(FakeProcess(cmd, env, codes[len(procs)]))
    return procs[-1]

  def sleep(seconds):
    if len(sleeps) > 20:  # every process has ended by the 4th poll
      raise AssertionError('spawn_local kept waiting')
    sleeps.append(seconds)

  sleeps = []
  monkeypatch.setattr(multihost, 'subprocess', types.SimpleNamespace(Popen=popen))
  monkeypatch.setattr(multihost, 'time', types.SimpleNamespace(sleep=sleep))
  monkeypatch.setattr(multihost, 'free_port', lambda: 4321)
  return procs


def test_spawn_local_waits_for_all_and_returns_the_first_failure(monkeypatch):
  import sys

  from examples import multihost

  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  procs = fake_spawning(monkeypatch, [None, 0], [None, None, None, 3])
  assert multihost.spawn_local(['--steps', '1'], 2) == 3  # after process 0 ended well
  assert [p.cmd for p in procs] == [
    [sys.executable, '-m', 'examples.multihost', '--steps', '1', '--coordinator',
     'localhost:4321', '--process-id', str(i)] for i in range(2)]
  assert [p.env['JAX_PLATFORMS'] for p in procs] == ['cpu', 'cpu']
  assert [(p.killed, p.waited) for p in procs] == [(False, True)] * 2
  # A failure takes the other process down; the platform the caller set is kept.
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda')
  procs = fake_spawning(monkeypatch, [None, 2], [None])
  assert multihost.spawn_local([], 2) == 2
  assert [(p.env['JAX_PLATFORMS'], p.killed, p.waited) for p in procs] == [
    ('cuda', False, True), ('cuda', True, True)]
  procs = fake_spawning(monkeypatch, [None, 0], [None, None, 0])
  assert multihost.spawn_local([], 2) == 0


def test_main_spawns_without_a_coordinator_and_exits_with_a_failure(monkeypatch):
  import math

  from examples import multihost

  procs = fake_spawning(monkeypatch, [0], [0])
  assert math.isnan(multihost.main(['--num-processes', '2']))
  assert len(procs) == 2
  fake_spawning(monkeypatch, [5], [None])
  with pytest.raises(SystemExit) as exit_:
    multihost.main(['--num-processes', '2'])
  assert exit_.value.code == 5
  # With a coordinator, this process is one of them: it joins (its id from the environment).
  procs = fake_spawning(monkeypatch, [0], [0])

  class Joined(Exception):
    pass

  def initialize(*args):
    raise Joined(args)

  monkeypatch.setattr(multihost, 'initialize', initialize)
  with pytest.raises(Joined, match=r"\('host0:1234', 2, None\)"):
    multihost.main(['--coordinator', 'host0:1234', '--num-processes', '2'])
  assert procs == []


def test_main_as_the_second_of_two_processes_loads_its_share_and_logs_nothing(monkeypatch,
                                                                               capsys):
  """Process 1 of 2 (collectives, sharding and training faked): it joins with its id, draws
  batch_size / 2 rows of every batch as process 1, and leaves the log to process 0."""
  import jax.numpy as jnp

  from examples import multihost

  joined, drawn = [], []
  monkeypatch.setattr(multihost, 'initialize', lambda *a: joined.append(a))
  monkeypatch.setattr(multihost.jax, 'process_index', lambda: 1)
  monkeypatch.setattr(multihost.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost.jax, 'device_count', lambda: 2)
  monkeypatch.setattr(multihost, 'data_mesh', lambda: None)
  monkeypatch.setattr(multihost, 'replicate', lambda mesh, *modules: None)
  monkeypatch.setattr(multihost, 'shard_rows', lambda mesh, *local: local)
  monkeypatch.setattr(multihost, 'train_step', lambda model, opt, *batch: jnp.float32(0.5))
  monkeypatch.setattr(multihost, 'accuracy', lambda model, *batch: jnp.float32(0.25))
  batch = multihost.synthetic_batch
  monkeypatch.setattr(multihost, 'synthetic_batch',
                      lambda *args: drawn.append(args) or batch(*args))
  monkeypatch.setattr(multihost, 'Classifier', lambda hidden, rngs: None)
  monkeypatch.setattr(multihost.nnx, 'Optimizer', lambda model, tx, wrt: None)
  assert multihost.main(['--coordinator', 'h:1', '--num-processes', '2', '--process-id', '1',
                         '--steps', '2', '--batch-size', '6', '--seed', '3']) == 0.25
  assert joined == [('h:1', 2, 1)]
  assert drawn == [(3, 0, 1, 3, 32), (3, 1, 1, 3, 32), (4, 0, 1, 3, 32)]
  assert capsys.readouterr().out == ''
