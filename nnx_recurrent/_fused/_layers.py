"""The fused layers :class:`LSTM` and :class:`GRU`: their cells, math and docs.

Everything they do is :class:`._core._FusedBase`'s; each names its cell
(:class:`OptimizedLSTMCell`, :class:`GRUCell`), the step math of
:mod:`._step_math`, and whether cuDNN can run it. The LSTM adds the cells'
projection (``proj_features``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  default_bias_init,
  default_kernel_init,
  default_recurrent_kernel_init,
)
from nnx_recurrent._fused._core import _FusedBase
from nnx_recurrent._fused._step_math import GRUMath, LSTMMath
from nnx_recurrent._gru import GRUCell
from nnx_recurrent._lstm import OptimizedLSTMCell

_LAYER_DOC = """
  Same call convention as :class:`~nnx_recurrent.RNN`: inputs ``(*batch,
  time, in_features)`` (or time first with ``time_major``), ``seq_lengths``
  marks padding, whose outputs are zero and which leaves the carry unchanged.
  Outputs are ``(*batch, time, out_features * num_directions)``
  (``out_features`` is {out_features}), the forward and backward directions
  concatenated on the last axis; the backward direction reverses each row
  within its valid length. Whatever the inputs hold at padding (even NaN or
  inf) reaches no output and no gradient: the gradient there is zero. A
  one-direction layer takes ``reverse`` and ``keep_order`` as ``RNN`` does,
  so two of them make a ``nr.Bidirectional``.

  Packed sequences: ``segment_ids`` (instead of ``seq_lengths``) as for
  ``RNN``: ``0`` is padding, and every layer and direction starts a row's
  first segment from its initial carry and every later segment from zeros,
  so each segment's outputs are those of a separate run on it (see
  :func:`~nnx_recurrent.pack_sequences`); the backward direction reverses
  each segment within its span. The returned carry of a packed row is the
  carry after its last valid step (in processing order).{cudnn_packed}

  Carry (``initial_carry`` in, ``return_carry`` out):

  * ``num_layers == 1`` and not ``bidirectional``: the cell's carry, exactly as
    ``nr.RNN`` over that cell returns it ({carry}).
  * otherwise: a tuple with one entry per layer; each entry is the cell's
    carry, or ``(carry_forward, carry_backward)`` when ``bidirectional``.

  ``initial_carry`` takes what the equivalent ``RNN`` / ``Bidirectional`` /
  ``StackedRNN`` (below) take: a list for any of these tuples, and ``None``
  for a layer's entry or one direction's carry (that part's default, zeros).
  Its arrays have the carry's shapes: as for ``nr.RNN``, a ``(1, H)`` or
  ``(H,)`` carry for a batch of rows is a ``ValueError``.

  Parameters live in ordinary cells: ``forward`` is an ``nnx.List`` of one
  :class:`~nnx_recurrent.{cell}` per layer and ``backward`` the same for the
  backward direction (``None`` unless ``bidirectional``). Layer ``l > 0`` has
  ``in_features = out_features * num_directions``. The layer computes
  exactly what ``RNN`` / ``Bidirectional`` stacked over these cells compute
  (up to float rounding), with dropout between layers (not after the last),
  but faster: see the module docstring of ``nnx_recurrent._fused``. It reads
  the cells' parameters and runs its own step, so a cell changed since (put
  in of another type, or with a projection swapped, as nnx's LoRA surgery
  swaps an ``nnx.Linear`` for an ``nnx.LoRALinear``) is a ``TypeError`` at
  the call: run such cells with ``RNN`` / ``Bidirectional``. One
  difference: with a half-precision ``dtype`` the outputs come in ``dtype``
  (half the memory), where ``RNN`` over the cell returns them in the carry's
  dtype; the carry comes in ``param_dtype`` (docs/performance.md). Another:
  the layer differentiates in reverse mode only (``jax.grad``, ``jax.vjp``,
  second order by ``jax.hessian``); ``jax.jvp`` and ``jax.jacfwd`` raise JAX's
  ``custom_vjp`` error: for forward mode use ``RNN`` over the same cells.

  Args:
    in_features: size of the last input axis.
    hidden_features: size of each direction's hidden state.{proj_args}
    num_layers: number of stacked layers.
    bidirectional: run a backward direction too and concatenate.
    dropout_rate: dropout on the inputs of layers ``1 .. num_layers - 1``
      (an ``nnx.Dropout`` in ``.dropout``: ``.eval()`` turns it off; it draws
      from the ``dropout`` stream, and holds no PRNG state when the rate is 0).
    time_major: inputs are ``(time, *batch, features)``.
    return_carry: return ``(carry, outputs)`` instead of ``outputs``.
    reverse: process each row (each packed segment) from its last valid step
      to its first (padding stays at the end), all layers; outputs come in
      processing order unless ``keep_order``. Not for a ``bidirectional``
      layer (a ``ValueError``).
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
      CPU, for tests; a ``ValueError`` elsewhere). ``'auto'`` picks it on an
      H200 at the batch and hidden sizes where it measured faster than the
      scans, forward and training step (docs/performance.md lists them)."""


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

  With a projection (PyTorch's ``proj_size``) ``h`` and the outputs have
  ``proj_features`` features and ``c`` keeps ``hidden_features``; packed
  sequences take ``segment_ids``::

    >>> projected = nr.LSTM(3, 5, proj_features=2, bidirectional=True, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    >>> (((c_f, h_f), _),), y = projected(x, segment_ids=ids, return_carry=True)  # one layer
    >>> y.shape, c_f.shape, h_f.shape, bool((y[0, 5:] == 0).all())
    ((2, 7, 4), (2, 5), (2, 2), True)
"""
    + _LAYER_DOC.format(
      out_features='``proj_features``, or ``hidden_features`` without a projection',
      cudnn_packed=" ``implementation='cudnn'`` takes neither ``segment_ids`` nor "
      '``proj_features`` (``jax.experimental.rnn`` has neither): a ``ValueError``.',
      proj_args="""
    proj_features: size of the projected ``h`` and of the outputs (the cells'
      ``proj_features``: ``h = W_hr (o * tanh(c'))``, the parameter ``proj``
      of each cell); default no projection.
    proj_kernel_init, proj_kernel_metadata: the cells' (initializer and
      metadata of ``W_hr``).""",
      carry='``(c, h)``', cell='OptimizedLSTMCell', implementation="""``'auto'``
      (default): the XLA scans, but the Pallas kernels where they measured
      faster (below); ``'xla'``: the XLA scans, on every backend (on an H200,
      cuDNN through ``jax.experimental.rnn`` took 1.24-1.43x their training
      step at three of the four benchmark shapes, 0.87-0.99x at batch 256);
      ``'cudnn'``: cuDNN via ``jax.experimental.rnn`` (CUDA GPU, float32 only,
      no ``proj_features`` or ``segment_ids``; a ``ValueError`` elsewhere, and
      under ``jax.vmap``, which its primitives do not support); ``'pallas'``: """
      + _PALLAS_DOC + """
      All compute the same function; on GPU all follow
      ``jax_default_matmul_precision`` (TF32 matmuls unless it is ``'highest'``).""")
  )

  _cell_type = OptimizedLSTMCell
  _math = LSTMMath
  _cudnn = True
  _carry_doc = 'a pair (c, h) of arrays'

  @_checks.named_errors
  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    proj_features: int | None = None,
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
    proj_kernel_init: Initializer = default_kernel_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    proj_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    implementation: str = 'auto',
    rngs: nnx.Rngs,
  ):
    self.proj_features = None if proj_features is None else _checks.check_positive_int(
      type(self).__name__, 'proj_features', proj_features)
    # For _cell_options while the cells are built; not kept (a dict is an
    # unhashable static field of the graphdef, and a mappingproxy no deepcopy).
    self._proj_options = {} if self.proj_features is None else dict(
      proj_features=self.proj_features, proj_kernel_init=proj_kernel_init,
      proj_kernel_metadata=proj_kernel_metadata)
    super().__init__(
      in_features, hidden_features, num_layers=num_layers, bidirectional=bidirectional,
      dropout_rate=dropout_rate, time_major=time_major, return_carry=return_carry,
      reverse=reverse, keep_order=keep_order, dtype=dtype, param_dtype=param_dtype,
      kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init,
      kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, implementation=implementation, rngs=rngs)
    del self._proj_options

  def _cell_options(self) -> Mapping[str, Any]:
    return self._proj_options


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
    + _LAYER_DOC.format(
      out_features='``hidden_features``', cudnn_packed='', carry='``h``', proj_args="""
    use_bias_hn: the cells' (default ``True``: ``b_hn``, as PyTorch's, cuDNN's
      and flax.linen's GRU; ``False``: none, flax.nnx's ``GRUCell`` exactly,
      whose checkpoints then load with the same parameters).""",
      cell='GRUCell', implementation="""``'auto'``
      (default): the XLA scans, but the Pallas kernels where they measured
      faster (below); ``'xla'``: the XLA scans (``jax.experimental.rnn`` has
      no cuDNN GRU); ``'pallas'``: """ + _PALLAS_DOC)
  )

  _cell_type = GRUCell
  _math = GRUMath
  _cudnn = False
  _carry_doc = 'an array h'

  @_checks.named_errors
  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    use_bias_hn: bool = True,
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
    self.use_bias_hn = _checks.check_bool(type(self).__name__, 'use_bias_hn', use_bias_hn)
    super().__init__(
      in_features, hidden_features, num_layers=num_layers, bidirectional=bidirectional,
      dropout_rate=dropout_rate, time_major=time_major, return_carry=return_carry,
      reverse=reverse, keep_order=keep_order, dtype=dtype, param_dtype=param_dtype,
      kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init,
      kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, implementation=implementation, rngs=rngs)

  def _cell_options(self) -> Mapping[str, Any]:
    return {'use_bias_hn': self.use_bias_hn}
