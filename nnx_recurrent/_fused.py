"""Fused multi-layer ``LSTM`` and ``GRU`` layers with a hand-written backward pass.

The generic :class:`~nnx_recurrent.RNN` scans any cell and lets JAX
differentiate the scan. For the two cells that matter most this module does the
work a cuDNN/oneDNN kernel does, in plain JAX:

* For small batches the input projection ``x @ W_i`` of every time step is
  ONE matmul over the whole (time-major) sequence, hoisted out of the loop;
  only ``h @ W_h`` stays inside (the bias is added in the loop's elementwise
  step, which costs nothing there and saves a pass over ``(time, batch,
  gates)``). For batches of ``_HOIST_MAX_ROWS`` rows or more the per-step
  matmuls already run at the matmul peak and the hoisted array only costs
  memory traffic, so ``x_t @ W_i`` stays in the loop, and the LSTM does one
  matmul of ``[x_t, h]`` against ``[W_i; W_h]`` per step (under a gradient
  below ``_JOINT_MAX_ROWS`` rows, and for tiny steps, whose time is their
  number of operations). The forward under a gradient (which also saves
  residuals) may be scanned differently from the plain forward (see
  :func:`_plan`; all measured, see ``benchmarks/RESULTS.md``). The backward
  pass is the same in every case.
* The recurrence, input projection included, is a :func:`jax.custom_vjp`. Its
  forward scan saves one residual per step: the activated gates and the carry
  that entered the step. Its backward is one reverse :func:`jax.lax.scan`
  doing one matmul per step (``dgates @ W_h^T``, with ``W_h^T`` transposed
  once before the loop); the weight gradients ``dW_h = h_prev_all^T @
  dgates_all`` and ``dW_i = x_all^T @ dgates_all`` are ONE large matmul each
  after the loop, and so is the input gradient. (On the CPU a GRU step of
  ``_GRU_AUTODIFF_MIN_ROWS`` rows or more is differentiated by JAX instead:
  measured faster there, see :func:`_plan`.)
* Padding (``seq_lengths``) is carry selection inside both scans
  (``where(valid, new, old)``): no extra passes over the sequence.
* Each step's slice of the sequence arrives through the loop carry, fetched
  one step ahead (:func:`_prefetch_scan`): XLA's CPU backend emits scalar code
  for an elementwise fusion that reads a dynamic slice, so the gate math of a
  plain ``scan`` over ``xs`` runs several times slower than it has to.
* The reverse direction goes through :func:`_scan.reverse_indices` /
  :func:`_scan.take_time`, validation and layout through :func:`_scan.prepare`:
  the same core as ``RNN`` and ``Bidirectional``; the LSTM cell update is
  :func:`_base.lstm_update`, the cells' own.

The parameters live in ordinary cells (:class:`OptimizedLSTMCell`,
:class:`GRUCell`), so the layout is that of the cells and the fused layer is
numerically the composition of ``RNN`` / ``Bidirectional`` over them (the
tests check values and gradients against it, and against NumPy). The gate
nonlinearities are the cells' defaults (sigmoid, tanh), whose derivatives the
backward pass hard-codes.

Backends: :meth:`_FusedBase._run_layer` is the single place that turns one
layer (one or both directions) into ``(final_carries, outputs)``. With
``implementation='cudnn'`` (LSTM, CUDA GPU, float32) a layer goes through cuDNN
(:func:`_cudnn_layer`, via ``jax.experimental.rnn.lstm``: both directions in
one call, the weights packed into cuDNN's flat layout on the fly, so the
parameters and their gradients stay the cells'). Otherwise, and by default
(``'auto'``: cuDNN through JAX measured slower than the scans on an H200), the
scans above. Dropout between layers is this module's in both cases, so the two
backends compute the same function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype, Initializer

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import (
  _NO_METADATA,
  Array,
  RngsLike,
  default_bias_init,
  default_kernel_init,
  default_recurrent_kernel_init,
  lstm_update,
)
from nnx_recurrent._gru import GRUCell
from nnx_recurrent._lstm import OptimizedLSTMCell

# How a direction is scanned, chosen from the shapes of one step (measured on 2
# CPU cores, see benchmarks/RESULTS.md):
# * 'hoisted': the input projection of every step is one matmul before the
#   loop. For steps with fewer rows (batch elements) than _HOIST_MAX_ROWS:
#   then the per-step matmuls are too small to use both cores. With more rows
#   they run at the matmul peak inside the loop ('loop'), and the hoisted
#   (time, batch, gates) array only costs memory traffic and page faults (20%
#   slower forward at batch 256).
# * A step with fewer gate pre-activations (rows * gates * H) than _TINY_STEP
#   costs its number of operations, not its arithmetic (a (1, 64) x (64, 256)
#   matmul is ~0.6 us of call overhead). Without a gradient such a step does
#   ONE matmul, [x_t, h] against the stacked weights ('joint'; 1.49 vs 1.83 ms
#   for two matmuls unrolled twice at (1, 1000, 32, 64)). Not for the GRU,
#   whose joint weight needs a zero block for ``h W_hn`` (1.41 vs 1.21 ms for
#   two matmuls, the same as flax's). Under a gradient, whose forward also
#   writes residuals, hoisting and unrolling twice was fastest (training step
#   5.6 vs 6.6 ms in the loop, 7.0 joint). Their backward scan runs two
#   steps per iteration (_prefetch_scan's ``pairs``): LSTM training step
#   0.88-0.94x at (1, 1000, 32, 64) in four A/B runs, the GRU's 0.90-1.02x;
#   at (8, 500, 64, 128) it made no difference.
# * At 64 rows (64, 100, 128, 256) the joint matmul made the LSTM's training
#   step 0.96x flax's vs 1.00x for two matmuls. At 256 rows it made no
#   difference (0.98-1.13x both), so it stops at _JOINT_MAX_ROWS. The forward
#   without a gradient uses two matmuls from _HOIST_MAX_ROWS rows on: with the
#   per-gate activations below it is then flax's own loop body, and it took
#   0.93x the joint forward's time at 64 rows (31 interleaved rounds).
# * Without a gradient the LSTM step activates each gate on its own
#   (``_LSTMMath.step``'s ``save``) instead of the one-tanh form, which writes
#   all four activations out as residuals need: forward 0.94-0.98x at all four
#   benchmark shapes (A/B runs of 9-21 rounds).
# * Otherwise scans are not unrolled: an unrolled step reads the next step's
#   slice straight from the sequence again (see _prefetch_scan), and 2, 4 or 8
#   were slower.
# * On the CPU, a GRU step of _GRU_AUTODIFF_MIN_ROWS rows or more is
#   differentiated by JAX (the forward scan without the custom VJP):
#   training step 0.90-0.92x the custom backward's at 128 and 256 rows (both
#   after the same forward; at 64 rows the two were equal, at 8 the custom
#   one is 0.5x). With that many rows the per-step weight-gradient matmuls
#   JAX does inside its backward loop run near the peak, and the custom
#   backward's stacked gate gradients and their concatenation (78 MB each at
#   (256, 50, 256, 512)) cost more than they save. Not for the LSTM (its
#   custom backward, with transposed weight-gradient matmuls, is 0.91x flax's
#   at 256 rows where JAX's is 1.05x), nor on a GPU (there the fused GRU's
#   training step took 0.72x flax's at 256 rows, the generic one 1.06x).
_HOIST_MAX_ROWS = 32
_JOINT_MAX_ROWS = 128
_TINY_STEP = 1024
_TRANSPOSE_MIN_MACS = 2**32  # see _flat_dot_t
_GRU_AUTODIFF_MIN_ROWS = 128


class _ScanPlan(NamedTuple):
  """How one forward scan computes its gate pre-activations."""

  inputs: str  # 'hoisted', 'loop' or 'joint' (see above)
  prefetch: bool  # the scan fetches the next step's input in the carry
  unroll: int


class _Plan(NamedTuple):
  primal: _ScanPlan  # the forward pass when no gradient is taken
  train: _ScanPlan  # the forward pass under a gradient (it saves residuals)
  # The backward scan always prefetches and is not unrolled (2 was not faster).
  # False: no custom VJP, JAX differentiates the ``primal`` forward scan.
  custom_vjp: bool = True
  # The backward scan runs two steps per iteration (``_prefetch_scan``'s ``pairs``).
  backward_pairs: bool = False


def _plan(cell_math, rows: int, gate_width: int) -> _Plan:
  loop = _ScanPlan('loop', prefetch=False, unroll=1)
  if cell_math.autodiff_min_rows is not None and rows >= cell_math.autodiff_min_rows \
      and _cpu_backend():
    return _Plan(primal=loop, train=loop, custom_vjp=False)
  in_loop = 'joint' if cell_math.joint else 'loop'
  if rows * gate_width < _TINY_STEP:
    return _Plan(primal=_ScanPlan(in_loop, prefetch=False, unroll=1),
                 train=_ScanPlan('hoisted', prefetch=False, unroll=2), backward_pairs=True)
  if rows < _HOIST_MAX_ROWS:
    # Prefetching is for the hoisted projections, which feed the gate math; an
    # input step feeds the matmul, whose operand XLA copies out anyway.
    scan = _ScanPlan('hoisted', prefetch=True, unroll=1)
    return _Plan(primal=scan, train=scan)
  if rows < _JOINT_MAX_ROWS:  # the joint matmul pays under a gradient only
    return _Plan(primal=loop, train=_ScanPlan(in_loop, prefetch=False, unroll=1))
  return _Plan(primal=loop, train=loop)


def _row(v: Array, ndim: int) -> Array:
  """A ``(features,)`` vector reshaped to broadcast against ``ndim`` axes."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _dot(a: Array, b: Array) -> Array:
  """``a @ b`` contracting the last axis of ``a`` with the first of ``b``."""
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def _shift(first: Array, seq: Array) -> Array:
  """``[first, seq[0], ..., seq[T-2]]``: the value entering each step."""
  return jnp.concatenate([first[None], seq], axis=0)[: seq.shape[0]]


