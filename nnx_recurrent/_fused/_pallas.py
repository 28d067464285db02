"""The Pallas backend of ``nr.LSTM`` / ``nr.GRU`` (``implementation='pallas'``).

One direction of one layer is :func:`recurrence`, a :func:`jax.custom_vjp`
with the XLA scans' contract (``_xla.recurrence``):

* Forward: the input projection of every step, ``x W_i + b``, is ONE matmul
  outside the kernel; then ONE Pallas kernel runs the whole recurrence: a
  ``fori_loop`` over time inside the kernel, the recurrent weights loaded once
  before it, ``h`` (and ``c``) kept on chip in float32 (or the computation
  dtype, if wider), the step's matmuls and gate math fused. Padding
  (``seq_lengths``) is carry selection inside the kernel: a row's steps at or
  past its length keep the carry and write zeros (a length-0 row returns its
  initial carry). Under a gradient the kernel also writes each step's
  residuals (the activated gates and the carry entering the step, as the XLA
  scans save them).
* Backward: a second kernel runs the reverse recurrence: each step's gate
  gradients, ``dh`` / ``dc`` carried on chip, one ``dgates W_h^T`` per gate
  and step. The weight and input gradients are then one large matmul each,
  outside the kernels (:func:`_step_math.grads_after_loop`, the XLA scans'
  own).

The step math is ``_step_math``'s (:func:`_base.lstm_update`,
``GRUMath.gate_step``, and their backward gate by gate), so the kernels compute
the function of the other backends; the tests check them against the generic
``RNN`` composition and a NumPy reference in interpret mode.

On a GPU the kernels lower through Triton; elsewhere (the CPU) they run in
Pallas' interpret mode (slow: for tests). They have NOT run on a GPU yet. The
tests export a training step for CUDA on the CPU (``internal.triton_lowering``),
so Pallas' Triton lowering accepts the kernels (float32 and bfloat16, weights
held or loaded per step); Triton's own compiler, which needs a GPU, has not
seen them, and nothing is known of their speed (``implementation='auto'`` does
not pick them: see ``_plans.PALLAS_FASTER``).

Triton's constraints (read from ``jax/_src/pallas/triton/lowering.py``, jax
0.10.2), and what the kernels do about them:

* Every array a kernel loads or stores must have a power-of-two number of
  elements: the batch block and the hidden size are padded to powers of two
  (``H`` to ``Hp`` within each gate; the padded weight rows and columns are
  zero, so padded hidden columns stay zero and never reach the real ones).
* ``dot`` needs at least 16 rows, and contraction and output sizes of at least
  16 (Triton's smallest tile; the lowering checks it for float64): batch
  blocks have 16 rows or more (padding rows have length 0), ``Hp >= 16``.
* Values cannot be sliced (``lax.slice`` has no lowering) nor concatenated
  (only ``[..., 1]`` pieces) nor split into 3: each gate is its own
  ``(rows, Hp)`` load, matmul and store; arrays are ``(time, rows, gates,
  Hp)`` and the kernels index the gate axis of the refs.
* No scratch buffers and no scalar prefetch: the lengths are an ordinary
  input block, the state lives in the loop's carry.
* Float32 matmuls follow ``jax_default_matmul_precision`` (JAX resolves it
  when the ``dot`` is traced): unset, Triton's lowering runs them in TF32;
  ``'highest'`` in full float32.
* On NVIDIA GPUs jax 0.10 lowers a ``pallas_call`` through Mosaic GPU unless it
  gets Triton's compiler parameters; Mosaic GPU rejects these kernels (found
  by exporting for CUDA: "Only copies transferring a number of bytes divisible
  by the warpgroup size are supported"), so every call passes them.

Unknown until compiled and measured on a GPU: whether a ``(Hp, Hp)`` dot
operand fits Triton's shared memory at large ``H`` (256 x 256 float32 is
256 KiB; an H200 multiprocessor has 228 KiB), where holding the recurrent
weights across steps stops paying (``_HOLD_WEIGHTS_MAX_BYTES``), and the best
rows per program (``_MAX_BLOCK_ROWS``) and ``num_warps``.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp

from nnx_recurrent._base import lstm_update
from nnx_recurrent._fused._step_math import GRUMath, LSTMMath, dot, grads_after_loop, identity

_MIN_ROWS = 16  # Triton's dot: at least 16 rows
_MIN_HIDDEN = 16  # ... and contraction / output sizes of at least 16
_MAX_BLOCK_ROWS = 64  # rows per program; more rows: a grid over batch blocks (unmeasured)
_RESIDUALS = 5  # per step: LSTM i, f, g, o, c_prev; GRU r, z, n, h W_hn + b_hn, h_prev
_GRADS = 4  # per step: LSTM d of i, f, g, o's inputs; GRU d of r's, z's, of h W_hn, of n's
# The recurrent weights (G * Hp * Hp elements) stay in the kernel's registers
# across steps up to this size, and are loaded again at every step (from L1/L2)
# above it, where holding them would spill. A guess, not measured.
_HOLD_WEIGHTS_MAX_BYTES = 64 * 1024

# Set by ``internal.triton_lowering``: the kernels lower for a GPU (Triton)
# even when the default backend is the CPU, for ``jax.export`` to 'cuda'.
_force_triton = False


def unsupported() -> str | None:
  """Why the Pallas kernels cannot run here (``None``: they can)."""
  backend = jax.default_backend()
  if backend in ('gpu', 'cpu'):
    return None
  return f'runs on a GPU (Triton) or, interpreted, on the CPU; the default backend is {backend!r}'


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


class _Layout:
  """Padded sizes: ``rows`` (the flattened batch) in blocks of ``block`` rows, ``H`` to ``Hp``."""

  def __init__(self, cell_math, time: int, rows: int, hidden: int, dtype):
    self.time, self.rows, self.hidden, self.dtype = time, rows, hidden, jnp.dtype(dtype)
    self.gates = cell_math.gates
    self.block = min(_pow2(max(rows, _MIN_ROWS)), _MAX_BLOCK_ROWS)
    self.padded_rows = max(1, -(-rows // self.block)) * self.block
    self.hp = _pow2(max(hidden, _MIN_HIDDEN))
    self.state = jnp.promote_types(dtype, jnp.float32)  # the kernels' h, c and gate math
    self.interpret = not (_force_triton or jax.default_backend() == 'gpu')
    self.hold_weights = self.gates * self.hp * self.hp * self.dtype.itemsize \
      <= _HOLD_WEIGHTS_MAX_BYTES

  def pad_rows(self, a, axis: int):
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, self.padded_rows - a.shape[axis])
    return jnp.pad(a, pad)

  def pad_hidden(self, a):
    """``(..., H)`` to ``(..., Hp)`` with zeros."""
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, self.hp - self.hidden)])

  def gate_blocks(self, a):
    """``(..., G * H)`` to ``(..., G, Hp)``, each gate padded."""
    return self.pad_hidden(a.reshape(a.shape[:-1] + (self.gates, self.hidden)))

  def unpad(self, a, batch, row_axis: int):
    """The real rows and hidden columns of a kernel output, batch axes restored."""
    a = jax.lax.slice_in_dim(a, 0, self.rows, axis=row_axis)[..., : self.hidden]
    return a.reshape(a.shape[:row_axis] + tuple(batch) + a.shape[row_axis + 1:])

  def call(self, kernel, name, inputs, outputs):
    """``pallas_call`` over batch blocks; ``inputs`` / ``outputs``: ``(array or
    (shape, dtype), row axis or None)``, block = the whole array but ``block``
    rows on the row axis."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    def spec(shape, row_axis):
      shape = tuple(self.block if k == row_axis else d for k, d in enumerate(shape))
      return pl.BlockSpec(shape, lambda b: tuple(b if k == row_axis else 0
                                                  for k in range(len(shape))))

    return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(shape, dtype) for (shape, dtype), _ in outputs],
      grid=(self.padded_rows // self.block,),
      in_specs=[spec(a.shape, axis) for a, axis in inputs],
      out_specs=[spec(shape, axis) for (shape, _), axis in outputs],
      interpret=self.interpret,
      name=name,
      # Triton's parameters (its defaults) select the Triton lowering: see above.
      compiler_params=pl_triton.CompilerParams(),
    )(*(a for a, _ in inputs))


