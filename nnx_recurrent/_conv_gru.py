"""Convolutional GRU cell for 1-D, 2-D and 3-D signals."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PaddingLike, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import _NO_METADATA, HCell, default_promote_dtype, masked
from nnx_recurrent._conv import _ConvCell, default_conv_bias_init, default_conv_kernel_init
from nnx_recurrent._updates import gru_update


class ConvGRUCell(_ConvCell, HCell):
  r"""Convolutional GRU cell: :class:`GRUCell` with convolutions for the dense layers.

  .. math::

     \begin{array}{ll}
     r = \sigma(W_{ir} \circledast x + b_{ir} + W_{hr} \circledast h + b_{hr}) \\
     z = \sigma(W_{iz} \circledast x + b_{iz} + W_{hz} \circledast h + b_{hz}) \\
     n = \tanh(W_{in} \circledast x + b_{in} + r * (W_{hn} \circledast h + b_{hn})) \\
     h' = (1 - z) * n + z * h
     \end{array}

  where :math:`\circledast` is convolution and ``*`` the element-wise product: the GRU of
  :class:`GRUCell`, PyTorch and cuDNN, with ``b_hn`` inside the reset product.
  The carry and the output are ``h'``.

  Parameters: the convolutions ``ih`` (input: kernel ``(*kernel_size, in,
  3 * hidden)``, bias ``b_i``) and ``hh`` (hidden: kernel ``(*kernel_size,
  hidden, 3 * hidden)``, bias ``b_h``), channels in the order ``r, z, n``;
  PyTorch's layout (``b_hr``, ``b_hz`` only ever add to ``b_ir``, ``b_iz``).
  Strides, padding and shapes are :class:`ConvLSTMCell`'s: ``ih`` takes
  ``strides`` and ``padding``; ``hh`` has stride 1 so the state keeps its
  spatial shape, and ``padding`` where that keeps the shape at stride 1
  (``'SAME'``, ``'SAME_LOWER'``, ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, or
  explicit pads summing to ``kernel_size - 1``), ``'SAME'`` otherwise. With
  ``padding='CIRCULAR'`` (and stride 1) the cell is translation-equivariant:
  rolling the input along a spatial axis rolls the carry and the output.
  Inputs are ``(*batch, *spatial, in_features)`` with ``len(kernel_size)``
  spatial axes, so ``num_feature_axes == len(kernel_size) + 1``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.ConvGRUCell(3, 8, (3, 3), strides=(2, 2), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 16, 16, 3))
    >>> h, y = cell(cell.initialize_carry(x.shape), x)
    >>> y.shape, cell.num_feature_axes
    ((2, 8, 8, 8), 3)

  Args:
    in_features: channels of the input.
    hidden_features: channels of the state (convolution filters).
    kernel_size: 1 to 3 ints.
    strides: strides of the input convolution (default 1).
    padding: padding of the input convolution (as ``nnx.Conv``), and of the
      hidden one where it keeps the shape (see above).
    use_bias: add the biases ``b_i`` and ``b_h`` (default True).
    gate_fn, activation_fn: nonlinearities (default sigmoid, tanh).
    kernel_init, recurrent_kernel_init, bias_init: initializers of the ``ih``
      and ``hh`` kernels and of the biases (default lecun normal, lecun normal,
      zeros: ``nnx.Conv``'s).
    dtype, param_dtype: computation dtype (inferred) and parameter and carry
      dtype (float32).
    dropout_rate, recurrent_dropout_rate: variational dropout rates.
    zoneout_rate: zoneout on the carry (docs/dropout.md, "Zoneout").
    carry_init, promote_dtype, keep_rngs: flax.nnx's cell options.
    kernel_metadata: metadata of the ``ih`` kernel (e.g. sharding names).
    recurrent_kernel_metadata: metadata of the ``hh`` kernel.
    bias_metadata: metadata of both biases.
    rngs: ``nnx.Rngs``.
  """

  num_parts = 3

  @_checks.named_errors
  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    kernel_size: Sequence[int],
    *,
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = 'SAME',
    use_bias: bool = True,
    gate_fn: Callable[..., Any] = nnx.sigmoid,
    activation_fn: Callable[..., Any] = nnx.tanh,
    kernel_init: Initializer = default_conv_kernel_init,
    recurrent_kernel_init: Initializer = default_conv_kernel_init,
    bias_init: Initializer = default_conv_bias_init,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    carry_init: Initializer | None = None,
    promote_dtype: PromoteDtypeFn = default_promote_dtype,
    keep_rngs: bool = False,
    zoneout_rate: float = 0.0,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    rngs: nnx.Rngs,
  ):
    _checks.check_callables('ConvGRUCell', gate_fn=gate_fn, activation_fn=activation_fn)
    super().__init__(
      in_features, hidden_features, kernel_size, strides=strides, padding=padding,
      use_bias=use_bias, kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
      bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, dropout_rate=dropout_rate,
      recurrent_dropout_rate=recurrent_dropout_rate, carry_init=carry_init,
      promote_dtype=promote_dtype, keep_rngs=keep_rngs, zoneout_rate=zoneout_rate,
      kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, rngs=rngs,
    )
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn

  def step(self, carry, inputs, recurrent_mask):
    h = carry
    xr, xz, xn = jnp.split(self._input_conv(inputs), 3, axis=-1)
    hr, hz, hn = jnp.split(self.hh(masked(h, recurrent_mask)), 3, axis=-1)
    new_h = gru_update(h, xr, xz, xn, hr, hz, hn, self.gate_fn, self.activation_fn)
    return new_h, new_h