def _flat_dot_t(a: Array, b: Array, transpose: bool = False) -> Array:
  """``sum over all leading axes of a^T b``: ``(..., m), (..., n) -> (m, n)``.

  With ``transpose``, a large one is computed as ``a^T`` materialised times
  ``b`` (an ``optimization_barrier`` keeps XLA from folding the transpose back
  into the dot): XLA:CPU runs a dot contracting both operands' first axis
  outside YNNPACK's fast path. The LSTM's weight gradients at (256, 50, 256,
  512) took 257 instead of 317 ms (training step 0.93-0.94x); the GRU's
  training step got 1.02-1.03x slower, so its math class does not ask for it.
  Below ``_TRANSPOSE_MIN_MACS`` the copy does not pay (and its scratch memory
  can push the step over glibc's 32 MiB mmap threshold, see
  ``benchmarks/RESULTS.md``).
  """
  a2 = a.reshape(-1, a.shape[-1])
  b2 = b.reshape(-1, b.shape[-1])
  if transpose and a2.shape[0] * a2.shape[1] * b2.shape[1] >= _TRANSPOSE_MIN_MACS:
    return _dot(jax.lax.optimization_barrier(a2.T), b2)
  return jax.lax.dot_general(a2, b2, (((0,), (0,)), ((), ())))


