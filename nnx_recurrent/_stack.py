"""``StackedRNN``: sequence layers applied one after another."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import Array, Carry, RngsLike
from nnx_recurrent._rnn import RNN, Bidirectional, _first


def _feature_axes(layer) -> int:
  """The number of feature axes a layer's inputs have (1 for the fused layers)."""
  while isinstance(layer, Bidirectional):
    layer = layer.forward_rnn
  cell = getattr(layer, 'cell', None)
  return cell.num_feature_axes if cell is not None else 1


class StackedRNN(nnx.Module):
  """A stack of sequence layers: ``RNN``, ``Bidirectional``, fused ``LSTM`` / ``GRU``
  (mixed freely).

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
    >>> stack(x, seq_lengths=jnp.array([6, 4])).shape
    (2, 6, 5)
    >>> ((fwd, bwd), h), y = stack(x, return_carry=True)  # one carry per layer
    >>> fwd[1].shape, h.shape
    ((2, 4), (2, 5))

  ``reverse=True`` runs the whole stack on each row reversed within its
  valid length (each packed segment within its span), which is what
  ``Bidirectional`` asks of its backward layer; outputs come in processing
  order unless ``keep_order=True``.

  Args:
    *layers: ``RNN``, ``Bidirectional``, ``LSTM`` or ``GRU`` layers, first to last.
    dropout_rate: dropout between layers (not after the last).
    time_major: inputs are ``(time, *batch, *features)`` (default: the first
      layer's ``time_major``).
    return_carry: return ``(carries, outputs)``, ``carries`` a tuple with
      one carry per layer (a ``(forward, backward)`` pair for a
      ``Bidirectional``).
    rngs: ``nnx.Rngs`` for the between-layer dropout (only with
      ``dropout_rate > 0``; may also be given at call time).
  """

  def __init__(self, *layers, dropout_rate: float = 0.0, time_major: bool | None = None,
               return_carry: bool = False, rngs: nnx.Rngs | None = None):
    if not layers:
      _checks.fail('StackedRNN', 'layers', 'at least one layer', 'none')
    from nnx_recurrent._fused import GRU, LSTM  # the fused layers import this package's core

    for i, layer in enumerate(layers):
      if not isinstance(layer, (RNN, Bidirectional, LSTM, GRU)):
        _checks.fail('StackedRNN', f'layers[{i}]', 'an RNN, Bidirectional, LSTM or GRU layer',
                     type(layer).__name__, TypeError)
    self.layers = nnx.List(layers)
    self.dropout_rate = _checks.check_rate('StackedRNN', 'dropout_rate', dropout_rate)
    self.time_major = (layers[0].time_major if time_major is None
                       else _checks.check_bool('StackedRNN', 'time_major', time_major))
    self.return_carry = _checks.check_bool('StackedRNN', 'return_carry', return_carry)
    # No RNG state without dropout (flax#4509).
    self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate else None

  def __call__(
    self,
    inputs: Array,
    *,
    initial_carry: tuple[Carry | None, ...] | None = None,
    seq_lengths: Array | None = None,
    segment_ids: Array | None = None,
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
    _checks.check_optional_bools('StackedRNN', return_carry=return_carry, time_major=time_major,
                                 reverse=reverse, keep_order=keep_order)
    n = len(self.layers)
    return_carry = _first(return_carry, self.return_carry)
    time_major = _first(time_major, self.time_major)
    if initial_carry is None:
      initial_carry = (None,) * n
    elif not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != n:
      _checks.fail('StackedRNN', 'initial_carry',
                   f'a tuple of {n} carries (one per layer, None for the default)',
                   _checks.kind(initial_carry))
    # A raw key would give every layer the same masks: split it, one per use.
    layer_rngs = dropout_rngs = (rngs,) * n
    if isinstance(rngs, jax.Array):
      keys = jax.random.split(rngs, 2 * n)
      layer_rngs, dropout_rngs = tuple(keys[:n]), tuple(keys[n:])
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
      carry, x = layer(x, initial_carry=initial_carry[i], seq_lengths=seq_lengths,
                       segment_ids=segment_ids, return_carry=True, time_major=time_major,
                       rngs=layer_rngs[i])
      carries.append(carry)
      if dropout is not None and i < n - 1:
        x = jax.tree_util.tree_map(lambda a, r=dropout_rngs[i], d=dropout: d(a, rngs=r), x)
    if reverse and keep_order:
      x, _, _ = self._reverse(x, idx, time_major, seq_lengths, segment_ids, batch_dims)
    return (tuple(carries), x) if return_carry else x

  def _reverse(self, x, idx, time_major, seq_lengths, segment_ids, batch_dims=None):
    """Each row of ``x`` reversed within its valid part (an involution):
    ``(x, idx, batch_dims)``, ``idx`` the per-row time indices."""
    if batch_dims is None:
      seq = _scan.prepare('StackedRNN', x, num_feature_axes=_feature_axes(self.layers[0]),
                          in_features=None,
                          time_major=time_major, seq_lengths=seq_lengths,
                          segment_ids=segment_ids)
      batch_dims = len(seq.batch_shape)
      xs, idx = _scan.processing_order(seq, True)
    else:
      xs = _scan.take_time(jnp.moveaxis(x, 0 if time_major else batch_dims, 0), idx)
    return _scan.restore_layout(xs, time_major, batch_dims), idx, batch_dims
