"""The fused layers' internals for ``benchmarks/`` and the tests. NOT public API.

Everything here may change without notice; it exists so that benchmark and
diagnostic scripts reach the package through one documented door instead of
through its modules' private helpers. It offers exactly:

* ``dot(a, b)``, ``shift(first, seq)``, ``flat_dot_t(a, b, transpose)``: the
  matmul helpers of the fused training step (``benchmarks/bound.py`` builds
  its matmul skeleton from them), and ``TRANSPOSE_MIN_MACS``, the size from
  which ``flat_dot_t(..., transpose=True)`` materialises the transpose;
* ``ScanPlan``, ``Plan``: how the XLA scans run one direction;
  ``plan_for(layer_cls, rows, gate_width)``: the plan ``nr.LSTM`` / ``nr.GRU``
  picks for one step of ``rows`` batch rows; ``gpu_plan(layer_cls, rows)``: the
  plan it picks on a GPU; ``forced_plan(plan)``: a context manager under which every
  fused layer traced uses ``plan`` (``benchmarks/gpu_plans.py``, the tests and
  the fuzzer, which run a GPU's plan on the CPU);
* ``cuda_backend()``: whether the default backend is a CUDA GPU;
  ``fake_cuda(cudnn_lstm=None)``: a context manager under which the cuDNN
  path's CUDA check passes and, given ``cudnn_lstm``, that function runs in
  place of ``jax.experimental.rnn.lstm`` (same signature as the call in
  ``_cudnn._lstm``; ``benchmarks/cudnn_check.py --dry`` and the tests pass
  ``jax.experimental.rnn.lstm_ref``);
* ``pallas_settings(**changes)``: a context manager under which the Pallas
  kernels are traced with other sizes or Triton parameters
  (:class:`PallasSettings`: column chunk, bytes of weights held on chip,
  state size per program, chunks unrolled, ``num_warps``, ``num_stages``,
  loads a step ahead, ``dot`` or multiply-adds); for measurements.
* ``pallas_padded_rows(rows, hidden)``: the batch rows the Pallas kernels run
  for ``rows`` rows of a layer of ``hidden`` features (no projection), that is
  the batch padded to whole blocks: every row count with the same padded rows
  runs the same kernel programs (``benchmarks/pallas_verdict.py`` widens a
  measured shape's region by it);
* ``triton_lowering()``: a context manager under which the Pallas kernels
  (``implementation='pallas'``) lower for a GPU through Triton even when the
  default backend is the CPU, so that ``jax.export(..., platforms=['cuda'])``
  checks their Triton lowering on a machine without a GPU (the tests);
* ``checked_interpreter()``: a context manager under which the Pallas kernels,
  where they are interpreted (on the CPU), run under Pallas' checking
  interpreter: a read outside a buffer raises an ``IndexError`` (the plain
  interpreter clamps it; a GPU reads whatever lies there) and outputs start as
  NaN, so that what a kernel never writes shows (the tests).

The plan, the cuDNN substitute, the Pallas settings, the Triton lowering and the
checking interpreter are read while a layer is traced: trace
(``jax.jit(...).lower``, or call) inside the ``with`` block.
None of the context managers is thread-safe.

Example::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> import nnx_recurrent as nr
  >>> from nnx_recurrent._fused import internal
  >>> loop = internal.ScanPlan('loop', prefetch=False, unroll=1)
  >>> layer = nr.LSTM(3, 4, rngs=nnx.Rngs(0))
  >>> with internal.forced_plan(internal.Plan(loop, loop)):
  ...   y = layer(jnp.ones((2, 5, 3)))
  >>> internal.plan_for(nr.LSTM, 2, 16).train.inputs  # the measured choice again
  'hoisted'
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from nnx_recurrent._fused import _cudnn, _pallas, _pallas_settings, _plans
from nnx_recurrent._fused._pallas_settings import Settings as PallasSettings
from nnx_recurrent._fused._plans import TRANSPOSE_MIN_MACS, Plan, ScanPlan, cuda_backend
from nnx_recurrent._fused._step_math import LSTMMath, dot, flat_dot_t, shift

__all__ = [
  'dot', 'shift', 'flat_dot_t', 'TRANSPOSE_MIN_MACS', 'ScanPlan', 'Plan', 'plan_for',
  'gpu_plan', 'forced_plan', 'cuda_backend', 'fake_cuda', 'triton_lowering', 'pallas_settings',
  'PallasSettings', 'pallas_padded_rows', 'checked_interpreter',
]


def plan_for(layer_cls, rows: int, gate_width: int) -> Plan:
  """The plan ``layer_cls`` (``nr.LSTM`` or ``nr.GRU``) uses for a step of
  ``rows`` batch rows and ``gate_width`` (gates times hidden) columns."""
  return _plans.plan(layer_cls._math, rows, gate_width)


def gpu_plan(layer_cls, rows: int) -> Plan:
  """The plan ``layer_cls`` (``nr.LSTM`` or ``nr.GRU``) uses on a GPU for a
  step of ``rows`` batch rows (:func:`forced_plan` runs it anywhere)."""
  return _plans.gpu_plan(layer_cls._math, rows)


def pallas_padded_rows(rows: int, hidden: int) -> int:
  """The batch rows the Pallas kernels run for ``rows`` batch rows of a layer
  of ``hidden`` features without a projection (either layer: the block does
  not depend on the gates), with the current :class:`PallasSettings`."""
  return _pallas._Layout(LSTMMath, 1, rows, hidden, hidden, proj=False, packed=False,
                         dtype=jnp.float32).padded_rows


@contextlib.contextmanager
def forced_plan(plan: Plan):
  """Every fused layer traced inside the block scans with ``plan``."""
  previous, _plans._forced = _plans._forced, plan
  try:
    yield plan
  finally:
    _plans._forced = previous


@contextlib.contextmanager
def fake_cuda(cudnn_lstm=None):
  """Inside the block ``implementation='cudnn'`` passes its CUDA check, and
  ``cudnn_lstm`` (when given) runs in place of ``jax.experimental.rnn.lstm``."""
  previous = _cudnn._fake_cuda, _cudnn._substitute
  _cudnn._fake_cuda, _cudnn._substitute = True, cudnn_lstm
  try:
    yield
  finally:
    _cudnn._fake_cuda, _cudnn._substitute = previous


@contextlib.contextmanager
def triton_lowering():
  """Inside the block the Pallas kernels lower through Triton, whatever the
  default backend (running them then needs a GPU). Without a GPU, jax 0.11
  and later lower for an H200 (they ask for an abstract device; jax 0.10 takes
  compute capability 9.0 itself; then compute nothing eagerly inside the
  block: only traced code may run under the abstract device)."""
  if _pallas._triton() is None:
    raise RuntimeError(f"jax {jax.__version__} has no Pallas Triton backend "
                       "(jax.experimental.pallas.triton) to lower the kernels with")
  previous, _pallas._force_triton = _pallas._force_triton, True
  try:
    with _abstract_gpu():
      yield
  finally:
    _pallas._force_triton = previous


@contextlib.contextmanager
def checked_interpreter():
  """Inside the block the Pallas kernels, where they are interpreted (not
  on a GPU, nor under :func:`triton_lowering`), run under Pallas' checking
  interpreter: a read outside a buffer raises an ``IndexError``, and outputs
  start as NaN. Not for float64 kernels under the ``jax.enable_x64`` context
  manager, whose setting is the calling thread's: XLA:CPU may run a program on
  a thread of its own, where jax (0.10.2 and 0.12.1) converts the checking
  interpreter's float64 results to float32 ("Incorrect output dtype";
  UPSTREAM.md). With x64 set globally they run."""
  previous, _pallas._checked_interpret = _pallas._checked_interpret, True
  try:
    yield
  finally:
    _pallas._checked_interpret = previous


def _abstract_gpu():
  sharding = jax.sharding
  if jax.default_backend() == 'gpu' or not hasattr(sharding, 'AbstractDevice'):
    return contextlib.nullcontext()
  try:
    h200 = sharding.AbstractDevice(device_kind='NVIDIA H200', num_cores=None, platform='cuda')
  except TypeError:  # jax 0.10.0: no `platform`, and no abstract device needed
    return contextlib.nullcontext()
  # Auto axes: jax 0.12's AbstractMesh defaults to Explicit ones, under which
  # the layers refuse 'pallas' (docs/checkpoints_and_sharding.md).
  return sharding.use_abstract_mesh(sharding.AbstractMesh(
    (1,), ('device',), axis_types=(sharding.AxisType.Auto,), abstract_device=h200))


@contextlib.contextmanager
def pallas_settings(**changes):
  """Inside the block the Pallas kernels are traced with ``changes`` to the
  current :class:`PallasSettings` (their names: ``chunk``, ``hold_bytes``,
  ``state_elements``, ``unrolled_chunks``, ``num_warps``, ``num_stages``,
  ``prefetch``, ``matmul``, ``recurrent_weights``, ``residuals``);
  yields the settings."""
  for name, allowed in (('matmul', _pallas_settings.MATMULS),
                        ('recurrent_weights', _pallas_settings.RECURRENT_WEIGHTS),
                        ('residuals', _pallas_settings.RESIDUALS)):
    if name in changes and changes[name] not in allowed:
      raise ValueError(f'pallas_settings: {name} must be one of {allowed}, '
                       f'got {changes[name]!r}')
  previous = _pallas_settings.current
  _pallas_settings.current = previous._replace(**changes)
  try:
    yield _pallas_settings.current
  finally:
    _pallas_settings.current = previous
