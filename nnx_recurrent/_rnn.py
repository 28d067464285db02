"""Sequence layers over any cell: ``RNN``, ``Bidirectional``, ``flip_sequences``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.errors import TraceContextError

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import (
  Array,
  ArrayOrNumPy,
  Carry,
  RngsLike,
  RNNCellBase,
  has_carry_stream,
  in_flax_style,
)


def _check_cell(where: str, cell: Any) -> None:
  # As flax.nnx: `initialize_carry` is needed only for a default carry; any graph
  # node (nnx.Pytree, which nnx.Module subclasses) scans.
  if not (isinstance(cell, nnx.Pytree) and hasattr(cell, 'num_feature_axes')):
    _checks.fail(where, 'cell', 'an RNNCellBase (an nnx.Module with num_feature_axes and '
                 'initialize_carry)', type(cell).__name__, TypeError)


def _warn_if_step_options_dropped(cell: Any) -> None:
  """A subclass of this package's cells whose ``__call__`` takes no
  ``**options`` still has dropout or zoneout, but ``RNN`` cannot hand it the
  per-sequence masks or a call's RNG (:func:`_scan.takes_step_options`): say
  so once, when the layer is built, rather than change the masks silently."""
  if (not isinstance(cell, RNNCellBase) or in_flax_style(cell)
      or _scan.takes_step_options(cell)):
    return
  rates = [f'{r}={getattr(cell, r)}' for r in ('dropout_rate', 'recurrent_dropout_rate',
                                               'zoneout_rate') if getattr(cell, r, 0.0)]
  if rates:
    name = type(cell).__name__
    _checks.warn(
      f'RNN: {name}.__call__ overrides RNNCellBase.__call__ without taking **options, so RNN '
      f"cannot pass it one dropout mask per sequence or a call's `rngs` ({', '.join(rates)}): "
      f'the cell draws new masks from its own stream at every step. Define '
      f'`__call__(self, carry, inputs, **options)` and pass **options on to '
      f'super().__call__ to keep them.')


def _carry_stream(where: str, rngs: Any, needed: bool) -> nnx.RngStream | None:
  """flax.nnx's ``rngs`` constructor argument of ``RNN`` / ``Bidirectional``.

  flax keeps an ``RngStream`` (``RngStream(0)`` for ``True``) to build the
  default carry. Zeros need none, and a stored key breaks checkpoints
  (flax#4509), so it is kept only when ``needed``: a cell whose default carry
  may draw from it.
  """
  if not (isinstance(rngs, (bool, nnx.Rngs, nnx.RngStream))):
    _checks.fail(where, 'rngs', 'True, False, an nnx.Rngs or an nnx.RngStream',
                 type(rngs).__name__, TypeError)
  if isinstance(rngs, nnx.Rngs):
    # flax.nnx forks the carry stream whether or not the fork is kept, so the
    # layers built after this one from the same `rngs` get flax's numbers.
    fork = _carry_fork(rngs)
    return fork if needed else None
  if rngs is False or not needed:
    return None
  if rngs is True:
    return nnx.RngStream(0, tag='carry')
  # As flax.nnx: the given stream itself, shared with the caller, so layers
  # given one stream draw in turn.
  return rngs


def _carry_fork(rngs: nnx.Rngs) -> nnx.RngStream | None:
  """``rngs.carry.fork()`` (its ``default`` stream without a ``carry`` one),
  or ``None`` when it has neither."""
  return rngs.carry.fork() if has_carry_stream(rngs) else None


def _call_carry_rngs(rngs: Any, stored: Any, needed: bool):
  """The RNG an RNN passes to ``initialize_carry``: flax.nnx's choice (the
  call's ``rngs``, else the stored stream; an ``nnx.Rngs`` gives a fork of its
  ``carry`` stream, drawn at every call as flax.nnx draws it). When the carry
  is not ``needed`` from it, a fork that the trace cannot draw (an ``Rngs``
  closed over by ``jax.jit``, where flax.nnx raises) is skipped."""
  rngs = rngs if rngs is not None else stored
  if isinstance(rngs, nnx.Rngs):
    if needed:
      return _carry_fork(rngs)
    with contextlib.suppress(TraceContextError):
      return _carry_fork(rngs)
    return None
  return rngs


class _DeclinedStream:
  """What an RNN that keeps no stream (its cell's carry needed none when it
  was built) hands the ``initialize_carry`` of a cell put in since: flax.nnx
  hands it the stream it always keeps, so a carry that ignores it runs as
  there, and one that draws from it raises a ``ValueError`` saying what to do
  (``None`` would change such a carry silently)."""

  def __init__(self, cell_name: str):
    self._cell_name = cell_name

  def _fail(self, *args: Any, **kwargs: Any) -> Any:
    _checks.fail('RNN', 'rngs', "an nnx.Rngs or nnx.RngStream in the call: the cell's "
                 f'initialize_carry ({self._cell_name}) draws from one, and this RNN keeps no '
                 'stream (built around a cell whose carry needed none; flax.nnx keeps one '
                 'always, docs/migrating_from_nnx.md)', 'none')

  __call__ = __getitem__ = _fail

  def __getattr__(self, name: str) -> Any:
    if name.startswith('__'):  # copy, pickle and friends look for protocols
      raise AttributeError(name)
    return self._fail()


class RNN(nnx.Module):
  """Applies a cell over a sequence with :func:`flax.nnx.scan`, masking padding.

  Inputs are ``(*batch, time, *features)`` (any number of batch axes, and as
  many feature axes as the cell's ``num_feature_axes``), or
  ``(time, *batch, *features)`` with ``time_major=True``.

  Variable lengths: ``seq_lengths`` (integers, shape ``batch``) marks steps
  ``t >= seq_lengths`` as padding. At a padding step the carry is *kept*
  (carry selection inside the scan), so the returned carry is the carry after
  each row's last valid step — the initial carry for a length-0 row — and the
  outputs at padding positions are zero. Packed sequences: ``segment_ids``
  (integers shaped like the batch and time axes, ``0`` = padding; consecutive
  equal ids form one segment): a row's first segment starts from
  ``initial_carry``, every later one from the default initial carry (zeros,
  or the learned one), so each segment's outputs equal a run on that segment
  alone; a chunk's carry passed on as ``initial_carry`` goes on into the next
  chunk's first segment (docs/streaming.md). The returned carry of a packed
  row is the carry after its last valid step: the end of its last segment
  (in processing order); the other segments' last outputs are in the
  outputs (see :func:`unpack_sequences`).

  ``reverse=True`` processes each row (each segment) from its last valid step
  to its first, leaving padding at the end; outputs come in processing order
  unless ``keep_order=True`` puts them back in input order.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> rnn = nr.RNN(nr.LSTMCell(3, 5, rngs=nnx.Rngs(0)))
    >>> x = jnp.ones((2, 4, 3))  # (batch, time, features)
    >>> rnn(x).shape
    (2, 4, 5)
    >>> (c, h), y = rnn(x, seq_lengths=jnp.array([4, 2]), return_carry=True)
    >>> bool((h[1] == y[1, 1]).all()), bool((y[1, 2:] == 0).all())
    (True, True)

  Args:
    cell: the cell, an :class:`RNNCellBase`.
    time_major: inputs are ``(time, *batch, *features)``.
    return_carry: return ``(carry, outputs)`` instead of ``outputs``.
    reverse: process sequences backwards (see above).
    keep_order: with ``reverse``, return outputs in input order.
    unroll: scan steps unrolled per loop iteration; as in ``jax.lax.scan``,
      ``True`` (or ``0``) unrolls every step and ``False`` none.
    remat: rematerialise each step in the backward pass: training memory holds
      only the carries, at the cost of recomputing each step once. What the
      step changes in the cell (Variables, plain attributes) persists as
      without it.
    state_axes: as flax.nnx's: how the cell's state goes through the scan, a
      mapping from state filters to ``nnx.Carry`` (threaded from step to step:
      the default, ``{...: nnx.Carry}``), ``None`` (broadcast: changes are
      dropped) or an axis. With the default, every Variable the cell changes
      (a step counter, its own RNG streams) keeps its changes after the call.
      Under a mesh of Explicit axes, a carried Variable that a step returns
      split otherwise than it holds (a running mean of ``h``, split over a
      ``model`` axis as ``h`` is) is resharded in place before the scan, its
      value unchanged: after the call it has the step's sharding.
    broadcast_rngs: as flax.nnx's: a filter of RNG stream names (e.g.
      ``'recurrent_dropout'``) held fixed over the steps of one call, so that
      a cell's ``nnx.Dropout`` applies one mask to every step (variational
      dropout); the streams still advance once per call.
    learn_initial_carry: make the initial carry a parameter: one
      ``nnx.Param`` per carry array, of the shape of one row's carry (one
      value per feature, zeros at first), broadcast over the batch (and, for
      convolutional cells, over positions, which keeps them translation
      equivariant) and trained like any parameter. It is the carry a
      length-0 row returns and the carry every packed segment starts from;
      an explicit ``initial_carry`` still wins (for a row's first segment).
      The parameters are the attribute ``initial_carry`` (``None``
      otherwise).
    rngs: as flax.nnx's (``True``, ``False``, an ``nnx.Rngs`` or an
      ``nnx.RngStream``): the source of the RNG passed to the cell's
      ``initialize_carry``. Unlike flax, a stream is kept in the module's
      state only when the cell may draw from it: never for this package's
      cells (their zero carry needs none) unless built with a ``carry_init``
      and no stream of their own (dropout or zoneout give them one, which
      their carry then draws from), or with ``keep_rngs`` (a stream that
      flax.nnx's ``RNN`` never draws from: it passes its own); always for
      other cells (flax.nnx's own, or yours), whose
      ``initialize_carry(input_shape, rngs)`` gets it as in flax.nnx.
  """

  @_checks.named_errors
  def __init__(self, cell, *, time_major: bool = False, return_carry: bool = False,
               reverse: bool = False, keep_order: bool = False, unroll: int | bool = 1,
               remat: bool = False, state_axes: Any = None, broadcast_rngs: Any = None,
               learn_initial_carry: bool = False, rngs: Any = True):
    _check_cell('RNN', cell)
    _warn_if_step_options_dropped(cell)
    self.cell = cell
    self.time_major = _checks.check_bool('RNN', 'time_major', time_major)
    self.return_carry = _checks.check_bool('RNN', 'return_carry', return_carry)
    self.reverse = _checks.check_bool('RNN', 'reverse', reverse)
    self.keep_order = _checks.check_bool('RNN', 'keep_order', keep_order)
    self.unroll = _checks.check_unroll('RNN', unroll)
    self.remat = _checks.check_bool('RNN', 'remat', remat)
    learn_initial_carry = _checks.check_bool('RNN', 'learn_initial_carry', learn_initial_carry)
    if state_axes is not None and not isinstance(state_axes, Mapping):
      _checks.fail('RNN', 'state_axes', 'None or a mapping from state filters to nnx.Carry, '
                   'None or an axis', type(state_axes).__name__, TypeError)
    filter_doc = ('an nnx filter (a stream or Variable name, a Variable type, ..., None, a '
                  'bool, a predicate, or a tuple of them)')
    for key, axis in (state_axes or {}).items():
      _checks.check_filter('RNN', 'state_axes', key, f'keys that are each {filter_doc}')
      if not (axis is nnx.Carry or axis is None or isinstance(axis, (int, np.integer))):
        _checks.fail('RNN', 'state_axes', 'values that are each nnx.Carry, None or an int '
                     'axis', f'{axis!r} for the filter {key!r}', TypeError)
    _checks.check_filter('RNN', 'broadcast_rngs', broadcast_rngs, filter_doc)
    # As flax.nnx's: an empty or no mapping is the whole state as a carry. Kept as
    # nnx.StateAxes: a plain dict attribute is a pytree, whose keys jax sorts, and
    # filters of two kinds ({nnx.Param: None, ...: nnx.Carry}) do not sort.
    whole_state: dict[Any, Any] = {...: nnx.Carry}
    self.state_axes = nnx.StateAxes(state_axes or whole_state)
    self.broadcast_rngs = broadcast_rngs
    self.rngs = nnx.data(_carry_stream('RNN', rngs, _scan.needs_carry_rngs(cell)))
    # Where flax.nnx would hold a stream and this RNN keeps none (its cell's
    # carry needed none), a cell put in later is handed a _DeclinedStream, not
    # None: its carry runs if it draws nothing, else a ValueError says why.
    self._declined_stream = rngs is not False and self.rngs is None
    self.initial_carry = nnx.data(_learned_carry(cell) if learn_initial_carry else None)

  @_checks.named_errors
  def __call__(
    self,
    inputs: ArrayOrNumPy,
    *,
    initial_carry: Carry | None = None,
    seq_lengths: ArrayOrNumPy | None = None,
    segment_ids: ArrayOrNumPy | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    rngs: RngsLike = None,
  ):
    """Runs the cell over ``inputs``.

    Args:
      inputs: ``(*batch, time, *features)`` (or time first).
      initial_carry: default ``cell.initialize_carry`` (zeros).
      seq_lengths: integer ``(*batch)`` lengths (a scalar, or a shape that
        broadcasts to ``batch`` such as ``(1,)``, is broadcast as in flax;
        whole-number floats, such as a float mask's sum, are cast); steps at
        or past a row's length are padding. A length above ``time`` acts as
        ``time``, as in flax. Concrete lengths must not be negative; under
        ``jit`` they cannot be checked, and a negative one acts as ``0``.
      segment_ids: integer ids shaped like the batch and time axes for packed
        sequences (``0`` = padding); not together with ``seq_lengths``.
        Concrete ids must be non-negative; under ``jit`` a negative id is
        not caught and acts as one more segment.
      return_carry, time_major, reverse, keep_order: override the attributes.
      rngs: an ``nnx.Rngs``, ``nnx.RngStream`` or PRNG key. As in flax.nnx,
        the RNG for the cell's ``initialize_carry`` (an ``nnx.Rngs``'s
        ``carry`` stream), overriding the stored one; and for this package's
        cells, the variational dropout RNG (its ``dropout`` stream),
        overriding the cell's.

    Returns:
      ``outputs``, or ``(final_carry, outputs)`` with ``return_carry``.
    """
    _checks.check_rngs('RNN', rngs)
    return_carry, time_major, reverse, keep_order = _checks.call_flags(
      'RNN', self, return_carry=return_carry, time_major=time_major, reverse=reverse,
      keep_order=keep_order)
    cell = self.cell
    seq = _scan.prepare(
      'RNN', inputs, num_feature_axes=cell.num_feature_axes,
      # (no feature axis, no size to check: a cell of token ids names its vocabulary so)
      in_features=getattr(cell, 'in_features', None) if cell.num_feature_axes else None,
      time_major=time_major,
      seq_lengths=seq_lengths, segment_ids=segment_ids,
    )
    step_shape = tuple(seq.xs.shape[1:])
    # Packed segments after a row's first start from the default carry, the
    # first from an initial_carry given (a chunk's carry passed on goes on).
    reset_from_default = initial_carry is not None and seq.masks.reset is not None
    if initial_carry is None and self.initial_carry is not None:
      initial_carry = _broadcast_carry(cell, self.initial_carry, step_shape)
    needs_rngs = (initial_carry is None or reset_from_default) and _scan.needs_carry_rngs(cell)
    carry_rngs = _call_carry_rngs(rngs, self.rngs, needs_rngs)
    if needs_rngs and carry_rngs is None:
      if _scan.uses_base_initialize_carry(cell) and getattr(cell, 'rngs', None) is None:
        # a random carry_init, no stream anywhere
        _checks.fail('RNN', 'rngs', "an nnx.Rngs or nnx.RngStream in the call: the cell's "
                     'carry_init draws the initial carry, and this RNN keeps no stream (built '
                     'with rngs=False, or before the cell was given its carry_init; flax.nnx '
                     "keeps one always, docs/migrating_from_nnx.md)", 'None')
      if getattr(self, '_declined_stream', False):
        carry_rngs = _DeclinedStream(type(cell).__name__)
    initial_carry = _scan.initial_carry('RNN', cell, initial_carry, step_shape, carry_rngs,
                                        seq.xs.dtype, masked=seq.masks.valid is not None)
    reset_carry = None
    if reset_from_default:
      reset_carry = (_broadcast_carry(cell, self.initial_carry, step_shape)
                     if self.initial_carry is not None
                     else _scan.default_carry(cell, step_shape, carry_rngs))
    xs, idx = _scan.processing_order(seq, reverse)
    dropout_masks = _scan.cell_dropout_masks(cell, step_shape, rngs, xs.dtype)
    rows = _scan.cell_rows(cell, xs, seq.masks, cell.num_feature_axes)  # leaves of the rows
    carry, ys = _scan.masked_scan(
      cell, initial_carry, xs, seq.masks, dropout_masks=dropout_masks,
      unroll=self.unroll, remat=self.remat, state_axes=self.state_axes,
      broadcast_rngs=self.broadcast_rngs, step_rngs=_scan.cell_step_rngs(cell, rngs, seq.time),
      reset_carry=reset_carry, num_feature_axes=cell.num_feature_axes, rows=rows,
    )
    ys = _scan.output_order(ys, seq, reverse, idx, keep_order, time_major, rows.out)
    return (carry, ys) if return_carry else ys


def _learned_carry(cell):
  """One zero ``nnx.Param`` per carry leaf, shaped ``(features,)``."""
  in_features = getattr(cell, 'in_features', None)
  if not isinstance(in_features, int) or not hasattr(cell, 'initialize_carry'):
    _checks.fail('RNN', 'learn_initial_carry', 'a cell with an int in_features and '
                 'initialize_carry (to build its carry)', f'{type(cell).__name__} without one',
                 TypeError)
  # A step of one row; a convolutional cell's spatial axes as large as its
  # kernel, which every padding leaves a point of ('VALID' too).
  spatial = getattr(cell, 'kernel_size', None)
  if not (isinstance(spatial, tuple) and len(spatial) == cell.num_feature_axes - 1):
    spatial = (1,) * (cell.num_feature_axes - 1)
  step_shape = (1, *spatial, in_features)
  shapes = _scan.carry_shapes(cell, step_shape)
  for leaf in jax.tree_util.tree_leaves(shapes):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):  # an integer counter has no gradient
      _checks.fail('RNN', 'learn_initial_carry', 'a cell whose carry leaves are all floating '
                   '(a learned carry is trained)', f'a carry leaf of dtype {leaf.dtype}',
                   TypeError)
  return jax.tree_util.tree_map(lambda leaf: nnx.Param(jnp.zeros(leaf.shape[-1:], leaf.dtype)),
                                shapes)


def _broadcast_carry(cell, learned, step_shape: tuple[int, ...]):
  """The learned carry broadcast to the carry of a step of shape ``step_shape``."""
  shapes = _scan.carry_shapes(cell, step_shape)
  params = jax.tree_util.tree_leaves(learned, is_leaf=lambda v: isinstance(v, nnx.Variable))
  treedef: Any  # jax's PyTreeDef (untyped for mypy)
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  return treedef.unflatten([jnp.broadcast_to(p[...].astype(s.dtype), s.shape)
                            for p, s in zip(params, leaves)])


def _concatenate(a: Array, b: Array) -> Array:
  return jnp.concatenate([a, b], axis=-1)


def merge_directions(where: str, merge_fn: Callable[[Array, Array], Array], out_f: Any,
                     out_b: Any) -> Any:
  """``merge_fn`` over the two directions' outputs, leaf by leaf. With the
  default merge (concatenation on the last axis), outputs that differ in
  another axis (convolutional directions of other strides or paddings) fail
  here, naming ``backward_rnn``, rather than in ``jnp.concatenate``."""
  if merge_fn is _concatenate:
    for a, b in zip(jax.tree_util.tree_leaves(out_f), jax.tree_util.tree_leaves(out_b)):
      if a.shape[:-1] != b.shape[:-1]:
        shape = ', '.join([*map(str, a.shape[:-1]), '_'])
        _checks.fail(where, 'backward_rnn', "outputs of forward_rnn's shape but the last axis, "
                     f'({shape}) (the default merge_fn concatenates them on it; pass a merge_fn '
                     'for outputs of other shapes)', f'outputs of shape {tuple(b.shape)}')
  return jax.tree_util.tree_map(merge_fn, out_f, out_b)


class RNNBase(Protocol):
  """What :class:`Bidirectional` needs of each direction: a sequence layer
  with flax.nnx's call, as ``flax.nnx.nn.recurrent.RNNBase`` states it (a
  type for annotations; :class:`RNN`, :class:`StackedRNN`, :class:`LSTM`,
  :class:`GRU` and flax.nnx's ``RNN`` have it). This package's layers also
  take ``segment_ids``."""

  def __call__(
    self,
    inputs: Array,
    *,
    initial_carry: Carry | None = None,
    rngs: RngsLike = None,
    seq_lengths: Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
  ) -> Any: ...


class Bidirectional(nnx.Module):
  """Runs one RNN forwards and another backwards, and merges their outputs.

  The backward RNN reverses each row within its valid length (or each packed
  segment), so both directions see real data first and padding stays padding;
  its outputs are put back in input order before ``merge_fn`` (default:
  concatenate on the last axis).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> rngs = nnx.Rngs(0)
    >>> bi = nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=rngs)),
    ...                       nr.RNN(nr.GRUCell(3, 4, rngs=rngs)))
    >>> x = jnp.ones((2, 5, 3))
    >>> (h_fwd, h_bwd), y = bi(x, seq_lengths=jnp.array([5, 3]), return_carry=True)
    >>> y.shape, h_fwd.shape, h_bwd.shape
    ((2, 5, 8), (2, 4), (2, 4))

  Args:
    forward_rnn, backward_rnn: sequence layers of this package: ``RNN``, a
      unidirectional fused ``LSTM`` / ``GRU``, a ``StackedRNN`` (or any layer
      with ``RNN``'s call, ``reverse`` and ``keep_order`` included). Refused at
      construction: a ``Bidirectional`` or a fused layer with
      ``bidirectional=True`` (each already runs both directions). Passing the
      same object twice shares its parameters between the two directions
      (and warns, as flax does).
    merge_fn: ``(forward_outputs, backward_outputs) -> outputs``.
    time_major, return_carry: defaults for the call.
    rngs: as flax.nnx's (``True``, ``False``, an ``nnx.Rngs`` or an
      ``nnx.RngStream``): the RNG passed to both directions' calls for their
      default carries (``True``: ``RngStream(0)``). It is kept only when a
      direction's cell may draw from it (see :class:`RNN`'s ``rngs``); with
      ``True``, and a direction that draws dropout from its call's RNG, each
      ``RNN`` uses its own streams instead.
  """

  @_checks.named_errors
  def __init__(self, forward_rnn, backward_rnn, *,
               merge_fn: Callable[[Array, Array], Array] = _concatenate,
               time_major: bool = False, return_carry: bool = False, rngs: Any = True):
    for arg, layer in (('forward_rnn', forward_rnn), ('backward_rnn', backward_rnn)):
      if isinstance(layer, (type, RNNCellBase, nnx.RNNCellBase)) or not callable(layer):
        got = (f'the class {layer.__name__}' if isinstance(layer, type) else type(layer).__name__)
        if isinstance(layer, (RNNCellBase, nnx.RNNCellBase)):
          got += ', a cell (wrap it: nr.RNN(cell))'
        _checks.fail('Bidirectional', arg, 'a sequence layer instance (RNN, LSTM, GRU, '
                     'StackedRNN, or a layer with their call)', got, TypeError)
      if isinstance(layer, Bidirectional) or getattr(layer, 'bidirectional', False) is True:
        _checks.fail('Bidirectional', arg, 'a one-direction sequence layer (RNN, LSTM or GRU '
                     'with bidirectional=False, StackedRNN)',
                     f'{type(layer).__name__}, which already runs both directions', TypeError)
    if not callable(merge_fn):
      _checks.fail('Bidirectional', 'merge_fn', 'a function (forward_outputs, backward_outputs) '
                   '-> outputs', repr(merge_fn), TypeError)
    from nnx_recurrent._stack import (  # _stack imports this module
      _in_features,
      _reads_axes,
      check_reads,
      check_reads_axes,
    )

    # Both read the same inputs: sizes that differ would fail at the first call;
    # feature axes that differ would not (one would read the other's time axis).
    check_reads_axes('Bidirectional', 'backward_rnn', backward_rnn, _reads_axes(forward_rnn),
                     "forward_rnn's: both directions read the same inputs")
    check_reads('Bidirectional', 'backward_rnn', backward_rnn, _in_features(forward_rnn),
                "forward_rnn's in_features: both directions read the same inputs")
    if forward_rnn is backward_rnn:
      _checks.warn('Bidirectional: `forward_rnn` and `backward_rnn` are the same object, so '
                   'both directions share its parameters; pass two RNNs unless that is '
                   'intended.')
    self.forward_rnn = forward_rnn
    self.backward_rnn = backward_rnn
    self.merge_fn = merge_fn
    self.time_major = _checks.check_bool('Bidirectional', 'time_major', time_major)
    self.return_carry = _checks.check_bool('Bidirectional', 'return_carry', return_carry)
    needed = any(isinstance(layer, RNN) and _scan.needs_carry_rngs(layer.cell)
                 for layer in (forward_rnn, backward_rnn))
    # flax.nnx's stream for both directions' carries (RngStream(0) for True),
    # unless a direction also draws dropout from the call's RNG: a stream
    # shared by every such layer would give them all one mask sequence.
    shared = self._carries_only()
    self.rngs = nnx.data(
      _carry_stream('Bidirectional', rngs, needed and (shared or not isinstance(rngs, bool))))

  def _carries_only(self) -> bool:
    """Whether the call's RNG serves only the directions' default carries (as
    in flax.nnx): both are ``RNN`` layers whose cells draw no dropout from it."""
    return all(isinstance(layer, RNN) and not _scan.draws_call_rngs(layer.cell)
               for layer in (self.forward_rnn, self.backward_rnn))

  @_checks.named_errors
  def __call__(
    self,
    inputs: ArrayOrNumPy,
    *,
    initial_carry: tuple[Carry, Carry] | None = None,
    seq_lengths: ArrayOrNumPy | None = None,
    segment_ids: ArrayOrNumPy | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    rngs: RngsLike = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
  ):
    """Returns merged outputs, or ``((carry_fwd, carry_bwd), outputs)``.

    Args:
      inputs, seq_lengths, segment_ids, return_carry, time_major: as for
        :class:`RNN`.
      initial_carry: a pair ``(forward_carry, backward_carry)``.
      rngs: passed to both directions (a PRNG key is split in two, so that
        their dropout masks differ); default the stored stream, if any. As
        in flax.nnx, an ``nnx.Rngs`` gives both directions its ``carry``
        stream itself, unless a direction draws dropout from it.
      reverse, keep_order: accepted and ignored, as in flax.nnx.
    """
    del reverse, keep_order  # flax.nnx's signature; both directions are fixed
    _checks.check_rngs('Bidirectional', rngs)
    return_carry, time_major = _checks.call_flags(
      'Bidirectional', self, return_carry=return_carry, time_major=time_major)
    batch_shape = _checks.batch_shape_of(inputs, time_major)  # for a hint on PyTorch's h_0
    with _checks.hint_torch_carry(initial_carry, self, batch_shape):
      carry_f, carry_b = _checks.carry_pair('Bidirectional', initial_carry)
    common = dict(seq_lengths=seq_lengths, return_carry=True, time_major=time_major)
    if segment_ids is not None:  # a layer with flax.nnx's call (RNNBase) takes none
      check_directions_take_segment_ids(self, "this package's layers")
      common['segment_ids'] = segment_ids
    rngs = rngs if rngs is not None else self.rngs
    if has_carry_stream(rngs) and self._carries_only():
      rngs = rngs.carry  # as flax.nnx: both directions draw their carries from it, unforked
    rngs_f = rngs_b = rngs
    if isinstance(rngs, jax.Array):  # one key would give both directions the same masks
      rngs_f, rngs_b = jax.random.split(rngs)
    with _checks.hint_torch_carry(initial_carry, self, batch_shape):
      with _checks.blame_entry('Bidirectional', '[0]',
                               f'forward_rnn ({type(self.forward_rnn).__name__})', carry_f):
        carry_f, out_f = self.forward_rnn(inputs, initial_carry=carry_f, reverse=False,
                                          rngs=rngs_f, **common)
      with _checks.blame_entry('Bidirectional', '[1]',
                               f'backward_rnn ({type(self.backward_rnn).__name__})', carry_b):
        carry_b, out_b = self.backward_rnn(inputs, initial_carry=carry_b, reverse=True,
                                           keep_order=True, rngs=rngs_b, **common)
    outputs = merge_directions('Bidirectional', self.merge_fn, out_f, out_b)
    return ((carry_f, carry_b), outputs) if return_carry else outputs


def check_directions_take_segment_ids(bidirectional: Any, layers: str) -> None:
  """A ``TypeError`` naming the direction of a ``Bidirectional`` (this
  package's or compat's) whose call takes no ``segment_ids`` (flax's ``RNN``),
  where Python's would name neither it nor the argument; ``layers``: what
  packed sequences need."""
  for arg in ('forward_rnn', 'backward_rnn'):
    layer = getattr(bidirectional, arg)
    if not _scan.takes_keyword(layer.__call__, 'segment_ids'):
      _checks.fail('Bidirectional', 'segment_ids', f'None, since {arg} '
                   f'({_checks.public_name(layer)}) takes no segment_ids (packed sequences '
                   f'need {layers})', 'ids', TypeError)


def flip_sequences(inputs: Array, seq_lengths: Array | None, num_batch_dims: int,
                   time_major: bool) -> Array:
  """Flips each sequence along time, keeping padding at the end (flax's semantics).

  Example::

    >>> import jax.numpy as jnp
    >>> import nnx_recurrent as nr
    >>> x = jnp.array([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
    >>> nr.flip_sequences(x, jnp.array([1, 2, 3]), num_batch_dims=1, time_major=False)
    Array([[1, 0, 0],
           [3, 2, 0],
           [6, 5, 4]], dtype=int32)

  Args:
    inputs: ``(*batch, time, ...)`` or ``(time, *batch, ...)``.
    seq_lengths: integer ``(*batch)`` lengths, or ``None`` to flip everything.
      As for :class:`RNN`, lengths that broadcast to the batch shape (a
      scalar, ``(1,)``) are broadcast, as flax does; a length above ``time``
      acts as ``time`` (flax's ``flip_sequences`` wraps it around the time
      axis instead), and concrete lengths must not be negative; under ``jit``
      a negative one acts as ``0``.
    num_batch_dims: number of batch axes.
    time_major: whether time is the first axis.

  Returns:
    ``inputs`` with each row's first ``seq_lengths`` steps in reverse order,
    the rest (padding) after them, itself reversed, as in flax (the row
    ``[a, b, p, q, r]`` of length 2 becomes ``[b, a, r, q, p]``); the whole
    time axis reversed without ``seq_lengths``.

  Raises:
    ValueError: a concrete negative length in ``seq_lengths``.
  """
  inputs = _checks.check_array('flip_sequences', 'inputs', inputs)
  if (isinstance(num_batch_dims, bool) or not isinstance(num_batch_dims, (int, np.integer))
      or not 0 <= num_batch_dims < inputs.ndim):
    _checks.fail('flip_sequences', 'num_batch_dims',
                 f'an int in [0, {inputs.ndim - 1}] (inputs have {inputs.ndim} axes, one of '
                 'them time)', repr(num_batch_dims),
                 TypeError if not isinstance(num_batch_dims, (int, np.integer)) else ValueError)
  time_axis = 0 if _checks.check_bool('flip_sequences', 'time_major', time_major) else \
    num_batch_dims
  xs = jnp.moveaxis(inputs, time_axis, 0)
  batch_shape = tuple(xs.shape[1: 1 + num_batch_dims])
  if seq_lengths is not None:
    seq_lengths = _checks.check_seq_lengths('flip_sequences', seq_lengths, batch_shape)
  idx = _scan.reverse_indices(xs.shape[0], batch_shape, seq_lengths)
  return jnp.moveaxis(_scan.take_time(xs, idx), 0, time_axis)