def _dot(a, b, dtype):
  """``a @ b`` of ``(rows, K) x (K, N)`` blocks, ``a`` cast to ``b``'s dtype."""
  return jax.lax.dot_general(a.astype(b.dtype), b, (((1,), (0,)), ((), ())),
                             preferred_element_type=dtype)


def _weights(w_ref, lay: _Layout, held=None):
  """The gate blocks of the recurrent weights: ``held`` (loaded once, before
  the loop, when ``lay.hold_weights``) or loaded now."""
  return held if held is not None else [w_ref[k] for k in range(lay.gates)]


def _forward_kernel(*refs, lay: _Layout, lstm: bool, save: bool):
  refs = list(refs)
  lengths_ref, xp_ref, w_ref = refs[:3]
  del refs[:3]
  bhn_ref = None if lstm else refs.pop(0)
  n_carry = 2 if lstm else 1
  carry_refs, refs = refs[:n_carry], refs[n_carry:]
  ys_ref, final_refs, res_refs = refs[0], refs[1: 1 + n_carry], refs[1 + n_carry:]
  lengths = lengths_ref[...]
  w = _weights(w_ref, lay) if lay.hold_weights else None
  b_hn = None if lstm else bhn_ref[...].astype(lay.state)[None, :]

  def body(t, carry):
    h = carry[-1]
    hp = [_dot(h, w_k, lay.state) for w_k in _weights(w_ref, lay, w)]
    xp = [xp_ref[t, :, k, :].astype(lay.state) for k in range(lay.gates)]
    if lstm:
      c = carry[0]
      i, f, o = (jax.nn.sigmoid(xp[k] + hp[k]) for k in (0, 1, 3))
      zg = xp[2] + hp[2]
      new = lstm_update(c, i, f, zg, o, identity, jnp.tanh)  # (c, h)
      res = (i, f, jnp.tanh(zg), o, c)
    else:
      hn = hp[2] + b_hn
      new_h, r, z, n = GRUMath.gate_step(h, *xp, hp[0], hp[1], hn)
      new, res = (new_h,), (r, z, n, hn, h)
    valid = (t < lengths)[:, None]
    ys_ref[t] = jnp.where(valid, new[-1], 0).astype(ys_ref.dtype)
    if save:
      for k, a in enumerate(res):
        res_refs[0][t, :, k, :] = a.astype(res_refs[0].dtype)
    return tuple(jnp.where(valid, a, old) for a, old in zip(new, carry))

  carry = tuple(r[...].astype(lay.state) for r in carry_refs)
  carry = jax.lax.fori_loop(0, lay.time, body, carry)
  for r, a in zip(final_refs, carry):
    r[...] = a.astype(r.dtype)


