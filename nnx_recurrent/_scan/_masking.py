"""Carry selection and the masks it reads.

Per-step ``valid`` and ``reset`` booleans (:class:`StepMasks`), built from
``seq_lengths`` or packed ``segment_ids``; :func:`select` keeps the old carry
where a step is padding. Leaves of a carry or of a step's outputs that the
rows share (a step counter, a ``(features,)`` statistic) go on: which they
are the cell says where it can (:class:`Rows`, :func:`leaf_rows`), their
shapes where it cannot (:func:`per_row`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nnx_recurrent import _checks

Array = jax.Array


class StepMasks(NamedTuple):
  """Per-step booleans, time-major ``(time, *batch)``; ``None`` means all-true/false."""

  valid: Array | None  # step is real data (not padding)
  reset: Array | None  # step starts a segment after the row's first: carry <- reset carry


def bcast(m: Array, x: Array) -> Array:
  """Reshapes a ``(*batch)`` mask to broadcast against ``(*batch, *features)``."""
  return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def full_spec(x: Any) -> tuple | None:
  """``x``'s partition in its type, one entry per axis (``None``: no sharding)."""
  sharding = x.sharding if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x).sharding
  spec = getattr(sharding, 'spec', None)
  if spec is None:
    return None
  return tuple(spec) + (None,) * (jnp.ndim(x) - len(spec))


def masked_where(mask: Array, x: Array, y: Any) -> Array:
  """``jnp.where(mask, x, y)`` with a ``(*batch)`` mask broadcast on the right.

  In explicit sharding mode the operands are first split alike where the mask
  already has ``x``'s shape (a feature axis of size 1): ``where`` takes one
  sharding there, where it merges the two itself for a mask it broadcasts
  (lengths replicated and the rows split, or the other way: each axis split
  as the operand that splits it). Every other program is unchanged.

  A mask that is broadcast is broadcast again in the backward pass
  (:func:`_broadcast_where`), not saved: inside a scan's step a saved one is
  a ``(time, *batch, *features)`` array of booleans."""
  m = bcast(mask, x)
  if m.shape == jnp.shape(x):
    sharding = _merged_sharding(m, x)
    if sharding is not None:
      m, x = _resharded(m, sharding), _resharded(x, sharding)
      y = _resharded(y, sharding) if jnp.shape(y) == jnp.shape(x) else y
    return jnp.where(m, x, y)
  return _broadcast_where(mask, x, y)


def _broadcast_where(mask: Array, x: Array, y: Any) -> Array:
  """``jnp.where(bcast(mask, x), x, y)`` under ``jax.checkpoint``: the backward
  pass of ``where`` needs only the mask, and it broadcasts the ``(*batch)``
  mask again instead of keeping the broadcast one. Without it, a scan's step
  (carry selection, zero outputs, a packed segment's reset) saved one
  ``(*batch, *features)`` array of booleans per step and per carry and output
  leaf: 5% more training memory for ``nr.RNN(OptimizedLSTMCell)`` with
  ``seq_lengths``, 15% with ``remat=True`` (25% packed). The forward pass is
  the same program (no ``optimization_barrier``: ``prevent_cse=False``)."""
  return _checkpointed_where(mask, x, y)


def _where(mask: Array, x: Array, y: Any) -> Array:
  return jnp.where(bcast(mask, x), x, y)


# One function for every call, so that jax.checkpoint's trace cache hits
# (a closure made per call missed it on every eager call).
_checkpointed_where = jax.checkpoint(_where, prevent_cse=False)


def _merged_sharding(a: Array, b: Array) -> Any:
  """Each axis split as whichever of ``a`` and ``b`` splits it, on the mesh of
  the one that splits an axis (``None`` where neither does)."""
  sa, sb = full_spec(a), full_spec(b)
  if sa is None or sb is None:
    return None
  merged = tuple(p if p is not None else q for p, q in zip(sa, sb))
  if all(p is None for p in merged):
    return None
  split = a if any(p is not None for p in sa) else b
  return jax.typeof(split).sharding.update(spec=jax.sharding.PartitionSpec(*merged))


