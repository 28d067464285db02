"""Elman (simple) recurrent cell."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  HCell,
  default_bias_init,
  default_kernel_init,
  default_promote_dtype,
  default_recurrent_kernel_init,
  masked,
)


class SimpleCell(HCell):
  r"""Simple (Elman) recurrent cell.

  .. math::

      h' = \tanh(W_i x + b_i + W_h h)

  and with ``residual=True``: :math:`h' = \tanh(W_i x + b_i + W_h h + h)`.
  ``tanh`` is ``activation_fn``. Parameters ``dense_i`` (kernel and bias) and
  ``dense_h`` (kernel), the same ``nnx.state`` as ``flax.nnx.SimpleCell``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.SimpleCell(3, 4, rngs=nnx.Rngs(0))
    >>> h, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
    >>> bool((h == y).all()), y.shape
    (True, (2, 4))

  Args:
    in_features, hidden_features: sizes.
    activation_fn: nonlinearity (default tanh).
    residual: add ``h`` inside the nonlinearity.
    kernel_init, recurrent_kernel_init, bias_init: initializers.
    dtype: computation dtype, default float32 (flax.nnx's default for this
      cell; ``None`` infers it from the inputs and parameters).
    param_dtype, dropout_rate, recurrent_dropout_rate: as for :class:`LSTMCell`.
    zoneout_rate, carry_init, promote_dtype, keep_rngs: as for :class:`LSTMCell`.
    kernel_metadata, recurrent_kernel_metadata, bias_metadata, rngs: as for
      :class:`LSTMCell`.
  """

  @_checks.named_errors
  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    activation_fn: Callable[..., Any] = nnx.tanh,
    residual: bool = False,
    kernel_init: Initializer = default_kernel_init,
    recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
    bias_init: Initializer = default_bias_init,
    dtype: Dtype | None = jnp.float32,
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
    _checks.check_callables(
      'SimpleCell', activation_fn=activation_fn, kernel_init=kernel_init,
      recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init)
    super().__init__(
      in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )
    self.activation_fn = activation_fn
    self.residual = _checks.check_bool('SimpleCell', 'residual', residual)
    # Creation order as flax.nnx.SimpleCell.
    self.dense_h = self._linear(
      self.hidden_features, self.hidden_features, use_bias=False,
      kernel_init=recurrent_kernel_init, kernel_metadata=recurrent_kernel_metadata, rngs=rngs,
    )
    self.dense_i = self._linear(
      self.in_features, self.hidden_features, use_bias=True, kernel_init=kernel_init,
      bias_init=bias_init, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
      rngs=rngs,
    )

  def step(self, carry, inputs, recurrent_mask):
    pre = self.dense_i(inputs) + self.dense_h(masked(carry, recurrent_mask))
    if self.residual:
      pre = pre + carry
    new_h = self.activation_fn(pre)
    return new_h, new_h