# -- pointwise math of one step, forward and backward ---------------------------
_LSTM_SIGMOID_GATES = (True, True, False, True)  # i, f, g, o: g is the tanh one


def _identity(a):
  return a


def _gate_columns(width: int, sigmoid: tuple[bool, ...]) -> Array:
  """Per-column booleans over ``width`` columns: True in the sigmoid gate blocks."""
  return jnp.asarray(np.repeat(np.asarray(sigmoid), width // len(sigmoid)))


def _gate_activations(z: Array, sigmoid: tuple[bool, ...]) -> Array:
  """sigmoid or tanh per gate block, as ONE elementwise op over all gates.

  ``sigmoid(x) = 0.5 + 0.5 * tanh(x / 2)``: one tanh per element, so XLA
  emits a single loop over ``(batch, gates * H)`` instead of one per gate.
  """
  is_sig = _row(_gate_columns(z.shape[-1], sigmoid), z.ndim)
  half = jnp.asarray(0.5, z.dtype)
  t = jnp.tanh(jnp.where(is_sig, half * z, z))
  return jnp.where(is_sig, half + half * t, t)


def _gate_derivatives(act: Array, sigmoid: tuple[bool, ...]) -> Array:
  """``d act / d z`` from the activations: ``a (1 - a)`` or ``1 - a^2`` per block."""
  is_sig = _row(_gate_columns(act.shape[-1], sigmoid), act.ndim)
  return jnp.where(is_sig, act * (1.0 - act), 1.0 - act * act)


# Each step saves ONE residual array ``(*batch, 5 * H)`` holding everything its
# backward needs (activated gates and the carry that entered the step), so the
# backward scan fetches one slice per step and recomputes nothing but a tanh.
class _LSTMMath:
  """LSTM step given ``xp = x W_i`` and ``hp = h W_h``; gates ``i, f, g, o``."""

  joint = True  # has joint_weight / split_joint: one matmul per step (see _plan)
  transpose_dw = True  # weight gradients through a materialised transpose (_flat_dot_t)
  autodiff_min_rows = None  # always the custom VJP (see _plan)

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
    z = z + _row(b, z.ndim)
    if not save:
      # Nothing to save: each gate's activation fuses into the op that uses it,
      # as in the cell (the one-tanh form materialises all four, see _plan).
      i, f, g, o = jnp.split(z, 4, axis=-1)
      return lstm_update(c, i, f, g, o, jax.nn.sigmoid, jnp.tanh), None
    act = _gate_activations(z, _LSTM_SIGMOID_GATES)
    i, f, _, o = jnp.split(act, 4, axis=-1)
    # The cells' update (identity gate_fn: i, f, o are activated already).
    new_c, new_h = lstm_update(c, i, f, jnp.split(z, 4, axis=-1)[2], o, _identity, jnp.tanh)
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
    dz = upstream * _gate_derivatives(act, _LSTM_SIGMOID_GATES)  # d of i, f, g, o's inputs
    return (dc * f, jnp.zeros_like(dh)), dz, dz

  @staticmethod
  def add_h(dcarry, dh):
    return (dcarry[0], dcarry[1] + dh)

  @staticmethod
  def grads(dz, res, carry0, ys, extra):
    """``(dW_h, d xp, d extra)`` from the stacked outputs of the backward scan."""
    del res, extra
    # h entering step t is ys[t - 1] (valid steps are a prefix), h0 for t = 0.
    return _flat_dot_t(_shift(carry0[1], ys), dz, _LSTMMath.transpose_dw), dz, None


class _GRUMath:
  """GRU step given ``xp = x W_i`` and ``hp = h W_h``; gates ``r, z, n``."""

  joint = False  # a joint weight would need a zero block for h W_hn: measured slower
  transpose_dw = False
  autodiff_min_rows = _GRU_AUTODIFF_MIN_ROWS  # on the CPU (see _plan)

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
    xr, xz, xn = jnp.split(xp_t + _row(b, xp_t.ndim), 3, axis=-1)
    hr, hz, hn = jnp.split(hp_t, 3, axis=-1)
    hn = hn + _row(b_hn, hn.ndim)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    new_h = (1.0 - z) * n + z * h
    return new_h, jnp.concatenate([r, z, n, hn, h], axis=-1)

  @staticmethod
  def step_bwd(res_t, dh, dy_t):
    r, z, n, hn, h_prev = jnp.split(res_t, 5, axis=-1)
    dh = dh + dy_t
    dan = dh * (1.0 - z) * (1.0 - n * n)  # d of n's pre-activation
    dhp = jnp.concatenate(
      [dan * hn * r * (1.0 - r), dh * (h_prev - n) * z * (1.0 - z), dan * r], axis=-1
    )
    return dh * z, (dhp, dan), dhp

  @staticmethod
  def add_h(dcarry, dh):
    return dcarry + dh

  @staticmethod
  def grads(d_all, res, carry0, ys, b_hn):
    del carry0, ys
    dhp, dan = d_all
    h = b_hn.shape[-1]
    dw_h = _flat_dot_t(res[..., 4 * h:], dhp)
    dxp = jnp.concatenate([dhp[..., : 2 * h], dan], axis=-1)
    db_hn = dhp[..., 2 * h:].reshape(-1, h).sum(axis=0)
    return dw_h, dxp, db_hn


# -- the scans ------------------------------------------------------------------
def _prefetch_scan(step, carry, xs, *, length: int, reverse: bool, unroll: int,
                   prefetch: bool = True, pairs: bool = False):
  """``lax.scan`` over time whose step ``t`` receives ``xs[t]`` in its carry.

  Step ``t`` fetches ``xs[t + 1]`` (``xs[t - 1]`` in reverse) for the next step.
  Then no elementwise fusion of the step reads a dynamic slice: XLA's CPU
  backend does not vectorise a loop fusion that contains one (it reloads the
  index for every element), which made the gate math several times slower.
  ``prefetch=False`` is a plain ``lax.scan`` (fewer operations per step, which
  wins when a step is tiny). ``pairs`` (with ``prefetch``, for an even
  ``length``): each iteration runs two steps on the pair of slices fetched by
  the previous one, so the loop's own operations (the carried slices' copies,
  the index) are paid once per two steps; ``unroll`` is then not used.
  """
  if not prefetch:
    return jax.lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)
  if pairs and length % 2 == 0:
    return _pair_scan(step, carry, xs, length=length, reverse=reverse)

  def fetch(t):
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, t, 0, False), xs)

  step_dir = -1 if reverse else 1

  def body(state, t):
    c, cur = state
    nxt = fetch(jnp.clip(t + step_dir, 0, length - 1))
    c, y = step(c, cur)
    return (c, nxt), y

  first = length - 1 if reverse else 0
  (carry, _), ys = jax.lax.scan(body, (carry, fetch(first)), jnp.arange(length),
                                reverse=reverse, unroll=unroll)
  return carry, ys


