"""The fused layers: ``LSTM`` and ``GRU``, and the one place that picks a backend.

:meth:`_FusedBase._run_layer` turns one layer (one or both directions) into
``(final_carries, outputs)``: through cuDNN (:mod:`._cudnn`) with
``implementation='cudnn'``, otherwise, and by default (``'auto'``: cuDNN through
JAX measured slower than the scans on an H200), the XLA scans (:mod:`._xla`)
one direction at a time, the backward direction on each row's valid part
reversed (:func:`_scan.reverse_indices` / :func:`_scan.take_time`, the same
core as ``RNN`` and ``Bidirectional``; validation and layout through
:func:`_scan.prepare`). Dropout between layers is this module's in every case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import (
  _NO_METADATA,
  Array,
  RngsLike,
  default_bias_init,
  default_kernel_init,
  default_recurrent_kernel_init,
)
from nnx_recurrent._fused import _cudnn, _pallas, _plans, _xla
from nnx_recurrent._fused._step_math import GRUMath, LSTMMath
from nnx_recurrent._gru import GRUCell
from nnx_recurrent._lstm import OptimizedLSTMCell

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')


def _first(*values):
  return next(v for v in values if v is not None)


def _describe(x) -> str:
  shape = getattr(x, 'shape', None)
  return f'an array of shape {tuple(shape)}' if shape is not None else type(x).__name__


class _FusedBase(nnx.Module):
  _cell_type: type
  _math: Any
  _cudnn: bool  # has a cuDNN path (_cudnn.layer)

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    time_major: bool = False,
    return_carry: bool = False,
    reverse: bool = False,
    keep_order: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
    bias_init: Initializer = default_bias_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    implementation: str = 'auto',
    rngs: nnx.Rngs,
  ):
    where = type(self).__name__
    supported = IMPLEMENTATIONS if self._cudnn else ('auto', 'xla', 'pallas')
    if implementation not in supported:
      why = '' if self._cudnn else ' (jax.experimental.rnn has a cuDNN LSTM only)'
      _checks.fail(where, 'implementation', ' or '.join(map(repr, supported)) + why,
                   repr(implementation))
    self.implementation = implementation
    self.in_features = _checks.check_positive_int(where, 'in_features', in_features)
    self.hidden_features = _checks.check_positive_int(where, 'hidden_features', hidden_features)
    self.num_layers = _checks.check_positive_int(where, 'num_layers', num_layers)
    self.dropout_rate = _checks.check_rate(where, 'dropout_rate', dropout_rate)
    if not isinstance(rngs, nnx.Rngs):
      _checks.fail(where, 'rngs', 'an nnx.Rngs', type(rngs).__name__, TypeError)
    self.bidirectional = bool(bidirectional)
    self._check_reverse(reverse)
    self.time_major = time_major
    self.return_carry = return_carry
    self.reverse = reverse
    self.keep_order = keep_order
    kw = dict(kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
              bias_init=bias_init, dtype=dtype, param_dtype=param_dtype,
              kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
              bias_metadata=bias_metadata, rngs=rngs)
    width = hidden_features * self.num_directions
    forward, backward = [], []
    for layer in range(self.num_layers):
      n_in = self.in_features if layer == 0 else width
      forward.append(self._cell_type(n_in, self.hidden_features, **kw))
      if self.bidirectional:
        backward.append(self._cell_type(n_in, self.hidden_features, **kw))
    self.forward = nnx.List(forward)
    self.backward = nnx.List(backward) if self.bidirectional else nnx.data(None)
    # Between layers only; no PRNG state unless it is needed.
    self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs if self.dropout_rate else None)

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  def _check_reverse(self, reverse: bool):
    if reverse and self.bidirectional:
      _checks.fail(type(self).__name__, 'reverse', 'False for a bidirectional layer (it runs '
                   'both directions already)', repr(reverse))

  def _cells(self, layer: int) -> list:
    return [self.forward[layer]] + ([self.backward[layer]] if self.bidirectional else [])

  def _default_carry(self, batch_shape: tuple[int, ...]):
    per_layer = []
    for layer in range(self.num_layers):
      carries = [cell.initialize_carry(batch_shape + (cell.in_features,))
                 for cell in self._cells(layer)]
      per_layer.append(carries[0] if len(carries) == 1 else tuple(carries))
    return self._public_carry(per_layer)

  def _public_carry(self, per_layer: list):
    if self.num_layers == 1 and not self.bidirectional:
      return per_layer[0]
    return tuple(per_layer)

  def _dtype(self, cell, xs: Array):
    """The cell's computation dtype (nnx.Linear's promotion of inputs and parameters)."""
    params = self._math.params(cell)
    return cell.dtype or jnp.result_type(xs.dtype, *jax.tree_util.tree_leaves(params))

  def _backend(self, dtype, rows: int) -> str:
    """The one place that picks a layer's backend: 'xla', 'cudnn' or 'pallas'.

    'auto' is the XLA scans, but where the Pallas kernels measured faster on
    this GPU (``_plans.PALLAS_FASTER``: no shape yet). Through
    jax.experimental.rnn, cuDNN measured slower than the scans on an H200 at
    three of the four benchmark shapes and at most 13% faster at the fourth
    (benchmarks/RESULTS.md, "GPU"): only 'cudnn' picks it.
    """
    where, chosen = type(self).__name__, self.implementation
    reason = {'cudnn': lambda: _cudnn.unsupported(dtype), 'pallas': _pallas.unsupported}.get(
      chosen, lambda: None)()
    if reason is not None:
      name = {'cudnn': 'cuDNN', 'pallas': 'Pallas'}[chosen]
      _checks.fail(where, 'implementation', f"'auto' or 'xla' here ({name} {reason})",
                   repr(chosen))
    if chosen == 'auto':
      faster = _plans.pallas_measured_faster(self._math, rows, self.hidden_features)
      return 'pallas' if faster else 'xla'
    return chosen

  def _run_layer(self, layer: int, xs: Array, carries, valid, idx, seq_lengths):
    """One layer over time-major ``xs``: ``(finals, ys)``, one final carry per
    direction, through the backend :meth:`_backend` picks."""
    cells = self._cells(layer)
    dtype = self._dtype(cells[0], xs)
    backend = self._backend(dtype, math.prod(xs.shape[1:-1])) if xs.size else 'xla'
    if backend == 'cudnn':  # both directions in one call
      try:
        return _cudnn.layer(cells, xs, carries, seq_lengths, dtype)
      except NotImplementedError as e:  # jax.vmap: the primitives have no batching rule
        if 'Batching rule' not in str(e):
          raise
        _checks.fail(type(self).__name__, 'implementation',
                     "'auto' or 'xla' under jax.vmap (jax.experimental.rnn's cuDNN "
                     'primitives have no batching rule)', "'cudnn'")
    finals, ys = [], []
    for d, cell in enumerate(cells):
      x = xs if d == 0 else _scan.take_time(xs, idx)  # the backward direction: each row reversed
      final, y = self._run_direction(cell, x, carries[d], valid, seq_lengths, backend)
      finals.append(final)
      ys.append(y if d == 0 else _scan.take_time(y, idx))
    return finals, (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1))

  def _run_direction(self, cell, xs: Array, carry, valid: Array | None,
                     seq_lengths: Array | None, backend: str):
    """One cell over time-major ``xs``: ``(final_carry, ys)`` with the XLA scans
    or the Pallas kernels."""
    params = self._math.params(cell)
    dtype = self._dtype(cell, xs)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    carry_in = jax.tree_util.tree_map(lambda a: a.astype(dtype), carry)
    time = xs.shape[0]
    if time == 0:  # nothing to scan: the carry passes through
      return carry, jnp.zeros(xs.shape[:-1] + (self.hidden_features,), dtype)
    xs = xs.astype(dtype)
    if backend == 'pallas':
      lengths = (jnp.full(xs.shape[1:-1], time, jnp.int32) if seq_lengths is None
                 else jnp.clip(seq_lengths, 0, time))  # as the scans treat unchecked lengths
      final, ys = _pallas.recurrence(self._math, params, xs, carry_in, lengths)
    else:
      plan = _plans.plan(self._math, math.prod(xs.shape[1:-1]), params[2].shape[-1])
      if plan.custom_vjp:
        final, ys = _xla.recurrence(self._math, plan, params, xs, carry_in, valid)
      else:  # JAX differentiates the forward scan (its unused residuals are dropped)
        final, ys, _ = _xla.forward_scan(self._math, plan.primal, params, xs, carry_in, valid)
    final = jax.tree_util.tree_map(lambda n, o: n.astype(o.dtype), final, carry)
    return final, ys

  def __call__(
    self,
    inputs: Array,
    *,
    initial_carry: Any = None,
    seq_lengths: Array | None = None,
    segment_ids: Array | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    rngs: RngsLike = None,
  ):
    """Runs the stack over ``inputs``.

    Args:
      inputs: ``(*batch, time, in_features)`` (or time first).
      initial_carry: in the structure described in the class docstring;
        default zeros.
      seq_lengths: integer ``(*batch)`` lengths; steps at or past a row's
        length are padding (zero outputs, carry unchanged; whatever the
        inputs hold there reaches no output and no gradient).
      segment_ids: must be ``None`` (packed sequences: use ``nr.RNN``); here
        so that the layer takes ``nr.RNN``'s call, e.g. inside
        ``nr.Bidirectional``.
      return_carry, time_major, reverse, keep_order: override the attributes.
      rngs: dropout RNG (an ``nnx.Rngs``, ``RngStream`` or key), overriding
        the one given at construction.

    Returns:
      ``outputs``, or ``(final_carry, outputs)`` with ``return_carry``.
    """
    where = type(self).__name__
    return_carry = _first(return_carry, self.return_carry)
    time_major = _first(time_major, self.time_major)
    reverse = _first(reverse, self.reverse)
    keep_order = _first(keep_order, self.keep_order)
    self._check_reverse(reverse)
    if segment_ids is not None:
      _checks.fail(where, 'segment_ids', f'None (packed sequences are not supported by '
                   f'nr.{where} yet; use nr.RNN)', _describe(segment_ids))
    seq = _scan.prepare(where, inputs, num_feature_axes=1, in_features=self.in_features,
                        time_major=time_major, seq_lengths=seq_lengths)
    if initial_carry is None:
      initial_carry = self._default_carry(seq.batch_shape)
    else:
      expected = jax.eval_shape(lambda: self._default_carry(seq.batch_shape))
      _checks.check_tree_matches(where, 'initial_carry', initial_carry, expected)
    if self.num_layers == 1 and not self.bidirectional:
      initial_carry = (initial_carry,)
    idx = None
    if self.bidirectional or reverse:
      idx = _scan.reverse_indices(seq.time, seq.batch_shape, seq.seq_lengths)
    valid = seq.masks.valid
    # Zeros at padding, once: the projections and steps there then compute on
    # zeros, whose values carry selection discards and whose gradients are 0
    # (garbage would give NaN * 0 = NaN). Later layers read outputs that are 0
    # at padding (and dropout keeps them 0).
    xs = _scan.clean_padding(seq.xs, valid)  # as nr.RNN's scan does
    if reverse:  # each row from its last valid step to its first; padding stays last
      xs = _scan.take_time(xs, idx)
    finals = []
    for layer in range(self.num_layers):
      if layer:
        xs = self.dropout(xs, rngs=rngs)
      layer_carry = initial_carry[layer]
      carries = tuple(layer_carry) if self.bidirectional else (layer_carry,)
      final, xs = self._run_layer(layer, xs, carries, valid, idx, seq.seq_lengths)
      finals.append(tuple(final) if self.bidirectional else final[0])
    if reverse and keep_order:
      xs = _scan.take_time(xs, idx)
    ys = _scan.restore_layout(xs, time_major, len(seq.batch_shape))
    return (self._public_carry(finals), ys) if return_carry else ys


_LAYER_DOC = """
  Same call convention as :class:`~nnx_recurrent.RNN`: inputs ``(*batch,
  time, in_features)`` (or time first with ``time_major``), ``seq_lengths``
  marks padding, whose outputs are zero and which leaves the carry unchanged.
  Outputs are ``(*batch, time, hidden_features * num_directions)``, the
  forward and backward directions concatenated on the last axis; the backward
  direction reverses each row within its valid length. Whatever the inputs
  hold at padding (even NaN or inf) reaches no output and no gradient: the
  gradient there is zero. A one-direction layer takes ``reverse`` and
  ``keep_order`` as ``RNN`` does, so two of them make a
  ``nr.Bidirectional``; ``segment_ids`` (packed sequences) are not supported
  yet.

  Carry (``initial_carry`` in, ``return_carry`` out):

  * ``num_layers == 1`` and not ``bidirectional``: the cell's carry, exactly as
    ``nr.RNN`` over that cell returns it ({carry}).
  * otherwise: a tuple with one entry per layer; each entry is the cell's
    carry, or ``(carry_forward, carry_backward)`` when ``bidirectional``.

  Parameters live in ordinary cells: ``forward`` is an ``nnx.List`` of one
  :class:`~nnx_recurrent.{cell}` per layer and ``backward`` the same for the
  backward direction (``None`` unless ``bidirectional``). Layer ``l > 0`` has
  ``in_features = hidden_features * num_directions``. The layer computes
  exactly what ``RNN`` / ``Bidirectional`` stacked over these cells compute
  (up to float rounding), with dropout between layers (not after the last),
  but faster: see the module docstring of ``nnx_recurrent._fused``.

  Args:
    in_features: size of the last input axis.
    hidden_features: size of each direction's hidden state.
    num_layers: number of stacked layers.
    bidirectional: run a backward direction too and concatenate.
    dropout_rate: dropout on the inputs of layers ``1 .. num_layers - 1``
      (an ``nnx.Dropout`` in ``.dropout``: ``.eval()`` turns it off; it draws
      from the ``dropout`` stream, and holds no PRNG state when the rate is 0).
    time_major: inputs are ``(time, *batch, features)``.
    return_carry: return ``(carry, outputs)`` instead of ``outputs``.
    reverse: process each row from its last valid step to its first (padding
      stays at the end), all layers; outputs come in processing order unless
      ``keep_order``. Not for a ``bidirectional`` layer (a ``ValueError``).
    keep_order: with ``reverse``, return the outputs in input order.
    dtype: computation dtype (default: inferred from inputs and parameters).
    param_dtype: parameter and carry dtype.
    kernel_init, recurrent_kernel_init, bias_init: initializers of the cells.
    kernel_metadata, recurrent_kernel_metadata, bias_metadata: metadata of every
      cell's parameters (e.g. ``{{'out_sharding': (None, 'model')}}``), as for the cells.
    implementation: {implementation}
    rngs: ``nnx.Rngs`` for the parameters (and dropout).