def _resharded(a: Any, sharding: Any) -> Any:
  return a if full_spec(a) == tuple(sharding.spec) else jax.sharding.reshard(a, sharding)


def per_row(mask: Array, x: Any) -> bool:
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
  (:func:`per_row`); a ``False`` marks a leaf shared by the rows whose
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


def rows_for(rows: Any, tree: Any) -> Any:
  """``rows`` where it has ``tree``'s structure, else ``None`` (the shapes decide)."""
  structure: Any = jax.tree_util.tree_structure(tree)  # jax's PyTreeDef (untyped for mypy)
  return None if rows is None or jax.tree_util.tree_structure(rows) != structure else rows


def select(mask: Array, new: Any, old: Any, shared: str = 'new', rows: Any = None) -> Any:
  """``where(mask, new, old)`` over matching pytrees, mask broadcast on the
  right; leaves without the batch axes (:func:`per_row`), or marked shared
  in ``rows`` (:attr:`Rows.carry`), take ``new``, or ``old`` with
  ``shared='old'``. A ``new`` carry of other shapes than ``old`` (a cell's
  step that lost an axis) is a ``TypeError`` naming them, instead of jax's
  scan error."""
  check_carry_shapes(new, old)

  def one(n, o, row=True):
    if row and per_row(mask, n):
      return masked_where(mask, n, o)
    return n if shared == 'new' else o
  rows = rows_for(rows, new)
  return jax.tree_util.tree_map(one, new, old, *(() if rows is None else (rows,)))


def check_carry_shapes(new: Any, old: Any) -> None:
  """A ``TypeError`` naming the shapes where a cell's step returned a carry of
  other shapes than it was given (jax's scan error names the scan's body)."""
  news, olds = jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old)
  if len(news) != len(olds) or any(jnp.shape(n) != jnp.shape(o) for n, o in zip(news, olds)):
    _checks.fail('RNN', 'cell', "a step that returns a carry of its carry's shapes "
                 f'{[jnp.shape(o) for o in olds]}', f'{[jnp.shape(n) for n in news]}',
                 TypeError)


def lengths_to_valid(seq_lengths: Array, time: int) -> Array:
  """``valid[t, *b] = t < seq_lengths[*b]``, time-major."""
  t = jnp.arange(time).reshape((time,) + (1,) * seq_lengths.ndim)
  return t < seq_lengths[None]


def segments_to_masks(segment_ids: Array) -> StepMasks:
  """Valid and reset masks from time-major segment ids (0 = padding): a
  reset at each segment's first step but the row's first segment's."""
  valid, starts = segment_masks(segment_ids)
  return StepMasks(valid, starts & earlier_valid(valid))


def earlier_valid(valid: Array) -> Array:
  """``(time, *batch)``: whether a valid step came before step ``t`` in the row.
  Both sides int32: comparing the count with the bool mask itself is a
  promotion that ``jax_numpy_dtype_promotion='strict'`` refuses."""
  return jnp.cumsum(valid, axis=0, dtype=jnp.int32) > valid.astype(jnp.int32)


def segment_masks(segment_ids: Array) -> tuple[Array, Array]:
  valid = segment_ids != 0
  prev = jnp.concatenate([jnp.zeros_like(segment_ids[:1]), segment_ids[:-1]], axis=0)
  return valid, valid & (segment_ids != prev)


def clean_padding(xs: Array, valid: Array | None) -> Array:
  """Zeros at padding: what a cell sees there is never garbage (NaN, inf).

  Carry selection discards the values a cell computes at padding, but not
  their gradients: NaN at padding times a zero cotangent is NaN (the JAX FAQ's
  "double where"). One ``where`` over the sequence, before the scan.
  """
  if valid is None:
    return xs
  return masked_where(valid, xs, jnp.zeros((), xs.dtype))
