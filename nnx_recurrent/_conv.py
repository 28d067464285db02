"""What the convolutional cells share: their two convolutions, shapes and padding rule.

``ConvLSTMCell`` and ``ConvGRUCell`` are the LSTM and GRU with convolutions for
the dense layers: an input convolution ``ih`` (with ``strides`` and
``padding``) and a hidden convolution ``hh`` (stride 1, shape-keeping), each
with ``num_parts * hidden_features`` output channels. This module builds them,
checks ``kernel_size`` and ``strides`` once, and says the step's shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer, PaddingLike, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import _NO_METADATA, Array, Cell, default_promote_dtype

# nnx.Conv's own defaults (and flax.linen's ConvLSTMCell's), for both convolutions.
default_conv_kernel_init = initializers.lecun_normal()
default_conv_bias_init = initializers.zeros_init()

_SHAPE_KEEPING = ('SAME', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'CAUSAL')


def _pairs(padding: int | Sequence[int | Sequence[int]], rank: int
           ) -> tuple[tuple[int, int], ...]:
  """An explicit padding (an int, or ints and ``(low, high)`` pairs, as
  checked by :func:`check_geometry`) as one ``(low, high)`` pair per axis."""
  entries = [padding] * rank if isinstance(padding, int) else list(padding)
  return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in entries)


def _shape_keeping(padding: PaddingLike, kernel_size: tuple[int, ...]) -> PaddingLike:
  """``padding`` if a stride-1 convolution with it keeps the spatial shape, else ``'SAME'``
  (``'SAME_LOWER'`` kept too: it pads an even kernel on the other side, as flax.linen's
  ConvLSTMCell, which gives both convolutions ``padding``)."""
  if isinstance(padding, str):
    return padding if padding.upper() in _SHAPE_KEEPING else 'SAME'
  if all(lo + hi == k - 1 for (lo, hi), k in zip(_pairs(padding, len(kernel_size)),
                                                   kernel_size)):
    return padding
  return 'SAME'


def _beyond_kernel(padding: PaddingLike, kernel_size: tuple[int, ...]
                   ) -> tuple[tuple[int, int], ...] | None:
  """An explicit ``padding`` as ``(low, high)`` pairs where a side pads more
  than ``kernel - 1`` points (outputs from padding alone), else ``None``.
  XLA:CPU computes the input gradient of such a convolution wrong (jax
  0.10.2: values from memory it never wrote, different at every call, for a
  low side of ``kernel`` points or more at stride 1), so the cells pad those
  inputs themselves."""
  if isinstance(padding, str):
    return None
  pads = _pairs(padding, len(kernel_size))
  return pads if any(max(pair) > k - 1 for pair, k in zip(pads, kernel_size)) else None


def check_geometry(where: str, kernel_size: Any, strides: Any,
                   padding: Any) -> tuple[tuple[int, ...], tuple[int, ...], PaddingLike]:
  """``(kernel_size, strides, padding)`` of a convolutional cell, checked:
  ``kernel_size`` 1 to 3 positive ints; ``strides`` ``None`` (1), one
  positive int or one per kernel axis; ``padding`` as flax's ``Conv`` takes it
  (:func:`_checks.check_padding`). Strides come back one per axis."""
  if isinstance(kernel_size, (np.ndarray, jax.Array)) and kernel_size.ndim == 1:
    kernel_size = tuple(kernel_size)  # flax's Conv takes a NumPy array of sizes too
  if not isinstance(kernel_size, (tuple, list)):
    _checks.fail(where, 'kernel_size', 'a sequence of 1 to 3 ints (one per spatial axis)',
                 repr(kernel_size) if isinstance(kernel_size, (int, float, str))
                 or kernel_size is None else type(kernel_size).__name__, TypeError)
  if not 1 <= len(kernel_size) <= 3:
    _checks.fail(where, 'kernel_size', 'a sequence of 1 to 3 ints', repr(kernel_size))
  kernel = tuple(_checks.check_positive_int(where, 'kernel_size', k) for k in kernel_size)
  n = len(kernel)
  if strides is None:
    strides = (1,) * n
  elif isinstance(strides, (int, np.integer)) and not isinstance(strides, bool):
    strides = (strides,) * n
  elif not isinstance(strides, (tuple, list)):
    _checks.fail(where, 'strides', f'None, an int or {n} ints (one per kernel axis)',
                 repr(strides) if isinstance(strides, (bool, float, str))
                 else type(strides).__name__, TypeError)
  if len(strides) != n:
    _checks.fail(where, 'strides', f'{n} ints (one per kernel axis)', repr(strides))
  strides = tuple(_checks.check_positive_int(where, 'strides', s) for s in strides)
  # Checked here: a padding nnx.Conv does not take fails only at the first call, in jax.
  return kernel, strides, _checks.check_padding(where, padding, n)


class _ConvCell(Cell):
  """A cell whose dense layers are the convolutions ``ih`` (input) and ``hh`` (hidden).

  Subclasses set ``num_parts`` (gates plus candidate: 4 for the LSTM, 3 for the
  GRU) and implement ``step``; the constructor is this class's.
  """

  num_parts: int

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
  ) -> None:
    where = type(self).__name__
    _checks.check_callables(where, kernel_init=kernel_init,
                            recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init)
    super().__init__(
      in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )
    self.kernel_size, self.strides, padding = check_geometry(where, kernel_size, strides,
                                                             padding)
    self.padding = padding
    self.use_bias = _checks.check_bool(where, 'use_bias', use_bias)
    width = self.num_parts * self.hidden_features
    # Pads beyond the kernel are applied by _input_conv, with jnp.pad.
    self._input_pads = _beyond_kernel(padding, self.kernel_size)
    self.ih = self._conv(
      self.in_features, width, strides=self.strides,
      padding='VALID' if self._input_pads else padding, kernel_init=kernel_init,
      bias_init=bias_init, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
      rngs=rngs,
    )
    self.hh = self._conv(
      self.hidden_features, width, strides=1,
      padding=_shape_keeping(padding, self.kernel_size), kernel_init=recurrent_kernel_init,
      bias_init=bias_init, kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, rngs=rngs,
    )

  def _input_conv(self, inputs: Array) -> Array:
    """``ih`` over ``inputs`` with the cell's ``padding``."""
    if self._input_pads:
      n = len(self._input_pads)
      inputs = jnp.pad(inputs, [(0, 0)] * (inputs.ndim - n - 1) + [*self._input_pads, (0, 0)])
    return self.ih(inputs)

  def _conv(self, in_features: int, out_features: int, *, strides, padding, kernel_init,
            bias_init, kernel_metadata, bias_metadata, rngs) -> nnx.Conv:
    """The one factory for the convolutions of every convolutional cell."""
    return nnx.Conv(
      in_features, out_features, self.kernel_size, strides=strides, padding=padding,
      use_bias=self.use_bias, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype,
      param_dtype=self.param_dtype, promote_dtype=self.promote_dtype,
      kernel_metadata=kernel_metadata, bias_metadata=bias_metadata, rngs=rngs,
    )

  @property
  def num_feature_axes(self) -> int:
    return len(self.kernel_size) + 1

  def _output_shape(self, input_shape):
    n = len(self.kernel_size)
    batch = tuple(input_shape[: -(n + 1)])
    padding = self.padding if isinstance(self.padding, (str, int)) else tuple(self.padding)
    given = tuple(input_shape[-(n + 1):-1])
    spatial = _conv_spatial_shape(given, self.kernel_size, self.strides, padding)
    if 0 in spatial:  # nnx.Conv would give an empty state
      _checks.fail(type(self).__name__, 'inputs', f'steps of a spatial shape that the input '
                   f'convolution (kernel_size {self.kernel_size}, strides {self.strides}, '
                   f'padding {padding!r}) leaves points of', f'spatial shape {given}, which it '
                   f'takes to {spatial}')
    return batch + spatial + (self.hidden_features,)


@functools.lru_cache(maxsize=1024)
def _conv_spatial_shape(spatial: tuple[int, ...], kernel_size: tuple[int, ...],
                        strides: tuple[int, ...], padding: PaddingLike) -> tuple[int, ...]:
  """The spatial shape ``nnx.Conv`` gives (by its own padding rules) for an
  input of spatial shape ``spatial``: traced once per geometry, as every
  eager step and ``initialize_carry`` asks."""
  def conv(x):
    return nnx.Conv(1, 1, kernel_size, strides=strides, padding=padding, rngs=nnx.Rngs(0))(x)
  probe = jax.ShapeDtypeStruct((1, *spatial, 1), jnp.float32)
  return tuple(jax.eval_shape(conv, probe).shape[1:-1])
