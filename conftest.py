"""Test-session settings shared by every test and doctest (tests/, compat/, docs/, the package)."""

import gc
import os
import subprocess
import sys

import pytest

# The tests compile many tiny programs; XLA:CPU's optimising backend passes
# dominate their run time (seconds per scan on 2 cores) and buy nothing at
# these sizes. Beyond the optimisation level: XLA:CPU's MLIR fusion emitters
# compile a small scan's gradient in 2-3x the time of the classic emitters,
# and splitting codegen over threads only contends with the other xdist
# worker on 2 cores (0.35 s -> 0.12 s per program; the suite 294-340 s ->
# 236 s, benchmarks/RESULTS.md "Test-suite time"). Users' programs keep XLA's
# defaults; the suite checks values, which both emitters compute to rounding.
#
# Must be set before the first computation. A user's own setting of the level
# wins, and so do the flags inherited by xdist workers from the controlling
# process. XLA aborts the process on a flag it does not know (jaxlib 0.11
# dropped the emitter switch), so the optional flags are tried in a child
# process first, once per run: 0.3 s when it only starts jaxlib's CPU client
# (where XLA reads the flags), 3 s when it must import jax.
_BASE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
_OPTIONAL_FLAGS = (
  '--xla_cpu_use_fusion_emitters=false',
  '--xla_cpu_parallel_codegen_split_count=1',
)


def _xla_accepts(flags: str) -> bool:
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  probe = ('try:\n  from jaxlib import _jax; _jax.get_tfrt_cpu_client()\n'
           'except (ImportError, AttributeError, TypeError):\n  import jax; jax.devices()')
  return subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True).returncode == 0


if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  _flags = (os.environ.get('XLA_FLAGS', '') + ' ' + _BASE_FLAGS).strip()
  _optional = list(_OPTIONAL_FLAGS)
  if not _xla_accepts(' '.join([_flags, *_optional])):
    _optional = [flag for flag in _optional if _xla_accepts(f'{_flags} {flag}')]
  os.environ['XLA_FLAGS'] = ' '.join([_flags, *_optional])

# Implicit rank promotion hides broadcasting bugs (a (batch,) mask against a
# (batch, features) array...); make it an error everywhere in the suite, the
# child processes of the subprocess tests included. Set through the
# environment, read by jax at its import: the controlling xdist process then
# never imports jax (2.5 s before the workers start).
os.environ['JAX_NUMPY_RANK_PROMOTION'] = 'raise'
if 'jax' in sys.modules:  # imported already (a plugin): the environment is read
  sys.modules['jax'].config.update('jax_numpy_rank_promotion', 'raise')


# Python's cyclic garbage collector, at its default thresholds (700, 10, 10),
# collects the young generation every 700 net allocations and the whole heap
# every hundred of those, and tracing and lowering allocate millions of objects:
# in a process running test_pallas, test_dropin and test_cells (118 s of CPU)
# it took 7.0 s, 5.4 s of them in full collections over a heap that holds jax,
# flax, torch and every compiled program. With a larger young generation and the
# objects that exist once the tests are collected (the imported modules) frozen
# out of every later collection (pytest_collection_finish), 1.5 s, and the same
# peak memory (benchmarks/RESULTS.md, "Test-suite time"); most of what is left
# is freeing what the collections find (compiled programs among it). Only when
# unreachable cycles are freed changes; no test reads that.
gc.set_threshold(50_000, 20, 10)


def _share_mlir_contexts(modules_per_context: int = 500) -> None:
  """One MLIR context for many lowerings instead of a new one for each.

  JAX lowers every program (each eager operation too) into a fresh MLIR
  context and spends 6 ms making it (dialects loaded and registered): 600
  eager operations of new shapes took 11.9 s, 9.3 s with one context, and
  the suite's processes needed twice the memory (benchmarks/RESULTS.md,
  "Test-suite time"). A context holds any number of modules; what it keeps
  after a module is gone is the types and attributes it interned, so it is
  replaced after ``modules_per_context`` lowerings. The programs lowered are
  the same; users' processes keep JAX's behaviour. Skipped where this JAX has
  no ``make_ir_context``.
  """
  if os.environ.get('NNX_RECURRENT_TEST_FRESH_MLIR_CONTEXTS'):
    return
  from jax._src.interpreters import mlir

  make = getattr(mlir, 'make_ir_context', None)
  if make is None:
    return
  shared = {'context': None, 'uses': 0}

  def make_ir_context():
    if shared['context'] is None or shared['uses'] >= modules_per_context:
      shared['context'], shared['uses'] = make(), 0
    shared['uses'] += 1
    return shared['context']

  mlir.make_ir_context = make_ir_context


def pytest_configure(config):
  # In the processes that run tests: xdist workers, or a run without xdist (the
  # controlling process of an xdist run imports no jax).
  if hasattr(config, 'workerinput') or not getattr(config.option, 'numprocesses', None):
    _share_mlir_contexts()


def pytest_collection_finish(session):
  # What the imports and the collection made lives to the end of the session:
  # collected once, then left out of the collections that follow.
  gc.collect()
  gc.freeze()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
  """End an xdist worker as soon as its session is over.

  By now the worker has sent every report to the controlling process; what is
  left is freeing the thousands of programs it compiled and the interpreter's
  teardown, 6-10 s at the end of the suite, which the controller waits for.
  Failures and crashes in tests are reported before this point; only the
  process's own teardown is skipped.
  """
  if hasattr(config, 'workerinput'):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
