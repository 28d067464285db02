"""The Pallas kernels of ``implementation='pallas'``: one direction's forward
recurrence and its backward, for the LSTM (projected or not) and the GRU.

:mod:`._pallas` lays the arrays out, calls these kernels inside a
:func:`jax.custom_vjp` and does the large matmuls around them. A kernel
program owns one block of batch rows for the whole sequence: a ``fori_loop``
over time with the state in the loop's carry.

Triton's constraints (read from ``jax/_src/pallas/triton/lowering.py``, jax
0.10.2), and what the kernels do about them:

* Every array a kernel loads or stores must have a power-of-two number of
  elements: the batch block and the hidden size are padded to powers of two
  (``H`` to ``Hp`` within each gate, the projected size ``P`` to ``Pp``; the
  padded weight rows and columns are zero, so padded columns stay zero and
  never reach the real ones).
* ``dot`` needs at least 16 rows, and contraction and output sizes of at least
  16 (Triton's smallest tile; the lowering checks it for float64): batch
  blocks have 16 rows or more (padding rows have length 0), ``Hp, Pp >= 16``.
* Values cannot be sliced (``lax.slice`` has no lowering) nor concatenated
  (only ``[..., 1]`` pieces) nor split into 3: each gate is its own
  ``(rows, Hp)`` load, matmul and store; arrays are ``(time, rows, gates,
  Hp)`` and the kernels index the gate axis of the refs.
* No scratch buffers and no scalar prefetch: the lengths (or the per-step
  flags of packed sequences) are an ordinary input block, the state lives in
  the loop's carry.
* Float32 matmuls follow ``jax_default_matmul_precision`` (JAX resolves it
  when the ``dot`` is traced): unset, Triton's lowering runs them in TF32;
  ``'highest'`` in full float32.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from nnx_recurrent._base import lstm_update
from nnx_recurrent._fused._step_math import GRUMath, LSTMMath, identity

RESIDUALS = 5  # per step: LSTM i, f, g, o, c_prev; GRU r, z, n, h W_hn + b_hn, h_prev
GRADS = 4  # per step: LSTM d of i, f, g, o's inputs; GRU d of r's, z's, of h W_hn, of n's


def _dot(a, b, dtype):
  """``a @ b`` of ``(rows, K) x (K, N)`` blocks, ``a`` cast to ``b``'s dtype."""
  return jax.lax.dot_general(a.astype(b.dtype), b, (((1,), (0,)), ((), ())),
                             preferred_element_type=dtype)


def _weights(w_ref, lay, held=None):
  """The gate blocks of the recurrent weights: ``held`` (loaded once, before
  the loop, when ``lay.hold_weights``) or loaded now."""
  return held if held is not None else [w_ref[k] for k in range(lay.gates)]


def _masks(steps_ref, t, lay, lengths):
  """``(valid, reset)`` of step ``t`` as ``(rows, 1)`` booleans (``reset`` is
  ``None`` without packed sequences). ``steps_ref``: the lengths ``(rows,)``,
  or per step ``(time, rows)``: 0 padding, 1 valid, 2 a segment's first step."""
  if not lay.packed:
    return (t < lengths)[:, None], None
  flags = steps_ref[t]
  return (flags > 0)[:, None], (flags > 1)[:, None]


def forward_kernel(*all_refs: Any, lay, lstm: bool, save: bool):
  """Inputs: steps, ``x W_i + b`` ``(time, rows, G, Hp)``, ``W_h``'s gate blocks
  ``(G, Pp, Hp)``, [GRU: ``b_hn``], [projection: ``W_hr`` ``(Hp, Pp)``], the
  initial carry; outputs: ``ys``, the final carry, [the residuals]."""
  refs = list(all_refs)
  steps_ref, xp_ref, w_ref = refs[:3]
  del refs[:3]
  bhn_ref = None if lstm else refs.pop(0)
  wr_ref = refs.pop(0) if lay.proj else None
  n_carry = 2 if lstm else 1
  carry_refs, refs = refs[:n_carry], refs[n_carry:]
  ys_ref, final_refs, res_refs = refs[0], refs[1: 1 + n_carry], refs[1 + n_carry:]
  lengths = None if lay.packed else steps_ref[...]
  w = _weights(w_ref, lay) if lay.hold_weights else None
  w_hr = None if wr_ref is None else wr_ref[...]
  b_hn = None if bhn_ref is None else bhn_ref[...].astype(lay.state)[None, :]
  carry0 = tuple(r[...].astype(lay.state) for r in carry_refs)

  def body(t, carry):
    valid, reset = _masks(steps_ref, t, lay, lengths)
    if reset is not None:  # a packed segment starts from the initial carry
      carry = tuple(jnp.where(reset, a0, a) for a0, a in zip(carry0, carry))
    h = carry[-1]
    hp = [_dot(h, w_k, lay.state) for w_k in _weights(w_ref, lay, w)]
    xp = [xp_ref[t, :, k, :].astype(lay.state) for k in range(lay.gates)]
    if lstm:
      c = carry[0]
      i, f, o = (jax.nn.sigmoid(xp[k] + hp[k]) for k in (0, 1, 3))
      zg = xp[2] + hp[2]
      new_c, m = lstm_update(c, i, f, zg, o, identity, jnp.tanh)
      new = (new_c, m if w_hr is None else _dot(m, w_hr, lay.state))
      res = (i, f, jnp.tanh(zg), o, c)
    else:
      hn = hp[2] + b_hn
      new_h, r, z, n = GRUMath.gate_step(h, *xp, hp[0], hp[1], hn)
      new, res = (new_h,), (r, z, n, hn, h)
    ys_ref[t] = jnp.where(valid, new[-1], 0).astype(ys_ref.dtype)
    if save:
      for k, a in enumerate(res):
        res_refs[0][t, :, k, :] = a.astype(res_refs[0].dtype)
    return tuple(jnp.where(valid, a, old) for a, old in zip(new, carry))

  carry = jax.lax.fori_loop(0, lay.time, body, carry0)
  for r, a in zip(final_refs, carry):
    r[...] = a.astype(r.dtype)


