"""The Pallas backend of ``nr.LSTM`` / ``nr.GRU`` (``implementation='pallas'``).

One direction of one layer is :func:`recurrence`, a :func:`jax.custom_vjp`
with the XLA scans' contract (``_xla.recurrence``); the kernels are
:mod:`._pallas_kernels`. A bidirectional layer ``jax.vmap``s it over the two
directions (``_core``): each ``pallas_call`` then has a grid axis over them (its
batching rule), one launch per pass runs both at once.

* Forward: the input projection of every step, ``x W_i + b``, is ONE matmul
  outside the kernel; then ONE Pallas kernel runs the whole recurrence: a
  ``fori_loop`` over time inside the kernel, the recurrent weights loaded once
  before it, ``h`` (and ``c``) kept on chip in float32 (or the computation
  dtype, if wider), the step's matmuls and gate math fused (with an LSTM
  projection, ``m W_hr`` too). Padding (``seq_lengths``) is carry selection
  inside the kernel: a row's steps at or past its length keep the carry and
  write zeros (a length-0 row returns its initial carry). Packed sequences
  (``segment_ids``) come as per-step flags instead of lengths, and the first
  step of a segment after the row's first starts from zeros. Under a gradient
  the kernel also writes each step's residuals (the activated gates and the
  carry entering the step, as the XLA scans save them).
* Backward: a second kernel runs the reverse recurrence: each step's gate
  gradients, ``dh`` / ``dc`` carried on chip, one ``dgates W_h^T`` per gate
  and step (and ``dh W_hr^T`` with a projection, whose ``dh`` it writes out);
  at such a step no carry cotangent flows on into the previous segment.
  The weight and input gradients are then one large matmul each, outside the
  kernels (:func:`_step_math.grads_after_loop`, the XLA scans' own).

The step math is ``_step_math``'s (:func:`_base.lstm_update`,
``GRUMath.gate_step``, and their backward gate by gate), so the kernels compute
the function of the other backends; the tests check them against the generic
``RNN`` composition and a NumPy reference in interpret mode.

On a GPU the kernels lower through Triton; elsewhere (the CPU) they run in
Pallas' interpret mode (slow: for tests). The tests export a training step for
CUDA on the CPU (``internal.triton_lowering``), so Pallas' Triton lowering
accepts the kernels (float32 and bfloat16, weights held or loaded per step,
projected and packed); ``benchmarks/triton_resources.py`` compiles them
further, with Triton's own compiler for an H200 (``sm_90a``), and reports their
shared memory, registers, spills and a step's instructions and barriers (the
sizes in :class:`._pallas_settings.Settings` come from it). On an H200
(2026-12-04) the tests passed on the GPU, and the kernels took 0.24-0.85x the
scans' time at batch 1 and 8 (hidden 64 and 128) but 1.5-18x at batch 64 and
256 (hidden 256 and 512): ``implementation='auto'`` picks them only where
measured faster (``_plans.PALLAS_FASTER``).
On NVIDIA GPUs jax 0.10 lowers a ``pallas_call`` through Mosaic GPU unless it
gets Triton's compiler parameters; Mosaic GPU rejects these kernels (found by
exporting for CUDA: "Only copies transferring a number of bytes divisible by
the warpgroup size are supported"), so every call passes them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from nnx_recurrent._fused import _float16, _pallas_settings, _plans, _step_math, _xla
from nnx_recurrent._fused._pallas_kernels import (
  GRADS,
  RESIDUALS,
  backward_kernel,
  forward_kernel,
)
from nnx_recurrent._fused._step_math import LSTMMath, dot, grads_after_loop

# Pallas (jax 0.12) imports its fuser on a kernel's first lowering (interpreted,
# at least), and the fuser registers a configuration option that jit's cache
# keys include: every function jitted before that (the layer's own jitted
# caller, on its second call, too) missed its cache once, traced and compiled
# again. Imported with the package (10 ms), the option is there before anything
# is jitted. (jax 0.10's fuser registers none, and takes 50 ms.)
try:
  from jax.experimental.pallas import fuser as _fuser  # noqa: F401
except ImportError:  # a jax without it: nothing to register
  pass

_MIN_ROWS = 16  # Triton's dot: at least 16 rows
_MIN_HIDDEN = 16  # ... and contraction / output sizes of at least 16


_MAX_BLOCK_ROWS = 64  # more rows: a grid over batch blocks

# Set by ``internal.triton_lowering``: the kernels lower for a GPU (Triton)
# even when the default backend is the CPU, for ``jax.export`` to 'cuda'.
_force_triton = False
# Set by ``internal.checked_interpreter``: interpreted kernels run under Pallas'
# checking interpreter, not ``interpret=True``.
_checked_interpret = False


def _checking_interpreter():
  """Pallas' TPU interpreter (these kernels use nothing of a GPU's), which
  raises on a read outside a buffer (``interpret=True`` clamps it; a GPU reads
  what lies there) and starts outputs as NaN. Each access is a callback."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams(out_of_bounds_reads='raise', uninitialized_memory='nan')


