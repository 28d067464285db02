"""The front doors' sequence handling: checks, time-major layout, reversal.

:func:`prepare` validates a layer's inputs and masks and moves time to axis
0; :func:`processing_order` reverses each row's valid part in place
(:func:`reverse_indices`) and :func:`output_order` puts outputs back in input
order and in the caller's layout (:func:`restore_layout`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nnx_recurrent import _checks
from nnx_recurrent._scan._masking import (
  StepMasks,
  bcast,
  lengths_to_valid,
  per_row,
  rows_for,
  segment_masks,
  segments_to_masks,
)
from nnx_recurrent._scan._sharding import rows_typed_as, typed_as

Array = jax.Array


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
    valid, start_mask = segment_masks(segment_ids)
    tt = typed_as(jnp.broadcast_to(t, segment_ids.shape), segment_ids)
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
  return jnp.take_along_axis(x, bcast(idx, x), axis=0)


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
    # One length for every row (a scalar, or any shape that broadcasts) is
    # broadcast to the batch, as flax broadcasts it.
    seq_lengths = _checks.check_seq_lengths(where, seq_lengths, batch_shape)
    seq_lengths = rows_typed_as(seq_lengths, xs, len(batch_shape))  # (explicit sharding)
    masks = StepMasks(lengths_to_valid(seq_lengths, time), None)
  if segment_ids is not None:
    layout = '(time, *batch)' if time_major else '(*batch, time)'
    shape = (time, *batch_shape) if time_major else (*batch_shape, time)
    # A ValueError for the dtype too, as the packing issue specifies.
    segment_ids = _checks.check_integer_array(where, 'segment_ids', segment_ids, shape, layout,
                                              dtype_error=ValueError)
    if _checks.is_concrete(segment_ids) and segment_ids.size:
      lowest = int(_checks.host_values(segment_ids).min())  # on the host: no compiled reduction
      if lowest < 0:
        _checks.fail(where, 'segment_ids', 'non-negative ids (0 = padding)', f'minimum {lowest}')
    segment_ids = _checks.ids_as_jax(segment_ids)  # NumPy's int64 read before jax narrows it
    if not time_major:
      segment_ids = jnp.moveaxis(segment_ids, -1, 0)
    segment_ids = rows_typed_as(segment_ids, xs, len(batch_shape), lead=1)
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
                 time_major: bool, rows: Any = None) -> Any:
  """Scan outputs back to input order (``reverse`` with ``keep_order``; ``idx``
  from :func:`processing_order`) and to the caller's layout. ``rows``: the
  outputs' :attr:`Rows.out` (``None``: their shapes say which are the rows')."""
  if reverse and keep_order:
    def back(y, row=True):
      # A leaf without the batch axes (a per-step scalar, a shared leaf of the
      # batch's size by chance) has no one input order when each row reverses
      # by its own length.
      if idx is not None and not (row and per_row(idx[0], y[0])):
        _checks.fail('RNN', 'cell', 'per-step outputs that lead with the batch axes '
                     f'{seq.batch_shape} when keep_order=True (as in a Bidirectional\'s '
                     'backward direction) restores each row\'s own order (reverse with '
                     'seq_lengths or segment_ids)',
                     f'an output leaf of per-step shape {tuple(y.shape[1:])}')
      return take_time(y, idx)
    rows = rows_for(rows, ys)
    ys = jax.tree_util.tree_map(back, ys, *(() if rows is None else (rows,)))
  return restore_layout(ys, time_major, len(seq.batch_shape))


def restore_layout(ys: Any, time_major: bool, num_batch_dims: int) -> Any:
  """Moves the time axis of time-major outputs back to the caller's layout:
  after the batch axes, as flax does to every leaf. A leaf with no room for
  them (a per-step scalar, where flax's ``moveaxis`` raises "axis out of
  bounds") has no batch axes to follow, and keeps time first."""
  if time_major:
    return ys
  return jax.tree_util.tree_map(
    lambda y: y if y.ndim <= num_batch_dims else jnp.moveaxis(y, 0, num_batch_dims), ys)
