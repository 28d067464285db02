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