def _backward_kernel(*refs, lay: _Layout, lstm: bool):
  n_carry = 2 if lstm else 1
  lengths_ref, res_ref, dys_ref, wt_ref = refs[:4]
  dfinal_refs = refs[4: 4 + n_carry]
  dg_ref, dcarry0_refs = refs[4 + n_carry], refs[5 + n_carry:]
  lengths = lengths_ref[...]
  wt = _weights(wt_ref, lay) if lay.hold_weights else None  # W_h's gate blocks, transposed

  def body(s, dcarry):
    t = lay.time - 1 - s
    res = [res_ref[t, :, k, :].astype(lay.state) for k in range(_RESIDUALS)]
    dh = dcarry[-1] + dys_ref[t].astype(lay.state)
    if lstm:
      *stored, dc_prev = LSTMMath.gate_step_bwd(*res, dcarry[0], dh)
    else:
      *stored, d_direct = GRUMath.gate_step_bwd(*res, dh)  # d r, d z, d hn, d n
    valid = (t < lengths)[:, None]
    stored = [jnp.where(valid, d, 0) for d in stored]
    for k, d in enumerate(stored):
      dg_ref[t, :, k, :] = d.astype(dg_ref.dtype)
    dh_prev = functools.reduce(operator.add, [
      _dot(d, w_k, lay.state) for d, w_k in zip(stored, _weights(wt_ref, lay, wt))])
    new = (dc_prev, dh_prev) if lstm else (d_direct + dh_prev,)
    return tuple(jnp.where(valid, a, old) for a, old in zip(new, dcarry))

  dcarry = tuple(r[...].astype(lay.state) for r in dfinal_refs)
  dcarry = jax.lax.fori_loop(0, lay.time, body, dcarry)
  for r, a in zip(dcarry0_refs, dcarry):
    r[...] = a.astype(r.dtype)


def _recurrent_weights(lay: _Layout, w_h, transpose: bool):
  """``(G, Hp, Hp)``: gate ``k``'s block of ``W_h`` (transposed), zero-padded."""
  w = jnp.moveaxis(lay.gate_blocks(w_h), -2, 0)  # (G, H, Hp)
  if transpose:
    w = jnp.swapaxes(w, 1, 2)
  return jnp.pad(w, [(0, 0), (0, lay.hp - w.shape[1]), (0, lay.hp - w.shape[2])])


def _rows(lay: _Layout, a, axis: int):
  """A ``(..., *batch, H)`` array with its batch axes from ``axis`` flattened and padded."""
  a = a.reshape(a.shape[:axis] + (lay.rows,) + a.shape[-1:])
  return lay.pad_rows(lay.pad_hidden(a), axis)


