"""How the XLA scans run a direction, chosen from the shape of one step.

For small batches the input projection ``x @ W_i`` of every time step is ONE
matmul over the whole (time-major) sequence, hoisted out of the loop; only
``h @ W_h`` stays inside (the bias is added in the loop's elementwise step,
which costs nothing there and saves a pass over ``(time, batch, gates)``). For
batches of ``HOIST_MAX_ROWS`` rows or more the per-step matmuls already run at
the matmul peak and the hoisted array only costs memory traffic, so ``x_t @
W_i`` stays in the loop, and the LSTM does one matmul of ``[x_t, h]`` against
``[W_i; W_h]`` per step (under a gradient below ``JOINT_MAX_ROWS`` rows, and
for tiny steps, whose time is their number of operations). The forward under a
gradient (which also saves residuals) may be scanned differently from the
plain forward (see :func:`plan`; all measured, see ``benchmarks/RESULTS.md``).
The backward pass is the same in every case. That is the CPU's choice. On a
GPU, where each loop iteration costs kernel launches, the projections are
hoisted at every batch size and every scan, the backward one too, is unrolled.

This module also holds the machine probes the backends are chosen with, and
(:data:`PALLAS_FASTER`) the one table that lets ``implementation='auto'`` pick
the Pallas kernels.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax

# How a direction is scanned, chosen from the shapes of one step (measured on 2
# cores of the AMD EPYC development machine, see benchmarks/RESULTS.md; its
# "On the Intel machine" says which choices read differently on the other kind):
# * 'hoisted': the input projection of every step is one matmul before the
#   loop. For steps with fewer rows (batch elements) than HOIST_MAX_ROWS:
#   then the per-step matmuls are too small to use both cores. With more rows
#   they run at the matmul peak inside the loop ('loop'), and the hoisted
#   (time, batch, gates) array only costs memory traffic and page faults (20%
#   slower forward at batch 256).
# * A step with fewer gate pre-activations (rows * gates * H) than TINY_STEP
#   costs its number of operations, not its arithmetic (a (1, 64) x (64, 256)
#   matmul is ~0.6 us of call overhead). Without a gradient such a step does
#   ONE matmul, [x_t, h] against the stacked weights ('joint'; 1.49 vs 1.83 ms
#   for two matmuls unrolled twice at (1, 1000, 32, 64)). Not for the GRU,
#   whose joint weight needs a zero block for ``h W_hn`` (1.41 vs 1.21 ms for
#   two matmuls, the same as flax's). Under a gradient, whose forward also
#   writes residuals, hoisting and unrolling twice was fastest (training step
#   5.6 vs 6.6 ms in the loop, 7.0 joint). Their backward scan runs two
#   steps per iteration (_xla.prefetch_scan's ``pairs``): LSTM training step
#   0.88-0.94x at (1, 1000, 32, 64) in four A/B runs, the GRU's 0.90-1.02x;
#   at (8, 500, 64, 128) it made no difference.
# * At 64 rows (64, 100, 128, 256) the joint matmul made the LSTM's training
#   step 0.96x flax's vs 1.00x for two matmuls. At 256 rows it made no
#   difference (0.98-1.13x both), so it stops at JOINT_MAX_ROWS. The forward
#   without a gradient uses two matmuls from HOIST_MAX_ROWS rows on: with the
#   per-gate activations below it is then flax's own loop body, and it took
#   0.93x the joint forward's time at 64 rows (31 interleaved rounds).
# * Without a gradient the LSTM step activates each gate on its own
#   (``LSTMMath.step``'s ``save``) instead of the one-tanh form, which writes
#   all four activations out as residuals need: forward 0.94-0.98x at all four
#   benchmark shapes (A/B runs of 9-21 rounds).
# * Otherwise scans are not unrolled on the CPU: an unrolled step reads the next step's
#   slice straight from the sequence again (see _xla.prefetch_scan), and 2, 4
#   or 8 were slower.
# * On the CPU, a GRU step of GRU_AUTODIFF_MIN_ROWS rows or more is
#   differentiated by JAX (the forward scan without the custom VJP):
#   training step 0.90-0.92x the custom backward's at 128 and 256 rows (both
#   after the same forward; at 64 rows the two were equal, at 8 the custom
#   one is 0.5x). With that many rows the per-step weight-gradient matmuls
#   JAX does inside its backward loop run near the peak, and the custom
#   backward's stacked gate gradients and their concatenation (78 MB each at
#   (256, 50, 256, 512)) cost more than they save. Not for the LSTM (its
#   custom backward, with transposed weight-gradient matmuls, is 0.91x flax's
#   at 256 rows where JAX's is 1.05x; on the Intel machine it is 1.06x JAX's
#   own), nor on a GPU (there the fused GRU's
#   training step took 0.72x flax's at 256 rows, the generic one 1.06x).
# * On a GPU (XLA's while loop costs several kernel launches per iteration)
#   the scans hoist the input projections and unroll every scan 8 times; the
#   LSTM's forward without a gradient 4 times from GPU_LSTM_UNROLL4_MIN_ROWS
#   rows on (there 0.68 / 0.99 ms against 0.82 / 1.12 unrolled 8 at 64 / 256
#   rows, where the GRU's took 0.97 / 0.93 against 0.82 / 0.95). On
#   an H200 (2026-12-04, `benchmarks/gpu_plans.py` at the suite's four shapes,
#   benchmarks/HISTORY.md, "The H200 again"), against the CPU's plans
#   there: training step 0.49-0.55x at (8, 500, 64, 128), 0.66-0.69x at (64, 100,
#   128, 256), 0.65-0.77x at (1, 1000, 32, 64), 0.84-0.86x at (256, 50, 256,
#   512); forward 0.47-0.65x. Each is within 6% of the best of the 9 (LSTM)
#   or 6 (GRU) plans timed at its shape (inputs hoisted, in the loop or joint;
#   unrolled 1, 4 or 8 times), but the GRU's training step at 64 rows, 0.69x
#   (the loop unrolled 4 times: 0.62x). Three rounds each, in one call.
HOIST_MAX_ROWS = 32
JOINT_MAX_ROWS = 128
TINY_STEP = 1024
TRANSPOSE_MIN_MACS = 2**32  # see _step_math.flat_dot_t
GRU_AUTODIFF_MIN_ROWS = 128
GPU_UNROLL = 8
GPU_LSTM_UNROLL4_MIN_ROWS = 64


class ScanPlan(NamedTuple):
  """How one forward scan computes its gate pre-activations."""

  inputs: str  # 'hoisted', 'loop' or 'joint' (see above)
  prefetch: bool  # the scan fetches the next step's input in the carry
  unroll: int


class Plan(NamedTuple):
  primal: ScanPlan  # the forward pass when no gradient is taken
  train: ScanPlan  # the forward pass under a gradient (it saves residuals)
  # The backward scan always prefetches; on the CPU it is not unrolled (2 was
  # not faster).
  # False: no custom VJP, JAX differentiates the ``primal`` forward scan.
  custom_vjp: bool = True
  # The backward scan runs two steps per iteration (``_xla.prefetch_scan``'s ``pairs``).
  backward_pairs: bool = False
  # Steps of the backward scan per loop iteration (1 on the CPU, GPU_UNROLL on
  # a GPU; any value through ``internal.forced_plan``, for benchmarks/gpu_plans.py).
  backward_unroll: int = 1


# Set by ``internal.forced_plan`` (benchmarks and tests); None: measured choice.
_forced: Plan | None = None


def plan(cell_math, rows: int, gate_width: int) -> Plan:
  if _forced is not None:
    return _forced
  loop = ScanPlan('loop', prefetch=False, unroll=1)
  if not isinstance(rows, int):  # a symbolic batch (jax.export): no measured choice applies
    return Plan(primal=loop, train=loop)
  if cell_math.autodiff_min_rows is not None and rows >= cell_math.autodiff_min_rows \
      and (cpu_backend() or placed_on_cpu()):
    return Plan(primal=loop, train=loop, custom_vjp=False)
  if gpu_backend():
    return gpu_plan(cell_math, rows)
  in_loop = 'joint' if cell_math.joint else 'loop'
  if rows * gate_width < TINY_STEP:
    return Plan(primal=ScanPlan(in_loop, prefetch=False, unroll=1),
                train=ScanPlan('hoisted', prefetch=False, unroll=2), backward_pairs=True)
  if rows < HOIST_MAX_ROWS:
    # Prefetching is for the hoisted projections, which feed the gate math; an
    # input step feeds the matmul, whose operand XLA copies out anyway.
    scan = ScanPlan('hoisted', prefetch=True, unroll=1)
    return Plan(primal=scan, train=scan)
  if rows < JOINT_MAX_ROWS:  # the joint matmul pays under a gradient only
    return Plan(primal=loop, train=ScanPlan(in_loop, prefetch=False, unroll=1))
  return Plan(primal=loop, train=loop)


def gpu_plan(cell_math, rows: int) -> Plan:
  """:func:`plan` on a GPU (measured on an H200, above): every scan unrolled
  ``GPU_UNROLL`` times; the LSTM's forward without a gradient 4 times from
  ``GPU_LSTM_UNROLL4_MIN_ROWS`` rows on."""
  unrolled = ScanPlan('hoisted', prefetch=False, unroll=GPU_UNROLL)
  primal = unrolled
  if cell_math.joint and rows >= GPU_LSTM_UNROLL4_MIN_ROWS:  # the LSTM
    primal = unrolled._replace(unroll=4)
  return Plan(primal=primal, train=unrolled, backward_unroll=GPU_UNROLL)


def plan_for_call(cell_math, params, xs) -> Plan:
  """:func:`plan` for one direction over time-major ``xs`` (``(time, *batch,
  features)``) with ``params`` ``(W_i, b, W_h, extra)``."""
  return plan(cell_math, math.prod(xs.shape[1:-1]), params[2].shape[-1])


# -- the Pallas kernels under implementation='auto' ------------------------------
class PallasRegion(NamedTuple):
  """Shapes at which the Pallas kernels measured faster than the XLA scans
  (forward and training step), on one kind of GPU."""

  layer: str  # 'LSTM' or 'GRU'
  rows: tuple[int, int]  # batch rows (all batch axes), inclusive
  hidden: tuple[int, int]  # hidden_features, inclusive
  device: str  # part of jax.devices()[0].device_kind, e.g. 'H200'


# Where implementation='auto' picks the Pallas kernels: the shapes where they
# measured faster than the XLA scans, forward and training step, on an H200
# (2026-12-04, the second call of `bash benchmarks/gpu_grid.sh` at e639280: the
# kernels with their loads a step ahead, the scans with the GPU plan above; 300
# steps, batch 1-64 x hidden 32-256; benchmarks/HISTORY.md, "The H200
# again"), printed by `python -m benchmarks.pallas_verdict --grid
# out/gpu/pallas_grid.json --commit <sha>`. Each region is one hidden size and
# a run of consecutive batch sizes measured faster, up to the rows that run the
# same kernel programs (the batch padded to a block). From hidden 128 on the
# kernels were slower than the scans unrolled on a GPU, forward or training
# step, at every batch (up to 6x).
PALLAS_FASTER: tuple[PallasRegion, ...] = (
  # T=300, I=16; batch: fwd/train x the scans 1: 0.50/0.47, 4: 0.47/0.42, 8: 0.46/0.46,
  # 16: 0.53/0.50 (e639280)
  PallasRegion('GRU', rows=(1, 16), hidden=(32, 32), device='H200'),
  # T=300, I=16; batch: fwd/train x the scans 64: 0.64/0.79 (e639280)
  PallasRegion('GRU', rows=(64, 64), hidden=(32, 32), device='H200'),
  # T=300, I=32; batch: fwd/train x the scans 1: 0.59/0.56, 4: 0.50/0.51, 8: 0.61/0.56,
  # 16: 0.53/0.56, 32: 0.99/0.86 (e639280)
  PallasRegion('GRU', rows=(1, 32), hidden=(64, 64), device='H200'),
  # T=300, I=16; batch: fwd/train x the scans 1: 0.62/0.53, 4: 0.49/0.47, 8: 0.50/0.48,
  # 16: 0.52/0.45 (e639280)
  PallasRegion('LSTM', rows=(1, 16), hidden=(32, 32), device='H200'),
  # T=300, I=16; batch: fwd/train x the scans 64: 0.82/0.72 (e639280)
  PallasRegion('LSTM', rows=(64, 64), hidden=(32, 32), device='H200'),
  # T=300, I=32; batch: fwd/train x the scans 1: 0.62/0.58, 4: 0.57/0.52, 8: 0.65/0.56,
  # 16: 0.62/0.56, 32: 0.91/0.78 (e639280)
  PallasRegion('LSTM', rows=(1, 32), hidden=(64, 64), device='H200'),
)


def pallas_measured_faster(cell_math, rows: int, hidden: int) -> bool:
  """Whether ``implementation='auto'`` runs a layer with the Pallas kernels."""
  if not PALLAS_FASTER or not cuda_backend() or not isinstance(rows, int):
    return False  # a symbolic batch (jax.export) has no measured rows
  if placed_on_cpu():  # the kernels would run interpreted there
    return False
  kind = jax.devices()[0].device_kind
  return any(r.layer == cell_math.name and r.rows[0] <= rows <= r.rows[1]
             and r.hidden[0] <= hidden <= r.hidden[1] and r.device in kind
             for r in PALLAS_FASTER)


# -- the machine ----------------------------------------------------------------
def placed_on_cpu() -> bool:
  """True inside ``jax.default_device(cpu)`` (on a GPU machine: computations
  placed on the CPU; jit's cache keys on the default device)."""
  config: Any = jax.config  # its flags are attributes set at runtime, unknown to the stubs
  device = config.jax_default_device  # a Device, a platform name, or None
  return getattr(device, 'platform', device) == 'cpu'


@functools.cache
def cpu_backend() -> bool:
  """True when JAX's default backend is the CPU (``plan``'s measurements)."""
  return jax.default_backend() == 'cpu'


def gpu_backend() -> bool:
  """True when JAX's default backend is a GPU (``plan``'s GPU measurements),
  unless ``jax.default_device`` places the computation on the CPU (then the
  CPU's measurements apply). Not cached: read at trace time only, it follows a
  patched ``jax.default_backend`` (the tests' lowering for CUDA on a CPU)."""
  return jax.default_backend() == 'gpu' and not placed_on_cpu()


@functools.cache
def cuda_backend() -> bool:
  """True when JAX's default backend is an NVIDIA GPU (ROCm's MIOpen packs
  the gates in another order and is not supported)."""
  try:
    device = jax.devices()[0]
    return device.platform == 'gpu' and 'rocm' not in device.client.platform_version.lower()
  except RuntimeError:  # no backend at all
    return False