"""


_PALLAS_DOC = """one Pallas kernel per direction for the forward
      recurrence and one for the backward (Triton on a GPU; interpreted on the
      CPU, for tests; a ``ValueError`` elsewhere). Not yet compiled nor measured
      on a GPU: ``'auto'`` does not pick it (see docs/performance.md)."""


class LSTM(_FusedBase):
  __doc__ = (
    """Multi-layer LSTM with a fused, hand-differentiated recurrence.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> lstm = nr.LSTM(3, 5, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 7, 3))
    >>> carry, y = lstm(x, seq_lengths=jnp.array([7, 4]), return_carry=True)
    >>> y.shape, bool((y[1, 4:] == 0).all())
    ((2, 7, 10), True)
    >>> (c_fwd, h_fwd), (c_bwd, h_bwd) = carry[1]  # last layer
    >>> h_fwd.shape
    (2, 5)
    >>> single = nr.LSTM(3, 5, rngs=nnx.Rngs(0))
    >>> (c, h), y = single(x, return_carry=True)  # as nr.RNN(OptimizedLSTMCell)
    >>> bool((h == y[:, -1]).all())
    True
"""
    + _LAYER_DOC.format(carry='``(c, h)``', cell='OptimizedLSTMCell', implementation="""``'auto'``
      (default) or ``'xla'``: the XLA scans, on every backend (on an H200,
      cuDNN through ``jax.experimental.rnn`` took 1.24-1.43x their training
      step at three of the four benchmark shapes, 0.87-0.99x at batch 256);
      ``'cudnn'``: cuDNN via ``jax.experimental.rnn`` (CUDA GPU, float32 only;
      a ``ValueError`` elsewhere, and under ``jax.vmap``, which its primitives
      do not support); ``'pallas'``: """ + _PALLAS_DOC + """
      All compute the same function; on GPU all follow
      ``jax_default_matmul_precision`` (TF32 matmuls unless it is ``'highest'``).""")
  )

  _cell_type = OptimizedLSTMCell
  _math = LSTMMath
  _cudnn = True


class GRU(_FusedBase):
  __doc__ = (
    """Multi-layer GRU with a fused, hand-differentiated recurrence.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> gru = nr.GRU(3, 4, num_layers=2, rngs=nnx.Rngs(0))
    >>> h_per_layer, y = gru(jnp.ones((2, 6, 3)), return_carry=True)
    >>> y.shape, len(h_per_layer), h_per_layer[1].shape
    ((2, 6, 4), 2, (2, 4))
"""
    + _LAYER_DOC.format(carry='``h``', cell='GRUCell', implementation="""``'auto'`` or
      ``'xla'``: the XLA scans (``jax.experimental.rnn`` has no cuDNN GRU);
      ``'pallas'``: """ + _PALLAS_DOC)
  )

  _cell_type = GRUCell
  _math = GRUMath
  _cudnn = False
