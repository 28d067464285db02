"""What the scans ask of a cell, without running it.

Its default and checked initial carry, whether it takes this package's
per-step options (dropout masks, zoneout keys) and RNGs, which leaves of its
carry and outputs hold the rows (:func:`cell_rows`), and, in explicit
sharding mode, the sharding its carried Variables settle to
(:func:`settle_cell_state`). Every probe traces the cell abstractly, on a
copy: no Variable changes and no stream advances.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# flax's graph-mode transforms, which flax.nnx's RNN scans with too: under a
# user's nnx.set_graph_mode(False) or set_graph_updates(False), plain nnx.scan
# refuses the StateAxes that thread the cell's state through the scan.
from flax.nnx import compat as graph_nnx

from nnx_recurrent import _checks
from nnx_recurrent._scan._masking import Rows, StepMasks, leaf_rows
from nnx_recurrent._scan._sharding import abstract_step_input, settle_state, splits_rows
from nnx_recurrent._scan._steps import call_cell, in_dtypes_of

Array = jax.Array


def nnx_state_axes(state_axes: Any = None, broadcast_rngs: Any = None) -> nnx.StateAxes:
  """flax.nnx's ``RNN`` state axes: the cell's whole state is a scan carry
  (mutations and RNG streams advance step by step), except the RNG streams
  named by ``broadcast_rngs``, held fixed over the steps of one call."""
  axes = state_axes or {...: nnx.Carry}
  return nnx.StateAxes({nnx.All(nnx.RngState, broadcast_rngs): None, **axes})


def cell_rows(cell, xs: Array, masks: StepMasks, num_feature_axes: int) -> Rows:
  """:class:`Rows` of an nnx cell over time-major ``xs``: its default carry
  and the outputs of one step from it, built abstractly (``nnx.eval_shape``,
  on a copy of the cell: no Variable of it changes and none of its streams
  advances; ``initialize_carry`` gets a fresh ``nnx.Rngs``) at two batch
  shapes (:func:`probed_rows`: where they cannot say, the shapes decide).
  Only with padding or packing, whose masks are all that ``Rows`` informs,
  or where the carry is split over the rows as the inputs are (explicit
  sharding mode, :func:`splits_rows`: a leaf marked shared is not), and not
  for this package's cells, whose carries and outputs all lead with the
  batch axes: trace time only, nothing in the program changes but the
  masking and the sharding of leaves marked shared."""
  from nnx_recurrent._base import is_package_cell

  features = tuple(xs.shape[xs.ndim - num_feature_axes:])
  batch = tuple(xs.shape[1:xs.ndim - num_feature_axes])
  if (masks.valid is None and masks.reset is None and not splits_rows(xs, len(batch))) \
      or is_package_cell(cell) or not hasattr(cell, 'initialize_carry'):
    return Rows()

  def default(cell, shape):
    if uses_base_initialize_carry(cell):
      return cell._initialize_carry(shape, jax.random.key(0), nnx.initializers.zeros_init())
    return cell.initialize_carry(shape, nnx.Rngs(0))

  def carry_and_outputs(batch):
    def one(cell):
      carry = default(cell, (*batch, *features))
      return carry, call_cell(cell, carry, jnp.zeros((*batch, *features), xs.dtype), None)[1]
    return graph_nnx.eval_shape(one, cell)

  return probed_rows(carry_and_outputs, lambda batch: graph_nnx.eval_shape(
    lambda cell: default(cell, (*batch, *features)), cell), batch)


def probed_rows(carry_and_outputs: Callable[[tuple[int, ...]], Any],
                carry_alone: Callable[[tuple[int, ...]], Any],
                batch_shape: tuple[int, ...]) -> Rows:
  """:class:`Rows` from a cell's probes (:func:`leaf_rows`): ``carry_and_outputs``
  (its default carry and one step's outputs from it, abstractly, at a batch
  shape) at ``batch_shape`` and one larger. Where the step cannot be traced
  so, ``carry_alone`` (the default carry). Where the step runs at
  ``batch_shape`` but not at the larger (a carry built at a batch size fixed
  in the cell, which does not grow as a shared leaf does not), or
  ``initialize_carry`` cannot be traced, nothing: the shapes decide."""
  both = leaf_rows(carry_and_outputs, batch_shape)
  if both is not None:
    return Rows.marking(*both)
  try:
    carry_and_outputs(batch_shape)
  except Exception:  # noqa: BLE001 -- the step cannot be traced so: the carry alone
    return Rows.marking(leaf_rows(carry_alone, batch_shape))
  return Rows()


def default_carry(cell, step_shape: tuple[int, ...], rngs: Any = None) -> Any:
  """The cell's default initial carry.

  This package's cells build it through their private hook (zeros need no
  RNG); any other cell's ``initialize_carry(input_shape, rngs)`` gets
  ``rngs`` as flax.nnx's ``RNN`` passes it (``None`` when there is none).
  """
  if uses_base_initialize_carry(cell):
    return cell._initialize_carry(step_shape, rngs)
  return cell.initialize_carry(step_shape, rngs)


def uses_base_initialize_carry(cell) -> bool:
  """True for cells whose ``initialize_carry`` is :class:`RNNCellBase`'s own."""
  from nnx_recurrent._base import RNNCellBase, overrides

  return isinstance(cell, RNNCellBase) and not overrides(cell, 'initialize_carry')


