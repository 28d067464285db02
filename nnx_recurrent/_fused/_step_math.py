"""The per-step math of the fused LSTM and GRU, shared by every backend.

One class per cell (:class:`LSTMMath`, :class:`GRUMath`) knows the cell's
parameters, its step given the gate pre-activations (forward, and backward
from the saved residual) and how the stacked gate gradients become weight
gradients; the helpers below are the matmuls and gate activations they use.
The gate nonlinearities are the cells' defaults (sigmoid, tanh), whose
derivatives the backward step hard-codes; the LSTM cell update is
:func:`_base.lstm_update`, the cells' own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nnx_recurrent._base import Array, lstm_update
from nnx_recurrent._fused import _plans


def row(v: Array, ndim: int) -> Array:
  """A ``(features,)`` vector reshaped to broadcast against ``ndim`` axes."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def dot(a: Array, b: Array) -> Array:
  """``a @ b`` contracting the last axis of ``a`` with the first of ``b``."""
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def shift(first: Array, seq: Array) -> Array:
  """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
  return jnp.concatenate([first[None], seq], axis=0)[: seq.shape[0]]


def flat_dot_t(a: Array, b: Array, transpose: bool = False) -> Array:
  """``sum over all leading axes of a^T b``: ``(..., m), (..., n) -> (m, n)``.

  With ``transpose``, a large one is computed as ``a^T`` materialised times
  ``b`` (an ``optimization_barrier`` keeps XLA from folding the transpose back
  into the dot): XLA:CPU runs a dot contracting both operands' first axis
  outside YNNPACK's fast path. The LSTM's weight gradients at (256, 50, 256,
  512) took 257 instead of 317 ms (training step 0.93-0.94x); the GRU's
  training step got 1.02-1.03x slower, so its math class does not ask for it.
  Below ``_plans.TRANSPOSE_MIN_MACS`` the copy does not pay (and its scratch memory
  can push the step over glibc's 32 MiB mmap threshold, see
  ``benchmarks/RESULTS.md``).
  """
  a2 = a.reshape(-1, a.shape[-1])
  b2 = b.reshape(-1, b.shape[-1])
  if transpose and a2.shape[0] * a2.shape[1] * b2.shape[1] >= _plans.TRANSPOSE_MIN_MACS:
    return dot(jax.lax.optimization_barrier(a2.T), b2)
  return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


# -- pointwise math of one step, forward and backward ---------------------------
LSTM_SIGMOID_GATES = (True, True, False, True)  # i, f, g, o: g is the tanh one


def identity(a):
  return a


def gate_columns(width: int, sigmoid: tuple[bool, ...]) -> Array:
  """Per-column booleans over ``width`` columns: True in the sigmoid gate blocks."""
  return jnp.asarray(np.repeat(np.asarray(sigmoid), width // len(sigmoid)))


def gate_activations(z: Array, sigmoid: tuple[bool, ...]) -> Array:
  """sigmoid or tanh per gate block, as ONE elementwise op over all gates.

  ``sigmoid(x) = 0.5 + 0.5 * tanh(x / 2)``: one tanh per element, so XLA
  emits a single loop over ``(batch, gates * H)`` instead of one per gate.
  """
  is_sig = row(gate_columns(z.shape[-1], sigmoid), z.ndim)
  half = jnp.asarray(0.5, z.dtype)
  t = jnp.tanh(jnp.where(is_sig, half * z, z))
  return jnp.where(is_sig, half + half * t, t)


def gate_derivatives(act: Array, sigmoid: tuple[bool, ...]) -> Array:
  """``d act / d z`` from the activations: ``a (1 - a)`` or ``1 - a^2`` per block."""
  is_sig = row(gate_columns(act.shape[-1], sigmoid), act.ndim)
  return jnp.where(is_sig, act * (1.0 - act), 1.0 - act * act)


# Each step saves ONE residual array ``(*batch, 5 * H)`` holding everything its
# backward needs (activated gates and the carry that entered the step), so the
# backward scan fetches one slice per step and recomputes nothing but a tanh.
class LSTMMath:
  """LSTM step given ``xp = x W_i`` and ``hp = h W_h``; gates ``i, f, g, o``."""

  name = 'LSTM'
  gates = 4
  joint = True  # has joint_weight / split_joint: one matmul per step (see _plans.plan)
  transpose_dw = True  # weight gradients through a materialised transpose (flat_dot_t)
  autodiff_min_rows = None  # always the custom VJP (see _plans.plan)

  @staticmethod
  def params(cell):
    """``(W_i, b, W_h, extra)`` of an :class:`OptimizedLSTMCell`."""
    return cell.dense_i.kernel[...], cell.dense_h.bias[...], cell.dense_h.kernel[...], None

  @staticmethod
  def h(carry):
    return carry[1]

  @staticmethod
  def joint_weight(w_i, w_h):
    """``[W_i; W_h]``: ``[x, h]`` times it is ``x W_i + h W_h``."""
    return jnp.concatenate([w_i, w_h], axis=0)

  @staticmethod
  def split_joint(z):
    """``(xp, hp)`` for :meth:`step` from ``[x, h] joint_weight``."""
    return z, None

  @staticmethod
  def step(carry, xp_t, hp_t, b, extra, save: bool):
    """Returns ``(new_carry, residual [i, f, g, o, c_prev])`` (activated gates;
    ``None`` without ``save``)."""
    del extra
    c, _ = carry
    z = xp_t if hp_t is None else xp_t + hp_t  # None: xp_t came from the joint matmul
    z = z + row(b, z.ndim)
    if not save:
      # Nothing to save: each gate's activation fuses into the op that uses it,
      # as in the cell (the one-tanh form materialises all four, see _plans.plan).
      i, f, g, o = jnp.split(z, 4, axis=-1)
      return lstm_update(c, i, f, g, o, jax.nn.sigmoid, jnp.tanh), None
    act = gate_activations(z, LSTM_SIGMOID_GATES)
    i, f, _, o = jnp.split(act, 4, axis=-1)
    # The cells' update (identity gate_fn: i, f, o are activated already).
    new_c, new_h = lstm_update(c, i, f, jnp.split(z, 4, axis=-1)[2], o, identity, jnp.tanh)
    return (new_c, new_h), jnp.concatenate([act, c], axis=-1)

  @staticmethod
  def step_bwd(res_t, dcarry, dy_t):
    """Returns ``(d carry_prev except via hp, what the scan stacks, d hp_t)``."""
    i, f, g, o, c_prev = jnp.split(res_t, 5, axis=-1)
    dc, dh = dcarry
    dh = dh + dy_t
    tc = jnp.tanh(f * c_prev + i * g)
    dc = dc + dh * o * (1.0 - tc * tc)
    upstream = jnp.concatenate([dc * g, dc * c_prev, dc * i, dh * tc], axis=-1)
    act = res_t[..., : 4 * i.shape[-1]]
    dz = upstream * gate_derivatives(act, LSTM_SIGMOID_GATES)  # d of i, f, g, o's inputs
    return (dc * f, jnp.zeros_like(dh)), dz, dz

  @staticmethod
  def gate_step_bwd(i, f, g, o, c_prev, dc, dh):
    """:meth:`step_bwd`'s formulas gate by gate (activated gates ``i, f, g, o``;
    ``dh`` includes the step's output cotangent): ``(dz_i, dz_f, dz_g, dz_o,
    dc_prev)``. For kernels that cannot slice or concatenate values (Triton);
    the XLA scan keeps the one-op form above."""
    tc = jnp.tanh(f * c_prev + i * g)
    dc = dc + dh * o * (1.0 - tc * tc)
    return (dc * g * (i * (1.0 - i)), dc * c_prev * (f * (1.0 - f)), dc * i * (1.0 - g * g),
            dh * tc * (o * (1.0 - o)), dc * f)

  @staticmethod
  def add_h(dcarry, dh):
    return (dcarry[0], dcarry[1] + dh)

  @staticmethod
  def grads(dz, res, carry0, ys, extra):
    """``(dW_h, d xp, d extra)`` from the stacked outputs of the backward scan."""
    del res, extra
    # h entering step t is ys[t - 1] (valid steps are a prefix), h0 for t = 0.
    return flat_dot_t(shift(carry0[1], ys), dz, LSTMMath.transpose_dw), dz, None


class GRUMath:
  """GRU step given ``xp = x W_i`` and ``hp = h W_h``; gates ``r, z, n``."""

  name = 'GRU'
  gates = 3
  joint = False  # a joint weight would need a zero block for h W_hn: measured slower
  transpose_dw = False
  autodiff_min_rows = _plans.GRU_AUTODIFF_MIN_ROWS  # on the CPU (see _plans.plan)

  @staticmethod
  def params(cell):
    """``(W_i, b_i, W_h, b_hn)`` of a :class:`GRUCell`."""
    return (cell.dense_i.kernel[...], cell.dense_i.bias[...], cell.dense_h.kernel[...],
            cell.bias_hn[...])

  @staticmethod
  def h(carry):
    return carry

  @staticmethod
  def step(h, xp_t, hp_t, b, b_hn, save: bool):
    """Returns ``(new_h, residual [r, z, n, W_hn h + b_hn, h_prev])`` (the
    same without ``save``: the scan drops the unused residual)."""
    del save
    xr, xz, xn = jnp.split(xp_t + row(b, xp_t.ndim), 3, axis=-1)
    hr, hz, hn = jnp.split(hp_t, 3, axis=-1)
    hn = hn + row(b_hn, hn.ndim)
    new_h, r, z, n = GRUMath.gate_step(h, xr, xz, xn, hr, hz, hn)
    return new_h, jnp.concatenate([r, z, n, hn, h], axis=-1)

  @staticmethod
  def gate_step(h, xr, xz, xn, hr, hz, hn):
    """The GRU update from each gate's pre-activations (``xr = x W_ir + b_ir``
    ..., ``hn = h W_hn + b_hn``): ``(new_h, r, z, n)``."""
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    new_h = (1.0 - z) * n + z * h
    return new_h, r, z, n

  @staticmethod
  def step_bwd(res_t, dh, dy_t):
    r, z, n, hn, h_prev = jnp.split(res_t, 5, axis=-1)
    dr, dz, dhn, dan, d_direct = GRUMath.gate_step_bwd(r, z, n, hn, h_prev, dh + dy_t)
    dhp = jnp.concatenate([dr, dz, dhn], axis=-1)
    return d_direct, (dhp, dan), dhp

  @staticmethod
  def gate_step_bwd(r, z, n, hn, h_prev, dh):
    """The backward of :meth:`gate_step` (``dh`` includes the step's output
    cotangent): ``(d r's pre-activation, d z's, d hn, d n's pre-activation,
    dh_prev except via h W_h)``."""
    dan = dh * (1.0 - z) * (1.0 - n * n)  # d of n's pre-activation
    return dan * hn * r * (1.0 - r), dh * (h_prev - n) * z * (1.0 - z), dan * r, dan, dh * z

  @staticmethod
  def add_h(dcarry, dh):
    return dcarry + dh

  @staticmethod
  def grads(d_all, res, carry0, ys, b_hn):
    del carry0, ys
    dhp, dan = d_all
    h = b_hn.shape[-1]
    dw_h = flat_dot_t(res[..., 4 * h:], dhp)
    dxp = jnp.concatenate([dhp[..., : 2 * h], dan], axis=-1)
    db_hn = dhp[..., 2 * h:].reshape(-1, h).sum(axis=0)
    return dw_h, dxp, db_hn


def grads_after_loop(cell_math, d_all, res, params, xs, carry0, ys):
  """The gradients of the parameters and inputs from the stacked outputs of a
  backward recurrence (``d_all``, as ``cell_math.step_bwd`` stacks them), each
  one large matmul over the whole sequence: ``((dW_i, db, dW_h, d extra), dxs)``."""
  w_i, _, _, extra = params
  dw_h, dxp, dextra = cell_math.grads(d_all, res, carry0, ys, extra)
  dw_i = flat_dot_t(xs, dxp, cell_math.transpose_dw)
  db = dxp.reshape(-1, dxp.shape[-1]).sum(axis=0)
  dxs = dot(dxp, w_i.T)  # XLA drops it when the inputs need no gradient
  return (dw_i, db, dw_h, dextra), dxs
