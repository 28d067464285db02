"""The per-step math of the fused LSTM and GRU, shared by every backend.

One class per cell (:class:`LSTMMath`, :class:`GRUMath`) knows the cell's
parameters, its step given the gate pre-activations (forward, and backward
from the saved residual) and how the stacked gate gradients become weight
gradients; the helpers below are the matmuls and gate activations they use.
The gate nonlinearities are the cells' defaults (sigmoid, tanh), whose
derivatives the backward step hard-codes; the LSTM cell update is
:func:`_base.lstm_update` and the GRU's :func:`_updates.gru_gates`, the cells' own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nnx_recurrent import _scan
from nnx_recurrent._base import Array, lstm_update
from nnx_recurrent._fused import _plans
from nnx_recurrent._updates import gru_gates


def row(v: Array, ndim: int) -> Array:
  """A ``(features,)`` vector reshaped to broadcast against ``ndim`` axes."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def dot(a: Array, b: Array, like: Array | None = None) -> Array:
  """``a @ b`` contracting the last axis of ``a`` with the first of ``b``.

  ``like``: where that axis is split over one Explicit mesh axis in both
  (parameters split over a model axis, explicit sharding mode), JAX asks where
  the sum goes; the product is then split as ``like`` is (of its rank: the
  value it is added to). Unused otherwise: the same program as without it.
  """
  dims = (((a.ndim - 1,), (0,)), ((), ()))
  if like is not None:
    spec_a, spec_b = _scan.explicit_spec(a), _scan.explicit_spec(b)
    if spec_a and spec_b and spec_a[-1] is not None and spec_a[-1] == spec_b[0]:
      return jax.lax.dot_general(a, b, dims, out_sharding=jax.typeof(like).sharding)
  return jax.lax.dot_general(a, b, dims)


