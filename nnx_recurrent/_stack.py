"""``StackedRNN``: sequence layers applied one after another."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import Array, ArrayOrNumPy, Carry, RngsLike, RNNCellBase, is_package_cell
from nnx_recurrent._rnn import RNN, Bidirectional, _concatenate


def _reads_axes(layer) -> int | None:
  """The number of feature axes a sequence layer's inputs have, where it
  says: its cell's ``num_feature_axes`` (flax.nnx's ``RNN`` too), 1 for the
  fused layers, through any nesting of ``Bidirectional`` and ``StackedRNN``;
  ``None`` for another callable."""
  from nnx_recurrent._fused import GRU, LSTM  # the fused layers import this package's core

  if isinstance(layer, Bidirectional):
    return _reads_axes(layer.forward_rnn)
  if isinstance(layer, StackedRNN):
    return _reads_axes(layer.layers[0])
  if isinstance(layer, (LSTM, GRU)):
    return 1
  try:
    axes = getattr(getattr(layer, 'cell', None), 'num_feature_axes', None)
  except NotImplementedError:  # flax.nnx's base class; the call will say
    return None
  return axes if isinstance(axes, int) and not isinstance(axes, bool) else None


def _gives_axes(layer) -> int | None:
  """The number of feature axes of a sequence layer's outputs, where it is
  known before a call: this package's cells and flax.nnx's keep their
  inputs' (a convolutional state keeps its spatial axes), the fused layers
  give 1; ``None`` for a user's cell (its step may read out any shape) and a
  ``Bidirectional`` with its own ``merge_fn``."""
  if isinstance(layer, RNN):
    cell = layer.cell
    known = is_package_cell(cell) or type(cell) in (nnx.LSTMCell, nnx.OptimizedLSTMCell,
                                                     nnx.GRUCell, nnx.SimpleCell)
    return cell.num_feature_axes if known else None
  if isinstance(layer, Bidirectional):
    if layer.merge_fn is not _concatenate:
      return None
    forward, backward = _gives_axes(layer.forward_rnn), _gives_axes(layer.backward_rnn)
    return forward if forward == backward else None
  if isinstance(layer, StackedRNN):
    return _gives_axes(layer.layers[-1])
  return _reads_axes(layer)  # the fused layers: 1


def _axes(n: int) -> str:
  return f'{n} feature axis' if n == 1 else f'{n} feature axes'


def check_reads_axes(where: str, arg: str, layer, axes: int | None, source: str) -> None:
  """``layer`` reads steps of ``axes`` feature axes (what ``source`` gives),
  where both are known: with another count it would read a feature axis as
  time, or time as a batch axis, and run on without an error."""
  wanted = _reads_axes(layer)
  if axes is not None and wanted is not None and wanted != axes:
    cell = getattr(layer, 'cell', None)
    name = _checks.public_name(layer) + ('' if cell is None else f' of {type(cell).__name__}')
    _checks.fail(where, arg, f'a layer reading steps of {_axes(axes)} ({source})',
                 f'{name}, which reads {_axes(wanted)}')


def _in_features(layer) -> int | None:
  """The size of the last input axis a sequence layer reads, or ``None`` when
  it does not say (another library's cell without an int ``in_features``)."""
  if isinstance(layer, RNN):
    size = getattr(layer.cell, 'in_features', None)
  elif isinstance(layer, Bidirectional):
    size = _in_features(layer.forward_rnn)
  elif isinstance(layer, StackedRNN):
    size = _in_features(layer.layers[0])
  else:  # the fused LSTM / GRU
    size = getattr(layer, 'in_features', None)
  return size if isinstance(size, int) and not isinstance(size, bool) else None


def _out_features(layer) -> int | None:
  """The size of the last output axis of a sequence layer, or ``None`` when
  it is not known before a call: a cell of another library, a ``Bidirectional``
  with its own ``merge_fn``."""
  if isinstance(layer, RNN):
    cell = layer.cell
    if not isinstance(cell, RNNCellBase) or not all(
        isinstance(getattr(cell, size, None), int) for size in ('in_features', 'hidden_features')):
      return None
    if not is_package_cell(cell):
      return _traced_out_features(cell)  # the user's own step may read out another width
    if cell.num_feature_axes > 1:  # convolutional: channels of the state
      return cell.hidden_features
    return cell._output_shape((cell.in_features,))[-1]  # proj_features where there are some
  if isinstance(layer, Bidirectional):
    forward, backward = _out_features(layer.forward_rnn), _out_features(layer.backward_rnn)
    if layer.merge_fn is not _concatenate or forward is None or backward is None:
      return None
    return forward + backward
  if isinstance(layer, StackedRNN):
    return _out_features(layer.layers[-1])
  out, directions = getattr(layer, 'out_features', None), getattr(layer, 'num_directions', None)
  return out * directions if isinstance(out, int) and isinstance(directions, int) else None


def _traced_out_features(cell: RNNCellBase) -> int | None:
  """The output width of a cell of the user's own, from one step traced on a
  copy (``nnx.eval_shape``: no parameter or RNG stream changes), since its
  ``step`` may return a readout other than ``h``; ``None`` where that does not
  trace (more feature axes than one, dropout without a stream, ...): the
  call itself will say what is wrong."""
  if cell.num_feature_axes != 1:
    return None
  shape = (1, cell.in_features)

  def one_step(cell):
    dtype = getattr(cell, 'dtype', None) or getattr(cell, 'param_dtype', jnp.float32)
    return cell(cell.initialize_carry(shape), jnp.zeros(shape, dtype))[1]

  try:
    y = nnx.eval_shape(one_step, cell)
  except Exception:  # noqa: BLE001 -- a check made early where it can be; the call raises
    return None
  return y.shape[-1] if isinstance(y, jax.ShapeDtypeStruct) and y.ndim >= 1 else None


def check_reads(where: str, arg: str, layer, size: int | None, source: str) -> None:
  """``layer`` reads inputs of last axis ``size`` (what ``source`` gives), where both are known."""
  wanted = _in_features(layer)
  if size is not None and wanted is not None and wanted != size:
    _checks.fail(where, arg, f'a layer reading {size} features ({source})',
                 f'{type(layer).__name__} with in_features {wanted}')


class StackedRNN(nnx.Module):
  """A stack of sequence layers: ``RNN``, ``Bidirectional``, fused ``LSTM`` / ``GRU``
  and ``StackedRNN`` (mixed freely; a stack in a stack is one layer, with a
  tuple of carries).

  Each layer reads the previous layer's outputs. ``seq_lengths``,
  ``segment_ids`` and ``time_major`` go to every layer, so padding stays
  padding (zero) and packed segments stay separate through the whole stack;
  the stack's ``time_major`` and ``return_carry`` override the layers' own
  (``time_major`` defaults to the first layer's).
  With ``dropout_rate > 0`` an ``nnx.Dropout`` is applied to the outputs of
  every layer but the last (plain per-element dropout, as ``torch.nn.LSTM``'s
  ``dropout``; the cells' own ``dropout_rate`` / ``recurrent_dropout_rate``
  are the variational kind). It follows ``nnx.Dropout``'s conventions: on
  unless ``deterministic`` (``model.eval()``, ``nnx.view(model,
  deterministic=True)``), RNG from the ``dropout`` stream of ``rngs`` given
  here or at call time.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> rngs = nnx.Rngs(0)
    >>> stack = nr.StackedRNN(
    ...   nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 4, rngs=rngs)),
    ...                    nr.RNN(nr.LSTMCell(3, 4, rngs=rngs))),
    ...   nr.RNN(nr.GRUCell(8, 5, rngs=rngs)),
    ...   dropout_rate=0.1, rngs=rngs)
    >>> x = jnp.ones((2, 6, 3))
    >>> ((fwd, bwd), h), y = stack(x, seq_lengths=jnp.array([6, 4]), return_carry=True)
    >>> y.shape, fwd[1].shape, h.shape  # one carry per layer
    ((2, 6, 5), (2, 4), (2, 5))

  ``reverse=True`` runs the whole stack on each row reversed within its
  valid length (each packed segment within its span), which is what
  ``Bidirectional`` asks of its backward layer; outputs come in processing
  order unless ``keep_order=True``.

  Args:
    *layers: ``RNN``, ``Bidirectional``, ``LSTM``, ``GRU`` or ``StackedRNN``
      layers, first to last.
    dropout_rate: dropout between layers (not after the last).
    time_major: inputs are ``(time, *batch, *features)`` (default: the first
      layer's ``time_major``).
    return_carry: return ``(carries, outputs)``, ``carries`` a tuple with
      one carry per layer (a ``(forward, backward)`` pair for a
      ``Bidirectional``).
    rngs: ``nnx.Rngs`` for the between-layer dropout (only with
      ``dropout_rate > 0``; may also be given at call time).
  """

  @_checks.named_errors
  def __init__(self, *layers, dropout_rate: float = 0.0, time_major: bool | None = None,
               return_carry: bool = False, rngs: nnx.Rngs | None = None):
    if not layers:
      _checks.fail('StackedRNN', 'layers', 'at least one layer', 'none')
    from nnx_recurrent._fused import GRU, LSTM  # the fused layers import this package's core

    for i, layer in enumerate(layers):
      if not isinstance(layer, (RNN, Bidirectional, LSTM, GRU, StackedRNN)):
        _checks.fail('StackedRNN', f'layers[{i}]',
                     'an RNN, Bidirectional, LSTM, GRU or StackedRNN layer',
                     type(layer).__name__, TypeError)
    # Each layer reads the previous one's outputs: a size that does not chain
    # would fail at the first call, naming neither layer.
    for i in range(1, len(layers)):
      source = f'layers[{i - 1}], {type(layers[i - 1]).__name__}'
      check_reads_axes('StackedRNN', f'layers[{i}]', layers[i], _gives_axes(layers[i - 1]),
                       f'the outputs of {source}')
      check_reads('StackedRNN', f'layers[{i}]', layers[i], _out_features(layers[i - 1]),
                  f'the output size of {source}')
    self.layers = nnx.List(layers)
    self.dropout_rate = _checks.check_rate('StackedRNN', 'dropout_rate', dropout_rate)
    self.time_major = (layers[0].time_major if time_major is None
                       else _checks.check_bool('StackedRNN', 'time_major', time_major))
    self.return_carry = _checks.check_bool('StackedRNN', 'return_carry', return_carry)
    if rngs is not None and not isinstance(rngs, (nnx.Rngs, nnx.RngStream)):
      # nnx.Dropout's own message names neither the stack nor the argument
      _checks.fail('StackedRNN', 'rngs', 'None, an nnx.Rngs or an nnx.RngStream (the source of '
                   'the dropout between layers; a PRNG key may be given at call time)',
                   type(rngs).__name__, TypeError)
    # No RNG state without dropout (flax#4509).
    if self.dropout_rate:
      _checks.check_stream('StackedRNN', rngs, 'dropout',
                           f'for dropout_rate={self.dropout_rate}')
    self.dropout = nnx.data(nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate
                            else None)

  @_checks.named_errors
  def __call__(
    self,
    inputs: ArrayOrNumPy,
    *,
    initial_carry: tuple[Carry | None, ...] | None = None,
    seq_lengths: ArrayOrNumPy | None = None,
    segment_ids: ArrayOrNumPy | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    rngs: RngsLike = None,
    reverse: bool = False,
    keep_order: bool = False,
  ):
    """Runs the layers in turn.

    Args:
      inputs: ``(*batch, time, *features)`` (or time first).
      initial_carry: a tuple with one entry per layer: that layer's initial
        carry, or ``None`` for its default.
      seq_lengths, segment_ids: as for :class:`RNN`, passed to every layer.
      return_carry, time_major: override the attributes.
      rngs: dropout RNG for the cells and the between-layer dropout,
        overriding theirs (a PRNG key is split, one per use).
      reverse: run the stack on each row reversed within its valid length.
      keep_order: with ``reverse``, return outputs in input order.

    Returns:
      ``outputs``, or ``(carries, outputs)`` with ``return_carry``.
    """
    _checks.check_rngs('StackedRNN', rngs)
    return_carry, time_major = _checks.call_flags(
      'StackedRNN', self, return_carry=return_carry, time_major=time_major)
    _checks.check_optional_bools('StackedRNN', reverse=reverse, keep_order=keep_order)
    n = len(self.layers)
    # An initial_carry in PyTorch's layout, (num_layers * num_directions, batch,
    # hidden) arrays, gets a hint on how to give it here.
    torch_hint = functools.partial(_checks.hint_torch_carry, initial_carry, self,
                                   _checks.batch_shape_of(inputs, time_major))
    if initial_carry is None:
      initial_carry = (None,) * n
    elif not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != n:
      with torch_hint():
        _checks.fail('StackedRNN', 'initial_carry',
                     f'a tuple of {n} carries (one per layer, None for the default)',
                     _checks.kind(initial_carry))
    if self.dropout is not None and n > 1 and not self.dropout.deterministic:
      _checks.check_stream('StackedRNN', rngs, 'dropout', 'for the dropout between layers')
    uses = _scan.per_use_rngs(rngs, 2 * n)  # the layers', then the dropouts' between them
    layer_rngs, dropout_rngs = uses[:n], uses[n:]
    dropout = self.dropout
    if (dropout is not None and n > 1 and not dropout.deterministic and rngs is None
        and dropout.rngs is None):
      _checks.fail('StackedRNN', 'rngs', 'a PRNG source for the dropout between layers in '
                   'training mode', 'None (pass rngs=nnx.Rngs(...) at construction or call '
                   'time, or call .eval())')
    idx = None
    x = inputs
    if reverse:
      x, idx, batch_dims = self._reverse(inputs, None, time_major, seq_lengths, segment_ids)
    carries = []
    for i, layer in enumerate(self.layers):
      with torch_hint(), _checks.blame_entry(
          'StackedRNN', f'[{i}]', f'layers[{i}] ({type(layer).__name__})', initial_carry[i],
          passed=(('inputs',) if i == 0 else ()) + ('seq_lengths', 'segment_ids')):
        carry, x = layer(x, initial_carry=initial_carry[i], seq_lengths=seq_lengths,
                         segment_ids=segment_ids, return_carry=True, time_major=time_major,
                         rngs=layer_rngs[i])
      carries.append(carry)
      if dropout is not None and i < n - 1:
        # The dropout between layers draws its mask time first, as the fused layers
        # do: a valid step's mask then depends neither on how much padding follows
        # (more steps) nor on time_major. (After the first layer has checked inputs;
        # inputs of several arrays, for a cell of one's own: as drawn, unmoved.)
        axes, leaves = _reads_axes(self.layers[0]), jax.tree_util.tree_leaves(inputs)
        time_axis = 0 if time_major or len(leaves) != 1 else max(
          jnp.ndim(leaves[0]) - 1 - (1 if axes is None else axes), 0)
        x = jax.tree_util.tree_map(
          lambda a, r=dropout_rngs[i], d=dropout, t=time_axis: _dropout_time_first(d, a, r, t), x)
    if reverse and keep_order:
      x, _, _ = self._reverse(x, idx, time_major, seq_lengths, segment_ids, batch_dims)
    return (tuple(carries), x) if return_carry else x

  def _reverse(self, x, idx, time_major, seq_lengths, segment_ids, batch_dims=None):
    """Each row of ``x`` reversed within its valid part (an involution):
    ``(x, idx, batch_dims)``, ``idx`` the per-row time indices. ``x`` is the
    inputs, or with ``batch_dims`` the last layer's outputs: any pytree of
    arrays, as ``RNN`` returns a cell's pytree of outputs."""
    if batch_dims is None:
      seq = _scan.prepare('StackedRNN', x, num_feature_axes=_reads_axes(self.layers[0]) or 1,
                          in_features=None,
                          time_major=time_major, seq_lengths=seq_lengths,
                          segment_ids=segment_ids)
      batch_dims = len(seq.batch_shape)
      xs, idx = _scan.processing_order(seq, True)
    else:
      time_axis = 0 if time_major else batch_dims
      xs = jax.tree_util.tree_map(lambda a: _scan.take_time(jnp.moveaxis(a, time_axis, 0), idx),
                                  x)
    return _scan.restore_layout(xs, time_major, batch_dims), idx, batch_dims


def _dropout_time_first(dropout: nnx.Dropout, a: Array, rngs: RngsLike, time_axis: int) -> Array:
  """``dropout(a)`` with the mask drawn for ``a``'s time axis first."""
  if not time_axis or a.ndim <= time_axis:
    return dropout(a, rngs=rngs)
  return jnp.moveaxis(dropout(jnp.moveaxis(a, time_axis, 0), rngs=rngs), 0, time_axis)