def backward_kernel(*all_refs: Any, lay, lstm: bool):
  """Inputs: steps, the residuals, ``d ys``, ``W_h^T``'s gate blocks ``(G, Hp,
  Pp)``, [projection: ``W_hr^T`` ``(Pp, Hp)``], the final carry's cotangent;
  outputs: the gate gradients ``(time, rows, GRADS, Hp)``, the initial carry's
  cotangent, [projection: each step's ``dh``, for ``dW_hr``]."""
  refs = list(all_refs)
  n_carry = 2 if lstm else 1
  steps_ref, res_ref, dys_ref, wt_ref = refs[:4]
  del refs[:4]
  wrt_ref = refs.pop(0) if lay.proj else None
  dfinal_refs, refs = refs[:n_carry], refs[n_carry:]
  dg_ref, dcarry0_refs, dh_ref = refs[0], refs[1: 1 + n_carry], refs[1 + n_carry:]
  lengths = None if lay.packed else steps_ref[...]
  wt = _weights(wt_ref, lay) if lay.hold_weights else None  # W_h's gate blocks, transposed
  w_hr_t = None if wrt_ref is None else wrt_ref[...]

  def body(s, state):
    t = lay.time - 1 - s
    dcarry, d_reset = state[:n_carry], state[n_carry:]
    valid, reset = _masks(steps_ref, t, lay, lengths)
    res = [res_ref[t, :, k, :].astype(lay.state) for k in range(RESIDUALS)]
    dh = dcarry[-1] + dys_ref[t].astype(lay.state)
    if lstm:
      dm = dh if w_hr_t is None else _dot(dh, w_hr_t, lay.state)
      *stored, dc_prev = LSTMMath.gate_step_bwd(*res, dcarry[0], dm)
    else:
      *stored, d_direct = GRUMath.gate_step_bwd(*res, dh)  # d r, d z, d hn, d n
    stored = [jnp.where(valid, d, 0) for d in stored]
    for k, d in enumerate(stored):
      dg_ref[t, :, k, :] = d.astype(dg_ref.dtype)
    if dh_ref:
      dh_ref[0][t] = jnp.where(valid, dh, 0).astype(dh_ref[0].dtype)
    dh_prev = functools.reduce(operator.add, [
      _dot(d, w_k, lay.state) for d, w_k in zip(stored, _weights(wt_ref, lay, wt))])
    new = (dc_prev, dh_prev) if lstm else (d_direct + dh_prev,)
    new = tuple(jnp.where(valid, a, old) for a, old in zip(new, dcarry))
    if reset is None:
      return new
    # A segment's first step read the initial carry: its cotangent goes there.
    d_reset = tuple(acc + jnp.where(reset, a, 0) for acc, a in zip(d_reset, new))
    return tuple(jnp.where(reset, 0, a) for a in new) + d_reset

  dcarry = tuple(r[...].astype(lay.state) for r in dfinal_refs)
  if lay.packed:
    dcarry += tuple(jnp.zeros_like(a) for a in dcarry)
  state = jax.lax.fori_loop(0, lay.time, body, dcarry)
  if lay.packed:
    state = tuple(a + b for a, b in zip(state[:n_carry], state[n_carry:]))
  for r, a in zip(dcarry0_refs, state):
    r[...] = a.astype(r.dtype)