def needs_carry_rngs(cell) -> bool:
  """Whether a layer over ``cell`` must supply an RNG for its default carry.

  This package's cells need none (zeros) unless built with a ``carry_init``
  and no stream of their own, or with ``keep_rngs`` (whose stream flax.nnx's
  ``RNN`` never draws from); any other cell's ``initialize_carry`` takes an
  RNG and may draw from it, so it gets one, as in flax.nnx.
  """
  if uses_base_initialize_carry(cell):
    return cell._needs_carry_rngs()
  return True


def takes_step_options(cell) -> bool:
  """Whether the cell steps through :class:`RNNCellBase`'s ``__call__`` (or an
  override that takes ``**options`` on, in a cell with a ``step``): only such
  a cell gets this package's per-call options (``dropout_masks``, a step's
  zoneout key). Another cell's ``dropout_rate`` or ``zoneout_rate``
  attribute is its own business, as in flax.nnx, whose ``RNN`` calls every
  cell as ``cell(carry, x)``: a cell in flax.nnx's style on this base
  (:func:`~nnx_recurrent._base.in_flax_style`) too, ``**kwargs`` or not."""
  from nnx_recurrent._base import RNNCellBase, in_flax_style, overrides

  if not isinstance(cell, RNNCellBase) or in_flax_style(cell):
    return False
  return not overrides(cell, '__call__') or takes_keyword(type(cell).__call__)


def takes_keyword(fn, name: str | None = None) -> bool:
  """Whether ``fn`` takes the keyword ``name`` (``None``: any, by ``**kwargs``)."""
  return any(p.kind is inspect.Parameter.VAR_KEYWORD or (name is not None and p.name == name)
             for p in inspect.signature(fn).parameters.values())


def draws_call_rngs(cell) -> bool:
  """Whether a call's RNG feeds the cell's dropout or zoneout."""
  return takes_step_options(cell) and any(
    getattr(cell, rate, 0.0) for rate in ('dropout_rate', 'recurrent_dropout_rate',
                                          'zoneout_rate'))


def per_use_rngs(rngs: Any, n: int) -> tuple:
  """A call's ``rngs`` for ``n`` uses (layers, gaps between layers): a raw
  key is split, one per use (the key itself would give each use the same
  masks); an ``nnx.Rngs`` or stream, which advances as it draws, or ``None``
  serves every use."""
  if isinstance(rngs, jax.Array) and n:
    return tuple(jax.random.split(rngs, n))
  return (rngs,) * n


def cell_step_rngs(cell, rngs: Any, time: int) -> Array | None:
  """Per-step keys for a cell's zoneout when the call overrides its RNG
  (``rngs`` given), else ``None`` (the cell draws from its own stream)."""
  from nnx_recurrent._base import _key_from

  if (rngs is None or not takes_step_options(cell) or not getattr(cell, 'zoneout_rate', 0.0)
      or getattr(cell, 'deterministic', True)):
    return None
  # fold_in: keys apart from the ones the dropout masks draw from the same source.
  return jax.random.split(jax.random.fold_in(_key_from(type(cell).__name__, rngs, 'dropout'), 1),
                          time)


def cell_dropout_masks(cell, step_shape: tuple[int, ...], rngs, dtype) -> Any:
  """The cell's variational dropout masks for one batch, or ``None``."""
  masks = getattr(cell, '_dropout_masks', None) if takes_step_options(cell) else None
  return None if masks is None else masks(step_shape, rngs, dtype)


