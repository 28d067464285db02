"""One step of the scans: a cell's call with carry selection.

:func:`step` (and :func:`remat_step`, recomputed in the backward pass) is the
body of ``nr.RNN``'s scan; :func:`linen_step` is flax.linen's, where the cell
runs on padding too, for compat's ``RNN``; :func:`with_rows` hands either the
cell's :class:`~nnx_recurrent._scan._masking.Rows`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_recurrent import _checks
from nnx_recurrent._scan._masking import (
  Rows,
  check_carry_shapes,
  masked_where,
  per_row,
  rows_for,
  select,
)

Array = jax.Array


def call_cell(cell, carry, x_t, dropout_masks, rng_t=None):
  """``cell(carry, x_t)``, with this package's per-step options where given:
  the call's variational dropout masks, a step's zoneout key."""
  kwargs = {}
  if dropout_masks is not None:
    kwargs['dropout_masks'] = dropout_masks
  if rng_t is not None:  # this package's cells only: a per-step key (zoneout)
    kwargs['rngs'] = rng_t
  return cell(carry, x_t, **kwargs)


def remat_call_cell(cell, carry, x_t, dropout_masks, rng_t=None):
  """:func:`call_cell` under ``jax.checkpoint``: the backward pass recomputes it.

  The cell's state is a scan carry (:func:`nnx_state_axes`), but parameters
  the step does not write must come out of the step as the very values that
  went in: then JAX sees them loop-invariant and saves them once, not once
  per step (``nnx.remat`` returns every Variable, which made the scan store
  the parameters at every step: 17x the memory of no remat at all). Whether
  the cell wrote a parameter is known when the step is traced.

  The step runs on a copy of the cell inside ``jax.checkpoint``; flax's
  update context (the four splits and merges ``nnx.remat`` makes) carries
  back what the step changed, plain attributes (``self.calls += 1``) and new
  submodules included, as without ``remat``.
  """
  with nnx.update_context(_REMAT_TAG):
    with nnx.split_context(_REMAT_TAG) as ctx:
      graphdef, params, rest = ctx.split(cell, nnx.Param, ...)

    def pure(params, rest, carry, x_t, dropout_masks, rng_t):
      before = jax.tree_util.tree_leaves(params)  # the arrays (merge shares them)
      with nnx.merge_context(_REMAT_TAG, inner=True) as ctx:
        c = ctx.merge(graphdef, params, rest)
      new_carry, y = call_cell(c, carry, x_t, dropout_masks, rng_t)
      with nnx.split_context(_REMAT_TAG) as ctx:
        graphdef_out, new_params, new_rest = ctx.split(c, nnx.Param, ...)
      unchanged = (jax.tree_util.tree_structure(new_params) == jax.tree_util.tree_structure(params)
                   and all(a is b for a, b in zip(jax.tree_util.tree_leaves(new_params), before)))
      # a GraphDef has no leaves: it comes out of the checkpoint as structure
      return new_carry, y, graphdef_out, (None if unchanged else new_params), new_rest

    new_carry, y, graphdef_out, new_params, new_rest = jax.checkpoint(pure)(
      params, rest, carry, x_t, dropout_masks, rng_t)
    with nnx.merge_context(_REMAT_TAG, inner=False) as ctx:
      ctx.merge(graphdef_out, params if new_params is None else new_params, new_rest)
  return new_carry, y


_REMAT_TAG = 'nnx_recurrent.remat'


def keep_at_padding(valid_t: Array | None, new_carry: Any, carry: Any, y: Any,
                    rows: Rows = Rows()):
  """Carry selection at one step: ``(carry, zeros)`` where ``valid_t`` is
  False, ``(new_carry, y)`` where it is True (everywhere when ``None``);
  leaves without the batch axes, or marked shared in ``rows``, go on."""
  if valid_t is None:
    return new_carry, y

  def zero(a, row=True):
    return masked_where(valid_t, a, 0) if row and per_row(valid_t, a) else a
  out = rows_for(rows.out, y)
  y = jax.tree_util.tree_map(zero, y, *(() if out is None else (out,)))
  return select(valid_t, new_carry, carry, rows=rows.carry), y


def step(cell, carry, xs, extras):
  """One masked step: padding keeps the carry and outputs zeros.

  ``xs`` is ``(x_t, valid_t, reset_t, rng_t)`` and ``extras`` is
  ``(dropout_masks, reset_carry)``; a ``reset_t`` step (the first of a packed
  segment after the row's first) starts from ``reset_carry``. Inputs at
  padding must be clean (:func:`clean_padding`) for their gradients to be.
  """
  return _masked_step(call_cell, cell, carry, xs, extras)


def remat_step(cell, carry, xs, extras):
  """:func:`step` whose cell call is recomputed in the backward pass."""
  return _masked_step(remat_call_cell, cell, carry, xs, extras)


def _masked_step(call, cell, carry, xs, extras, rows: Rows = Rows()):
  x_t, valid_t, reset_t, rng_t = xs
  dropout_masks, reset_carry = extras
  if reset_t is not None:  # a shared counter goes on
    carry = select(reset_t, reset_carry, carry, shared='old', rows=rows.carry)
  new_carry, y = call(cell, carry, x_t, dropout_masks, rng_t)
  return keep_at_padding(valid_t, in_dtypes_of(carry, new_carry), carry, y, rows)


def with_rows(step_fn: Callable, rows: Rows) -> Callable:
  """``step_fn`` (:func:`step`, :func:`linen_step`), a scan's body
  ``(cell, carry, xs, extras)``, masking by ``rows`` (:class:`Rows`);
  ``step_fn`` itself where they say nothing (the shapes decide). (The scans
  bind their bodies' signatures: one with a ``rows`` parameter would take
  one more argument.)"""
  if rows.carry is None and rows.out is None:
    return step_fn
  by_rows = _BY_ROWS[step_fn]

  def body(cell, carry, xs, extras):
    return by_rows(cell, carry, xs, extras, rows)
  body.__name__ = body.__qualname__ = step_fn.__name__
  return body


def in_dtypes_of(carry: Any, new_carry: Any) -> Any:
  """``new_carry`` in ``carry``'s dtypes: cells may compute in a lower dtype
  than the carry is stored in. Only within a kind (floating, integer, bool):
  a floating leaf cast to an integer carry would cut the recurrence silently,
  which the scan refuses (a ``TypeError`` naming the dtypes), as it refuses
  other shapes (:func:`check_carry_shapes`)."""
  check_carry_shapes(new_carry, carry)

  def one(n, o):
    if _kind(jnp.result_type(n)) != _kind(o.dtype):
      _checks.fail('RNN', 'cell', 'a step that returns a carry leaf of the kind of its carry '
                   f'leaf ({o.dtype})', f'{jnp.result_type(n)}', TypeError)
    return n.astype(held_dtype(o))
  return jax.tree_util.tree_map(one, new_carry, carry)


def held_dtype(leaf: Any) -> Any:
  """``leaf``'s dtype as JAX holds it: a NumPy float64 carry given without
  ``jax_enable_x64`` is float32 (an ``astype(float64)`` would warn that it
  truncates, where flax.nnx gives no warning)."""
  return jax.dtypes.canonicalize_dtype(leaf.dtype, allow_extended_dtype=True)


def _kind(dtype) -> Any:
  """floating (bfloat16 included), complex, integer (signed or not), bool."""
  return next((k for k in (jnp.floating, jnp.complexfloating, jnp.integer, jnp.bool_)
               if jnp.issubdtype(dtype, k)), dtype)


def plain_step(cell, carry, x_t):
  """The step without padding or packing: the cell's, in the carry's dtypes."""
  new_carry, y = cell(carry, x_t)
  return in_dtypes_of(carry, new_carry), y


def linen_step(cell, carry, xs, extras):
  """flax.linen's step: the cell runs on padding too and its outputs stay.

  ``carry`` is ``(running, last_valid)``: ``running`` is flax.linen's carry,
  which goes on through the padding; ``last_valid`` is selected as in
  :func:`step` (leaves shared by the rows, :class:`Rows`, go on), so the
  final carry is each row's last valid one without a carry history.
  """
  return _linen_step(cell, carry, xs, extras)


def _linen_step(cell, carry, xs, extras, rows: Rows = Rows()):
  x_t, valid_t, _, _ = xs
  del extras
  running, last_valid = carry
  new, y = plain_step(cell, running, x_t)
  # A copy before the selection: in the backward pass JAX sums a value's
  # cotangents from its last use to its first, so `new`'s (an LSTM's `h` is
  # also its `y`) become (next step + returned carry) + output, in flax.linen's
  # order (its scan returns the carry first, then the carry and `y` stacked).
  # Without it the sum is (next step + output) + returned carry, which rounds
  # the gradients apart where both the carry and the outputs feed the loss.
  y = jax.tree_util.tree_map(jnp.copy, y)
  return (new, select(valid_t, new, last_valid, rows=rows.carry)), y


# The steps with carry selection, as they take Rows (with_rows).
_BY_ROWS: dict[Callable, Callable] = {
  step: functools.partial(_masked_step, call_cell),
  remat_step: functools.partial(_masked_step, remat_call_cell),
  linen_step: _linen_step,
}
