"""The masked scan: the one sequence engine behind every front door.

Everything here works on *time-major* arrays ``(time, *batch, *features)``;
the front doors (``RNN``, ``Bidirectional``, the fused layers, compat) move
the time axis and call in.

Masking is *carry selection*: at a padding step the new carry is discarded
(``where(valid, new, old)``) and the output is zero, so the carry that comes
out of the scan is the one after each row's last valid step without storing
the carry history. Packed sequences add a *reset*: at the first step of each
segment the carry is replaced by the initial carry.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_recurrent import _checks

Array = jax.Array


class StepMasks(NamedTuple):
  """Per-step booleans, time-major ``(time, *batch)``; ``None`` means all-true/false."""

  valid: Array | None  # step is real data (not padding)
  reset: Array | None  # step starts a new segment: carry <- initial carry


def _bcast(m: Array, x: Array) -> Array:
  """Reshapes a ``(*batch)`` mask to broadcast against ``(*batch, *features)``."""
  return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def select(mask: Array, new: Any, old: Any) -> Any:
  """``where(mask, new, old)`` over matching pytrees, mask broadcast on the right."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(_bcast(mask, n), n, o), new, old)


# -- building the masks ---------------------------------------------------------
def lengths_to_valid(seq_lengths: Array, time: int) -> Array:
  """``valid[t, *b] = t < seq_lengths[*b]``, time-major."""
  t = jnp.arange(time).reshape((time,) + (1,) * seq_lengths.ndim)
  return t < seq_lengths[None]


def segments_to_masks(segment_ids: Array) -> StepMasks:
  """Valid and reset masks from time-major segment ids (0 = padding)."""
  valid = segment_ids != 0
  prev = jnp.concatenate([jnp.zeros_like(segment_ids[:1]), segment_ids[:-1]], axis=0)
  return StepMasks(valid=valid, reset=valid & (segment_ids != prev))


# -- reversal -------------------------------------------------------------------
def reverse_indices(time: int, batch_shape: tuple[int, ...], seq_lengths=None,
                    segment_ids=None) -> Array | None:
  """Time indices ``(time, *batch)`` that reverse each row's valid part in place.

  With ``seq_lengths`` the first ``L`` steps reverse and padding stays at the
  end (flax's ``flip_sequences``); with ``segment_ids`` every segment reverses
  within its own span. The map is an involution, so the same indices undo it.
  ``None`` means a plain flip of the whole axis.
  """
  t = jnp.arange(time).reshape((time,) + (1,) * len(batch_shape))
  if segment_ids is not None:
    valid, start_mask = segments_to_masks(segment_ids)
    tt = jnp.broadcast_to(t, segment_ids.shape)
    start = jax.lax.cummax(jnp.where(start_mask, tt, 0), axis=0)
    nxt = jnp.concatenate([segment_ids[1:], jnp.zeros_like(segment_ids[:1])], axis=0)
    end_mask = valid & (nxt != segment_ids)
    end = jax.lax.cummin(jnp.where(end_mask, tt, time - 1), axis=0, reverse=True)
    return jnp.where(valid, start + end - tt, tt)
  if seq_lengths is not None:
    # Clip: under jit unchecked lengths > time must act as time (and < 0 as 0).
    seq_lengths = jnp.clip(seq_lengths, 0, time)
    return (time - 1 - t + seq_lengths[None]) % time
  return None


def take_time(x: Array, idx: Array | None) -> Array:
  """Gathers time-major ``x`` along axis 0 with per-row indices ``(time, *batch)``."""
  if idx is None:
    return jnp.flip(x, axis=0)
  return jnp.take_along_axis(x, _bcast(idx, x), axis=0)


# -- the scan -------------------------------------------------------------------
def _step(cell, carry, xs, extras):
  x_t, valid_t, reset_t = xs
  dropout_masks, reset_carry = extras
  if reset_t is not None:
    carry = select(reset_t, reset_carry, carry)
  if dropout_masks is None:
    new_carry, y = cell(carry, x_t)
  else:
    new_carry, y = cell(carry, x_t, dropout_masks=dropout_masks)
  # Cells may compute in a lower dtype than the carry is stored in.
  new_carry = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), new_carry, carry)
  if valid_t is not None:
    new_carry = select(valid_t, new_carry, carry)
    y = jax.tree_util.tree_map(lambda a: jnp.where(_bcast(valid_t, a), a, 0), y)
  return new_carry, y


def masked_scan(
  cell: nnx.Module,
  carry: Any,
  xs: Array,
  masks: StepMasks = StepMasks(None, None),
  *,
  dropout_masks: Any = None,
  reset_carry: Any = None,
  unroll: int | bool = 1,
  remat: bool = False,
) -> tuple[Any, Any]:
  """Scans ``cell`` over time-major ``xs`` with carry selection.

  Args:
    cell: any cell: ``cell(carry, x_t) -> (carry, y_t)``.
    carry: the initial carry.
    xs: ``(time, *batch, *features)``.
    masks: per-step ``valid`` and ``reset`` booleans ``(time, *batch)``.
    dropout_masks: passed to every step (shared across time).
    reset_carry: the carry a ``reset`` step starts from (default ``carry``).
    unroll: steps unrolled per loop iteration.
    remat: rematerialise each step in the backward pass (memory ~ carries only).

  Returns:
    ``(final_carry, ys)`` with ``ys`` time-major; ``ys`` is zero where not valid.
  """
  if masks.reset is not None and reset_carry is None:
    reset_carry = carry
  step = nnx.remat(_step) if remat else _step
  scan = nnx.scan(step, in_axes=(None, nnx.Carry, 0, None), out_axes=(nnx.Carry, 0),
                  unroll=unroll)
  return scan(cell, carry, (xs, masks.valid, masks.reset), (dropout_masks, reset_carry))