def initial_carry(where: str, cell, initial_carry: Any, step_shape: tuple[int, ...],
                  rngs: Any = None, inputs_dtype: Any = jnp.float32,
                  masked: bool = False) -> Any:
  """``initial_carry`` checked against the cell's own carry, or that default.

  The check compares structure and leaf shapes with the carry the cell's
  ``initialize_carry`` would give: this package's cells say it without side
  effects; another cell's (flax.nnx's, yours) is traced with ``jax.eval_shape``
  and a fresh ``nnx.Rngs``, so nothing runs and none of its streams advance.
  A cell without ``initialize_carry``, or whose ``initialize_carry`` cannot be
  traced so, is not checked. flax.nnx never calls ``initialize_carry`` when a
  carry is given, so a carry that a user's cell takes but its
  ``initialize_carry`` does not describe (more batch axes than it builds, an
  integer counter) passes when one step of the cell, traced, keeps it. A
  carry the cell's broadcasts to (beams over shared inputs) passes too, as in
  flax.nnx; with more leading axes it runs unmasked only (``masked``: padding
  or packing, whose per-row masks would align with the wrong axes), and with
  leading axes of size 1 only it warns (PyTorch's one-layer ``h_0``).
  """
  if initial_carry is None:
    if not hasattr(cell, 'initialize_carry'):
      _checks.fail(where, 'initial_carry', f'a carry, since the cell {type(cell).__name__} has '
                   'no initialize_carry to build one', 'None')
    return default_carry(cell, step_shape, rngs)
  from nnx_recurrent._base import is_package_cell

  package = is_package_cell(cell)
  expected = carry_shapes(cell, step_shape) if package else foreign_carry_shapes(cell, step_shape)
  if uses_base_initialize_carry(cell) and isinstance(initial_carry, list) \
      and isinstance(expected, tuple):
    initial_carry = tuple(initial_carry)  # a list is a tuple, as the cell reads it
  if expected is not None:
    try:  # beams over shared inputs, as flax.nnx runs them: the carry's shape stays
      _checks.check_tree_matches(where, 'initial_carry', initial_carry, expected,
                                 broadcast='given')
    except (ValueError, TypeError):
      if package or not step_keeps_carry(cell, initial_carry, step_shape, inputs_dtype):
        raise
      return initial_carry  # the step's carry, which initialize_carry does not describe
    given, wanted = (jax.tree_util.tree_leaves(t) for t in (initial_carry, expected))
    extra = [tuple(jnp.shape(g))[:jnp.ndim(g) - len(e.shape)] for g, e in zip(given, wanted)]
    if masked and any(extra):
      _checks.fail(where, 'initial_carry', f'leaf shapes {[e.shape for e in wanted]} with '
                   'seq_lengths or segment_ids (a carry with more leading axes than the '
                   'inputs, beams say, runs without them)',
                   f'{[tuple(jnp.shape(g)) for g in given]}')
    if any(extra) and all(set(axes) <= {1} for axes in extra):
      # PyTorch's h_0 of one layer, (1, batch, hidden), broadcasts as one beam.
      _checks.warn(f'{where}: `initial_carry` has leading axes of size 1 that the inputs lack '
                   f'(leaf shapes {[tuple(jnp.shape(g)) for g in given]}, the cell\'s '
                   f'{[e.shape for e in wanted]}): they broadcast as beams over the inputs, as '
                   "in flax.nnx, and stay in the outputs' shape too. PyTorch's h_0 of shape (1, "
                   'batch, hidden) is h_0[0] here.')
  return initial_carry


def step_keeps_carry(cell, carry: Any, step_shape: tuple[int, ...], inputs_dtype: Any) -> bool:
  """Whether one step of ``cell``, traced on a copy (``nnx.eval_shape``: no
  parameter or stream changes), takes ``carry`` and returns a carry of its
  structure and leaf shapes, as the scan needs."""
  def one_step(cell, carry):
    return call_cell(cell, carry, jnp.zeros(step_shape, inputs_dtype), None)[0]

  try:
    new: Any = nnx.eval_shape(one_step, cell, carry)
  except Exception:  # noqa: BLE001 -- only a yes or no: the check's own error says what is wrong
    return False
  before: Any = jax.tree_util.tree_structure(carry)  # jax's PyTreeDef (untyped for mypy)
  if before != jax.tree_util.tree_structure(new):
    return False
  return all(jnp.shape(a) == jnp.shape(b)
             for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(new)))


