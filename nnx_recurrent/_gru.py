"""GRU cell, and the gated-unit base it shares with the MGU cell."""

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
  add_bias,
  default_bias_init,
  default_kernel_init,
  default_promote_dtype,
  default_recurrent_kernel_init,
  key_beside,
  masked,
)
from nnx_recurrent._updates import gru_update


class _GatedUnit(HCell):
  """Cells of the form ``n = act(W_in x + b_in + r * (W_hn h + b_hn))``.

  ``num_gates`` sigmoid gates plus the candidate share one input matmul
  (``dense_i``, with bias) and one hidden matmul (``dense_h``, no bias); the
  candidate's hidden bias ``b_hn`` sits inside the reset product, as in
  flax.linen, PyTorch and cuDNN, and is the parameter ``bias_hn``.
  """

  num_gates: int

  def _build(
    self,
    in_features: int,
    hidden_features: int,
    *,
    gate_fn: Callable[..., Any],
    activation_fn: Callable[..., Any],
    kernel_init: Initializer,
    recurrent_kernel_init: Initializer,
    input_bias_init: Initializer,
    hn_bias_init: Initializer | None,
    dtype: Dtype | None,
    param_dtype: Dtype,
    dropout_rate: float,
    recurrent_dropout_rate: float,
    kernel_metadata: Mapping[str, Any],
    recurrent_kernel_metadata: Mapping[str, Any],
    bias_metadata: Mapping[str, Any],
    rngs: nnx.Rngs,
    carry_init: Initializer | None,
    promote_dtype: PromoteDtypeFn,
    keep_rngs: bool,
    zoneout_rate: float,
  ) -> None:
    _checks.check_callables(
      type(self).__name__, gate_fn=gate_fn, activation_fn=activation_fn, kernel_init=kernel_init,
      recurrent_kernel_init=recurrent_kernel_init)
    super().__init__(
      in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    h, width = self.hidden_features, (self.num_gates + 1) * self.hidden_features
    self.dense_i = self._linear(
      self.in_features, width, use_bias=True, kernel_init=kernel_init,
      bias_init=input_bias_init, kernel_metadata=kernel_metadata, bias_metadata=bias_metadata,
      rngs=rngs,
    )
    self.dense_h = self._linear(
      h, width, use_bias=False, kernel_init=recurrent_kernel_init,
      kernel_metadata=recurrent_kernel_metadata, rngs=rngs,
    )
    if hn_bias_init is None:
      self.bias_hn = nnx.data(None)
    else:
      # flax.nnx's GRUCell has no b_hn: its key must not come from the stream.
      key = key_beside(rngs.params, 0x686E)
      self.bias_hn = nnx.Param(hn_bias_init(key, (h,), param_dtype), **bias_metadata)

  def _projections(self, inputs, h):
    """Input and hidden projections split into ``num_gates + 1`` parts each."""
    n = self.num_gates + 1
    xs = jnp.split(self.dense_i(inputs), n, axis=-1)
    hs = jnp.split(self.dense_h(h), n, axis=-1)
    return xs, hs[:-1], add_bias(hs[-1], self.bias_hn)


class GRUCell(_GatedUnit):
  r"""Gated recurrent unit cell.

  .. math::

      \begin{array}{ll}
      r = \sigma(W_{ir} x + b_{ir} + W_{hr} h) \\
      z = \sigma(W_{iz} x + b_{iz} + W_{hz} h) \\
      n = \tanh(W_{in} x + b_{in} + r * (W_{hn} h + b_{hn})) \\
      h' = (1 - z) * n + z * h
      \end{array}

  The carry and the output are ``h'``. Parameters: ``dense_i`` (kernel
  ``(in, 3 * hidden)`` for ``r, z, n`` and bias ``b_i``), ``dense_h`` (kernel
  ``(hidden, 3 * hidden)``, no bias) and ``bias_hn``. Unlike
  ``flax.nnx.GRUCell``, which drops ``b_hn``, this is flax.linen's and
  PyTorch's formula (PyTorch's extra ``b_hr, b_hz`` fold into ``b_ir, b_iz``);
  ``use_bias_hn=False`` drops it, for flax.nnx's cell exactly (its state,
  checkpoints and training).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.GRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> h, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
    >>> h.shape
    (2, 4)

  Args:
    in_features: size of the last input axis.
    hidden_features: size of ``h``.
    gate_fn, activation_fn: nonlinearities (default sigmoid, tanh).
    kernel_init, recurrent_kernel_init, bias_init: initializers (lecun normal,
      orthogonal, zeros).
    use_bias_hn: keep ``b_hn`` (default; flax.linen's, PyTorch's and cuDNN's
      GRU); ``False`` for flax.nnx's GRU, which has none.
    dtype, param_dtype: computation dtype (inferred) and parameter dtype (float32).
    dropout_rate, recurrent_dropout_rate: variational dropout rates.
    zoneout_rate: zoneout on ``h`` (docs/dropout.md, "Zoneout").
    carry_init, promote_dtype, keep_rngs: as flax.nnx's (``carry_init`` and
      ``keep_rngs`` warn, as there).
    kernel_metadata, recurrent_kernel_metadata, bias_metadata: parameter metadata.
    rngs: ``nnx.Rngs``.
  """

  num_gates = 2

  @_checks.named_errors
  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    gate_fn: Callable[..., Any] = nnx.sigmoid,
    activation_fn: Callable[..., Any] = nnx.tanh,
    kernel_init: Initializer = default_kernel_init,
    recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
    bias_init: Initializer = default_bias_init,
    use_bias_hn: bool = True,
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
    _checks.check_callables('GRUCell', bias_init=bias_init)
    use_bias_hn = _checks.check_bool('GRUCell', 'use_bias_hn', use_bias_hn)
    self._build(
      in_features, hidden_features, gate_fn=gate_fn, activation_fn=activation_fn,
      kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
      input_bias_init=bias_init, hn_bias_init=bias_init if use_bias_hn else None, dtype=dtype,
      param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate,
      kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )

  def step(self, carry, inputs, recurrent_mask):
    h = carry
    (xr, xz, xn), (hr, hz), hn = self._projections(inputs, masked(h, recurrent_mask))
    new_h = gru_update(h, xr, xz, xn, hr, hz, hn, self.gate_fn, self.activation_fn)
    return new_h, new_h