def _forward(cell_math, params, xs, carry0, lengths, save: bool):
  w_i, b, w_h, extra = params
  time, batch = xs.shape[0], xs.shape[1:-1]
  lstm = cell_math is LSTMMath
  lay = _Layout(cell_math, time, math.prod(batch), w_h.shape[0], xs.dtype)
  rows, hp, g = lay.padded_rows, lay.hp, lay.gates
  with jax.named_scope(f'nr.{cell_math.name}/pallas_forward'):
    # The input projection of every step: one matmul, outside the kernel.
    x = lay.pad_rows(xs.reshape(time, lay.rows, xs.shape[-1]), 1)
    w_i = lay.gate_blocks(w_i).reshape(w_i.shape[0], g * hp)
    xp = (dot(x, w_i) + lay.gate_blocks(b).reshape(1, 1, g * hp)).reshape(time, rows, g, hp)
    inputs = [(lay.pad_rows(lengths.reshape(lay.rows).astype(jnp.int32), 0), 0), (xp, 1),
              (_recurrent_weights(lay, w_h, False), None)]
    if not lstm:
      inputs.append((lay.pad_hidden(extra), None))
    carries = jax.tree_util.tree_leaves(carry0)
    inputs += [(_rows(lay, c, 0), 0) for c in carries]
    outputs = [(((time, rows, hp), xs.dtype), 1)] + [(((rows, hp), lay.state), 0)] * len(carries)
    if save:
      outputs.append((((time, rows, _RESIDUALS, hp), xs.dtype), 1))
    out = lay.call(functools.partial(_forward_kernel, lay=lay, lstm=lstm, save=save),
                   f'nr_{cell_math.name.lower()}_forward', inputs, outputs)
    ys = lay.unpad(out[0], batch, 1)
    finals = [lay.unpad(a, batch, 0).astype(c.dtype) for a, c in zip(out[1:], carries)]
    final = tuple(finals) if lstm else finals[0]
  return final, ys, (out[-1] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def recurrence(cell_math, params, xs, carry0, lengths):
  """``(final_carry, ys)`` of one cell over time-major ``xs`` (``(time, *batch,
  features)``) with the Pallas kernels; ``params`` is ``(W_i, b, W_h, extra)``
  (``extra``: the GRU's ``b_hn``), ``lengths`` integers ``(*batch)`` in ``[0,
  time]``."""
  final, ys, _ = _forward(cell_math, params, xs, carry0, lengths, save=False)
  return final, ys


def _recurrence_fwd(cell_math, params, xs, carry0, lengths):
  final, ys, res = _forward(cell_math, params, xs, carry0, lengths, save=True)
  return (final, ys), (params, xs, carry0, ys, res, lengths)


def _recurrence_bwd(cell_math, saved, cotangents):
  params, xs, carry0, ys, res, lengths = saved
  dfinal, dys = cotangents
  time, batch = xs.shape[0], xs.shape[1:-1]
  lstm = cell_math is LSTMMath
  lay = _Layout(cell_math, time, math.prod(batch), params[2].shape[0], xs.dtype)
  rows, hp, h = lay.padded_rows, lay.hp, lay.hidden
  with jax.named_scope(f'nr.{cell_math.name}/pallas_backward'):
    carries = jax.tree_util.tree_leaves(carry0)
    inputs = [(lay.pad_rows(lengths.reshape(lay.rows).astype(jnp.int32), 0), 0), (res, 1),
              (_rows(lay, dys, 1), 1), (_recurrent_weights(lay, params[2], True), None)]
    inputs += [(_rows(lay, d.astype(lay.state), 0), 0) for d in jax.tree_util.tree_leaves(dfinal)]
    outputs = [(((time, rows, _GRADS, hp), xs.dtype), 1)]
    outputs += [(((rows, hp), lay.state), 0)] * len(carries)
    out = lay.call(functools.partial(_backward_kernel, lay=lay, lstm=lstm),
                   f'nr_{cell_math.name.lower()}_backward', inputs, outputs)
    dg = lay.unpad(out[0], batch, 1)  # (time, *batch, 4, H)
    dcarry0 = [lay.unpad(a, batch, 0).astype(c.dtype) for a, c in zip(out[1:], carries)]
    dcarry0 = tuple(dcarry0) if lstm else dcarry0[0]
    flat = dg.shape[:-2]
    if lstm:  # the gradients of the gate pre-activations: of x W_i and of h W_h
      d_all, res_flat = dg.reshape(flat + (4 * h,)), None
    else:  # those of h W_h (r, z, n), and of n's pre-activation (x W_in's)
      d_all = (dg[..., :3, :].reshape(flat + (3 * h,)), dg[..., 3, :])
      res_flat = lay.unpad(res, batch, 1).reshape(flat + (_RESIDUALS * h,))
    # The weight and input gradients: one large matmul each.
    dparams, dxs = grads_after_loop(cell_math, d_all, res_flat, params, xs, carry0, ys)
  return dparams, dxs, dcarry0, None


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
