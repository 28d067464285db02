"""Convolutional LSTM cell for 1-D, 2-D and 3-D signals."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from nnx_recurrent._base import (
  CHCell,
  lstm_update,
  masked,
)
from nnx_recurrent._conv import _ConvCell


class ConvLSTMCell(_ConvCell, CHCell):
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
  keeps the shape at stride 1 (``'SAME'``, ``'SAME_LOWER'``, ``'CIRCULAR'``,
  ``'REFLECT'``, ``'CAUSAL'``, or explicit pads summing to ``kernel_size - 1``; as in
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
    kernel_init, recurrent_kernel_init, bias_init: initializers of the ``ih``
      and ``hh`` kernels and of the biases (default lecun normal, lecun normal,
      zeros: ``nnx.Conv``'s and flax.linen's).
    dtype, param_dtype: computation and parameter dtypes.
    dropout_rate, recurrent_dropout_rate: variational dropout rates.
    zoneout_rate: zoneout on the carry (docs/dropout.md, "Zoneout").
    carry_init, promote_dtype, keep_rngs: as for :class:`LSTMCell` (flax.nnx's options).
    kernel_metadata: metadata of the ``ih`` kernel (e.g. sharding names).
    recurrent_kernel_metadata: metadata of the ``hh`` kernel.
    bias_metadata: metadata of both biases.
    rngs: ``nnx.Rngs``.
  """

  num_carry_arrays = 2
  num_parts = 4

  def step(self, carry, inputs, recurrent_mask):
    c, h = carry
    gates = self._input_conv(inputs) + self.hh(masked(h, recurrent_mask))
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    # lstm_update applies sigmoid to f; flax.linen adds 1 before it.
    new_c, new_h = lstm_update(c, i, f + 1.0, g, o, nnx.sigmoid, jnp.tanh)
    return (new_c, new_h), new_h
