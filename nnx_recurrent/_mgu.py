"""Minimal gated unit (MGU) cell."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  default_kernel_init,
  default_promote_dtype,
  default_recurrent_kernel_init,
  masked,
)
from nnx_recurrent._gru import _GatedUnit
from nnx_recurrent._updates import mgu_update


def _concat_init(*inits: Initializer) -> Initializer:
  """An initializer that fills equal consecutive slices with ``inits``."""

  def init(key, shape, dtype=jnp.float32):
    part = (*shape[:-1], shape[-1] // len(inits))
    keys = jax.random.split(key, len(inits))
    return jnp.concatenate([f(k, part, dtype) for f, k in zip(inits, keys)], axis=-1)

  return init


class MGUCell(_GatedUnit):
  r"""Minimal gated unit cell (https://arxiv.org/abs/1603.09420).

  .. math::

      \begin{array}{ll}
      f = \sigma(W_{if} x + b_{if} + W_{hf} h) \\
      n = \tanh(W_{in} x + b_{in} + f * (W_{hn} h + b_{hn})) \\
      h' = (1 - f) * n + f * h
      \end{array}

  With ``reset_gate=False``: ``n = tanh(W_in x + b_in + W_hn h)`` (no ``b_hn``).
  Parameters: ``dense_i`` (kernel ``(in, 2 * hidden)`` for ``f, n`` and bias,
  initialised with ``forget_bias_init`` / ``activation_bias_init``),
  ``dense_h`` (kernel ``(hidden, 2 * hidden)``) and ``bias_hn`` (only with the
  reset gate).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.MGUCell(3, 4, rngs=nnx.Rngs(0))
    >>> float(cell.dense_i.bias[0])  # forget bias starts at one
    1.0
    >>> h, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
    >>> y.shape
    (2, 4)

  Args:
    in_features, hidden_features: sizes.
    gate_fn, activation_fn: nonlinearities (default sigmoid, tanh).
    kernel_init, recurrent_kernel_init: kernel initializers.
    forget_bias_init: initializer of ``b_if`` (default ones).
    activation_bias_init: initializer of ``b_in`` and ``b_hn`` (default zeros).
    reset_gate: apply ``f`` to the hidden candidate term (default True).
    dtype, param_dtype, dropout_rate, recurrent_dropout_rate: as for :class:`GRUCell`.
    zoneout_rate, carry_init, promote_dtype, keep_rngs: as for :class:`GRUCell`.
    kernel_metadata, recurrent_kernel_metadata, bias_metadata, rngs: as for
      :class:`GRUCell`.
  """

  num_gates = 1

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
    forget_bias_init: Initializer = initializers.ones_init(),
    activation_bias_init: Initializer = initializers.zeros_init(),
    reset_gate: bool = True,
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
    _checks.check_callables('MGUCell', forget_bias_init=forget_bias_init,
                            activation_bias_init=activation_bias_init)
    self.reset_gate = _checks.check_bool('MGUCell', 'reset_gate', reset_gate)
    self._build(
      in_features, hidden_features, gate_fn=gate_fn, activation_fn=activation_fn,
      kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
      input_bias_init=_concat_init(forget_bias_init, activation_bias_init),
      hn_bias_init=activation_bias_init if self.reset_gate else None,
      dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate,
      kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
      bias_metadata=bias_metadata, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )

  def step(self, carry, inputs, recurrent_mask):
    h = carry
    (xf, xn), (hf,), hn = self._projections(inputs, masked(h, recurrent_mask))
    new_h = mgu_update(h, xf, xn, hf, hn, self.reset_gate, self.gate_fn, self.activation_fn)
    return new_h, new_h
