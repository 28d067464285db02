"""A carry typed as each step's carry will be.

Inside ``jax.shard_map`` a carry varies like the inputs (:func:`vary_like`);
under a mesh of Explicit axes (JAX's explicit sharding mode) it is split over
the batch like them (:func:`shard_like`), and parameters split over a mesh
axis (model parallel over the hidden axis) split each step's carry too, so
the carry (and the cell's Variables that the scan carries) takes the sharding
one step of the cell gives it, traced abstractly (:func:`settle_state`).
Outside those two modes nothing here changes a program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnx_recurrent import _checks
from nnx_recurrent._scan._masking import StepMasks, full_spec, rows_for

Array = jax.Array


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


def explicit_spec(x: Any) -> tuple | None:
  """The partition of ``x``'s axes over the *Explicit* axes of its mesh (JAX's
  explicit sharding mode, "sharding in types"), one entry per axis, or ``None``
  when no axis of ``x`` is split so: no mesh, a mesh of Auto axes (whose
  shardings are not in the types) or inside ``jax.shard_map``. Only then does
  anything below act, so the programs of every other mode are unchanged."""
  spec = full_spec(x)
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
    specs = [full_spec(o) or (None,) * jnp.ndim(o) for o in olds], \
      [full_spec(n) or (None,) * jnp.ndim(n) for n in news]
    if specs[0] == specs[1]:
      return state
    last = state, new
    state = structure.unflatten(
      o if a == b else jax.sharding.reshard(o, n.sharding)
      for o, n, a, b in zip(olds, news, *specs))
  (carry, variables), (new_carry, new_variables) = last
  before, after = ([full_spec(c) for c in jax.tree_util.tree_leaves(c)]
                   for c in (carry, new_carry))
  changed = [f'carry partitions {before} -> {after}'] if before != after else []
  changed += [f'{name} partitions {full_spec(v)} -> {full_spec(new_variables[name])}'
              for name, v in variables.items() if full_spec(v) != full_spec(new_variables[name])]
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


def rows_typed_as(a: Any, xs: Array, num_batch_axes: int, lead: int = 0) -> Any:
  """``a`` (``seq_lengths`` ``(*batch)``, or time-major ``segment_ids`` with
  ``lead=1``) split over the mesh as the rows of time-major ``xs`` are, in
  explicit sharding mode where the two differ (lengths replicated beside rows
  split, or the other way): the rows' sharding is the inputs', so the masks,
  the carry and every output take it. ``a`` itself in every other mode."""
  if a is None or (explicit_spec(xs) is None and explicit_spec(a) is None):
    return a
  spec = full_spec(xs)
  assert spec is not None  # explicit_spec of one of the two
  want = spec[1 - lead:1 + num_batch_axes]
  if full_spec(a) == want:
    return a
  like = xs if explicit_spec(xs) is not None else a
  return jax.sharding.reshard(a, jax.typeof(like).sharding.update(
    spec=jax.sharding.PartitionSpec(*want)))


def scan_unroll(unroll: int | bool, length: int, x: Any) -> int | bool:
  """``unroll`` for a scan of ``length`` steps over ``x`` (time-major, or any
  array the scan reads), but where ``x`` is traced under a mesh with an Explicit
  axis of size 1 and ``unroll`` leaves a remainder (``length % unroll``), the
  largest divisor of ``length`` below it. JAX's scan runs a remainder as a
  second loop and concatenates the two loops' outputs, whose types differ where
  an array axis of size 1 is split over a mesh axis (one row over a ``data``
  axis of size 1, a hidden size of 1 over a ``model`` axis of size 1): a
  ``ShardingTypeError`` from its concatenate (jax 0.10 to 0.12.1). An axis of
  size 1 splits evenly over mesh axes of size 1 only, so on meshes without
  those ``unroll`` stays, as in every other mode."""
  if isinstance(unroll, bool) or unroll <= 1 or length <= unroll or length % unroll == 0:
    return unroll
  if not any(size == 1 and kind == jax.sharding.AxisType.Explicit
             for mesh in _meshes(x)
             for size, kind in zip(mesh.axis_sizes, mesh.axis_types, strict=True)):
    return unroll
  return max(d for d in range(1, unroll + 1) if length % d == 0)


def _meshes(x: Array) -> tuple:
  """The meshes ``x`` is traced under: the one ``jax.set_mesh`` sets (empty
  without one), and the mesh of ``x``'s own sharding in its type, if any."""
  mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
  return (jax.sharding.get_abstract_mesh(), *([mesh] if mesh is not None else []))


def explicit_mesh(x: Array) -> bool:
  """Whether ``x`` is traced under a mesh with Explicit axes: the one
  ``jax.set_mesh`` sets, or the mesh of ``x``'s own sharding in its type."""
  return any(jax.sharding.AxisType.Explicit in tuple(m.axis_types or ()) for m in _meshes(x))


def batch_sharding(xs: Array, num_batch_axes: int) -> tuple | None:
  """Explicit sharding mode: the partition of time-major ``xs``'s batch axes
  (``xs.shape[1:1 + num_batch_axes]``), or ``None`` where no batch axis is
  split over an Explicit mesh axis (:func:`explicit_spec`)."""
  spec = explicit_spec(xs)
  if spec is None:
    return None
  batch = spec[1:1 + num_batch_axes]
  return batch if any(s is not None for s in batch) else None


def splits_rows(xs: Array, num_batch_axes: int) -> bool:
  """Whether :func:`shard_like` splits a carry's rows as time-major ``xs``'s
  batch axes are split (explicit sharding mode): then a carry leaf that the
  rows share but whose size is the batch's by chance must be told apart
  (:class:`Rows`), with or without padding."""
  return batch_sharding(xs, num_batch_axes) is not None


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
  rows = rows_for(rows, carry)
  return jax.tree_util.tree_map(one, carry, *(() if rows is None else (rows,)))


def like_inputs(carry: Any, xs: Array, num_batch_axes: int, masks: StepMasks,
                rows: Any = None) -> Any:
  """A carry typed as each step's carry will be: varying like the inputs
  under ``shard_map`` (:func:`vary_like`), split over the batch like them under
  an Explicit mesh (:func:`shard_like`; ``rows``: :attr:`Rows.carry`)."""
  return shard_like(vary_like(carry, xs, *masks), xs, num_batch_axes, rows)
