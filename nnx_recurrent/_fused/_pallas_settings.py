"""The Pallas kernels' sizes and Triton parameters (``implementation='pallas'``):
:class:`Settings`, and the ones the kernels are traced with now
(:data:`current`, which ``internal.pallas_settings`` changes for a
measurement)."""

from __future__ import annotations

from typing import NamedTuple


class Settings(NamedTuple):
  """The kernels' sizes and Triton parameters (``internal.pallas_settings``
  changes them, for measurements). Chosen by compiling the kernels with Triton
  for an H200 (``sm_90a``) on a CPU, ``benchmarks/triton_resources.py``, so
  that shared memory (227 KiB a block) suffices and registers rarely spill at
  the suite's shapes. Timed on an H200 at (8, 500, 64, 128) against five
  variants (``benchmarks/gpu_plans.py --pallas``): 128-wide chunks with 128 KiB
  held trained faster (0.88x / 0.90x the LSTM's / GRU's step with these) but
  ran the forward slower (1.03x / 1.06x), the others were slower both ways
  (benchmarks/HISTORY.md, "Pallas kernels on the H200"). Timed again at both
  small shapes (session 34, "The H200 again"): the loads a step ahead were
  faster at both (now the default); no other variant beat them at both (4
  warps with them, 4 or 2 warps, ``num_stages=2``, which ran out of shared
  memory at ``H = 128``, 128-wide chunks)."""

  chunk: int = 64
  """Column chunks of this width, weight tiles of this size squared."""
  hold_bytes: int = 176 * 1024
  """Bytes of recurrent weight tiles loaded once, before the time loop, and
  held across steps (in shared memory with ``matmul='dot'``, in registers
  with ``'fma'``); the tiles beyond are loaded at each step (from L2). The
  rest of the 227 KiB is for the tile staged per step, ``h`` and Triton's
  layout conversions."""
  state_elements: int = 4096
  """Rows per program: at most this over ``max(Hp, Pp)`` (the state is held in
  registers: 32 rows at ``H = 128``, 16 from 256 on), and at most 64; at
  least 16 with ``matmul='dot'``, one with ``'fma'``."""
  unrolled_chunks: int = 4
  """The kernels write out each hidden chunk's code (weight tiles then held
  across steps) up to this many chunks of ``Hp``; with more (``H > 256`` at
  chunk 64) they loop over the chunks, one chunk's code for all, and load every
  weight tile at each step (at ``H = 512`` the budget above would hold 4% of
  ``W_h``): written out there, each kernel took Triton 2-12 minutes to compile
  on 2 cores, looped 5-17 s (``benchmarks/HISTORY.md``, "Pallas kernels")."""
  num_warps: int = 8
  num_stages: int = 1
  """No software pipelining of the loop's loads: it would multi-buffer the
  weight tiles loaded per step, in shared memory."""
  matmul: str = 'dot'
  """How the kernels multiply by the recurrent weights: ``'dot'``, Triton's
  ``dot`` (tensor cores; a program has at least 16 rows, the batch padded to
  them), or ``'fma'``, broadcast products summed over the contraction, run as
  multiply-adds in registers, with no row minimum (with a small
  ``state_elements``, one or a few batch rows a program, programs side by
  side). Compiled for ``sm_90a`` (``benchmarks/triton_resources.py``), one row
  a program at ``(1, ., 32, 64)``: a step of the LSTM's forward kernel is 282
  PTX instructions, 18 barriers and 12 shared-memory loads, against the
  ``dot``'s 573, 22 and 84 (its 16 rows, 15 of them padding, and the weight
  tiles read from shared memory at each step); in 2 warps (``num_warps``),
  534 instructions and 2 barriers (each thread sums a whole contraction), at
  ``H = 32`` in one warp 334 and 1. From ``H = 128`` on, ``W_h`` spills
  from registers. ``'auto'`` is that reading as a rule: the multiply-adds
  where ``W_h``'s gate blocks are at most ``FMA_MAX_WIDTH`` wide (``Hp`` and
  ``Pp``), one batch row a program, in one warp up to 32 columns and two up
  to 64 (``state_elements`` and ``num_warps`` then do not apply), and
  ``dot`` beyond. Not yet timed on a GPU (benchmarks/HISTORY.md, session
  35): ``'dot'`` stays the default until it is."""
  prefetch: bool = True
  """Each kernel loads the next step's inputs (the forward's input
  projections, the backward's residuals and output cotangents) before the
  current step's work and carries them over (written-out chunks only), so that
  their latency overlaps it. ``num_stages > 1`` does not pipeline them in the
  forward (Triton pipelines loads that feed a ``dot``), and it takes more
  shared memory than a Hopper block has at ``H = 128``; seen in the kernels'
  Triton GPU IR (``benchmarks/triton_resources.py --dump``). Compiled for
  ``sm_90a``: no spill up to ``H = 128``, 0.6-1 KiB more at 256. On an H200
  (2026-12-04, ``benchmarks/gpu_grid.sh``) the training step took 0.72-0.78x
  the time without it at issue 14's two small shapes, the forward 0.78-0.94x;
  at hidden 32 and batch 1-8, 0.71-0.87x and 0.77-1.04x."""
  recurrent_weights: str = 'float32'
  """``'float16'``: the kernels take ``W_h`` in float16, and round the other
  operand of each product to float16 too (the forward's ``h``, the backward's
  gate gradients), where the layer computes in float32 at a matmul precision
  of TF32 or less (``jax_default_matmul_precision`` unset on a GPU, where that
  means TF32, or ``'tensorfloat32'`` or ``'bfloat16'`` anywhere) and has no
  projection; else (and with ``'float32'``) the weights keep their dtype.
  Float16 has TF32's 10 mantissa bits, so for values within its range the
  products round as TF32's do: over 500 steps of an LSTM at hidden 128 both
  differed from float64 by 1.8e-4 at most (benchmarks/HISTORY.md, session 36).
  Its range ends at 65504, so each gate's block of ``W_h`` is divided by the
  power of two at or below its largest magnitude (exact) and the products
  multiplied back; ``h`` stays within range (an LSTM's within 1, a GRU's within
  the larger of 1 and the initial carry's) unless the initial carry exceeds
  it, and then a kernel program scales each row of ``h`` likewise at every
  step (a branch, untaken otherwise; session 37). The
  weights take half the bytes, so ``hold_bytes`` holds twice as many: all of
  an LSTM's ``W_h`` at hidden 128 (128 KiB), where float32 holds 176 of 256
  KiB and reads the rest from L2 at every step. The backward's gate gradients
  have no bounded range: each row of them is first divided by the power of two
  at or below its largest magnitude (exact; the row then lies within 2), and
  the products are multiplied back, so smaller entries lose no more than TF32
  would lose beside the largest. Compiled for ``sm_90a`` at (8, ., 64, 128), a
  step of the LSTM's forward / backward kernel takes 1169 / 1112 instructions
  (the untaken branch counted) and 8 / 12 global loads, where float32 takes
  1517 / 1350 and 28 / 32. Not yet timed on a GPU (``benchmarks/gpu.sh``)."""
  residuals: str = 'written'
  """What the kernels write at each step for the passes after them:
  ``'written'``, the training forward the activated gates and the carry
  entering the step (five tiles: LSTM ``i, f, g, o, c``, GRU ``r, z, n, h W_hn
  + b_hn, h``) and the backward the four gate gradients; ``'rebuilt'``, the
  forward only the LSTM's ``c`` (the GRU's nothing: its forward is the
  inference kernel) and the backward only the ``dc`` and ``dh`` its gate math
  starts from (the GRU's ``dh``), and XLA rebuilds the rest between and after
  the kernels, fully parallel over all steps: the five tiles from the outputs
  (the ``h`` entering each step), the inputs and one large matmul ``h W_h``;
  the gate gradients from the residuals (``_step_math.rebuilt_residuals``,
  ``rebuilt_gate_grads``). Each tile a step costs the kernel a layout
  conversion for its store, two barriers, on a latency-bound step: compiled
  for ``sm_90a`` at ``(1, ., 32, 64)``, the LSTM's training forward takes 22
  barriers a step, 14 rebuilt (its inference forward 12), its backward 28 and
  24; the GRU's 20 and 10, 26 and 20. The rebuilt gates come from the outputs,
  not the kernel's own sums, so on a GPU they differ from the forward's by
  TF32's rounding. Not yet timed on a GPU (``benchmarks/gpu.sh``)."""


MATMULS = ('dot', 'fma', 'auto')  # the values of Settings.matmul
RESIDUALS = ('written', 'rebuilt')  # the values of Settings.residuals
RECURRENT_WEIGHTS = ('float32', 'float16')  # the values of Settings.recurrent_weights
# jax_default_matmul_precision values at which float32 products round to TF32 or less (unset:
# on a GPU, or lowered for one, not on the CPU)
LOW_PRECISIONS = ('default', 'fastest', 'tensorfloat32', 'bfloat16')
FMA_MAX_WIDTH = 64  # matmul='auto': the multiply-adds up to this Hp and Pp

current = Settings()