def shift(first: Array, seq: Array) -> Array:
  """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
  return jnp.concatenate([first[None], seq], axis=0)[: seq.shape[0]]


def h_entering(h0: Array, ys: Array, packed) -> Array:
  """The ``h`` entering each step of a valid row part, from the outputs: ``ys[t - 1]``
  where step ``t - 1`` was valid (always with seq_lengths), ``h0`` at the first.
  ``packed``: ``(valid, reset)`` of packed rows, or ``None``: zeros at a later
  segment's first step (``reset``), ``h0`` after the row's leading padding."""
  h_prev = shift(h0, ys)
  if packed is not None:
    valid, reset = packed
    h_prev = _scan.masked_where(reset, jnp.zeros_like(h_prev), h_prev)
    h_prev = _scan.masked_where(_scan.earlier_valid(valid), h_prev, h0[None])
  return h_prev


def flat_dot_t(a: Array, b: Array, transpose: bool = False, like: Array | None = None) -> Array:
  """``sum over all leading axes of a^T b``: ``(..., m), (..., n) -> (m, n)``.

  With ``transpose``, a large one is computed as ``a^T`` materialised times
  ``b`` (an ``optimization_barrier`` keeps XLA from folding the transpose back
  into the dot): XLA:CPU runs a dot contracting both operands' first axis
  outside YNNPACK's fast path. The LSTM's weight gradients at (256, 50, 256,
  512) took 257 instead of 317 ms (training step 0.93-0.94x); the GRU's
  training step got 1.02-1.03x slower, so its math class does not ask for it.
  Below ``_plans.TRANSPOSE_MIN_MACS`` the copy does not pay (and its scratch memory
  can push the step over glibc's 32 MiB mmap threshold, see
  ``benchmarks/HISTORY.md``).

  With several devices the leading axes are contracted as they are, not
  reshaped into one: merging time with a sharded batch axis cannot keep the
  sharding, so a data-parallel step gathered the whole batch onto every
  device (and each computed every weight gradient); in place, each device's
  part is summed by one all-reduce. On one device the reshaped form stays:
  XLA:CPU compiles the other with a transposed copy, a program not measured.
  ``like``: the parameter whose gradient this is, whose sharding the result
  takes in explicit sharding mode (:func:`_summed_over_mesh`).
  """
  if _sharded_leading_axes(a, b):
    lead = tuple(range(a.ndim - 1))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())), **_summed_over_mesh(a, b, like))
  a2 = a.reshape(-1, a.shape[-1])
  b2 = b.reshape(-1, b.shape[-1])
  macs = a2.shape[0] * a2.shape[1] * b2.shape[1]
  if transpose and isinstance(macs, int) and macs >= _plans.TRANSPOSE_MIN_MACS:
    return dot(jax.lax.optimization_barrier(a2.T), b2)
  return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


def _sharded_leading_axes(*arrays: Array) -> bool:
  """Whether the leading (time, batch) axes may be split over devices: with
  more than one, reshaping them into one would gather them (:func:`flat_dot_t`);
  in explicit sharding mode, where JAX refuses that reshape, on one device too."""
  return jax.device_count() > 1 or any(_scan.explicit_spec(a) is not None for a in arrays)


def _summed_over_mesh(a: Array, b: Array, like: Array | None = None) -> dict:
  """Explicit sharding mode (:func:`_scan.explicit_spec`): the ``out_sharding``
  of :func:`flat_dot_t`'s contraction of leading axes split over the mesh (the
  batch, data parallel), which JAX will not guess, the split leading axes
  summed by one all-reduce: the partition of the parameter ``like`` (its
  gradient's; replicated for replicated parameters, split over a model axis
  as the parameter is), else the partition of ``a``'s and ``b``'s last axes.
  ``{}`` otherwise: the same program as before."""
  spec_a, spec_b = _scan.explicit_spec(a), _scan.explicit_spec(b)
  if spec_a is None and spec_b is None:
    return {}
  sharding = jax.typeof(a if spec_a else b).sharding
  if like is not None:
    spec = _scan.explicit_spec(like) or (None,) * jnp.ndim(like)
    return {'out_sharding': sharding.update(spec=jax.sharding.PartitionSpec(*spec))}
  m = spec_a[-1] if spec_a else None
  n = spec_b[-1] if spec_b else None
  if n is not None and n == m:  # one mesh axis cannot split both
    n = None
  return {'out_sharding': sharding.update(spec=jax.sharding.PartitionSpec(m, n))}


def sum_leading(x: Array) -> Array:
  """``x`` summed over every axis but the last (a bias gradient over time and
  batch); with several devices without reshaping them into one (see
  :func:`flat_dot_t`)."""
  if _sharded_leading_axes(x):
    return x.sum(axis=tuple(range(x.ndim - 1)))
  return x.reshape(-1, x.shape[-1]).sum(axis=0)


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
# (With an LSTM projection the same: ``m = o * tanh(c')``, which ``dW_hr``
# reads, is recomputed from it after the loop, for all steps at once.)
class LSTMMath:
  """LSTM step given ``xp = x W_i`` and ``hp = h W_h``; gates ``i, f, g, o``.

  With ``proj_features`` (``W_hr``, the ``extra`` parameter) the new ``h`` is
  ``(o * tanh(c')) W_hr``: one more matmul per step forward (``dh W_hr^T``
  backward); without it the step is the unprojected one, op for op.
  """

  name = 'LSTM'
  gates = 4
  joint = True  # has joint_weight / split_joint: one matmul per step (see _plans.plan)
  transpose_dw = True  # weight gradients through a materialised transpose (flat_dot_t)
  autodiff_min_rows = None  # always the custom VJP (see _plans.plan)

  @staticmethod
  def params(cell):
    """``(W_i, b, W_h, W_hr)`` of an :class:`OptimizedLSTMCell`; ``W_hr`` is the
    projection's kernel ``(H, P)`` (``proj_features``), or ``None``."""
    w_hr = None if cell.proj is None else cell.proj.kernel[...]
    return cell.dense_i.kernel[...], cell.dense_h.bias[...], cell.dense_h.kernel[...], w_hr

  @staticmethod
  def project(m, w_hr):
    """The new ``h`` from ``m = o * tanh(c')``: ``m W_hr``, or ``m`` itself."""
    return m if w_hr is None else dot(m, w_hr)

  @staticmethod
  def backward_extra(params):
    """What :meth:`step_bwd` needs of the parameters, made once before the loop:
    ``W_hr^T`` (``None`` without a projection)."""
    w_hr = params[3]
    return None if w_hr is None else w_hr.T

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
  def step(carry, xp_t, hp_t, b, w_hr, save: bool):
    """Returns ``(new_carry, residual [i, f, g, o, c_prev])`` (activated gates;
    ``None`` without ``save``). ``w_hr``: the projection, or ``None``."""
    c, _ = carry
    z = xp_t if hp_t is None else xp_t + hp_t  # None: xp_t came from the joint matmul
    z = z + row(b, z.ndim)
    if not save:
      # Nothing to save: each gate's activation fuses into the op that uses it,
      # as in the cell (the one-tanh form materialises all four, see _plans.plan).
      i, f, g, o = jnp.split(z, 4, axis=-1)
      new_c, m = lstm_update(c, i, f, g, o, jax.nn.sigmoid, jnp.tanh)
      return (new_c, LSTMMath.project(m, w_hr)), None
    act = gate_activations(z, LSTM_SIGMOID_GATES)
    i, f, _, o = jnp.split(act, 4, axis=-1)
    # The cells' update (identity gate_fn: i, f, o are activated already).
    new_c, m = lstm_update(c, i, f, jnp.split(z, 4, axis=-1)[2], o, identity, jnp.tanh)
    # (c typed as act: explicit sharding mode before the carry takes the step's sharding)
    return (new_c, LSTMMath.project(m, w_hr)), jnp.concatenate([act, _scan.typed_as(c, act)],
                                                               axis=-1)

  @staticmethod
  def step_bwd(res_t, dcarry, dy_t, w_hr_t):
    """Returns ``(d carry_prev except via hp, what the scan stacks, d hp_t)``.

    With a projection (``w_hr_t = W_hr^T``) ``dm = dh W_hr^T`` is the
    cotangent of ``m = o * tanh(c')``, and the scan also stacks ``dh`` (for
    ``dW_hr``, one matmul after the loop: :meth:`grads`)."""
    i, f, g, o, c_prev = jnp.split(res_t, 5, axis=-1)
    dc, dh = dcarry
    dh = dh + dy_t
    dm = dh if w_hr_t is None else dot(dh, w_hr_t, like=dc)
    tc = jnp.tanh(f * c_prev + i * g)
    dc = dc + dm * o * (1.0 - tc * tc)
    upstream = jnp.concatenate([dc * g, dc * c_prev, dc * i, dm * tc], axis=-1)
    act = res_t[..., : 4 * i.shape[-1]]
    dz = upstream * gate_derivatives(act, LSTM_SIGMOID_GATES)  # d of i, f, g, o's inputs
    return (dc * f, jnp.zeros_like(dh)), (dz if w_hr_t is None else (dz, dh)), dz

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
  def cell_outputs(res):
    """``m = o * tanh(c')`` of every step, from the residuals (what ``W_hr`` reads)."""
    i, f, g, o, c_prev = jnp.split(res, 5, axis=-1)
    return o * jnp.tanh(f * c_prev + i * g)

  @staticmethod
  def grads(d_all, res, carry0, ys, params, packed):
    """``(dW_h, d xp, dW_hr)`` from the stacked outputs of the backward scan
    (``dW_hr`` is ``None`` without a projection)."""
    _, _, w_h, w_hr = params
    dz, dh = (d_all, None) if w_hr is None else d_all
    dw_h = flat_dot_t(h_entering(carry0[1], ys, packed), dz, LSTMMath.transpose_dw, like=w_h)
    if w_hr is None:
      return dw_h, dz, None
    return dw_h, dz, flat_dot_t(LSTMMath.cell_outputs(res), dh, LSTMMath.transpose_dw,
                                like=w_hr)


class GRUMath:
  """GRU step given ``xp = x W_i`` and ``hp = h W_h``; gates ``r, z, n``."""

  name = 'GRU'
  gates = 3
  joint = False  # a joint weight would need a zero block for h W_hn: measured slower
  transpose_dw = False
  autodiff_min_rows = _plans.GRU_AUTODIFF_MIN_ROWS  # on the CPU (see _plans.plan)

  @staticmethod
  def backward_extra(params):
    del params
    return None

  @staticmethod
  def params(cell):
    """``(W_i, b_i, W_h, b_hn)`` of a :class:`GRUCell` (``b_hn`` zeros
    without one: ``use_bias_hn=False``)."""
    b_hn = jnp.zeros((cell.hidden_features,), cell.param_dtype) if cell.bias_hn is None \
      else cell.bias_hn[...]
    return cell.dense_i.kernel[...], cell.dense_i.bias[...], cell.dense_h.kernel[...], b_hn

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
    # (h typed as r: explicit sharding mode before the carry takes the step's sharding)
    return new_h, jnp.concatenate([r, z, n, hn, _scan.typed_as(h, r)], axis=-1)

  @staticmethod
  def gate_step(h, xr, xz, xn, hr, hz, hn):
    """The GRU update from each gate's pre-activations (``xr = x W_ir + b_ir``
    ..., ``hn = h W_hn + b_hn``): ``(new_h, r, z, n)``."""
    return gru_gates(h, xr, xz, xn, hr, hz, hn, jax.nn.sigmoid, jnp.tanh)

  @staticmethod
  def step_bwd(res_t, dh, dy_t, extra_t):
    del extra_t
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
  def grads(d_all, res, carry0, ys, params, packed):
    del carry0, ys, packed  # h_prev is in the residuals
    _, _, w_h, b_hn = params
    dhp, dan = d_all
    h = b_hn.shape[-1]
    dw_h = flat_dot_t(res[..., 4 * h:], dhp, like=w_h)
    # (explicit sharding mode: dan typed as dhp, which jax 0.12 can type apart at a
    # hidden size of 1 split over a mesh axis of size 1)
    dxp = jnp.concatenate([dhp[..., : 2 * h], _scan.typed_as(dan, dhp)], axis=-1)
    db_hn = sum_leading(dhp[..., 2 * h:])
    return dw_h, dxp, db_hn


def rebuilt_residuals(cell_math, params, xs, carry0, ys, c_prev, packed, dtype):
  """Every step's residuals as ``cell_math.step`` saves them (``(time, *batch,
  5 H)`` in ``xs``' dtype, the math in ``dtype``), rebuilt after the forward
  loop from its outputs: the ``h`` entering each step (:func:`h_entering`), its
  product with ``W_h`` over all steps in one matmul, and the step math; the
  LSTM's ``c`` entering each step is ``c_prev``, which the loop saved (the
  Pallas kernels with ``Settings.residuals='rebuilt'``). ``packed``: ``(valid,
  reset)`` of packed rows, or ``None``."""
  w_i, b, w_h, extra = params
  h_prev = h_entering(cell_math.h(carry0), ys, packed)
  xp, hp, b = (a.astype(dtype) for a in (dot(xs, w_i), dot(h_prev, w_h), b))
  if cell_math is LSTMMath:
    _, res = LSTMMath.step((c_prev.astype(dtype), None), xp, hp, b, None, save=True)
  else:
    _, res = GRUMath.step(h_prev.astype(dtype), xp, hp, b, extra.astype(dtype), save=True)
  return res.astype(xs.dtype)


def rebuilt_gate_grads(cell_math, res, seeds, valid):
  """The gate gradients of every step (``(time, *batch, 4, H)``: the LSTM's of
  ``i, f, g, o``'s pre-activations, the GRU's of ``r``'s, ``z``'s, ``h W_hn``
  and ``n``'s), zeros at invalid steps, from the residuals ``(time, *batch, 5,
  H)`` and what a backward loop wrote instead of them (``seeds``, ``(time,
  *batch, 2 or 1, H)``: the LSTM's ``dc`` and ``dh`` entering each step's gate
  math, the GRU's ``dh``; the Pallas kernels with ``Settings.residuals=
  'rebuilt'``)."""
  parts = [res[..., k, :] for k in range(res.shape[-2])]
  *grads, _ = cell_math.gate_step_bwd(*parts, *(seeds[..., k, :] for k in range(seeds.shape[-2])))
  return jnp.where(valid[..., None, None], jnp.stack(grads[:4], axis=-2), 0)


def grads_after_loop(cell_math, d_all, res, params, xs, carry0, ys, packed):
  """The gradients of the parameters and inputs from the stacked outputs of a
  backward recurrence (``d_all``, as ``cell_math.step_bwd`` stacks them), each
  one large matmul over the whole sequence: ``((dW_i, db, dW_h, d extra), dxs)``.
  ``packed``: ``(valid, reset)`` of packed rows (``StepMasks``), or ``None``."""
  w_i = params[0]
  dw_h, dxp, dextra = cell_math.grads(d_all, res, carry0, ys, params, packed)
  dw_i = flat_dot_t(xs, dxp, cell_math.transpose_dw, like=w_i)
  db = sum_leading(dxp)
  dxs = dot(dxp, w_i.T, like=xs)  # XLA drops it when the inputs need no gradient
  # (explicit sharding mode: each gradient split over the mesh as its parameter is, and
  # the inputs' as they are: replicated inputs with a carry split over the batch)
  return _scan.typed_as((dw_i, db, dw_h, dextra), params), _scan.typed_as(dxs, xs)