def _pair_scan(step, carry, xs, *, length: int, reverse: bool):
  """:func:`_prefetch_scan` two steps per iteration (``length`` even)."""
  n = length // 2

  def fetch(j):  # steps 2j and 2j + 1, one dynamic slice per array
    return jax.tree_util.tree_map(lambda a: jax.lax.dynamic_slice_in_dim(a, 2 * j, 2, 0), xs)

  order = (1, 0) if reverse else (0, 1)

  def body(state, j):
    c, pair = state
    nxt = fetch(jnp.clip(j + (-1 if reverse else 1), 0, n - 1))
    ys = [None, None]
    for k in order:  # static slices of the pair: no dynamic slice in the step's fusions
      c, ys[k] = step(c, jax.tree_util.tree_map(lambda a, k=k: a[k], pair))
    return (c, nxt), jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), *ys)

  (carry, _), ys = jax.lax.scan(body, (carry, fetch(n - 1 if reverse else 0)), jnp.arange(n),
                                reverse=reverse)
  return carry, jax.tree_util.tree_map(lambda a: a.reshape((length,) + a.shape[2:]), ys)


def _forward_scan(cell_math, plan: _ScanPlan, params, xs, carry0, valid, save: bool = False):
  """``(final_carry, ys, residuals)``; the residuals only with ``save``."""
  w_i, b, w_h, extra = params
  if plan.inputs == 'hoisted':  # every step's projection in one matmul
    seq = _dot(xs, w_i)

    def preactivations(xp_t, h):
      return xp_t, _dot(h, w_h)
  elif plan.inputs == 'joint':  # one matmul per step: [x_t, h] [W_i; W_h]
    seq, w_joint = xs, cell_math.joint_weight(w_i, w_h)

    def preactivations(x_t, h):
      return cell_math.split_joint(_dot(jnp.concatenate([x_t, h], axis=-1), w_joint))
  else:
    seq = xs

    def preactivations(x_t, h):
      return _dot(x_t, w_i), _dot(h, w_h)

  def step(carry, inp):
    x_t, v_t = inp
    new_carry, res = cell_math.step(carry, *preactivations(x_t, cell_math.h(carry)), b, extra,
                                    save)
    y = cell_math.h(new_carry)
    if v_t is not None:
      new_carry = _scan.select(v_t, new_carry, carry)
      y = _scan.select(v_t, y, jnp.zeros_like(y))
    return new_carry, (y, res)

  carry, (ys, res) = _prefetch_scan(step, carry0, (seq, valid), length=xs.shape[0],
                                    reverse=False, unroll=plan.unroll, prefetch=plan.prefetch)
  return carry, ys, res


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(cell_math, plan, params, xs, carry0, valid):
  """``(final_carry, ys)`` of one cell over time-major ``xs``.

  ``params`` is ``(W_i, b, W_h, extra)`` (``extra``: the GRU's ``b_hn``).
  ``valid`` (``(time, *batch)`` booleans or ``None``) must be a prefix mask
  (what ``seq_lengths`` gives): the LSTM backward reads ``h_prev`` off ``ys``.
  """
  carry, ys, _ = _forward_scan(cell_math, plan.primal, params, xs, carry0, valid)
  return carry, ys


