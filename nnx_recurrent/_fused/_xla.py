"""The XLA scans of the fused layers: one direction of one layer, in plain JAX.

* The recurrence, input projection included, is a :func:`jax.custom_vjp`
  (:func:`recurrence`). Its forward scan saves one residual per step: the
  activated gates and the carry that entered the step. Its backward is one
  reverse :func:`jax.lax.scan` doing one matmul per step (``dgates @
  W_h^T``, with ``W_h^T`` transposed once before the loop); the weight
  gradients ``dW_h = h_prev_all^T @ dgates_all`` and ``dW_i = x_all^T @
  dgates_all`` are ONE large matmul each after the loop, and so is the input
  gradient. (On the CPU a GRU step of ``_plans.GRU_AUTODIFF_MIN_ROWS`` rows or
  more is differentiated by JAX instead: measured faster there, see
  :func:`_plans.plan`.)
* How the forward computes its gate pre-activations (hoisted, in the loop, or
  one joint matmul) is the :class:`_plans.ScanPlan` it is given.
* Padding (``seq_lengths``) is carry selection inside both scans
  (``where(valid, new, old)``): no extra passes over the sequence. Packed
  sequences (``segment_ids``) add a reset: the first step of each segment after
  a row's first starts from zeros, and in the backward scan no carry cotangent
  flows from that step into the previous segment.
* An LSTM projection (``proj_features``) adds ``m W_hr`` to the forward step
  and ``dh W_hr^T`` to the backward step; ``dW_hr`` is one large matmul after
  the loop too.
* Each step's slice of the sequence arrives through the loop carry, fetched
  one step ahead (:func:`prefetch_scan`): XLA's CPU backend emits scalar code
  for an elementwise fusion that reads a dynamic slice, so the gate math of a
  plain ``scan`` over ``xs`` runs several times slower than it has to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nnx_recurrent import _scan
from nnx_recurrent._fused._plans import ScanPlan
from nnx_recurrent._fused._step_math import dot, grads_after_loop


def prefetch_scan(step, carry, xs, *, length: int, reverse: bool, unroll: int,
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
  # (explicit sharding mode: an unroll that leaves a remainder, one that does not)
  unroll = _scan.scan_unroll(unroll, length, jax.tree_util.tree_leaves((xs, carry))[0])
  if not prefetch:
    return jax.lax.scan(step, carry, xs, reverse=reverse, unroll=unroll)
  if pairs and length % 2 == 0:
    return pair_scan(step, carry, xs, length=length, reverse=reverse)

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


def pair_scan(step, carry, xs, *, length: int, reverse: bool):
  """:func:`prefetch_scan` two steps per iteration (``length`` even)."""
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


def forward_scan(cell_math, plan: ScanPlan, params, xs, carry0, valid, reset,
                 save: bool = False):
  """``(final_carry, ys, residuals)``; the residuals only with ``save``.

  ``valid`` / ``reset``: ``(time, *batch)`` booleans or ``None``; a ``reset``
  step (the first of a packed segment after the row's first) starts from zeros.
  """
  seq, step = _forward_step(cell_math, plan, params, xs, save)
  carry, (ys, res) = prefetch_scan(step, carry0, (seq, valid, reset), length=xs.shape[0],
                                   reverse=False, unroll=plan.unroll, prefetch=plan.prefetch)
  return carry, ys, res


def settled_carry(cell_math, plan: ScanPlan, params, xs, carry0):
  """``carry0`` split over the mesh as one step of :func:`forward_scan` returns it
  (explicit sharding mode, :func:`_scan.settle_carry`: parameters split over an
  Explicit model axis split the carry too), for a non-empty ``xs``."""
  def one_step(carry, params, xs):
    seq, step = _forward_step(cell_math, plan, params, xs, save=False)
    return step(carry, (seq[0], None, None))[0]
  return _scan.settle_carry(cell_math.name, lambda c: jax.eval_shape(one_step, c, params, xs),
                            carry0)


def _forward_step(cell_math, plan: ScanPlan, params, xs, save: bool):
  """``(seq, step)``: what :func:`forward_scan` scans over (the inputs, or
  their projections with ``plan.inputs == 'hoisted'``) and its step."""
  w_i, b, w_h, extra = params
  if plan.inputs == 'hoisted':  # every step's projection in one matmul
    seq = dot(xs, w_i)

    def preactivations(xp_t, h):
      return xp_t, dot(h, w_h)
  elif plan.inputs == 'joint':  # one matmul per step: [x_t, h] [W_i; W_h]
    seq, w_joint = xs, cell_math.joint_weight(w_i, w_h)

    def preactivations(x_t, h):
      h = _scan.typed_as(h, x_t)  # (explicit sharding mode: concatenate takes one sharding)
      return cell_math.split_joint(dot(jnp.concatenate([x_t, h], axis=-1), w_joint))
  else:
    seq = xs

    def preactivations(x_t, h):
      return dot(x_t, w_i), dot(h, w_h)

  def step(carry, inp):
    x_t, v_t, r_t = inp
    if r_t is not None:
      carry = _scan.select(r_t, jax.tree_util.tree_map(jnp.zeros_like, carry), carry)
    new_carry, res = cell_math.step(carry, *preactivations(x_t, cell_math.h(carry)), b, extra,
                                    save)
    new_carry, y = _scan.keep_at_padding(v_t, new_carry, carry, cell_math.h(new_carry))
    return new_carry, (y, res)
  return seq, step


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(cell_math, plan, params, xs, carry0, valid, reset):
  """``(final_carry, ys)`` of one cell over time-major ``xs``.

  ``params`` is ``(W_i, b, W_h, extra)`` (``extra``: the GRU's ``b_hn``, the
  LSTM's projection ``W_hr`` or ``None``). ``valid`` and ``reset``
  (``(time, *batch)`` booleans or ``None``): padding, and the first step of
  each packed segment after a row's first, which starts from zeros (the first
  segment goes on from ``carry0``). The LSTM backward reads ``h_prev`` off
  ``ys`` (:meth:`LSTMMath.grads` says where that does not hold).
  """
  with jax.named_scope(f'nr.{cell_math.name}/forward'):
    carry, ys, _ = forward_scan(cell_math, plan.primal, params, xs, carry0, valid, reset)
  return carry, ys


def _recurrence_fwd(cell_math, plan, params, xs, carry0, valid, reset):
  with jax.named_scope(f'nr.{cell_math.name}/forward'):
    carry, ys, res = forward_scan(cell_math, plan.train, params, xs, carry0, valid, reset,
                                  save=True)
  return (carry, ys), (params, xs, carry0, ys, res, valid, reset)


def _recurrence_bwd(cell_math, plan, saved, cotangents):
  with jax.named_scope(f'nr.{cell_math.name}/backward'):
    return _backward(cell_math, plan, saved, cotangents)


def _backward(cell_math, plan, saved, cotangents):
  params, xs, carry0, ys, res, valid, reset = saved
  dcarry_final, dys = cotangents
  w_h_t = params[2].T  # W_h, transposed once, outside the loop
  extra_t = cell_math.backward_extra(params)

  def step(dcarry, inp):
    res_t, dy_t, v_t, r_t = inp
    d_direct, d_t, dhp = cell_math.step_bwd(res_t, dcarry, dy_t, extra_t)
    # (explicit sharding mode, W_h split over a model axis: summed over it as h is split)
    d_prev = cell_math.add_h(d_direct, dot(dhp, w_h_t, like=cell_math.h(dcarry)))
    if v_t is not None:  # a padding step passed the carry through unchanged
      d_prev = _scan.select(v_t, d_prev, dcarry)
      d_t = jax.tree_util.tree_map(lambda d: _scan.select(v_t, d, jnp.zeros_like(d)), d_t)
    if r_t is not None:  # a segment's first step read zeros: nothing flows on before it
      d_prev = _scan.select(r_t, jax.tree_util.tree_map(jnp.zeros_like, d_prev), d_prev)
    return d_prev, d_t

  dcarry0, d_all = prefetch_scan(step, dcarry_final, (res, dys, valid, reset),
                                 length=xs.shape[0], reverse=True,
                                 unroll=plan.backward_unroll, pairs=plan.backward_pairs)
  # The weight gradients: one large matmul each, for the whole sequence.
  packed = None if reset is None else (valid, reset)
  dparams, dxs = grads_after_loop(cell_math, d_all, res, params, xs, carry0, ys, packed)
  return dparams, dxs, dcarry0, None, None


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
