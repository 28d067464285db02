"""flax.linen ``RNN`` and ``Bidirectional`` on the nnx_recurrent scan core.

``RNN`` keeps flax.linen's variable handling: it lifts the cell with
``flax.linen.scan`` and forwards ``variable_axes``, ``variable_broadcast``,
``variable_carry``, ``split_rngs`` and ``unroll`` exactly as flax.linen does,
so parameters (broadcast by default, without a time axis) and any other
collections behave as they do there. Everything else is the core's: input
validation and the time-major layout (``_scan.prepare``), per-row reversal
(``_scan.reverse_indices`` / ``take_time``), and the step of the scan, which
``flax.linen.scan`` runs under flax.linen's name ``scan_fn``:
``_scan.plain_step`` (the cell's step, as flax.linen's), ``_scan.linen_step``
with ``seq_lengths`` and ``return_carry`` (the cell runs on through the padding
and its outputs stay, as in flax.linen, while a second carry keeps each row's
last valid one), ``_scan.step`` for packed sequences (carry selection and zero
outputs at padding, segment resets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from flax.core import FrozenDict
from flax.core.scope import CollectionFilter, PRNGSequenceFilter
from flax.typing import InOutScanAxis

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import is_package_cell
from nnx_recurrent._rnn import _concatenate, check_directions_take_segment_ids, merge_directions
from nnx_recurrent._rnn import flip_sequences as flip_sequences
from nnx_recurrent.compat._cells import _Cell


class _Never:
  """The default of a field nobody may set: one object, through copies and pickles
  (``copy.deepcopy`` and ``cloudpickle`` of a Linen module copy its fields)."""

  def __repr__(self) -> str:
    return '<not given>'

  def __copy__(self) -> _Never:
    return self

  def __deepcopy__(self, memo) -> _Never:
    return self

  def __reduce__(self) -> str:
    return '_NEVER'  # pickled by reference: the module's own object


_NEVER = _Never()


def _named_scan_fn(step: Callable) -> Callable:
  """``step`` under flax.linen's name for its scan body, ``scan_fn``: the
  method name ``capture_intermediates`` filters and records, and ``tabulate``
  shows."""
  def scan_fn(cell, carry, *xs):
    return step(cell, carry, *xs)
  return scan_fn


# The scan bodies: flax.linen's own, (cell, carry, x) -> (carry, y), where the
# returned carry is not a row's last valid one (no seq_lengths, or no
# return_carry); with seq_lengths and return_carry, flax.linen's carry through
# the padding and the last valid one beside it; carry selection and segment
# resets for packed sequences.
_PLAIN_SCAN_FN = _named_scan_fn(_scan.plain_step)
_LINEN_SCAN_FN = _named_scan_fn(_scan.linen_step)
_PACKED_SCAN_FN = _named_scan_fn(_scan.step)


class RNN(nn.Module):
  """Applies a cell over a sequence: ``flax.linen.RNN`` on the nnx_recurrent scan.

  Inputs are ``(*batch, time, *features)``, or ``(time, *batch, *features)``
  with ``time_major=True``; the cell is any flax.linen ``RNNCellBase`` (a
  compat cell, a flax.linen cell or your own). Fields, defaults and the call
  signature are flax.linen's, and the scan options are forwarded to
  ``flax.linen.scan`` unchanged.

  At padding (``seq_lengths``) the values are flax.linen's: the cell runs on
  and its outputs stay. The returned carry is each row's last valid carry, as
  flax.linen's, but selected step by step in a second carry instead of
  gathered from the history of every carry. One deliberate difference: the
  carry of a row of length 0 is the **initial carry** (flax.linen returns the
  carry after the last time step, because it indexes step ``-1``).
  Extension: ``segment_ids`` (packed sequences, as ``nnx_recurrent.RNN``:
  padding outputs zero there). Unlike ``nnx_recurrent.RNN``, garbage (NaN)
  in padding reaches the outputs there and the gradients, as in flax.linen.

  The ``cell_size`` argument of the old signature raises a ``TypeError``: the
  cell holds its size now (``RNN(LSTMCell(features=64))``). So does the old
  positional form ``RNN(cell, 64)``, where flax.linen (0.12) silently takes
  the 64 for ``time_major`` (an int above 1 is no time-major flag).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 5, 3))  # (batch, time, features)
    >>> rnn = compat.RNN(compat.LSTMCell(4), return_carry=True)
    >>> variables = rnn.init(jax.random.key(0), x)
    >>> jax.tree.map(jnp.shape, variables['params']['cell']['hi'])  # no time axis
    {'bias': (4,), 'kernel': (4, 4)}
    >>> (c, h), y = rnn.apply(variables, x, seq_lengths=jnp.array([5, 2]))
    >>> bool((h[1] == y[1, 1]).all()), bool((y[1, 2:] != 0).all())  # flax.linen's padding
    (True, True)

  Attributes:
    cell: the cell, an ``RNNCellBase``.
    time_major: inputs are ``(time, *batch, *features)``.
    return_carry: return ``(carry, outputs)``.
    reverse: process each sequence from its last valid step to its first
      (padding stays at the end); outputs in processing order.
    keep_order: with ``reverse``, return outputs in input order.
    unroll: scan iterations unrolled per loop iteration.
    variable_axes: forwarded to ``flax.linen.scan``.
    variable_broadcast: forwarded to ``flax.linen.scan``.
    variable_carry: forwarded to ``flax.linen.scan``.
    split_rngs: forwarded to ``flax.linen.scan``.
    cell_size: removed; passing it raises ``TypeError``, as does an int above
      1 in ``time_major``'s place (the old signature's second positional
      argument; flax.linen takes it for ``time_major``).
  """

  cell: nn.RNNCellBase
  time_major: bool = False
  return_carry: bool = False
  reverse: bool = False
  keep_order: bool = False
  unroll: int = 1
  variable_axes: Mapping[CollectionFilter, InOutScanAxis] = FrozenDict()
  variable_broadcast: CollectionFilter = 'params'
  variable_carry: CollectionFilter = False
  split_rngs: Mapping[PRNGSequenceFilter, bool] = FrozenDict({'params': False})
  # Last, so that flax.linen's positional fields keep their places; the old
  # signature's positional cell_size lands on time_major, caught below.
  cell_size: Any = _NEVER

  def __post_init__(self):
    old_positional = (isinstance(self.time_major, (int, np.integer))
                      and not isinstance(self.time_major, (bool, np.bool_))
                      and self.time_major > 1)
    if self.cell_size is not _NEVER or old_positional:
      fix = ('the cell holds its size: write RNN(LSTMCell(features=...)) and drop cell_size '
             '(the carry comes from cell.initialize_carry(rng, input_shape)).')
      if self.cell_size is not _NEVER:
        raise TypeError(f'RNN: `cell_size` is no longer an argument (got {self.cell_size!r}); '
                        + fix)
      # RNN(cell, 64) or RNN(cell, time_major=2): the same field, either mistake.
      raise TypeError(f'RNN: `time_major` expected a bool, got {self.time_major!r} (RNN(cell, '
                      f'{self.time_major!r}), the old call with a cell size, sets time_major: '
                      '`cell_size` is no longer an argument); ' + fix)
    if not isinstance(self.cell, nn.Module):
      _checks.fail('RNN', 'cell', 'a flax.linen RNNCellBase (for an nnx_recurrent cell use '
                   'nnx_recurrent.RNN, or convert it with compat.from_nnx)',
                   type(self.cell).__name__, TypeError)
    for flag in ('time_major', 'return_carry', 'reverse', 'keep_order'):
      _checks.check_bool('RNN', flag, getattr(self, flag))
    # flax.linen passes it to jax's scan, whose error names no module (and for a
    # string compares it with 0: "'<' not supported").
    _checks.check_unroll('RNN', self.unroll)
    super().__post_init__()

  @nn.nowrap  # a helper: no method of the module (capture_intermediates, tabulate)
  def _lifted(self, fn: Callable, xs: jax.Array, in_axes: Any = 0) -> Callable:
    """``fn(cell, carry, *xs)`` scanned over time by ``flax.linen.scan`` with
    this RNN's options (time-major ``xs``: ``unroll`` cut where it leaves a
    remainder under a mesh with an Explicit axis of size 1, ``_scan.scan_unroll``)."""
    return nn.scan(fn, variable_axes=self.variable_axes,
                   variable_broadcast=self.variable_broadcast,
                   variable_carry=self.variable_carry, split_rngs=self.split_rngs,
                   in_axes=in_axes, out_axes=0,
                   unroll=_scan.scan_unroll(_checks.check_unroll('RNN', self.unroll),
                                           xs.shape[0], xs))

  @nn.nowrap
  def _settled(self, carry: Any, xs: jax.Array) -> Any:
    """Explicit sharding mode: ``carry`` split over the mesh as a step of the
    cell returns it (``_scan.settle_carry``). The step is traced abstractly
    under this RNN's ``flax.linen.scan`` (so each step's view of the variables
    and RNG streams is the real scan's: ``variable_axes``, ``split_rngs``), on
    an unbound copy of the cell given its variables, every collection mutable
    and every change discarded (what the step records or creates, the streams'
    counts)."""
    cell = self.cell.clone(parent=None)
    variables = self.cell.variables
    features = getattr(cell, 'features', None)
    assert self.scope is not None  # called bound, from __call__
    rngs = {name: rng.rng for name, rng in self.scope.rngs.items()}

    def new_carry(cell, carry, x_t):  # the step's carry, out as ys (the carry kept)
      new = _scan.plain_step(cell, carry, x_t)[0]
      return _scan.typed_as(new, carry), new

    def step(carry):
      run = nn.apply(lambda cell, carry: self._lifted(new_carry, xs)(cell, carry, xs)[1], cell,
                     mutable=True)
      stacked = jax.eval_shape(lambda carry: run(variables, carry, rngs=rngs)[0], carry)
      return jax.tree_util.tree_map(_scan.abstract_step_input, stacked)
    with _scan.gates_checked('RNN', 'cell', features, variables.get('params'),
                             f'{type(cell).__name__} of features {features}',
                             known=is_package_cell(cell)):
      return _scan.settle_carry('RNN', step, carry)

  def __call__(
    self,
    inputs: jax.Array,
    *,
    initial_carry: Any = None,
    init_key: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    segment_ids: jax.Array | None = None,
  ):
    """Applies the RNN to ``inputs``.

    Args:
      inputs: ``(*batch, time, *features)`` (time first with ``time_major``).
      initial_carry: default ``cell.initialize_carry(init_key, step_shape)``.
      init_key: key for ``initialize_carry`` (default ``jax.random.key(0)``).
      seq_lengths: integer ``(*batch)`` lengths (whole-number floats are
        cast); later steps are padding.
      return_carry, time_major, reverse, keep_order: override the attributes.
      segment_ids: packed sequences (extension, not in flax.linen): integer
        ids shaped like the batch and time axes, ``0`` = padding; each
        segment after a row's first starts from the cell's ``initialize_carry``
        (the first, from ``initial_carry``), as in ``nnx_recurrent.RNN``.

    Returns:
      ``outputs``, or ``(carry, outputs)`` with ``return_carry``.
    """
    return_carry, time_major, reverse, keep_order = _checks.call_flags(
      'RNN', self, return_carry=return_carry, time_major=time_major, reverse=reverse,
      keep_order=keep_order)
    seq = _scan.prepare('RNN', inputs, num_feature_axes=self.cell.num_feature_axes,
                        in_features=None, time_major=time_major, seq_lengths=seq_lengths,
                        segment_ids=segment_ids)
    step_shape = tuple(seq.xs.shape[1:])
    given_carry = initial_carry is not None
    init_key = jax.random.key(0) if init_key is None else init_key
    # Packed segments after a row's first start from the default carry, the
    # first from an initial_carry given (a chunk's carry passed on goes on).
    reset_carry = None
    if initial_carry is None:  # as flax.linen: only then is initialize_carry needed
      initial_carry = self.cell.initialize_carry(init_key, step_shape)
    elif seq.masks.reset is not None:
      reset_carry = self.cell.initialize_carry(init_key, step_shape)
    elif isinstance(self.cell, _Cell):  # this package's cells give their carry for free
      sized = self.cell._sized_by(initial_carry)  # as flax.linen: of the carry's size
      expected = jax.eval_shape(lambda: sized.initialize_carry(jax.random.key(0), step_shape))
      # Leaves the cell's carry broadcasts to pass, as in flax.linen (a carry
      # per beam over shared inputs); a smaller one (a scalar, a (features,)
      # h0) fails: the step would return a carry of another shape, which
      # flax.linen's scan refuses with a TypeError that names no argument.
      _checks.check_tree_matches('RNN', 'initial_carry', initial_carry, expected,
                                 broadcast='given')
    else:  # another cell: its carry's structure (flax.linen's take their size from the carry)
      expected = _carry_structure(self.cell, step_shape)
      if expected is not None:
        _checks.check_tree_structure('RNN', 'initial_carry', initial_carry, expected)
    xs, idx = _scan.processing_order(seq, reverse)
    # flax.linen's values at padding: the cell runs on and its outputs stay;
    # with return_carry a second carry keeps each row's last valid one.
    # Packed sequences (an extension) are masked as in nnx_recurrent.RNN,
    # garbage at padding included (no gradient reaches it).
    packed = seq.masks.reset is not None
    linen = seq.masks.valid is not None and not packed and return_carry
    # The leaves of the rows: for the masks, and under an Explicit mesh splitting the
    # rows for the carry's split (a leaf the rows share is not split, padding or not).
    split_rows = _scan.splits_rows(xs, len(seq.batch_shape))
    rows = (_carry_rows(self.cell, seq) if linen or packed or split_rows else _scan.Rows())
    # Under shard_map the carry varies like the inputs, under an Explicit mesh it is
    # split over the batch like them (flax.linen's fails in both).
    initial_carry = _scan.like_inputs(initial_carry, xs, len(seq.batch_shape), seq.masks,
                                      rows.carry)
    if not (linen or packed):
      rows = _scan.Rows()  # the plain scan masks nothing
    explicit = _scan.explicit_mesh(xs)
    if explicit:  # parameters split over the mesh split the carry too
      with _named_errors(given_carry, self.variable_carry, explicit):
        initial_carry = self._settled(initial_carry, xs)
    carry: Any = initial_carry
    scan_args: tuple[Any, ...] = (xs,)
    if linen:
      carry = (initial_carry, initial_carry)
      scan_args = ((xs, seq.masks.valid, None, None), None)
    elif packed:
      xs = _scan.clean_padding(xs, seq.masks.valid)
      reset_carry = _scan.segment_start(seq.masks, initial_carry, reset_carry, xs,
                                        len(seq.batch_shape), rows.carry)
      scan_args = ((xs, seq.masks.valid, seq.masks.reset, None), (None, reset_carry))
    scan_fn = _LINEN_SCAN_FN if linen else _PACKED_SCAN_FN if packed else _PLAIN_SCAN_FN
    if rows.carry is not None or rows.out is not None:  # leaves shared by the rows
      scan_fn = _named_scan_fn(_scan.with_rows(_scan.linen_step if linen else _scan.step, rows))
    scan = self._lifted(scan_fn, xs, in_axes=0 if len(scan_args) == 1 else (0, nn.broadcast))
    with _named_errors(given_carry, self.variable_carry, explicit):
      carry, ys = scan(self.cell, carry, *scan_args)
    if linen:
      carry = carry[1]
    ys = _scan.output_order(ys, seq, reverse, idx, keep_order, time_major)
    return (carry, ys) if return_carry else ys


@contextlib.contextmanager
def _named_errors(given_carry: bool, variable_carry: CollectionFilter,
                  explicit: bool) -> Iterator[None]:
  """Errors of the scan, and of the carry's settling (which traces a step), that
  name an argument of ``RNN``: a carry of another size than the cell's
  parameters names ``initial_carry`` where one is given; under an Explicit mesh
  (``explicit``), JAX's scan ``TypeError`` for a collection in ``variable_carry``
  that a step returns split otherwise than it was given names ``variable_carry``
  (flax.linen's ``scan`` carries such a collection as it is; the carry itself
  is settled, ``RNN._settled``)."""
  try:
    yield
  except _checks.CarrySizeError as e:  # the carry is the one given here
    if given_carry:
      _checks.fail('RNN', 'initial_carry', e.expected, e.got, _checks.ParamShapeError)
    raise
  except TypeError as e:
    if not (explicit and variable_carry and _SCAN_CARRY_TYPES in str(e)):
      raise
    which = next((line for line in str(e).splitlines() if 'carry component' in line), str(e))
    _checks.fail('RNN', 'variable_carry',
                 'collections that each step of the cell returns split over the mesh as they '
                 'were given (explicit sharding mode: a variable computed from parameters split '
                 f'over a mesh axis is split over it too; {_scan.EXPLICIT_REMEDY})',
                 f"{variable_carry!r}, whose variable a step returns split otherwise (JAX's scan: "
                 f'"{which}")')


# The start of JAX's message for a scan whose step changes its carry's type.
_SCAN_CARRY_TYPES = 'scan body function carry input and carry output must have equal types'


def _carry_structure(cell: nn.Module, step_shape: tuple[int, ...]) -> Any:
  """The abstract carry of a cell's ``initialize_carry`` (:func:`_abstract_carry`),
  or ``None`` when it cannot be had so: then the carry is not checked."""
  try:
    return _abstract_carry(cell, step_shape)
  except Exception:  # any failure only means: nothing to check against
    return None


def _abstract_carry(cell: nn.Module, step_shape: tuple[int, ...]) -> Any:
  """The abstract carry of a cell's ``initialize_carry`` (``jax.eval_shape``,
  on an unbound copy, so no variable is read or made and no RNG stream of the
  module's advances: its key is made inside)."""
  unbound = cell.clone(parent=None)
  return jax.eval_shape(lambda: unbound.initialize_carry(jax.random.key(0), step_shape))