def _recurrence_fwd(cell_math, plan, params, xs, carry0, valid):
  carry, ys, res = _forward_scan(cell_math, plan.train, params, xs, carry0, valid, save=True)
  return (carry, ys), (params, xs, carry0, ys, res, valid)


def _recurrence_bwd(cell_math, plan, saved, cotangents):
  (w_i, b, w_h, extra), xs, carry0, ys, res, valid = saved
  dcarry_final, dys = cotangents
  w_h_t = w_h.T  # transposed once, outside the loop

  def step(dcarry, inp):
    res_t, dy_t, v_t = inp
    d_direct, d_t, dhp = cell_math.step_bwd(res_t, dcarry, dy_t)
    d_prev = cell_math.add_h(d_direct, _dot(dhp, w_h_t))
    if v_t is not None:  # a padding step passed the carry through unchanged
      d_prev = _scan.select(v_t, d_prev, dcarry)
      d_t = jax.tree_util.tree_map(lambda d: _scan.select(v_t, d, jnp.zeros_like(d)), d_t)
    return d_prev, d_t

  dcarry0, d_all = _prefetch_scan(step, dcarry_final, (res, dys, valid), length=xs.shape[0],
                                  reverse=True, unroll=1, pairs=plan.backward_pairs)
  # The weight gradients: one large matmul each, for the whole sequence.
  dw_h, dxp, dextra = cell_math.grads(d_all, res, carry0, ys, extra)
  dw_i = _flat_dot_t(xs, dxp, cell_math.transpose_dw)
  db = dxp.reshape(-1, dxp.shape[-1]).sum(axis=0)
  dxs = _dot(dxp, w_i.T)  # XLA drops it when the inputs need no gradient
  return (dw_i, db, dw_h, dextra), dxs, dcarry0, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# -- cuDNN (jax.experimental.rnn) -------------------------------------------------
IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


@functools.cache
def _cpu_backend() -> bool:
  """True when JAX's default backend is the CPU (``_plan``'s measurements)."""
  return jax.default_backend() == 'cpu'


@functools.cache
def _cuda_backend() -> bool:
  """True when JAX's default backend is an NVIDIA GPU (ROCm's MIOpen packs
  the gates in another order and is not supported)."""
  try:
    device = jax.devices()[0]
    return device.platform == 'gpu' and 'rocm' not in device.client.platform_version.lower()
  except RuntimeError:  # no backend at all
    return False


def _cudnn_unsupported(dtype) -> str | None:
  """Why cuDNN cannot run this computation (``None``: it can)."""
  if not _cuda_backend():
    return f'needs a CUDA GPU, and the default backend is {jax.default_backend()!r}'
  if jnp.dtype(dtype) != jnp.float32:
    return f'runs float32 only, and the computation dtype is {jnp.dtype(dtype).name}'
  precision = jax.config.jax_default_matmul_precision
  if precision is not None and str(precision).lower() not in _CUDNN_PRECISIONS:
    return f'has no matmul precision {precision!r} (jax_default_matmul_precision)'
  return None


# Names of lax.Precision.HIGH and HIGHEST (TF32 on or off: the two cuDNN modes).
_CUDNN_PRECISIONS = ('high', 'bfloat16_3x', 'tensorfloat32', 'highest', 'float32')


def _cudnn_lstm(x, h0, c0, weights, lengths, *, input_size, hidden_size, bidirectional):
  """``jax.experimental.rnn.lstm`` for one layer: ``(y, h_n, c_n)``, batch-major.

  Tests replace this with ``jax.experimental.rnn.lstm_ref`` (the same function
  in plain JAX) to check everything around it on the CPU.
  """
  from jax.experimental import rnn

  return rnn.lstm(x, h0, c0, weights, lengths, input_size=input_size, hidden_size=hidden_size,
                  num_layers=1, dropout=0.0, bidirectional=bidirectional)


def _cudnn_weights(cells, dtype) -> Array:
  """The cells' parameters in cuDNN's flat layout (see ``jax.experimental.rnn``):
  ``W_ih, W_hh`` of each direction, then ``b_ih, b_hh`` of each. Gates ``i, f,
  g, o`` are cuDNN's order already; our one bias is ``b_ih`` and ``b_hh`` is
  zero (its gradient, equal to ``b_ih``'s, is dropped)."""
  mats, biases = [], []
  for cell in cells:
    w_i, b, w_h, _ = _LSTMMath.params(cell)
    mats += [w_i.T.reshape(-1), w_h.T.reshape(-1)]  # (4H, I) and (4H, H), row-major
    biases += [b, jnp.zeros_like(b)]
  return jnp.concatenate([a.astype(dtype) for a in mats + biases])


