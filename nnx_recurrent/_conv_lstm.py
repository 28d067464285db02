"""Convolutional LSTM cell for 1-D, 2-D and 3-D signals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PaddingLike, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  RNNCellBase,
  default_promote_dtype,
  lstm_update,
  masked,
)

_SHAPE_KEEPING = ('SAME', 'CIRCULAR', 'REFLECT', 'CAUSAL')


def _shape_keeping(padding: PaddingLike, kernel_size: tuple[int, ...]) -> PaddingLike:
  """``padding`` if a stride-1 convolution with it keeps the spatial shape, else ``'SAME'``."""
  if isinstance(padding, str):
    return padding if padding.upper() in _SHAPE_KEEPING else 'SAME'
  pads = [padding] * len(kernel_size) if isinstance(padding, int) else list(padding)
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in pads]
  if len(pads) == len(kernel_size) and all(
      lo + hi == k - 1 for (lo, hi), k in zip(pads, kernel_size)):
    return padding
  return 'SAME'


class ConvLSTMCell(RNNCellBase):
  r"""Convolutional LSTM cell (Shi et al., 2015), flax.linen's formulation.

  .. math::

     \begin{array}{ll}
     i = \sigma(W_{ii} * x + W_{hi} * h + b_i) \\
     g = \tanh(W_{ig} * x + W_{hg} * h + b_g) \\
     f = \sigma(W_{if} * x + W_{hf} * h + b_f + 1) \\
     o = \sigma(W_{io} * x + W_{ho} * h + b_o) \\
     c' = f c + i g \qquad h' = o \tanh(c')
     \end{array}

  where ``*`` is convolution. The input-to-hidden convolution ``ih`` uses
  ``strides`` and ``padding``; the hidden-to-hidden convolution ``hh`` uses
  stride 1 so the state keeps its spatial shape (flax.linen applies the
  strides to both and crashes for strides > 1), and ``padding`` too where it
  keeps the shape at stride 1 (``'SAME'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'``, or explicit pads summing to ``kernel_size - 1``; as in
  flax.linen), ``'SAME'`` otherwise (``'VALID'``, where flax.linen crashes). Gate
  order in the kernels is ``i, g, f, o``. Inputs are
  ``(*batch, *spatial, in_features)`` with ``len(kernel_size)`` spatial axes,
  so ``num_feature_axes == len(kernel_size) + 1``; the carry is ``(c, h)``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.ConvLSTMCell(3, 8, (3, 3), strides=(2, 2), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 16, 16, 3))
    >>> (c, h), y = cell(cell.initialize_carry(x.shape), x)
    >>> y.shape, cell.num_feature_axes
    ((2, 8, 8, 8), 3)

  Args:
    in_features: channels of the input.
    hidden_features: channels of the state (convolution filters).
    kernel_size: 1 to 3 ints.
    strides: strides of the input convolution (default 1).
    padding: padding of the input convolution (as ``nnx.Conv``), and of the
      hidden one where it keeps the shape (see above).
    use_bias: add biases (default True).
    dtype, param_dtype: computation and parameter dtypes.
    dropout_rate, recurrent_dropout_rate: variational dropout rates.
    kernel_metadata: metadata of the ``ih`` kernel (e.g. sharding names).
    recurrent_kernel_metadata: metadata of the ``hh`` kernel.
    bias_metadata: metadata of both biases.
    rngs: ``nnx.Rngs``.
  """

  _carry_leaves = 2

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = 'SAME',
    use_bias: bool = True,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    carry_init: Initializer | None = None,
    promote_dtype: PromoteDtypeFn = default_promote_dtype,
    keep_rngs: bool = False,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    rngs: nnx.Rngs,
  ):
    where = 'ConvLSTMCell'
    self._init_common(
      where, in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
    )
    if isinstance(kernel_size, int) or not 1 <= len(kernel_size) <= 3:
      _checks.fail(where, 'kernel_size', 'a sequence of 1 to 3 ints', repr(kernel_size))
    self.kernel_size = tuple(_checks.check_positive_int(where, 'kernel_size', k)
                             for k in kernel_size)
    n = len(self.kernel_size)
    if strides is None:
      strides = (1,) * n
    elif isinstance(strides, int):
      strides = (strides,) * n
    if len(strides) != n:
      _checks.fail(where, 'strides', f'{n} ints (one per kernel axis)', repr(strides))
    self.strides = tuple(_checks.check_positive_int(where, 'strides', s) for s in strides)
    self.padding = padding
    self.use_bias = use_bias
    conv = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                promote_dtype=promote_dtype, rngs=rngs)
    self.ih = nnx.Conv(self.in_features, 4 * self.hidden_features, self.kernel_size,
                       strides=self.strides, padding=padding, kernel_metadata=kernel_metadata,
                       bias_metadata=bias_metadata, **conv)
    self.hh = nnx.Conv(self.hidden_features, 4 * self.hidden_features, self.kernel_size,
                       padding=_shape_keeping(padding, self.kernel_size),
                       kernel_metadata=recurrent_kernel_metadata,
                       bias_metadata=bias_metadata, **conv)

  @property
  def num_feature_axes(self) -> int:
    return len(self.kernel_size) + 1

  def _output_shape(self, input_shape):
    n = len(self.kernel_size)
    batch = tuple(input_shape[: -(n + 1)])
    probe = jax.ShapeDtypeStruct((1, *input_shape[-(n + 1):]), jnp.float32)
    # Through split/merge so abstract parameters (nnx.eval_shape) work too.
    graphdef, state = nnx.split(self.ih)
    spatial = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state, probe).shape[1:-1]
    return batch + tuple(spatial) + (self.hidden_features,)

  def _step(self, carry, inputs, recurrent_mask):
    c, h = carry
    gates = self.ih(inputs) + self.hh(masked(h, recurrent_mask))
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    # lstm_update applies sigmoid to f; flax.linen adds 1 before it.
    new_c, new_h = lstm_update(c, i, f + 1.0, g, o, nnx.sigmoid, jnp.tanh)
    return (new_c, new_h), new_h