def _carry_rows(cell: nn.Module, seq: _scan.Sequence) -> _scan.Rows:
  """``_scan.Rows`` of a cell: the leaves of its ``initialize_carry``, and of
  one step's outputs from that carry, that lead with the batch axes, as
  ``nnx_recurrent.RNN`` finds them (``_scan.probed_rows``; the step is the
  unbound cell's ``init_with_output``, under ``jax.eval_shape``: no variable
  of the module is read or made), so that a leaf shared by the rows whose
  size only happens to be the batch's goes on through the padding. Not for
  this package's cells (every leaf leads with the batch axes)."""
  if is_package_cell(cell):
    return _scan.Rows()
  features = seq.xs.shape[1 + len(seq.batch_shape):]
  unbound = cell.clone(parent=None)

  def carry_and_outputs(batch):
    def one():
      carry = unbound.initialize_carry(jax.random.key(0), (*batch, *features))
      x = jax.numpy.zeros((*batch, *features), seq.xs.dtype)
      (_, y), _ = unbound.init_with_output(jax.random.key(1), carry, x)
      return carry, y
    return jax.eval_shape(one)

  return _scan.probed_rows(carry_and_outputs,
                           lambda batch: _abstract_carry(cell, (*batch, *features)),
                           seq.batch_shape)