def foreign_carry_shapes(cell, step_shape: tuple[int, ...]) -> Any:
  """:func:`carry_shapes` of another library's cell, or ``None`` when it has
  no ``initialize_carry`` or that cannot be traced abstractly (it wants other
  arguments, or writes the cell's state): then its carry is not checked."""
  if not hasattr(cell, 'initialize_carry'):
    return None
  try:
    return carry_shapes(cell, step_shape)
  except Exception:  # any failure only means: no carry to check against
    return None


def carry_shapes(cell, step_shape: tuple[int, ...]) -> Any:
  """The cell's default carry as ``ShapeDtypeStruct`` leaves, drawing nothing from
  its streams (another library's cell gets a fresh ``Rngs`` inside ``eval_shape``)."""
  if uses_base_initialize_carry(cell):
    zeros = nnx.initializers.zeros_init()
    return jax.eval_shape(lambda: cell._initialize_carry(step_shape, jax.random.key(0), zeros))
  return jax.eval_shape(lambda: cell.initialize_carry(step_shape, nnx.Rngs(0)))


def settle_cell_state(cell, carry: Any, axes: nnx.StateAxes, xs: Array, dropout_masks: Any,
                      step_rngs: Array | None) -> Any:
  """Explicit sharding mode: the carry, and the cell's own Variables that the
  scan carries from step to step as flax.nnx's ``RNN`` does
  (:func:`carried_variables`: a running statistic, a counter), split over the
  mesh as one step of the cell returns them (:func:`settle_state`, one trace
  of the step per look); returns the carry. A Variable whose sharding a step
  changes (a running mean of ``h`` over the batch is split over a ``model``
  axis as ``h`` is) is resharded *in place*, on the cell: its value does not
  change, and the scan would return it so anyway."""
  variables = carried_variables(cell, axes)
  carry, settled = settle_state(
    'RNN', lambda c, values: _abstract_cell_step(cell, axes, c, values, xs, dropout_masks,
                                                 step_rngs),
    carry, {name: v.get_raw_value() for name, v in variables.items()})
  for name, variable in variables.items():
    if settled[name] is not variable.get_raw_value():
      variable.set_raw_value(settled[name])
  return carry


def carried_variables(cell, axes: nnx.StateAxes) -> dict[str, nnx.Variable]:
  """The cell's Variables that hold an array and that ``axes`` carry from
  step to step (``nnx.Carry``: by default all but the broadcast RNG streams;
  a broadcast Variable's changes are dropped, so its sharding is left alone),
  by their paths in the cell (``cell.running_mean``, ``cell.layers[0].count``)."""
  return {_path_name(path): v
          for path, v, _ in _array_variables(cell, axes, lambda axis: axis is nnx.Carry)}


def _array_variables(cell, axes: nnx.StateAxes, keep) -> list[tuple[tuple, nnx.Variable, Any]]:
  """``(path, Variable, axis)`` of the cell's Variables that hold an array and
  whose axis in ``axes`` (``None`` where no filter takes it: flax's scan says
  so) ``keep`` accepts."""
  def axis(path, variable):
    try:
      return axes.map_prefix(path, variable)
    except ValueError:
      return None

  state = graph_nnx.state(cell, lambda path, variable: keep(axis(path, variable)))
  return [(path, v, axis(path, v)) for path, v in nnx.to_flat_state(state)
          if isinstance(v.get_raw_value(), jax.Array)]


def _path_name(path: tuple) -> str:
  return 'cell' + ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in path)


def _abstract_cell_step(cell, axes: nnx.StateAxes, carry: Any, variables: dict[str, Any],
                        xs: Array, dropout_masks: Any, step_rngs: Array | None) -> Any:
  """The carry and the carried Variables (:func:`carried_variables`, given
  ``variables``' values) after one step of ``cell``, abstract
  (``nnx.eval_shape``: the cell's Variables and streams do not change), for
  :func:`settle_state`. A Variable that ``axes`` scan over an int axis is one
  slice there, as in the scan's steps."""
  x_t = abstract_step_input(xs)
  rng_t = None if step_rngs is None else abstract_step_input(step_rngs)

  def one_step(cell, carry, variables, x_t, dropout_masks, rng_t):
    for variable, axis in _scanned_variables(cell, axes):  # one step's slice, as the scan's
      variable.set_raw_value(jax.lax.index_in_dim(variable.get_raw_value(), 0, axis, False))
    own = carried_variables(cell, axes)
    for name, value in variables.items():
      own[name].set_raw_value(value)
    new_carry = in_dtypes_of(carry, call_cell(cell, carry, x_t, dropout_masks, rng_t)[0])
    return new_carry, {name: own[name].get_raw_value() for name in variables}
  return nnx.eval_shape(one_step, cell, carry, variables, x_t, dropout_masks, rng_t)