def _row_major(*arrays: Array) -> list[Array]:
  """The arrays in row-major memory layout, and their cotangents too.

  cuDNN's custom calls (``jax.experimental.rnn``) read their operands as
  row-major but do not tell XLA so: under ``jit`` XLA may turn the transpose
  that makes ``x`` batch-major into a layout change, and cuDNN then reads
  time-major memory as batch-major (wrong results, no error: measured on an
  H200 with jax 0.11.2; jax-ml/jax#19177). A layout constraint is linear, so
  its transpose constrains the cotangents that the backward call reads.
  """
  from jax.experimental.layout import Layout, with_layout_constraint

  return [with_layout_constraint(a, Layout(tuple(range(a.ndim)))) for a in arrays]


def _cudnn_layer(cells, xs: Array, carries, seq_lengths: Array | None, dtype):
  """One LSTM layer, one or both directions, through cuDNN.

  ``xs`` is time-major ``(time, *batch, features)``, ``carries`` one ``(c, h)``
  per direction. Returns ``(finals, ys)`` as the scans do: ``ys`` time-major,
  the backward direction's outputs in input order after the forward's.
  """
  time, batch, features = xs.shape[0], xs.shape[1:-1], xs.shape[-1]
  n, hidden = math.prod(batch), cells[0].hidden_features
  x = jnp.swapaxes(xs.reshape(time, n, features), 0, 1).astype(dtype)
  c0 = jnp.stack([c.reshape(n, hidden) for c, _ in carries]).astype(dtype)
  h0 = jnp.stack([h.reshape(n, hidden) for _, h in carries]).astype(dtype)
  if seq_lengths is None:
    lengths = jnp.full((n,), time, jnp.int32)
  else:  # out-of-range lengths act as the scans treat them (see _checks.check_seq_lengths)
    lengths = jnp.clip(seq_lengths.reshape(n), 0, time).astype(jnp.int32)
  x, h0, c0 = _row_major(x, h0, c0)
  # cuDNN fails on zero lengths (jax-ml/jax#17966): run one step, then undo it.
  out = _cudnn_lstm(x, h0, c0, _cudnn_weights(cells, dtype), jnp.maximum(lengths, 1),
                    input_size=features, hidden_size=hidden, bidirectional=len(cells) == 2)
  y, h_n, c_n = _row_major(*out)  # and their cotangents, the backward call's operands
  if seq_lengths is not None:
    empty = lengths == 0
    y = jnp.where(empty[:, None, None], jnp.zeros_like(y), y)
    c_n = jnp.where(empty[None, :, None], c0, c_n)
    h_n = jnp.where(empty[None, :, None], h0, h_n)
  ys = jnp.swapaxes(y, 0, 1).reshape(time, *batch, y.shape[-1])
  finals = [(c_n[d].reshape(*batch, hidden).astype(c.dtype),
             h_n[d].reshape(*batch, hidden).astype(h.dtype))
            for d, (c, h) in enumerate(carries)]
  return finals, ys


# -- the layers -----------------------------------------------------------------
def _first(*values):
  return next(v for v in values if v is not None)


