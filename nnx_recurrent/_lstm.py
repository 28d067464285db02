"""LSTM cells: ``LSTMCell`` (one dense layer per gate) and ``OptimizedLSTMCell``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  Array,
  CHCell,
  default_bias_init,
  default_kernel_init,
  default_promote_dtype,
  default_recurrent_kernel_init,
  lstm_update,
  masked,
  modified_orthogonal,
)


class _LSTMBase(CHCell):
  num_carry_arrays = 2

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
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    carry_init: Initializer | None = None,
    promote_dtype: PromoteDtypeFn = default_promote_dtype,
    keep_rngs: bool = False,
    zoneout_rate: float = 0.0,
    proj_features: int | None = None,
    proj_kernel_init: Initializer = default_kernel_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    proj_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    rngs: nnx.Rngs,
  ):
    self.proj_features = (None if proj_features is None else _checks.check_positive_int(
      type(self).__name__, 'proj_features', proj_features))
    _checks.check_callables(
      type(self).__name__, gate_fn=gate_fn, activation_fn=activation_fn, kernel_init=kernel_init,
      recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init,
      proj_kernel_init=proj_kernel_init)
    super().__init__(
      in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self._make_params(
      dict(use_bias=False, kernel_init=kernel_init, kernel_metadata=kernel_metadata, rngs=rngs),
      dict(use_bias=True, kernel_init=recurrent_kernel_init, bias_init=bias_init,
           kernel_metadata=recurrent_kernel_metadata, bias_metadata=bias_metadata, rngs=rngs),
    )
    # Last, so that without a projection equal Rngs give flax.nnx's parameters.
    self.proj = nnx.data(None) if self.proj_features is None else self._linear(
      self.hidden_features, self.proj_features, use_bias=False, kernel_init=proj_kernel_init,
      kernel_metadata=proj_kernel_metadata, rngs=rngs)

  @property
  def _h_features(self) -> int:
    """Size of ``h`` (and of the output): ``proj_features`` or ``hidden_features``."""
    return self.proj_features or self.hidden_features

  def _output_shape(self, input_shape):
    return tuple(input_shape[:-1]) + (self._h_features,)

  def _carry_shapes(self, input_shape):
    return [tuple(input_shape[:-1]) + (self.hidden_features,), self._output_shape(input_shape)]

  def _make_params(self, input_kw: dict, hidden_kw: dict) -> None:
    raise NotImplementedError

  def _gates(self, inputs: Array, h: Array) -> tuple[Array, Array, Array, Array]:
    raise NotImplementedError

  def step(self, carry, inputs, recurrent_mask):
    c, h = carry
    i, f, g, o = self._gates(inputs, masked(h, recurrent_mask))
    new_c, new_h = lstm_update(c, i, f, g, o, self.gate_fn, self.activation_fn)
    if self.proj is not None:
      new_h = self.proj(new_h)
    return (new_c, new_h), new_h


_LSTM_MATH = r"""

  .. math::

      \begin{array}{ll}
      i = \sigma(W_{ii} x + W_{hi} h + b_{hi}) \\
      f = \sigma(W_{if} x + W_{hf} h + b_{hf}) \\
      g = \tanh(W_{ig} x + W_{hg} h + b_{hg}) \\
      o = \sigma(W_{io} x + W_{ho} h + b_{ho}) \\
      c' = f * c + i * g \\
      h' = o * \tanh(c')
      \end{array}

  With ``proj_features=P`` (PyTorch's ``proj_size``; the LSTMP of Sak et al.,
  2014) the hidden state is projected: :math:`h' = W_{hr} (o * \tanh(c'))`,
  so ``h`` and the output have ``P`` features, ``c`` keeps
  ``hidden_features``, and the recurrent kernels read the projected ``h``
  (they are ``(P, hidden)`` per gate). ``W_hr`` is the parameter ``proj``
  (a kernel ``(hidden, P)``, no bias).

  The carry is ``(c, h)`` (flax.linen's order); the output is ``h'``.
  ``sigma`` is ``gate_fn`` and ``tanh`` is ``activation_fn``.
"""

_LSTM_ARGS = """
  Args:
    in_features: size of the last input axis.
    hidden_features: size of ``c`` and ``h``.
    gate_fn: gate nonlinearity (default ``sigmoid``).
    activation_fn: candidate and output nonlinearity (default ``tanh``).
    kernel_init: initializer of the input kernels (default lecun normal).
    recurrent_kernel_init: initializer of the hidden kernels (default orthogonal).
    bias_init: initializer of the biases (default zeros).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter and carry dtype (default float32).
    dropout_rate: variational dropout on the step input.
    recurrent_dropout_rate: variational dropout on ``h`` fed to the recurrent kernel.
    zoneout_rate: zoneout on ``c`` and ``h`` (docs/dropout.md, "Zoneout").
    carry_init, promote_dtype, keep_rngs: as flax.nnx's (``carry_init`` and
      ``keep_rngs`` warn, as there).
    proj_features: size of the projected ``h`` (default: no projection).
    proj_kernel_init: initializer of ``W_hr`` (default lecun normal).
    kernel_metadata, recurrent_kernel_metadata, bias_metadata: metadata of the
      parameters, e.g. ``{'out_sharding': (None, 'model')}`` (flax 0.12's key).
    proj_kernel_metadata: metadata of ``W_hr``, likewise.
    rngs: ``nnx.Rngs`` for the parameters (and the ``dropout`` stream).
"""


class LSTMCell(_LSTMBase):
  __doc__ = (
    r"""LSTM cell with one dense layer per gate (flax.nnx's and flax.linen's layout).
"""
    + _LSTM_MATH
    + """
  Parameters: ``ii, if_, ig, io`` (input kernels, no bias) and ``hi, hf, hg,
  ho`` (hidden kernels with the bias); the same ``nnx.state`` as
  ``flax.nnx.LSTMCell``.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(x.shape)
    >>> (c, h), y = cell(carry, x)
    >>> c.shape, h.shape, y.shape
    ((2, 4), (2, 4), (2, 4))
"""
    + _LSTM_ARGS
  )

  def _make_params(self, input_kw, hidden_kw):
    i, h, r = self.in_features, self.hidden_features, self._h_features
    if hidden_kw['kernel_init'] is default_recurrent_kernel_init:
      # flax.nnx.LSTMCell's default, which differs under jax_enable_x64.
      hidden_kw = dict(hidden_kw, kernel_init=modified_orthogonal)
    # Same creation order as flax.nnx.LSTMCell, so equal Rngs give equal params.
    self.ii = self._linear(i, h, **input_kw)
    self.if_ = self._linear(i, h, **input_kw)
    self.ig = self._linear(i, h, **input_kw)
    self.io = self._linear(i, h, **input_kw)
    self.hi = self._linear(r, h, **hidden_kw)
    self.hf = self._linear(r, h, **hidden_kw)
    self.hg = self._linear(r, h, **hidden_kw)
    self.ho = self._linear(r, h, **hidden_kw)

  def _gates(self, inputs, h):
    return (
      self.ii(inputs) + self.hi(h),
      self.if_(inputs) + self.hf(h),
      self.ig(inputs) + self.hg(h),
      self.io(inputs) + self.ho(h),
    )


class OptimizedLSTMCell(_LSTMBase):
  __doc__ = (
    r"""LSTM cell with the four gates in one input and one hidden matmul.
"""
    + _LSTM_MATH
    + """
  Parameters: ``dense_i`` (kernel ``(in, 4 * hidden)``, no bias) and
  ``dense_h`` (kernel ``(hidden, 4 * hidden)`` and bias), gate order
  ``i, f, g, o``; the same ``nnx.state`` as ``flax.nnx.OptimizedLSTMCell``.
  (flax.linen's ``OptimizedLSTMCell`` stores per-gate kernels instead;
  ``nnx_recurrent.compat`` converts.)

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> carry, y = cell(cell.initialize_carry((2, 3)), jnp.ones((2, 3)))
    >>> y.shape
    (2, 4)
"""
    + _LSTM_ARGS
  )

  def _make_params(self, input_kw, hidden_kw):
    i, h = self.in_features, self.hidden_features
    self.dense_i = self._linear(i, 4 * h, **input_kw)
    self.dense_h = self._linear(self._h_features, 4 * h, **hidden_kw)

  def _gates(self, inputs, h):
    return tuple(jnp.split(self.dense_i(inputs) + self.dense_h(h), 4, axis=-1))
