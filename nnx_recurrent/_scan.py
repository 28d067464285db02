"""The masked scan: the sequence engine behind every front door.

Everything here works on *time-major* arrays ``(time, *batch, *features)``;
the front doors move the time axis and call in. ``RNN`` (hence
``Bidirectional`` and ``StackedRNN``) scans with :func:`masked_scan`, compat's
``RNN`` runs :func:`step` / :func:`linen_step` under ``flax.linen.scan``, and
the fused layers' hand-differentiated scans (``_fused._xla``) use the same
input checks (:func:`prepare`), cleaning (:func:`clean_padding`) and carry
selection (:func:`keep_at_padding`).

Masking is *carry selection*: at a padding step the new carry is discarded
(``where(valid, new, old)``) and the output is zero, so the carry that comes
out of the scan is the one after each row's last valid step without storing
the carry history. Packed sequences add a *reset*: at the first step of each
segment but a row's first, the carry is replaced by the default initial carry
(the row's first segment goes on from the carry the call starts from, so a
chunk's carry passed on continues it). Leaves of the carry and of the
outputs that the rows share (a step counter, a ``(features,)`` statistic) go
on at padding and resets, as in flax; which they are the cell says where it
can (:class:`Rows`, :func:`cell_rows`), their shapes where it cannot
(:func:`_per_row`).

A carry enters the scans typed as each step's carry will be
(:func:`like_inputs`): varying like the inputs inside ``jax.shard_map``, split
over the batch like them under a mesh of Explicit axes (JAX's explicit
sharding mode); there, parameters split over a mesh axis (model parallel over
the hidden axis) split each step's carry too, and the carry (a packed row's
reset carry with it) takes the sharding one step of the cell gives it, traced
abstractly (:func:`settle_carry`), and so do the cell's own Variables that the
scan carries (:func:`settle_cell_state`). Outside those two, nothing in the
programs changes.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# flax's graph-mode transforms, which flax.nnx's RNN scans with too: under a
# user's nnx.set_graph_mode(False) or set_graph_updates(False), plain nnx.scan
# refuses the StateAxes that thread the cell's state through the scan.
from flax.nnx import compat as graph_nnx

from nnx_recurrent import _checks

Array = jax.Array


class StepMasks(NamedTuple):
  """Per-step booleans, time-major ``(time, *batch)``; ``None`` means all-true/false."""

  valid: Array | None  # step is real data (not padding)
  reset: Array | None  # step starts a segment after the row's first: carry <- reset carry


def _bcast(m: Array, x: Array) -> Array:
  """Reshapes a ``(*batch)`` mask to broadcast against ``(*batch, *features)``."""
  return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def _per_row(mask: Array, x: Any) -> bool:
  """Whether ``x`` leads with the batch axes of a ``(*batch)`` mask (each of
  the mask's size, or any size against a mask axis of 1: one row's length
  shared by carry rows). A leaf without them (a step counter shared by every
  row, a scalar per step, a ``(features,)`` leaf whose size is not the
  batch's) is not per row, so no row's mask applies to it; it goes on as in
  flax, which masks nothing. One that only happens to lead with the batch's
  sizes is told apart where the cell says so (:class:`Rows`)."""
  shape = jnp.shape(x)
  return len(shape) >= mask.ndim and all(
    m in (1, d) for m, d in zip(mask.shape, shape[:mask.ndim]))


class Rows(NamedTuple):
  """Which leaves of the carry (``carry``) and of a step's outputs (``out``)
  hold the batch's rows, as the cell builds them: each a tree of bools of the
  carry's (the outputs') structure, from :func:`leaf_rows`. ``None`` (the
  default, and wherever the cell cannot say) leaves it to the leaves' shapes
  (:func:`_per_row`); a ``False`` marks a leaf shared by the rows whose
  leading size only happens to be the batch's (a ``(features,)`` statistic
  with as many features as rows), which then goes on as a leaf without the
  batch axes does. A ``True`` changes nothing: the shapes still decide."""

  carry: Any = None
  out: Any = None

  @classmethod
  def marking(cls, carry: Any, out: Any = None) -> Rows:
    """``Rows`` of the trees of bools ``carry`` and ``out`` (:func:`leaf_rows`)
    that mark a leaf shared; one of all ``True`` says no more than the
    shapes do, and is dropped (``None``)."""
    def marks(rows):
      return None if rows is None or all(jax.tree_util.tree_leaves(rows)) else rows
    return cls(marks(carry), marks(out))


def leaf_rows(probe: Callable[[tuple[int, ...]], Any], batch_shape: tuple[int, ...]) -> Any:
  """For :class:`Rows`: a tree of bools of ``probe``'s structure, ``True``
  where a leaf leads with the batch axes. ``probe(batch)`` is an abstract
  tree built for a batch of shape ``batch`` (the cell's ``initialize_carry``,
  one step's outputs, traced abstractly); it is built at ``batch_shape`` and
  at every batch axis one larger, and a leaf leads with the batch axes where
  it does in both (a leaf of the batch's size by chance keeps its size).
  ``None`` without batch axes, and where ``probe`` fails or builds trees of
  two structures: the leaves' shapes decide there, as before."""
  if not batch_shape:
    return None
  grown = tuple(b + 1 for b in batch_shape)
  try:
    at, plus = probe(batch_shape), probe(grown)
  except Exception:  # noqa: BLE001 -- only a yes or no: the shapes decide instead
    return None
  treedef: Any = jax.tree_util.tree_structure(at)  # jax's PyTreeDef (untyped for mypy)
  if jax.tree_util.tree_structure(plus) != treedef:
    return None
  n = len(batch_shape)
  return treedef.unflatten(
    tuple(jnp.shape(a)[:n]) == batch_shape and tuple(jnp.shape(b)[:n]) == grown
    for a, b in zip(jax.tree_util.tree_leaves(at), jax.tree_util.tree_leaves(plus)))


def _rows_for(rows: Any, tree: Any) -> Any:
  """``rows`` where it has ``tree``'s structure, else ``None`` (the shapes decide)."""
  structure: Any = jax.tree_util.tree_structure(tree)  # jax's PyTreeDef (untyped for mypy)
  return None if rows is None or jax.tree_util.tree_structure(rows) != structure else rows


def select(mask: Array, new: Any, old: Any, shared: str = 'new', rows: Any = None) -> Any:
  """``where(mask, new, old)`` over matching pytrees, mask broadcast on the
  right; leaves without the batch axes (:func:`_per_row`), or marked shared
  in ``rows`` (:attr:`Rows.carry`), take ``new``, or ``old`` with
  ``shared='old'``. A ``new`` carry of other shapes than ``old`` (a cell's
  step that lost an axis) is a ``TypeError`` naming them, instead of jax's
  scan error."""
  check_carry_shapes(new, old)

  def one(n, o, row=True):
    if row and _per_row(mask, n):
      return jnp.where(_bcast(mask, n), n, o)
    return n if shared == 'new' else o
  rows = _rows_for(rows, new)
  return jax.tree_util.tree_map(one, new, old, *(() if rows is None else (rows,)))


def check_carry_shapes(new: Any, old: Any) -> None:
  """A ``TypeError`` naming the shapes where a cell's step returned a carry of
  other shapes than it was given (jax's scan error names the scan's body)."""
  news, olds = jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)
  if len(news) != len(olds) or any(jnp.shape(n) != jnp.shape(o) for n, o in zip(news, olds)):
    _checks.fail('RNN', 'cell', "a step that returns a carry of its carry's shapes "
                 f'{[jnp.shape(o) for o in olds]}', f'{[jnp.shape(n) for n in news]}',
                 TypeError)


# -- building the masks ---------------------------------------------------------
def lengths_to_valid(seq_lengths: Array, time: int) -> Array:
  """``valid[t, *b] = t < seq_lengths[*b]``, time-major."""
  t = jnp.arange(time).reshape((time,) + (1,) * seq_lengths.ndim)
  return t < seq_lengths[None]


def segments_to_masks(segment_ids: Array) -> StepMasks:
  """Valid and reset masks from time-major segment ids (0 = padding): a
  reset at each segment's first step but the row's first segment's."""
  valid, starts = _segment_masks(segment_ids)
  return StepMasks(valid, starts & earlier_valid(valid))


def earlier_valid(valid: Array) -> Array:
  """``(time, *batch)``: whether a valid step came before step ``t`` in the row."""
  return jnp.cumsum(valid, axis=0, dtype=jnp.int32) > valid


def _segment_masks(segment_ids: Array) -> tuple[Array, Array]:
  valid = segment_ids != 0
  prev = jnp.concatenate([jnp.zeros_like(segment_ids[:1]), segment_ids[:-1]], axis=0)
  return valid, valid & (segment_ids != prev)


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
    valid, start_mask = _segment_masks(segment_ids)
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
  return jnp.take_along_axis(x, _bcast(idx, x), axis=0)


# -- the scan -------------------------------------------------------------------
def _call_cell(cell, carry, x_t, dropout_masks, rng_t=None):
  kwargs = {}
  if dropout_masks is not None:
    kwargs['dropout_masks'] = dropout_masks
  if rng_t is not None:  # this package's cells only: a per-step key (zoneout)
    kwargs['rngs'] = rng_t
  return cell(carry, x_t, **kwargs)


def _remat_call_cell(cell, carry, x_t, dropout_masks, rng_t=None):
  """:func:`_call_cell` under ``jax.checkpoint``: the backward pass recomputes it.

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
      new_carry, y = _call_cell(c, carry, x_t, dropout_masks, rng_t)
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
    return jnp.where(_bcast(valid_t, a), a, 0) if row and _per_row(valid_t, a) else a
  out = _rows_for(rows.out, y)
  y = jax.tree_util.tree_map(zero, y, *(() if out is None else (out,)))
  return select(valid_t, new_carry, carry, rows=rows.carry), y


def step(cell, carry, xs, extras):
  """One masked step: padding keeps the carry and outputs zeros.

  ``xs`` is ``(x_t, valid_t, reset_t, rng_t)`` and ``extras`` is
  ``(dropout_masks, reset_carry)``; a ``reset_t`` step (the first of a packed
  segment after the row's first) starts from ``reset_carry``. Inputs at
  padding must be clean (:func:`clean_padding`) for their gradients to be.
  """
  return _masked_step(_call_cell, cell, carry, xs, extras)


def _remat_step(cell, carry, xs, extras):
  """:func:`step` whose cell call is recomputed in the backward pass."""
  return _masked_step(_remat_call_cell, cell, carry, xs, extras)


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
    return n.astype(o.dtype)
  return jax.tree_util.tree_map(one, new_carry, carry)


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
  return (new, select(valid_t, new, last_valid, rows=rows.carry)), y


# The steps with carry selection, as they take Rows (with_rows).
_BY_ROWS: dict[Callable, Callable] = {
  step: functools.partial(_masked_step, _call_cell),
  _remat_step: functools.partial(_masked_step, _remat_call_cell),
  linen_step: _linen_step,
}


def clean_padding(xs: Array, valid: Array | None) -> Array:
  """Zeros at padding: what a cell sees there is never garbage (NaN, inf).

  Carry selection discards the values a cell computes at padding, but not
  their gradients: NaN at padding times a zero cotangent is NaN (the JAX FAQ's
  "double where"). One ``where`` over the sequence, before the scan.
  """
  if valid is None:
    return xs
  return jnp.where(_bcast(valid, xs), xs, jnp.zeros((), xs.dtype))


def nnx_state_axes(state_axes: Any = None, broadcast_rngs: Any = None) -> nnx.StateAxes:
  """flax.nnx's ``RNN`` state axes: the cell's whole state is a scan carry
  (mutations and RNG streams advance step by step), except the RNG streams
  named by ``broadcast_rngs``, held fixed over the steps of one call."""
  axes = state_axes or {...: nnx.Carry}
  return nnx.StateAxes({nnx.All(nnx.RngState, broadcast_rngs): None, **axes})


def varying_axes(x: Any) -> frozenset:
  """The mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
  aval = jax.typeof(x)
  axes = getattr(aval, 'vma', None)  # where JAX names them so
  if axes is None:
    axes = getattr(getattr(aval, 'manual_axis_type', None), 'varying', None)
  return frozenset(axes or ())


def vary_like(carry: Any, *arrays: Any) -> Any:
  """``carry`` cast to vary over every mesh axis ``arrays`` (``None``s skipped)
  vary over.

  Inside ``shard_map`` (with ``check_vma``, its default) a zero initial carry
  is replicated while each step's output varies with the sharded inputs, and
  ``scan`` needs its carry's type unchanged. Outside ``shard_map``: ``carry``.
  """
  axes = frozenset().union(*(varying_axes(a) for a in arrays if a is not None))
  def cast(c):
    missing = tuple(sorted(axes - varying_axes(c)))
    return jax.lax.pcast(c, missing, to='varying') if missing else c
  return jax.tree_util.tree_map(cast, carry) if axes else carry


# -- explicit sharding mode ----------------------------------------------------------
def explicit_spec(x: Any) -> tuple | None:
  """The partition of ``x``'s axes over the *Explicit* axes of its mesh (JAX's
  explicit sharding mode, "sharding in types"), one entry per axis, or ``None``
  when no axis of ``x`` is split so: no mesh, a mesh of Auto axes (whose
  shardings are not in the types) or inside ``jax.shard_map``. Only then does
  anything below act, so the programs of every other mode are unchanged."""
  spec = _full_spec(x)
  return spec if spec is not None and any(s is not None for s in spec) else None


def typed_as(x: Any, like: Any) -> Any:
  """``x``'s leaves resharded as ``like``'s (of their ranks) are, in explicit
  sharding mode where the two partitions differ (an operand of ``where`` or
  ``concatenate``, which take one sharding; a carry or a cotangent whose
  sharding one step of a model split over an Explicit axis changed); ``x``
  itself otherwise, and always outside that mode
  (:func:`explicit_spec` is ``None`` for both there)."""
  def one(a, b):
    if explicit_spec(a) == explicit_spec(b):
      return a
    return jax.sharding.reshard(a, jax.typeof(b).sharding)
  return jax.tree_util.tree_map(one, x, like)


def abstract_step_input(xs: Array) -> jax.ShapeDtypeStruct:
  """One time step of time-major ``xs`` as an abstract value, typed as a slice
  of ``xs`` is (its sharding without the time axis), for ``jax.eval_shape``;
  also for an empty sequence (the scans trace their step there too)."""
  sharding: Any = jax.typeof(xs).sharding
  spec = getattr(sharding, 'spec', None)
  if spec is not None:
    sharding = sharding.update(spec=jax.sharding.PartitionSpec(*tuple(spec)[1:]))
  return jax.ShapeDtypeStruct(xs.shape[1:], xs.dtype, sharding=sharding)


def settle_carry(where: str, abstract_step: Any, carry: Any, rounds: int = 3) -> Any:
  """Explicit sharding mode: ``carry`` resharded as one step returns it.

  Parameters split over an Explicit mesh axis (model parallelism over the
  hidden axis) make each step's carry split over that axis too, where the
  initial carry is split over the batch only; ``scan`` needs the two types
  equal. ``abstract_step(carry)`` traces one step (``jax.eval_shape``; the
  shardings are in the types of its abstract outputs) and the carry takes the
  new carry's shardings, until a step keeps them (the second look, for the
  package's cells). A carry of other structure or shapes is left to the
  scan's own checks. Call it in explicit sharding mode only
  (:func:`explicit_mesh`): it traces the step once more.

  Raises:
    ValueError: a step whose carry's sharding still changes after ``rounds``
      looks (``where`` names the layer).
  """
  return settle_state(where, lambda c, _: (abstract_step(c), {}), carry, {}, rounds)[0]


def settle_state(where: str, abstract_step: Any, carry: Any, variables: dict[str, Any],
                 rounds: int = 3) -> tuple[Any, dict[str, Any]]:
  """:func:`settle_carry` for a carry and the values of the cell's own
  Variables that the scan carries too (``variables``, by their paths:
  ``cell.running_mean``): ``abstract_step(carry, variables)`` returns both
  after one step, and both take its shardings until a step keeps them. A
  Variable a step computes from parameters split over a mesh axis (a running
  mean of ``h``) is split over it too, where it was given replicated.

  Returns:
    ``(carry, variables)``: each leaf the one given where its sharding stays,
    else resharded (the values are the same).

  Raises:
    ValueError: a step whose carry's or Variables' shardings still change
      after ``rounds`` looks, naming them.
  """
  state: Any = (carry, dict(variables))
  structure: Any  # jax's PyTreeDef (untyped for mypy)
  for _ in range(rounds):
    new = abstract_step(*state)
    olds, structure = jax.tree_util.tree_flatten(state)
    news = jax.tree_util.tree_leaves(new)
    if jax.tree_util.tree_structure(new) != structure or any(
        jnp.shape(o) != jnp.shape(n) for o, n in zip(olds, news)):
      return state  # not the state the scan can take: its own checks say why
    # (a leaf without a mesh in its type, such as a shared leaf made outside the
    # mesh, reads as replicated)
    specs = [_full_spec(o) or (None,) * jnp.ndim(o) for o in olds], \
      [_full_spec(n) or (None,) * jnp.ndim(n) for n in news]
    if specs[0] == specs[1]:
      return state
    last = state, new
    state = structure.unflatten(
      o if a == b else jax.sharding.reshard(o, n.sharding)
      for o, n, a, b in zip(olds, news, *specs))
  (carry, variables), (new_carry, new_variables) = last
  before, after = ([_full_spec(c) for c in jax.tree_util.tree_leaves(c)]
                   for c in (carry, new_carry))
  changed = [f'carry partitions {before} -> {after}'] if before != after else []
  changed += [f'{name} partitions {_full_spec(v)} -> {_full_spec(new_variables[name])}'
              for name, v in variables.items() if _full_spec(v) != _full_spec(new_variables[name])]
  what = ('its carry, and the Variables of the cell that the scan carries (state_axes), split '
          'over the mesh as they were given (explicit sharding mode: they' if variables else
          'its carry split over the mesh as it was given (explicit sharding mode: the carry')
  _checks.fail(where, 'cell', f"a step that returns {what} took the sharding of the step's "
               f'output {rounds} times; {EXPLICIT_REMEDY})', '; '.join(changed))


# What to do where a step splits over a mesh axis what the scan carries from
# step to step (nr.RNN's carry and the cell's Variables, compat.RNN's
# variable_carry).
EXPLICIT_REMEDY = ('keep its sharding in the step, or split the parameters over mesh axes of '
                   'AxisType.Auto')


def check_gate_split(where: str, arg: str, hidden: Any, params: Any, got: str) -> None:
  """Explicit sharding mode: a parameter whose last axis stacks a cell's gates
  (a multiple of ``hidden`` wide: ``(in, 4 * hidden)`` for an LSTM's) split
  over ``n`` devices splits each gate, hence each step's carry, over them too,
  which JAX refuses where ``n`` does not divide ``hidden`` (an error from deep
  in the step): then a ``ValueError`` naming ``arg`` (``got``: what it is).
  Without an int ``hidden`` (a cell that does not say its size), nothing is
  checked."""
  if not isinstance(hidden, int) or isinstance(hidden, bool):
    return
  for p in jax.tree_util.tree_leaves(params):
    spec = explicit_spec(p)
    axes = () if spec is None else spec[-1]
    axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    if not axes or jnp.shape(p)[-1] % hidden:
      continue
    mesh = jax.typeof(p).sharding.mesh
    n = int(np.prod([mesh.shape[a] for a in axes]))
    if hidden % n:
      over = f'mesh axis {axes[0]!r}' if len(axes) == 1 else f'mesh axes {axes}'
      _checks.fail(where, arg, f'a hidden size that is a multiple of {n} (explicit sharding '
                   f'mode: a parameter of shape {tuple(jnp.shape(p))} is split over {over} '
                   f'({n} devices) on its last axis, which holds the gates, {hidden} wide each: '
                   "each gate and each step's carry would be split over those devices too; keep "
                   f'that axis whole over {over}, or make the hidden size a multiple of {n})',
                   got)


@contextlib.contextmanager
def gates_checked(where: str, arg: str, hidden: Any, params: Any, got: str, *,
                  known: bool) -> Iterator[None]:
  """Around the abstract trace of a step in explicit sharding mode, the gate
  split of :func:`check_gate_split`: before it for this package's cells
  (``known``: their parameters stack the gates on the last axis), and for
  any other cell only where the trace fails with an error not of this
  package, whose cause it then names (``raise ... from`` JAX's): a parameter
  of another cell whose last axis is a multiple of the hidden size need not
  hold gates, and a cell that runs is never refused."""
  if known:
    check_gate_split(where, arg, hidden, params, got)
    yield
    return
  try:
    yield
  except Exception as e:
    if _checks.origin(e) is not None:
      raise
    try:
      check_gate_split(where, arg, hidden, params, got)
    except ValueError as gates:
      raise gates from e
    raise


def _full_spec(x: Any) -> tuple | None:
  """``x``'s partition in its type, one entry per axis (``None``: no sharding)."""
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  spec = getattr(sharding, 'spec', None)
  if spec is None:
    return None
  return tuple(spec) + (None,) * (jnp.ndim(x) - len(spec))


def explicit_mesh(x: Array) -> bool:
  """Whether ``x`` is traced under a mesh with Explicit axes: the one
  ``jax.set_mesh`` sets, or the mesh of ``x``'s own sharding in its type."""
  meshes = (jax.sharding.get_abstract_mesh(), getattr(jax.typeof(x).sharding, 'mesh', None))
  return any(jax.sharding.AxisType.Explicit in tuple(getattr(m, 'axis_types', ()) or ())
             for m in meshes)


def batch_sharding(xs: Array, num_batch_axes: int) -> tuple | None:
  """Explicit sharding mode: the partition of time-major ``xs``'s batch axes
  (``xs.shape[1:1 + num_batch_axes]``), or ``None`` where no batch axis is
  split over an Explicit mesh axis (:func:`explicit_spec`)."""
  spec = explicit_spec(xs)
  if spec is None:
    return None
  batch = spec[1:1 + num_batch_axes]
  return batch if any(s is not None for s in batch) else None


def shard_like(carry: Any, xs: Array, num_batch_axes: int, rows: Any = None) -> Any:
  """``carry``'s leaves that lead with the batch axes of time-major ``xs``
  (and are not marked shared in ``rows``, :attr:`Rows.carry`), split over
  them as ``xs`` is (explicit sharding mode); ``carry`` itself otherwise
  (:func:`batch_sharding`).

  Under an Explicit mesh a default zero carry is replicated while every
  step's output is split over the batch like the inputs, and ``scan`` needs
  its carry's type unchanged (flax.nnx's RNN fails there). A leaf's other
  axes keep their own partition.
  """
  batch = batch_sharding(xs, num_batch_axes)
  if batch is None:
    return carry
  shape = tuple(xs.shape[1:1 + num_batch_axes])
  sharding = jax.typeof(xs).sharding

  def one(c, row=True):
    if not row or tuple(jnp.shape(c)[:num_batch_axes]) != shape:
      return c  # not per row (a shared counter): as it is
    own = explicit_spec(c) or (None,) * jnp.ndim(c)
    spec = batch + own[num_batch_axes:]
    if explicit_spec(c) == spec:
      return c
    return jax.sharding.reshard(c, sharding.update(spec=jax.sharding.PartitionSpec(*spec)))
  rows = _rows_for(rows, carry)
  return jax.tree_util.tree_map(one, carry, *(() if rows is None else (rows,)))


def like_inputs(carry: Any, xs: Array, num_batch_axes: int, masks: StepMasks,
                rows: Any = None) -> Any:
  """A carry typed as each step's carry will be: varying like the inputs
  under ``shard_map`` (:func:`vary_like`), split over the batch like them under
  an Explicit mesh (:func:`shard_like`; ``rows``: :attr:`Rows.carry`)."""
  return shard_like(vary_like(carry, xs, *masks), xs, num_batch_axes, rows)


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
  rows: Rows | None = None,
) -> tuple[Any, Any]:
  """Scans ``cell`` over time-major ``xs`` with carry selection.

  The cell's state is threaded through the scan as flax.nnx's ``RNN`` does
  (:func:`nnx_state_axes`): Variables the cell changes and its RNG streams
  persist after the call. At padding the cell sees zeros
  (:func:`clean_padding`), so garbage there reaches no output or gradient.

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
    rows: the leaves that hold the rows (:class:`Rows`); default the cell's
      (:func:`cell_rows`).

  Returns:
    ``(final_carry, ys)`` with ``ys`` time-major; ``ys`` is zero where not valid.
  """
  num_batch_axes = xs.ndim - 1 - num_feature_axes
  axes = nnx_state_axes(state_axes, broadcast_rngs)
  if rows is None:  # the leaves shared by the rows
    rows = cell_rows(cell, xs, masks, num_feature_axes)
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
  step_fn = with_rows(_remat_step if remat else step, rows)
  scan = graph_nnx.scan(step_fn, in_axes=(axes, nnx.Carry, 0, None), out_axes=(nnx.Carry, 0),
                        unroll=unroll)
  if broadcast_rngs is not None:
    # One split per call: the broadcast streams give new randomness each call.
    scan = graph_nnx.split_rngs(splits=1, only=broadcast_rngs, squeeze=True)(scan)
  with jax.named_scope(f'nr.RNN/{type(cell).__name__}'):  # for profiles and HLO dumps
    return scan(cell, carry, (xs, masks.valid, masks.reset, step_rngs),
                (dropout_masks, reset_carry))


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
  def carried(path, variable):
    try:
      return axes.map_prefix(path, variable) is nnx.Carry
    except ValueError:  # a Variable no filter takes: flax's scan says so
      return False

  return {_path_name(path): v for path, v in nnx.to_flat_state(graph_nnx.state(cell, carried))
          if isinstance(v.get_raw_value(), jax.Array)}


def _path_name(path: tuple) -> str:
  return 'cell' + ''.join(f'[{p}]' if isinstance(p, int) else f'.{p}' for p in path)


def _abstract_cell_step(cell, axes: nnx.StateAxes, carry: Any, variables: dict[str, Any],
                        xs: Array, dropout_masks: Any, step_rngs: Array | None) -> Any:
  """The carry and the carried Variables (:func:`carried_variables`, given
  ``variables``' values) after one step of ``cell``, abstract
  (``nnx.eval_shape``: the cell's Variables and streams do not change), for
  :func:`settle_state`."""
  x_t = abstract_step_input(xs)
  rng_t = None if step_rngs is None else abstract_step_input(step_rngs)

  def one_step(cell, carry, variables, x_t, dropout_masks, rng_t):
    own = carried_variables(cell, axes)
    for name, value in variables.items():
      own[name].set_raw_value(value)
    new_carry = in_dtypes_of(carry, _call_cell(cell, carry, x_t, dropout_masks, rng_t)[0])
    return new_carry, {name: own[name].get_raw_value() for name in variables}
  return nnx.eval_shape(one_step, cell, carry, variables, x_t, dropout_masks, rng_t)


def cell_rows(cell, xs: Array, masks: StepMasks, num_feature_axes: int) -> Rows:
  """:class:`Rows` of an nnx cell over time-major ``xs``: its default carry
  and the outputs of one step from it, built abstractly (``nnx.eval_shape``,
  on a copy of the cell: no Variable of it changes and none of its streams
  advances; ``initialize_carry`` gets a fresh ``nnx.Rngs``) at two batch
  shapes (:func:`probed_rows`: where they cannot say, the shapes decide).
  Only with padding or packing, whose masks are all that ``Rows`` informs,
  and not for this package's cells, whose carries and outputs all lead with
  the batch axes: trace time only, nothing in the program changes but the
  masking of leaves marked shared."""
  from nnx_recurrent._base import is_package_cell

  if (masks.valid is None and masks.reset is None) or is_package_cell(cell) \
      or not hasattr(cell, 'initialize_carry'):
    return Rows()
  features = tuple(xs.shape[xs.ndim - num_feature_axes:])
  batch = tuple(xs.shape[1:xs.ndim - num_feature_axes])

  def default(cell, shape):
    if uses_base_initialize_carry(cell):
      return cell._initialize_carry(shape, jax.random.key(0), nnx.initializers.zeros_init())
    return cell.initialize_carry(shape, nnx.Rngs(0))

  def carry_and_outputs(batch):
    def one(cell):
      carry = default(cell, (*batch, *features))
      return carry, _call_cell(cell, carry, jnp.zeros((*batch, *features), xs.dtype), None)[1]
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
  return jax.tree_util.tree_map(lambda r, c: typed_as(r.astype(c.dtype), c), reset_carry, carry)


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
  override that takes ``**options`` on): only such a cell gets this package's
  per-call options (``dropout_masks``, a step's zoneout key). Another cell's
  ``dropout_rate`` or ``zoneout_rate`` attribute is its own business, as in
  flax.nnx, whose ``RNN`` calls every cell as ``cell(carry, x)``."""
  from nnx_recurrent._base import RNNCellBase, overrides

  if not isinstance(cell, RNNCellBase):
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
  or packing, whose per-row masks would align with the wrong axes).
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
    if masked and any(jnp.ndim(g) > len(e.shape) for g, e in zip(given, wanted)):
      _checks.fail(where, 'initial_carry', f'leaf shapes {[e.shape for e in wanted]} with '
                   'seq_lengths or segment_ids (a carry with more leading axes than the '
                   'inputs, beams say, runs without them)',
                   f'{[tuple(jnp.shape(g)) for g in given]}')
  return initial_carry


def step_keeps_carry(cell, carry: Any, step_shape: tuple[int, ...], inputs_dtype: Any) -> bool:
  """Whether one step of ``cell``, traced on a copy (``nnx.eval_shape``: no
  parameter or stream changes), takes ``carry`` and returns a carry of its
  structure and leaf shapes, as the scan needs."""
  def one_step(cell, carry):
    return _call_cell(cell, carry, jnp.zeros(step_shape, inputs_dtype), None)[0]

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
    # One length for every row (a scalar, or any shape that broadcasts) is
    # broadcast to the batch, as flax broadcasts it.
    seq_lengths = _checks.check_seq_lengths(where, seq_lengths, batch_shape)
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
                 time_major: bool, rows: Any = None) -> Any:
  """Scan outputs back to input order (``reverse`` with ``keep_order``; ``idx``
  from :func:`processing_order`) and to the caller's layout. ``rows``: the
  outputs' :attr:`Rows.out` (``None``: their shapes say which are the rows')."""
  if reverse and keep_order:
    def back(y, row=True):
      # A leaf without the batch axes (a per-step scalar, a shared leaf of the
      # batch's size by chance) has no one input order when each row reverses
      # by its own length.
      if idx is not None and not (row and _per_row(idx[0], y[0])):
        _checks.fail('RNN', 'cell', 'per-step outputs that lead with the batch axes '
                     f'{seq.batch_shape} when keep_order=True (as in a Bidirectional\'s '
                     'backward direction) restores each row\'s own order (reverse with '
                     'seq_lengths or segment_ids)',
                     f'an output leaf of per-step shape {tuple(y.shape[1:])}')
      return take_time(y, idx)
    rows = _rows_for(rows, ys)
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
