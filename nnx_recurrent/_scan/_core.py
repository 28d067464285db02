"""The masked scan: ``nnx.scan`` over a cell with carry selection."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

# flax's graph-mode transforms, which flax.nnx's RNN scans with too: under a
# user's nnx.set_graph_mode(False) or set_graph_updates(False), plain nnx.scan
# refuses the StateAxes that thread the cell's state through the scan.
from flax.nnx import compat as graph_nnx

from nnx_recurrent import _checks
from nnx_recurrent._scan._cell import (
  added_state,
  nnx_state_axes,
  settle_cell_state,
  with_plain_variables,
)
from nnx_recurrent._scan._masking import Rows, StepMasks, clean_padding
from nnx_recurrent._scan._sharding import (
  explicit_mesh,
  gates_checked,
  like_inputs,
  scan_unroll,
  typed_as,
)
from nnx_recurrent._scan._steps import held_dtype, remat_step, step, with_rows

Array = jax.Array


def masked_scan(
  cell: nnx.Module,
  carry: Any,
  xs: Array,
  masks: StepMasks = StepMasks(None, None),
  *,
  dropout_masks: Any = None,
  unroll: int | bool = 1,
  remat: bool = False,
  state_axes: Any = None,
  broadcast_rngs: Any = None,
  step_rngs: Array | None = None,
  reset_carry: Any = None,
  num_feature_axes: int = 1,
  rows: Rows,
) -> tuple[Any, Any]:
  """Scans ``cell`` over time-major ``xs`` with carry selection.

  The cell's state is threaded through the scan as flax.nnx's ``RNN`` does
  (:func:`nnx_state_axes`): Variables the cell changes and its RNG streams
  persist after the call. At padding the cell sees zeros
  (:func:`clean_padding`), so garbage there reaches no output or gradient.
  A cell of flax's array refs or hijax Variables, which flax's scan does not
  carry, is scanned as a copy of plain Variables whose changes are then
  written back (:func:`with_plain_variables`).

  Args:
    cell: any cell: ``cell(carry, x_t) -> (carry, y_t)``.
    carry: the initial carry.
    xs: ``(time, *batch, *features)``.
    masks: per-step ``valid`` and ``reset`` booleans ``(time, *batch)``.
    dropout_masks: passed to every step (shared across time).
    unroll: steps unrolled per loop iteration.
    remat: rematerialise each step in the backward pass (memory ~ carries only).
    state_axes, broadcast_rngs: as for flax.nnx's ``RNN``.
    step_rngs: one PRNG key per step ``(time,)``, passed to the cell as
      ``rngs`` (this package's cells: zoneout), or ``None``.
    reset_carry: where the packed segments after a row's first start
      (``masks.reset``); default ``carry``.
    num_feature_axes: the cell's: the axes of ``xs`` after time and the batch.
    rows: the leaves of the carry and outputs that hold the rows
      (:class:`Rows`; the cell's: :func:`cell_rows`, computed once by the
      caller, which orders the outputs by them too).

  Returns:
    ``(final_carry, ys)`` with ``ys`` time-major; ``ys`` is zero where not valid.
  """
  plain = with_plain_variables(cell)
  if plain is not None:  # flax's array refs and hijax Variables: scan a plain copy
    result = masked_scan(plain[0], carry, xs, masks, dropout_masks=dropout_masks, unroll=unroll,
                         remat=remat, state_axes=state_axes, broadcast_rngs=broadcast_rngs,
                         step_rngs=step_rngs, reset_carry=reset_carry,
                         num_feature_axes=num_feature_axes, rows=rows)
    plain[1]()
    return result
  num_batch_axes = xs.ndim - 1 - num_feature_axes
  axes = nnx_state_axes(state_axes, broadcast_rngs)
  carry = like_inputs(carry, xs, num_batch_axes, masks, rows.carry)  # shard_map, explicit sharding
  if explicit_mesh(xs):  # parameters split over the mesh split the carry too
    from nnx_recurrent._base import is_package_cell

    hidden = getattr(cell, 'hidden_features', None)
    with gates_checked('RNN', 'cell', hidden, nnx.state(cell, nnx.Param),
                       f'{type(cell).__name__} of hidden_features {hidden}',
                       known=is_package_cell(cell)):
      carry = settle_cell_state(cell, carry, axes, xs, dropout_masks, step_rngs)
  reset_carry = segment_start(masks, carry, reset_carry, xs, num_batch_axes, rows.carry)
  xs = clean_padding(xs, masks.valid)
  step_fn = with_rows(remat_step if remat else step, rows)
  scan = graph_nnx.scan(step_fn, in_axes=(axes, nnx.Carry, 0, None), out_axes=(nnx.Carry, 0),
                        unroll=scan_unroll(unroll, xs.shape[0], xs))
  if broadcast_rngs is not None:
    # One split per call: the broadcast streams give new randomness each call.
    scan = graph_nnx.split_rngs(splits=1, only=broadcast_rngs, squeeze=True)(scan)
  with jax.named_scope(f'nr.RNN/{type(cell).__name__}'):  # for profiles and HLO dumps
    try:
      return scan(cell, carry, (xs, masks.valid, masks.reset, step_rngs),
                  (dropout_masks, reset_carry))
    except TypeError as e:  # JAX's: the carried state changed its structure
      if _checks.origin(e) is not None:
        raise
      added = added_state(cell, carry, xs, dropout_masks, step_rngs)
      if not added:
        raise
      try:
        # A TypeError, as JAX's (flax.nnx's RNN fails there with it): code catching it
        # catches ours.
        first = added[0][1]
        first = f'nnx.{first}' if getattr(nnx, first, None) is not None else first
        _checks.fail('RNN', 'cell', 'a step that adds nothing to the state the scan carries '
                     'from step to step (to stack a value sown at each step over time, give '
                     f'its type an axis: state_axes=nnx.StateAxes({{{first}: 0, ...: '
                     'nnx.Carry}); or return it in the step\'s output)',
                     ', '.join(f'{path} ({kind})' for path, kind in added)
                     + ' added by one step', TypeError)
      except TypeError as ours:
        raise ours from e


def segment_start(masks: StepMasks, carry: Any, reset_carry: Any, xs: Array,
                  num_batch_axes: int, rows: Any = None) -> Any:
  """Where the packed segments after a row's first start: ``reset_carry``
  (default ``carry``, the scan's initial one) in the carry's dtypes, as the
  steps cast what they return, and typed like ``xs`` (:func:`like_inputs`:
  ``shard_map``, explicit sharding; ``rows``: :attr:`Rows.carry`); ``None``
  without packed sequences."""
  if masks.reset is None:
    return None
  if reset_carry is None:
    return carry
  reset_carry = like_inputs(reset_carry, xs, num_batch_axes, StepMasks(None, None), rows)
  # (explicit sharding mode: split over the mesh as the carry is, where() taking one)
  return jax.tree_util.tree_map(lambda r, c: typed_as(r.astype(held_dtype(c)), c), reset_carry,
                                carry)