class _FusedBase(nnx.Module):
  _cell_type: type
  _math: Any
  _cudnn: bool  # has a cuDNN path (_cudnn_layer)

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    time_major: bool = False,
    return_carry: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
    bias_init: Initializer = default_bias_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    implementation: str = 'auto',
    rngs: nnx.Rngs,
  ):
    where = type(self).__name__
    supported = IMPLEMENTATIONS if self._cudnn else ('auto', 'xla')
    if implementation not in supported:
      why = '' if self._cudnn else ' (jax.experimental.rnn has a cuDNN LSTM only)'
      _checks.fail(where, 'implementation', ' or '.join(map(repr, supported)) + why,
                   repr(implementation))
    self.implementation = implementation
    self.in_features = _checks.check_positive_int(where, 'in_features', in_features)
    self.hidden_features = _checks.check_positive_int(where, 'hidden_features', hidden_features)
    self.num_layers = _checks.check_positive_int(where, 'num_layers', num_layers)
    self.dropout_rate = _checks.check_rate(where, 'dropout_rate', dropout_rate)
    if not isinstance(rngs, nnx.Rngs):
      _checks.fail(where, 'rngs', 'an nnx.Rngs', type(rngs).__name__, TypeError)
    self.bidirectional = bool(bidirectional)
    self.time_major = time_major
    self.return_carry = return_carry
    kw = dict(kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
              bias_init=bias_init, dtype=dtype, param_dtype=param_dtype,
              kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
              bias_metadata=bias_metadata, rngs=rngs)
    width = hidden_features * self.num_directions
    forward, backward = [], []
    for layer in range(self.num_layers):
      n_in = self.in_features if layer == 0 else width
      forward.append(self._cell_type(n_in, self.hidden_features, **kw))
      if self.bidirectional:
        backward.append(self._cell_type(n_in, self.hidden_features, **kw))
    self.forward = nnx.List(forward)
    self.backward = nnx.List(backward) if self.bidirectional else nnx.data(None)
    # Between layers only; no PRNG state unless it is needed.
    self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs if self.dropout_rate else None)

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  def _cells(self, layer: int) -> list:
    return [self.forward[layer]] + ([self.backward[layer]] if self.bidirectional else [])

  def _default_carry(self, batch_shape: tuple[int, ...]):
    per_layer = []
    for layer in range(self.num_layers):
      carries = [cell.initialize_carry(batch_shape + (cell.in_features,))
                 for cell in self._cells(layer)]
      per_layer.append(carries[0] if len(carries) == 1 else tuple(carries))
    return self._public_carry(per_layer)

  def _public_carry(self, per_layer: list):
    if self.num_layers == 1 and not self.bidirectional:
      return per_layer[0]
    return tuple(per_layer)

  def _dtype(self, cell, xs: Array):
    """The cell's computation dtype (nnx.Linear's promotion of inputs and parameters)."""
    params = self._math.params(cell)
    return cell.dtype or jnp.result_type(xs.dtype, *jax.tree_util.tree_leaves(params))

  def _run_layer(self, layer: int, xs: Array, carries, valid, idx, seq_lengths):
    """One layer over time-major ``xs``: ``(finals, ys)``, one final carry per
    direction (the backend switch: cuDNN or the scans)."""
    cells = self._cells(layer)
    dtype = self._dtype(cells[0], xs)
    # 'auto' is the scans everywhere: through jax.experimental.rnn, cuDNN measured
    # slower than them on an H200 at three of the four benchmark shapes and at
    # most 13% faster at the fourth (benchmarks/RESULTS.md, "GPU").
    if self.implementation == 'cudnn' and xs.size:
      reason = _cudnn_unsupported(dtype)
      if reason is not None:
        _checks.fail(type(self).__name__, 'implementation',
                     f"'auto' or 'xla' here (cuDNN {reason})", "'cudnn'")
      try:
        return _cudnn_layer(cells, xs, carries, seq_lengths, dtype)
      except NotImplementedError as e:  # jax.vmap: the primitives have no batching rule
        if 'Batching rule' not in str(e):
          raise
        _checks.fail(type(self).__name__, 'implementation',
                     "'auto' or 'xla' under jax.vmap (jax.experimental.rnn's cuDNN "
                     'primitives have no batching rule)', "'cudnn'")
    finals, ys = [], []
    for d, cell in enumerate(cells):
      x = xs if d == 0 else _scan.take_time(xs, idx)  # the backward direction: each row reversed
      final, y = self._run_direction(cell, x, carries[d], valid)
      finals.append(final)
      ys.append(y if d == 0 else _scan.take_time(y, idx))
    return finals, (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1))

  def _run_direction(self, cell, xs: Array, carry, valid: Array | None):
    """One cell over time-major ``xs``: ``(final_carry, ys)`` with the scans."""
    params = self._math.params(cell)
    dtype = self._dtype(cell, xs)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    carry_in = jax.tree_util.tree_map(lambda a: a.astype(dtype), carry)
    if xs.shape[0] == 0:  # nothing to scan: the carry passes through
      return carry, jnp.zeros(xs.shape[:-1] + (self.hidden_features,), dtype)
    plan = _plan(self._math, math.prod(xs.shape[1:-1]), params[2].shape[-1])
    xs = xs.astype(dtype)
    if plan.custom_vjp:
      final, ys = _recurrence(self._math, plan, params, xs, carry_in, valid)
    else:  # JAX differentiates the forward scan (its unused residuals are dropped)
      final, ys, _ = _forward_scan(self._math, plan.primal, params, xs, carry_in, valid)
    final = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), final, carry)
    return final, ys

  def __call__(
    self,
    inputs: Array,
    *,
    initial_carry: Any = None,
    seq_lengths: Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    rngs: RngsLike = None,
  ):
    """Runs the stack over ``inputs``.

    Args:
      inputs: ``(*batch, time, in_features)`` (or time first).
      initial_carry: in the structure described in the class docstring;
        default zeros.
      seq_lengths: integer ``(*batch)`` lengths; steps at or past a row's
        length are padding (zero outputs, carry unchanged).
      return_carry, time_major: override the attributes.
      rngs: dropout RNG (an ``nnx.Rngs``, ``RngStream`` or key), overriding
        the one given at construction.

    Returns:
      ``outputs``, or ``(final_carry, outputs)`` with ``return_carry``.
    """
    where = type(self).__name__
    return_carry = _first(return_carry, self.return_carry)
    time_major = _first(time_major, self.time_major)
    seq = _scan.prepare(where, inputs, num_feature_axes=1, in_features=self.in_features,
                        time_major=time_major, seq_lengths=seq_lengths)
    if initial_carry is None:
      initial_carry = self._default_carry(seq.batch_shape)
    else:
      expected = jax.eval_shape(lambda: self._default_carry(seq.batch_shape))
      _checks.check_tree_matches(where, 'initial_carry', initial_carry, expected)
    if self.num_layers == 1 and not self.bidirectional:
      initial_carry = (initial_carry,)
    idx = None
    if self.bidirectional:
      idx = _scan.reverse_indices(seq.time, seq.batch_shape, seq.seq_lengths)
    valid = seq.masks.valid
    xs = seq.xs
    finals = []
    for layer in range(self.num_layers):
      if layer:
        xs = self.dropout(xs, rngs=rngs)
      layer_carry = initial_carry[layer]
      carries = tuple(layer_carry) if self.bidirectional else (layer_carry,)
      final, xs = self._run_layer(layer, xs, carries, valid, idx, seq.seq_lengths)
      finals.append(tuple(final) if self.bidirectional else final[0])
    ys = _scan.restore_layout(xs, time_major, len(seq.batch_shape))
    return (self._public_carry(finals), ys) if return_carry else ys