def _triton():
  """Pallas' Triton backend (``jax.experimental.pallas.triton``), or ``None``:
  deprecated since jax 0.11, to be removed in a later jax."""
  try:
    from jax.experimental.pallas import triton
  except ImportError:
    return None
  return triton


def unsupported() -> str | None:
  """Why the Pallas kernels cannot run here (``None``: they can)."""
  backend = jax.default_backend()
  if backend == 'gpu' and _triton() is None:
    return (f"lowers through Pallas' Triton backend, which jax {jax.__version__} no longer "
            "has (jax.experimental.pallas.triton)")
  if backend in ('gpu', 'cpu'):
    return None
  return f'runs on a GPU (Triton) or, interpreted, on the CPU; the default backend is {backend!r}'


# A kernel output: ((shape, dtype), the row axis or None).
_Block = tuple[tuple[tuple[int, ...], Any], int | None]


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class _Layout:
  """Padded sizes: ``rows`` (the flattened batch) in blocks of ``block`` rows,
  ``H`` to ``Hp``, ``h``'s size (``P`` with a projection, else ``H``) to ``Pp``."""

  def __init__(self, cell_math, time: int, rows: int, hidden: int, out: int, proj: bool,
               packed: bool, dtype):
    self.time, self.rows, self.hidden, self.dtype = time, rows, hidden, jnp.dtype(dtype)
    self.out, self.proj, self.packed = out, proj, packed
    self.gates = cell_math.gates
    self.hp = _pow2(max(hidden, _MIN_HIDDEN))
    self.pp = _pow2(max(out, _MIN_HIDDEN))
    self.settings = settings = _pallas_settings.current
    widest = max(self.hp, self.pp)
    auto_fma = settings.matmul == 'auto' and widest <= _pallas_settings.FMA_MAX_WIDTH
    self.fma = settings.matmul == 'fma' or auto_fma
    least = 1 if self.fma else _MIN_ROWS  # Triton's dot takes 16 rows or more
    most = 1 if auto_fma else max(least, min(_MAX_BLOCK_ROWS, settings.state_elements // widest))
    self.block = min(_pow2(max(rows, least)), _pow2(most))
    # 'auto''s multiply-adds: a thread sums a whole contraction (Settings.matmul)
    self.num_warps = (1 if widest <= 32 else 2) if auto_fma else settings.num_warps
    self.padded_rows = max(1, -(-rows // self.block)) * self.block
    chunk = _pow2(max(settings.chunk, _MIN_HIDDEN))
    self.ch, self.cp = min(chunk, self.hp), min(chunk, self.pp)  # chunk widths
    self.nh, self.np = self.hp // self.ch, self.pp // self.cp  # chunks of Hp, of Pp
    self.rolled = self.nh > settings.unrolled_chunks  # a loop over Hp's chunks
    self.state = jnp.promote_types(dtype, jnp.float32)  # the kernels' h, c and gate math
    self.interpret = not (_force_triton or jax.default_backend() == 'gpu')
    self.checked = self.interpret and _checked_interpret
    config: Any = jax.config  # its flags are attributes set at runtime, unknown to the stubs
    precision = config.jax_default_matmul_precision  # unset: TF32 on a GPU only
    low = (not self.interpret if precision is None
           else str(precision).lower() in _pallas_settings.LOW_PRECISIONS)
    self.w16 = (settings.recurrent_weights == 'float16' and self.dtype == jnp.float32
                and not proj and low)
    # Settings.residuals (a backward rebuilds the residuals by what its forward saved)
    self.rebuild = settings.residuals == 'rebuilt'

  def pad_rows(self, a, axis: int):
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, self.padded_rows - a.shape[axis])
    return jnp.pad(a, pad)

  def pad_to(self, a, width: int, axis: int = -1):
    """``a`` zero-padded to ``width`` on ``axis``."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    return jnp.pad(a, pad)

  def gate_blocks(self, a):
    """``(..., G * H)`` to ``(..., G, Hp)``, each gate padded."""
    return self.pad_to(a.reshape(a.shape[:-1] + (self.gates, self.hidden)), self.hp)

  def unpad(self, a, batch, row_axis: int, width: int):
    """The real rows and ``width`` columns of a kernel output, batch axes restored."""
    a = jax.lax.slice_in_dim(a, 0, self.rows, axis=row_axis)[..., :width]
    return a.reshape(a.shape[:row_axis] + tuple(batch) + a.shape[row_axis + 1:])

  def rows_of(self, a, axis: int):
    """A ``(..., *batch, F)`` array with its batch axes from ``axis`` flattened,
    rows padded, ``F`` padded: ``c`` (``H``) to ``Hp``, ``h`` (``P``) to ``Pp``
    (without a projection the two are the same)."""
    a = a.reshape(a.shape[:axis] + (self.rows,) + a.shape[-1:])
    return self.pad_rows(self.pad_to(a, self.hp if a.shape[-1] == self.hidden else self.pp),
                         axis)

  def steps(self, steps):
    """The lengths ``(*batch)`` as ``(rows,)``, or the per-step flags ``(time,
    *batch)`` as ``(time, rows)``, and the row axis."""
    axis = 1 if self.packed else 0
    return self.pad_rows(steps.reshape(steps.shape[:axis] + (self.rows,)).astype(jnp.int32),
                         axis), axis

  def call(self, kernel, name, inputs, outputs):
    """``pallas_call`` over batch blocks; ``inputs`` / ``outputs``: ``(array or
    (shape, dtype), row axis or None)``, block = the whole array but ``block``
    rows on the row axis."""
    from jax.experimental import pallas as pl

    def spec(shape, row_axis):
      shape = tuple(self.block if k == row_axis else d for k, d in enumerate(shape))
      return pl.BlockSpec(shape, lambda b: tuple(b if k == row_axis else 0
                                                  for k in range(len(shape))))

    def run(interpret, *arrays):
      return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct(shape, dtype) for (shape, dtype), _ in outputs],
        grid=(self.padded_rows // self.block,),
        in_specs=[spec(a.shape, axis) for a, axis in inputs],
        out_specs=[spec(shape, axis) for (shape, _), axis in outputs],
        interpret=interpret,
        name=name,
        compiler_params=self._compiler_params(),
      )(*arrays)

    arrays = [a for a, _ in inputs]
    if self.interpret or _force_triton:
      return run(_checking_interpreter() if self.checked else self.interpret, *arrays)
    # The default backend is a GPU, but the computation may be placed on the CPU
    # (jax.default_device, CPU-committed arguments), where a kernel lowered for
    # Triton fails ("Only interpret mode is supported on CPU backend"): interpreted
    # there. Only the branch of the platform lowered for is compiled.
    return jax.lax.platform_dependent(*arrays, cuda=functools.partial(run, False),
                                      default=functools.partial(run, True))

  def _compiler_params(self):
    """Triton's parameters, which select the Triton lowering (see above); none
    when interpreted with a jax that has no Triton backend (``unsupported``
    refuses a GPU then) or by the checking interpreter."""
    triton = _triton()
    if triton is None or self.checked:
      return None
    return triton.CompilerParams(num_warps=self.num_warps,
                                 num_stages=self.settings.num_stages)


def _layout(cell_math, params, xs, packed: bool) -> _Layout:
  w_i, _, w_h, extra = params
  proj = cell_math is LSTMMath and extra is not None
  return _Layout(cell_math, xs.shape[0], math.prod(xs.shape[1:-1]), w_i.shape[-1] //
                 cell_math.gates, w_h.shape[0], proj, packed, xs.dtype)


def _recurrent_weights(lay: _Layout, w_h, transpose: bool):
  """``(G, Pp, Hp)``: gate ``k``'s block of ``W_h`` (``(Hp, Pp)`` transposed), zero-padded."""
  w = jnp.moveaxis(lay.gate_blocks(w_h), -2, 0)  # (G, P, Hp)
  if transpose:
    w = jnp.swapaxes(w, 1, 2)
  shape = (lay.hp, lay.pp) if transpose else (lay.pp, lay.hp)
  return jnp.pad(w, [(0, 0), (0, shape[0] - w.shape[1]), (0, shape[1] - w.shape[2])])


def _weight_inputs(lay: _Layout, w_h, transpose: bool) -> list[tuple[Any, int | None]]:
  """The kernels' ``W_h`` (:func:`_recurrent_weights`); with ``lay.w16`` in
  float16 and scaled, then the scales ``(G,)``, padded (:mod:`._float16`)."""
  w = _recurrent_weights(lay, w_h, transpose)
  if not lay.w16:
    return [(w, None)]
  w16, scale = _float16.scaled_weights(w)
  return [(w16, None), (jnp.pad(scale, (0, _pow2(lay.gates) - lay.gates), constant_values=1), None)]


def _projection(lay: _Layout, w_hr, transpose: bool):
  """``W_hr`` ``(Hp, Pp)`` (or its transpose), zero-padded."""
  w = lay.pad_to(lay.pad_to(w_hr, lay.pp, 1), lay.hp, 0)
  return w.T if transpose else w


def _forward(cell_math, packed, params, xs, carry0, steps, save: bool):
  w_i, b, w_h, extra = params
  time, batch = xs.shape[0], xs.shape[1:-1]
  lstm = cell_math is LSTMMath
  lay = _layout(cell_math, params, xs, packed)
  rows, hp, g = lay.padded_rows, lay.hp, lay.gates
  with jax.named_scope(f'nr.{cell_math.name}/pallas_forward'):
    # The input projection of every step: one matmul, outside the kernel.
    x = lay.pad_rows(xs.reshape(time, lay.rows, xs.shape[-1]), 1)
    w_i = lay.gate_blocks(w_i).reshape(w_i.shape[0], g * hp)
    xp = (dot(x, w_i) + lay.gate_blocks(b).reshape(1, 1, g * hp)).reshape(time, rows, g, hp)
    inputs = [lay.steps(steps), (xp, 1), *_weight_inputs(lay, w_h, False)]
    if not lstm:
      inputs.append((lay.pad_to(extra, hp), None))
    elif lay.proj:
      inputs.append((_projection(lay, extra, False), None))
    carries = jax.tree_util.tree_leaves(carry0)
    inputs += [(lay.rows_of(c, 0), 0) for c in carries]
    widths = [hp, lay.pp] if lstm else [hp]
    outputs: list[_Block] = [(((time, rows, lay.pp), xs.dtype), 1)]
    outputs += [(((rows, w), lay.state), 0) for w in widths]
    # Settings.residuals='rebuilt': the LSTM's kernel writes c alone, the GRU's nothing
    written = save and not (lay.rebuild and not lstm)
    if written:
      shape = (time, rows, hp) if lay.rebuild else (time, rows, RESIDUALS, hp)
      outputs.append(((shape, xs.dtype), 1))
    out = lay.call(functools.partial(forward_kernel, lay=lay, lstm=lstm, save=written),
                   f'nr_{cell_math.name.lower()}_forward', inputs, outputs)
    ys = lay.unpad(out[0], batch, 1, lay.out)
    finals = [lay.unpad(a, batch, 0, c.shape[-1]).astype(c.dtype)
              for a, c in zip(out[1:], carries)]
    final = tuple(finals) if lstm else finals[0]
  return final, ys, (out[-1] if written else jnp.zeros((0,), xs.dtype) if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(cell_math, packed, params, xs, carry0, steps):
  """``(final_carry, ys)`` of one cell over time-major ``xs`` (``(time, *batch,
  features)``) with the Pallas kernels; ``params`` is ``(W_i, b, W_h, extra)``
  (``extra``: the GRU's ``b_hn``, the LSTM's projection ``W_hr`` or ``None``).
  ``steps``: integer lengths ``(*batch)`` in ``[0, time]``, or with ``packed``
  per-step flags ``(time, *batch)``: 0 padding, 1 valid, 2 a segment's first
  step."""
  final, ys, _ = _forward(cell_math, packed, params, xs, carry0, steps, save=False)
  return final, ys


# Second order. The kernels have no derivative of their own, so the two passes
# of the custom VJP are differentiated through the XLA scans' passes for the
# same call (the same function, tested against them): a gradient of a gradient
# or jax.hessian runs the kernels for the values and the scans for the
# derivatives of the passes. The kernels' residuals get a zero tangent: only
# the backward pass reads them, and its derivative recomputes everything from
# the call's inputs (so it needs none).
def _step_masks(packed: bool, time: int, steps):
  """``(valid, reset)`` of every step, ``(time, *batch)`` (``reset``: ``None``
  without packed sequences)."""
  if packed:
    return steps > 0, steps == 2
  return jnp.arange(time).reshape((-1,) + (1,) * steps.ndim) < steps[None], None


def _scans(cell_math, packed: bool, params, xs, steps):
  """The XLA scans' plan and ``(valid, reset)`` masks for this call."""
  return _plans.plan_for_call(cell_math, params, xs), _step_masks(packed, xs.shape[0], steps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _forward_pass(cell_math, packed, params, xs, carry0, steps):
  """The custom VJP's forward pass: ``(final, ys, residuals)``."""
  return _forward(cell_math, packed, params, xs, carry0, steps, save=True)


@_forward_pass.defjvp
def _forward_pass_jvp(cell_math, packed, primals, tangents):
  params, xs, carry0, steps = primals
  final, ys, res = _forward_pass(cell_math, packed, *primals)
  plan, masks = _scans(cell_math, packed, params, xs, steps)
  _, (dfinal, dys) = jax.jvp(
    lambda p, x, c: _xla._recurrence_fwd(cell_math, plan, p, x, c, *masks)[0],
    (params, xs, carry0), tangents[:3])
  return (final, ys, res), (dfinal, dys, jnp.zeros_like(res))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _backward_pass(cell_math, packed, saved, cotangents):
  """The custom VJP's backward pass: ``(d params, d xs, d carry0, None)``."""
  return _kernels_backward(cell_math, packed, saved, cotangents)


@_backward_pass.defjvp
def _backward_pass_jvp(cell_math, packed, primals, tangents):
  (params, xs, carry0, _, _, steps), cotangents = primals
  (dparams, dxs, dcarry0, _, _, _), dcotangents = tangents
  plan, masks = _scans(cell_math, packed, params, xs, steps)

  def scans_backward(p, x, c, cot):
    saved = _xla._recurrence_fwd(cell_math, plan, p, x, c, *masks)[1]
    return _xla._backward(cell_math, plan, saved, cot)[:3]

  _, tangent = jax.jvp(scans_backward, (params, xs, carry0, cotangents),
                       (dparams, dxs, dcarry0, dcotangents))
  return (*_backward_pass(cell_math, packed, *primals)[:3], None), (*tangent, None)


def _recurrence_fwd(cell_math, packed, params, xs, carry0, steps):
  final, ys, res = _forward_pass(cell_math, packed, params, xs, carry0, steps)
  return (final, ys), (params, xs, carry0, ys, res, steps)


def _kernels_backward(cell_math, packed: bool, saved, cotangents) -> tuple[Any, Any, Any, None]:
  params, xs, carry0, ys, res, steps = saved
  dfinal, dys = cotangents
  time, batch = xs.shape[0], xs.shape[1:-1]
  lstm = cell_math is LSTMMath
  lay = _layout(cell_math, params, xs, packed)
  rows, hp, h = lay.padded_rows, lay.hp, lay.hidden
  with jax.named_scope(f'nr.{cell_math.name}/pallas_backward'):
    if res.ndim != 4:  # the forward saved c alone, or nothing (Settings.residuals)
      c_prev = lay.unpad(res, batch, 1, h) if lstm else None
      valid, reset = _step_masks(packed, time, steps)
      res = _step_math.rebuilt_residuals(cell_math, params, xs, carry0, ys, c_prev,
                                         (valid, reset) if packed else None, lay.state)
      res = lay.pad_rows(lay.pad_to(res.reshape(time, lay.rows, RESIDUALS, h), hp), 1)
    carries = jax.tree_util.tree_leaves(carry0)
    inputs = [lay.steps(steps), (res, 1), (lay.rows_of(dys, 1), 1),
              *_weight_inputs(lay, params[2], True)]
    if lay.proj:
      inputs.append((_projection(lay, params[3], True), None))
    inputs += [(lay.rows_of(d.astype(lay.state), 0), 0)
               for d in jax.tree_util.tree_leaves(dfinal)]
    widths = [hp, lay.pp] if lstm else [hp]
    grads = (2 if lstm else 1) if lay.rebuild else GRADS  # Settings.residuals
    outputs: list[_Block] = [(((time, rows, grads, hp), xs.dtype), 1)]
    outputs += [(((rows, w), lay.state), 0) for w in widths]
    if lay.proj:  # each step's dh, for dW_hr
      outputs.append((((time, rows, lay.pp), lay.state), 1))
    out = lay.call(functools.partial(backward_kernel, lay=lay, lstm=lstm),
                   f'nr_{cell_math.name.lower()}_backward', inputs, outputs)
    dg = lay.unpad(out[0], batch, 1, h)  # (time, *batch, 4, H)
    if lay.rebuild:  # from the gate math's dc and dh (Settings.residuals)
      valid = _step_masks(packed, time, steps)[0]
      dg = _step_math.rebuilt_gate_grads(cell_math, lay.unpad(res, batch, 1, h).astype(lay.state),
                                         dg.astype(lay.state), valid).astype(xs.dtype)
    dcarry0_leaves = [lay.unpad(a, batch, 0, c.shape[-1]).astype(c.dtype)
                      for a, c in zip(out[1: 1 + len(carries)], carries)]
    dcarry0 = tuple(dcarry0_leaves) if lstm else dcarry0_leaves[0]
    flat = dg.shape[:-2]
    res_flat = lay.unpad(res, batch, 1, h).reshape(flat + (RESIDUALS * h,))
    if lstm:  # the gradients of the gate pre-activations: of x W_i and of h W_h
      d_all = dg.reshape(flat + (4 * h,))
      if lay.proj:
        d_all = (d_all, lay.unpad(out[-1], batch, 1, lay.out).astype(xs.dtype))
    else:  # those of h W_h (r, z, n), and of n's pre-activation (x W_in's)
      d_all = (dg[..., :3, :].reshape(flat + (3 * h,)), dg[..., 3, :])
    masks = (steps > 0, steps == 2) if packed else None  # (valid, reset)
    # The weight and input gradients: one large matmul each.
    dparams, dxs = grads_after_loop(cell_math, d_all, res_flat, params, xs, carry0, ys, masks)
  return dparams, dxs, dcarry0, None


recurrence.defvjp(_recurrence_fwd, _backward_pass)