class Bidirectional(nn.Module):
  """Runs one RNN forwards and one backwards: ``flax.linen.Bidirectional``.

  The backward RNN reverses each row within its valid length and its outputs
  are put back in input order before ``merge_fn`` (default: concatenate on the
  last axis). ``reverse`` and ``keep_order`` are accepted and ignored, as in
  flax.linen; ``init_key`` is split between the two RNNs.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> layer = compat.Bidirectional(compat.RNN(compat.GRUCell(4)),
    ...                              compat.RNN(compat.GRUCell(4)))
    >>> x = jnp.ones((2, 5, 3))
    >>> variables = layer.init(jax.random.key(0), x)
    >>> sorted(variables['params'])
    ['backward_rnn', 'forward_rnn']
    >>> (h_fwd, h_bwd), y = layer.apply(variables, x, return_carry=True)
    >>> y.shape, h_bwd.shape
    ((2, 5, 8), (2, 4))

  Attributes:
    forward_rnn: the forward ``RNN`` module (compat or flax.linen).
    backward_rnn: the backward ``RNN`` module (compat or flax.linen).
    merge_fn: ``(forward_outputs, backward_outputs) -> outputs``.
    time_major: default for the call.
    return_carry: default for the call.
  """

  forward_rnn: Any
  backward_rnn: Any
  merge_fn: Callable[[jax.Array, jax.Array], jax.Array] = _concatenate
  time_major: bool = False
  return_carry: bool = False

  def __post_init__(self):
    for arg in ('forward_rnn', 'backward_rnn'):
      layer = getattr(self, arg)
      if isinstance(layer, (type, nn.RNNCellBase)) or not callable(layer):
        got = f'the class {layer.__name__}' if isinstance(layer, type) else type(layer).__name__
        if isinstance(layer, nn.RNNCellBase):
          got += ', a cell (wrap it: RNN(cell))'
        _checks.fail('Bidirectional', arg, 'an RNN module (compat or flax.linen)', got,
                     TypeError)
    if not callable(self.merge_fn):  # flax.linen calls it after both directions have run
      _checks.fail('Bidirectional', 'merge_fn', 'a function (forward_outputs, '
                   'backward_outputs) -> outputs', repr(self.merge_fn), TypeError)
    for flag in ('time_major', 'return_carry'):
      _checks.check_bool('Bidirectional', flag, getattr(self, flag))
    from nnx_recurrent._stack import _reads_axes, check_reads_axes

    # flax.linen runs a convolutional and a vector direction, the vector one
    # reading a spatial axis as time.
    check_reads_axes('Bidirectional', 'backward_rnn', self.backward_rnn,
                     _reads_axes(self.forward_rnn),
                     "forward_rnn's: both directions read the same inputs")
    super().__post_init__()

  def __call__(
    self,
    inputs: jax.Array,
    *,
    initial_carry: Any = None,
    init_key: jax.Array | None = None,
    seq_lengths: jax.Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    segment_ids: jax.Array | None = None,
  ):
    """Returns merged outputs, or ``((carry_forward, carry_backward), outputs)``.

    Args:
      inputs, seq_lengths, time_major, return_carry: as for :class:`RNN`.
      initial_carry: a pair ``(forward_carry, backward_carry)``.
      init_key: split in two, one key per direction.
      reverse, keep_order: ignored (flax.linen's signature).
      segment_ids: packed sequences (extension; needs compat ``RNN`` layers).
    """
    del reverse, keep_order  # flax.linen accepts and ignores them too
    if self.forward_rnn is self.backward_rnn:  # flax.linen's warning, word for word
      logging.warning('forward_rnn and backward_rnn is the same object, so '
                      'they will share parameters.')
    return_carry, time_major = _checks.call_flags(
      'Bidirectional', self, return_carry=return_carry, time_major=time_major)
    key_f = key_b = None
    if init_key is not None:
      key_f, key_b = jax.random.split(init_key)
    carry_f, carry_b = _checks.carry_pair('Bidirectional', initial_carry)
    common: dict = dict(seq_lengths=seq_lengths, return_carry=True, time_major=time_major)
    if segment_ids is not None:  # flax.linen's RNN takes none
      check_directions_take_segment_ids(self, 'compat.RNN layers')
      common['segment_ids'] = segment_ids
    carry_f, out_f = self.forward_rnn(inputs, initial_carry=carry_f, init_key=key_f,
                                      reverse=False, **common)
    carry_b, out_b = self.backward_rnn(inputs, initial_carry=carry_b, init_key=key_b,
                                       reverse=True, keep_order=True, **common)
    outputs = merge_directions('Bidirectional', self.merge_fn, out_f, out_b)
    return ((carry_f, carry_b), outputs) if return_carry else outputs