_LAYER_DOC = """
  Same call convention as :class:`~nnx_recurrent.RNN`: inputs ``(*batch,
  time, in_features)`` (or time first with ``time_major``), ``seq_lengths``
  marks padding, whose outputs are zero and which leaves the carry unchanged.
  Outputs are ``(*batch, time, hidden_features * num_directions)``, the
  forward and backward directions concatenated on the last axis; the backward
  direction reverses each row within its valid length.

  Carry (``initial_carry`` in, ``return_carry`` out):

  * ``num_layers == 1`` and not ``bidirectional``: the cell's carry, exactly as
    ``nr.RNN`` over that cell returns it ({carry}).
  * otherwise: a tuple with one entry per layer; each entry is the cell's
    carry, or ``(carry_forward, carry_backward)`` when ``bidirectional``.

  Parameters live in ordinary cells: ``forward`` is an ``nnx.List`` of one
  :class:`~nnx_recurrent.{cell}` per layer and ``backward`` the same for the
  backward direction (``None`` unless ``bidirectional``). Layer ``l > 0`` has
  ``in_features = hidden_features * num_directions``. The layer computes
  exactly what ``RNN`` / ``Bidirectional`` stacked over these cells compute
  (up to float rounding), with dropout between layers (not after the last),
  but faster: see the module docstring of ``nnx_recurrent._fused``.

  Args:
    in_features: size of the last input axis.
    hidden_features: size of each direction's hidden state.
    num_layers: number of stacked layers.
    bidirectional: run a backward direction too and concatenate.
    dropout_rate: dropout on the inputs of layers ``1 .. num_layers - 1``
      (an ``nnx.Dropout`` in ``.dropout``: ``.eval()`` turns it off; it draws
      from the ``dropout`` stream, and holds no PRNG state when the rate is 0).
    time_major: inputs are ``(time, *batch, features)``.
    return_carry: return ``(carry, outputs)`` instead of ``outputs``.
    dtype: computation dtype (default: inferred from inputs and parameters).
    param_dtype: parameter and carry dtype.
    kernel_init, recurrent_kernel_init, bias_init: initializers of the cells.
    kernel_metadata, recurrent_kernel_metadata, bias_metadata: metadata of every
      cell's parameters (e.g. ``{{'out_sharding': (None, 'model')}}``), as for the cells.
    implementation: {implementation}
    rngs: ``nnx.Rngs`` for the parameters (and dropout).
"""


class LSTM(_FusedBase):
  __doc__ = (
    """Multi-layer LSTM with a fused, hand-differentiated recurrence.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> lstm = nr.LSTM(3, 5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 7, 3))
    >>> carry, y = lstm(x, seq_lengths=jnp.array([7, 4]), return_carry=True)
    >>> y.shape, bool((y[1, 4:] == 0).all())
    ((2, 7, 10), True)
    >>> (c_fwd, h_fwd), (c_bwd, h_bwd) = carry[1]  # last layer
    >>> h_fwd.shape
    (2, 5)
    >>> single = nr.LSTM(3, 5, rngs=nnx.Rngs(0))
    >>> (c, h), y = single(x, return_carry=True)  # as nr.RNN(OptimizedLSTMCell)
    >>> bool((h == y[:, -1]).all())
    True
"""
    + _LAYER_DOC.format(carry='``(c, h)``', cell='OptimizedLSTMCell', implementation="""``'auto'``
      (default) or ``'xla'``: the XLA scans, on every backend (on an H200,
      cuDNN through ``jax.experimental.rnn`` took 1.24-1.43x their training
      step at three of the four benchmark shapes, 0.87-0.99x at batch 256);
      ``'cudnn'``: cuDNN via ``jax.experimental.rnn`` (CUDA GPU, float32 only;
      a ``ValueError`` elsewhere, and under ``jax.vmap``, which its primitives
      do not support).
      Both compute the same function; on GPU both follow
      ``jax_default_matmul_precision`` (TF32 matmuls unless it is ``'highest'``).""")
  )

  _cell_type = OptimizedLSTMCell
  _math = _LSTMMath
  _cudnn = True


class GRU(_FusedBase):
  __doc__ = (
    """Multi-layer GRU with a fused, hand-differentiated recurrence.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> gru = nr.GRU(3, 4, num_layers=2, rngs=nnx.Rngs(0))
    >>> h_per_layer, y = gru(jnp.ones((2, 6, 3)), return_carry=True)
    >>> y.shape, len(h_per_layer), h_per_layer[1].shape
    ((2, 6, 4), 2, (2, 4))
"""
    + _LAYER_DOC.format(carry='``h``', cell='GRUCell', implementation="""``'auto'`` or
      ``'xla'``: the XLA scans (``jax.experimental.rnn`` has no cuDNN GRU).""")
  )

  _cell_type = GRUCell
  _math = _GRUMath
  _cudnn = False