def _scanned_variables(cell, axes: nnx.StateAxes) -> list[tuple[nnx.Variable, int]]:
  """The cell's Variables that ``axes`` scan over an int axis (a per-step
  stack: the scan gives each step one slice), with that axis."""
  return [(v, axis) for _, v, axis in
          _array_variables(cell, axes, lambda axis: isinstance(axis, int))]


def _variables(node) -> dict[Any, nnx.Variable]:
  return {path: v for path, v in nnx.iter_graph(node) if isinstance(v, nnx.Variable)}


def with_plain_variables(cell) -> tuple[Any, Callable[[], None]] | None:
  """flax's array refs (``nnx.with_vars(model, ref=True)``) and hijax
  Variables, which flax's scan does not carry yet: a copy of ``cell`` with
  plain Variables, to scan, and the function that then writes what the scan
  changed back into the cell's own Variables (through their refs under
  ``jax.jit``); ``None`` for a cell without them."""
  if not any(getattr(v, 'ref', False) is True or getattr(v, 'hijax', False) is True
             for v in _variables(cell).values()):
    return None
  with_vars = getattr(nnx, 'with_vars', None) or nnx.vars_as  # flax 0.12.7: vars_as
  plain = with_vars(cell, ref=False, hijax=False)
  before = {path: v.get_raw_value() for path, v in _variables(plain).items()}

  def write_back() -> None:
    own, added = _variables(cell), []
    for path, v in _variables(plain).items():
      if path not in own:  # a value sown at each step (state_axes): the cell's, as without refs
        added.append((path, v))
      elif (value := v.get_raw_value()) is not before.get(path):
        if isinstance(value, jax.Array):
          own[path][...] = value  # into the ref, under jax.jit too
        else:  # a tree (nnx.capture's): the Variable takes it whole
          own[path].set_value(value)
    if added:
      nnx.update(cell, nnx.from_flat_state(added))

  return plain, write_back


def added_state(cell, carry: Any, xs: Array, dropout_masks: Any,
                step_rngs: Array | None) -> list[tuple[str, str]]:
  """What one step of ``cell`` adds to its state, traced on a copy
  (``nnx.eval_shape``), as ``(path, Variable type)`` pairs: new Variables
  (``('cell.h', 'Intermediate')``: a value ``Module.sow`` stores) and new
  entries in a Variable that holds a tree (``nnx.capture``'s). The scan
  carries the state from step to step, so its structure cannot grow; JAX's
  error says only that two structures differ. Empty where the step adds
  nothing, or where the trace fails."""
  x_t = abstract_step_input(xs)
  rng_t = None if step_rngs is None else abstract_step_input(step_rngs)
  found: list[tuple[str, str]] = []

  def one_step(cell, carry, x_t, dropout_masks, rng_t):
    before = _state_entries(cell)
    call_cell(cell, carry, x_t, dropout_masks, rng_t)
    after = _state_entries(cell)
    # A new Variable by its path; a new leaf inside a Variable that was there.
    found.extend((name, kind) for name, (kind, owner) in after.items()
                 if name not in before and (owner == name or owner in before))

  try:
    nnx.eval_shape(one_step, cell, carry, x_t, dropout_masks, rng_t)
  except Exception:  # noqa: BLE001 -- the scan's own error stands
    return []
  return found


def _state_entries(cell) -> dict[str, tuple[str, str]]:
  """The cell's Variables by path (``cell.h``) and, inside a Variable holding
  a tree, that tree's leaves (``cell.__captures__['h']``), each with its
  Variable's type and path."""
  entries = {}
  for path, variable in nnx.to_flat_state(graph_nnx.state(cell)):
    name, kind = _path_name(path), type(variable).__name__
    entries[name] = (kind, name)
    value = variable.get_raw_value()
    if not isinstance(value, jax.Array):
      for inner, _ in jax.tree_util.tree_leaves_with_path(value):
        entries[name + jax.tree_util.keystr(inner)] = (kind, name)
  return entries