def default_carry(cell, step_shape: tuple[int, ...]) -> Any:
  """The cell's default initial carry (through the private hook when it has one)."""
  init = getattr(cell, '_initialize_carry', None)
  return init(step_shape) if init is not None else cell.initialize_carry(step_shape)


def cell_dropout_masks(cell, step_shape: tuple[int, ...], rngs, dtype) -> Any:
  """The cell's variational dropout masks for one batch, or ``None``."""
  masks = getattr(cell, '_dropout_masks', None)
  return None if masks is None else masks(step_shape, rngs, dtype)


def initial_carry(where: str, cell, initial_carry: Any, step_shape: tuple[int, ...]) -> Any:
  """``initial_carry`` checked against the cell's own carry, or that default."""
  if initial_carry is None:
    return default_carry(cell, step_shape)
  expected = jax.eval_shape(lambda: default_carry(cell, step_shape))
  _checks.check_tree_matches(where, 'initial_carry', initial_carry, expected)
  return initial_carry


# -- front-door helpers ---------------------------------------------------------
class Sequence(NamedTuple):
  """A validated input batch, moved to time-major layout."""

  xs: Array  # (time, *batch, *features)
  batch_shape: tuple[int, ...]
  time: int
  masks: StepMasks
  seq_lengths: Array | None  # (*batch)
  segment_ids: Array | None  # time-major (time, *batch)


def prepare(where: str, inputs: Any, *, num_feature_axes: int, in_features: int | None,
            time_major: bool, seq_lengths: Any = None, segment_ids: Any = None) -> Sequence:
  """Validates the inputs of a sequence layer and moves time to axis 0."""
  inputs = _checks.check_array(where, 'inputs', inputs)
  nfa = num_feature_axes
  if inputs.ndim < nfa + 1:
    _checks.fail(where, 'inputs', f'at least {nfa + 1} axes (time and {nfa} feature axes)',
                 f'shape {tuple(inputs.shape)}')
  if in_features is not None and inputs.shape[-1] != in_features:
    _checks.fail(where, 'inputs', f"last axis of size {in_features} (the cell's in_features)",
                 f'shape {tuple(inputs.shape)}')
  time_axis = 0 if time_major else inputs.ndim - nfa - 1
  time = inputs.shape[time_axis]
  xs = jnp.moveaxis(inputs, time_axis, 0)
  batch_shape = tuple(xs.shape[1: xs.ndim - nfa])
  if seq_lengths is not None and segment_ids is not None:
    _checks.fail(where, 'segment_ids', 'None when seq_lengths is given (use one of them)',
                 'both')
  masks = StepMasks(None, None)
  if seq_lengths is not None:
    seq_lengths = _checks.check_seq_lengths(where, seq_lengths, batch_shape, time)
    masks = StepMasks(lengths_to_valid(seq_lengths, time), None)
  if segment_ids is not None:
    layout = '(time, *batch)' if time_major else '(*batch, time)'
    shape = (time, *batch_shape) if time_major else (*batch_shape, time)
    # A ValueError for the dtype too, as the packing issue specifies.
    segment_ids = _checks.check_integer_array(where, 'segment_ids', segment_ids, shape, layout,
                                              dtype_error=ValueError)
    if _checks.is_concrete(segment_ids) and segment_ids.size:
      lowest = int(np.asarray(segment_ids).min())  # on the host: no compiled reduction
      if lowest < 0:
        _checks.fail(where, 'segment_ids', 'non-negative ids (0 = padding)', f'minimum {lowest}')
    if not time_major:
      segment_ids = jnp.moveaxis(segment_ids, -1, 0)
    masks = segments_to_masks(segment_ids)
  return Sequence(xs, batch_shape, time, masks, seq_lengths, segment_ids)


def processing_order(seq: Sequence, reverse: bool) -> tuple[Array, Array | None]:
  """``(xs, idx)``: the time-major inputs in processing order, and the
  per-row reversal indices (``None``: not reversed, or a plain flip)."""
  if not reverse:
    return seq.xs, None
  idx = reverse_indices(seq.time, seq.batch_shape, seq.seq_lengths, seq.segment_ids)
  return take_time(seq.xs, idx), idx


def output_order(ys: Any, seq: Sequence, reverse: bool, idx: Array | None, keep_order: bool,
                 time_major: bool) -> Any:
  """Scan outputs back to input order (``reverse`` with ``keep_order``; ``idx``
  from :func:`processing_order`) and to the caller's layout."""
  if reverse and keep_order:
    ys = jax.tree_util.tree_map(lambda y: take_time(y, idx), ys)
  return restore_layout(ys, time_major, len(seq.batch_shape))


def restore_layout(ys: Any, time_major: bool, num_batch_dims: int) -> Any:
  """Moves the time axis of time-major outputs back to the caller's layout."""
  if time_major:
    return ys
  return jax.tree_util.tree_map(lambda y: jnp.moveaxis(y, 0, num_batch_dims), ys)
