"""Layer-normalized cells (Ba et al., 2016): ``LayerNormLSTMCell`` and ``LayerNormGRUCell``.

Both normalize the input projection ``W_i x`` and the recurrent projection
``W_h h`` separately, each over all its units at once (the paper's stacked
pre-activations), with learned scales; the paper's three biases, which only
ever appear summed, are one bias vector. The LSTM also normalizes ``c'``
before the output ``tanh``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from nnx_recurrent import _checks
from nnx_recurrent._base import (
  _NO_METADATA,
  Array,
  Cell,
  CHCell,
  HCell,
  add_bias,
  default_bias_init,
  default_kernel_init,
  default_promote_dtype,
  default_recurrent_kernel_init,
  masked,
)
from nnx_recurrent._updates import gru_update

default_scale_init = initializers.ones_init()


class _LayerNormCell(Cell):
  """``LN(W_i x; scale) + b`` and ``LN(W_h h; scale)``, each over its ``num_parts * hidden``
  units jointly; subclasses set ``num_parts`` and add what their formula needs."""

  num_parts: int

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
    scale_init: Initializer = default_scale_init,
    epsilon: float = 1e-6,
    use_scale: bool = True,
    use_bias: bool = True,
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
    scale_metadata: Mapping[str, Any] = _NO_METADATA,
    rngs: nnx.Rngs,
  ):
    where = type(self).__name__
    _checks.check_callables(
      where, gate_fn=gate_fn, activation_fn=activation_fn, kernel_init=kernel_init,
      recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init, scale_init=scale_init)
    super().__init__(
      in_features, hidden_features, dtype=dtype, param_dtype=param_dtype,
      dropout_rate=dropout_rate, recurrent_dropout_rate=recurrent_dropout_rate, rngs=rngs,
      carry_init=carry_init, promote_dtype=promote_dtype, keep_rngs=keep_rngs,
      zoneout_rate=zoneout_rate,
    )
    self.epsilon = _checks.check_positive_float(where, 'epsilon', epsilon)
    self.use_scale = _checks.check_bool(where, 'use_scale', use_scale)
    self.use_bias = _checks.check_bool(where, 'use_bias', use_bias)
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    width = self.num_parts * self.hidden_features
    self.dense_i = self._linear(self.in_features, width, use_bias=False,
                                kernel_init=kernel_init, kernel_metadata=kernel_metadata,
                                rngs=rngs)
    self.dense_h = self._linear(self.hidden_features, width, use_bias=False,
                                kernel_init=recurrent_kernel_init,
                                kernel_metadata=recurrent_kernel_metadata, rngs=rngs)
    make_norm = functools.partial(self._layer_norm, scale_init=scale_init,
                                  scale_metadata=scale_metadata, bias_metadata=bias_metadata,
                                  rngs=rngs)
    make_bias = functools.partial(self._bias, init=bias_init, metadata=bias_metadata, rngs=rngs)
    self.ln_i = make_norm(width, use_bias=False)
    self.ln_h = make_norm(width, use_bias=False)
    self.bias = make_bias(width)
    self._more_params(make_norm, make_bias)

  def _more_params(self, make_norm, make_bias) -> None:
    """Subclass hook: the parameters beyond the two projections, norms and ``bias``."""

  def _layer_norm(self, num_features: int, *, use_bias: bool, scale_init: Initializer,
                  scale_metadata: Mapping[str, Any], bias_metadata: Mapping[str, Any],
                  rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The one factory for the cell's layer norms (statistics in float32 at least, two-pass
    variance: no cancellation when a large ``c'`` has a small spread)."""
    return nnx.LayerNorm(
      num_features, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
      use_bias=use_bias, use_scale=self.use_scale, scale_init=scale_init,
      bias_init=initializers.zeros_init(), use_fast_variance=False,
      promote_dtype=self.promote_dtype, scale_metadata=scale_metadata,
      bias_metadata=bias_metadata, rngs=rngs,
    )

  def _bias(self, size: int, *, init: Initializer, metadata: Mapping[str, Any],
            rngs: nnx.Rngs):
    if not self.use_bias:
      return nnx.data(None)
    return nnx.Param(init(rngs.params(), (size,), self.param_dtype), **metadata)

  def _normalized(self, inputs: Array, h: Array) -> tuple[list[Array], list[Array]]:
    """``LN(W_i x) + b`` and ``LN(W_h h)``, each split into ``num_parts`` parts."""
    xs = add_bias(self.ln_i(self.dense_i(inputs)), self.bias)
    hs = self.ln_h(self.dense_h(h))
    return jnp.split(xs, self.num_parts, axis=-1), jnp.split(hs, self.num_parts, axis=-1)


_LN = r"""
  where, for a vector :math:`v` of :math:`m` units,
  :math:`\mathrm{LN}(v; \gamma, \beta) = \gamma * (v - \mu) / \sqrt{s^2 + \epsilon} + \beta`
  with :math:`\mu` and :math:`s^2` the mean and (biased) variance of all
  :math:`m` units of :math:`v`, and :math:`\beta = 0` where no :math:`\beta` is written.
"""

_JOINT = """
  **All gates jointly.** ``W_i x`` and ``W_h h`` are each normalized over all
  their ``{m}`` units at once, as in the paper's equations (its
  ``LN(W_h h; α1, β1)`` normalizes the stacked pre-activations of every gate;
  so do haste's and PyTorch's benchmark layer-normalized LSTMs); normalizing
  each gate on its own (TensorFlow's ``LayerNormBasicLSTMCell``) is a
  different model, not offered here.

  **One bias.** The paper's ``β1``, ``β2`` and ``b`` are only ever summed, so
  one vector ``{b}`` stands for them (haste's parameters): the two norms have a
  scale and no bias of their own.

  **Scale of the inputs.** Every term that depends on ``x`` passes through a
  layer norm, so for any ``a > 0`` the cell gives the same carry and output
  for ``a * x`` as for ``x``, up to ``epsilon`` (while ``a² * var(W_i x) ≫
  epsilon``); a negative ``a`` flips the sign of ``LN(W_i x)``."""

_ARGS = """
  Args:
    in_features: size of the last input axis.
    hidden_features: size of the carry.
    gate_fn: gate nonlinearity (default ``sigmoid``).
    activation_fn: candidate and output nonlinearity (default ``tanh``).
    kernel_init: initializer of ``W_i`` (default lecun normal).
    recurrent_kernel_init: initializer of ``W_h`` (default orthogonal).
    bias_init: initializer of {bias} (default zeros).
    scale_init: initializer of the norms' scales (default ones).
    epsilon: added to the variance in every norm (default ``1e-6``, flax's).
    use_scale: learn the norms' scales ``γ`` (default True; else ``γ = 1``).
    use_bias: learn {biases} (default True; else 0).
    dtype: computation dtype (default: inferred from inputs and params); the
      norms' mean and variance are computed in float32 at least.
    param_dtype: parameter and carry dtype (default float32).
    dropout_rate: variational dropout on the step input.
    recurrent_dropout_rate: variational dropout on ``h`` fed to ``W_h``.
    zoneout_rate: zoneout on the carry (docs/dropout.md, "Zoneout").
    carry_init, promote_dtype, keep_rngs: flax.nnx's cell options.
    kernel_metadata, recurrent_kernel_metadata, bias_metadata, scale_metadata:
      metadata of ``W_i``, ``W_h``, the biases and the scales, e.g.
      ``{'out_sharding': (None, 'model')}``.
    rngs: ``nnx.Rngs`` for the parameters (and the ``dropout`` stream).
"""


class LayerNormLSTMCell(_LayerNormCell, CHCell):
  __doc__ = (
    r"""Layer-normalized LSTM cell (Ba et al., 2016, "Layer Normalization", section 3.1).

  .. math::

      \begin{array}{ll}
      (i, f, g, o) = \mathrm{LN}(W_i x; \gamma_i) + \mathrm{LN}(W_h h; \gamma_h) + b \\
      c' = \sigma(f) * c + \sigma(i) * \tanh(g) \\
      h' = \sigma(o) * \tanh(\mathrm{LN}(c'; \gamma_c, \beta_c))
      \end{array}
"""
    + _LN
    + """
  The carry is ``(c', h')`` (``c'`` stored before its norm; flax.linen's
  ``(c, h)`` order) and the output is ``h'``; ``sigma`` is ``gate_fn`` and
  ``tanh`` is ``activation_fn``. The gate order ``i, f, g, o`` is
  :class:`OptimizedLSTMCell`'s (the paper writes ``f, i, o, g``; a joint norm
  does not depend on the order of the units).
"""
    + _JOINT.replace('{m}', '4 * hidden_features').replace('{b}', 'b')
    + """

  Parameters: ``dense_i`` (kernel ``W_i`` ``(in, 4 * hidden)``, no bias),
  ``dense_h`` (kernel ``W_h`` ``(hidden, 4 * hidden)``, no bias), ``ln_i`` and
  ``ln_h`` (``nnx.LayerNorm`` of ``4 * hidden`` units with ``scale`` ``γ_i``,
  ``γ_h``), ``bias`` (``b``, ``(4 * hidden,)``) and ``ln_c`` (``nnx.LayerNorm``
  of ``hidden`` units with ``scale`` ``γ_c`` and ``bias`` ``β_c``).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.LayerNormLSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> (c, h), y = cell(cell.initialize_carry(x.shape), x)
    >>> y.shape
    (2, 4)
    >>> _, y_scaled = cell(cell.initialize_carry(x.shape), 1000 * x)
    >>> bool(jnp.allclose(y, y_scaled, atol=1e-5))  # the scale of x does not matter
    True
"""
    + _ARGS.replace('{bias}', '``b``').replace('{biases}', '``b`` and ``β_c``')
  )

  num_carry_arrays = 2
  num_parts = 4

  def _more_params(self, make_norm, make_bias):
    self.ln_c = make_norm(self.hidden_features, use_bias=self.use_bias)

  def step(self, carry, inputs, recurrent_mask):
    c, h = carry
    xs, hs = self._normalized(inputs, masked(h, recurrent_mask))
    i, f, g, o = (x + y for x, y in zip(xs, hs))
    new_c = self.gate_fn(f) * c + self.gate_fn(i) * self.activation_fn(g)
    new_h = self.gate_fn(o) * self.activation_fn(self.ln_c(new_c))
    return (new_c, new_h), new_h


class LayerNormGRUCell(_LayerNormCell, HCell):
  __doc__ = (
    r"""Layer-normalized GRU cell: Ba et al.'s layer norms (2016) on :class:`GRUCell`.

  .. math::

      \begin{array}{ll}
      (x_r, x_z, x_n) = \mathrm{LN}(W_i x; \gamma_i) + b_i \\
      (h_r, h_z, h_n) = \mathrm{LN}(W_h h; \gamma_h) \\
      r = \sigma(x_r + h_r) \\
      z = \sigma(x_z + h_z) \\
      n = \tanh(x_n + r * (h_n + b_{hn})) \\
      h' = (1 - z) * n + z * h
      \end{array}
"""
    + _LN
    + """
  The carry and the output are ``h'``. As in :class:`GRUCell`
  (flax.linen's, PyTorch's and cuDNN's GRU), the candidate's hidden bias
  ``b_hn`` sits inside the reset product, after the norm (so it is not summed
  with the other biases); gate order ``r, z, n``.
"""
    + _JOINT.replace('{m}', '3 * hidden_features').replace('{b}', 'b_i')
    + """

  Parameters: ``dense_i`` (kernel ``W_i`` ``(in, 3 * hidden)``, no bias),
  ``dense_h`` (kernel ``W_h`` ``(hidden, 3 * hidden)``, no bias), ``ln_i`` and
  ``ln_h`` (``nnx.LayerNorm`` of ``3 * hidden`` units with ``scale`` ``γ_i``,
  ``γ_h``), ``bias`` (``b_i = (b_ir, b_iz, b_in)``, ``(3 * hidden,)``) and
  ``bias_hn`` (``b_hn``, ``(hidden,)``).

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> cell = nr.LayerNormGRUCell(3, 4, rngs=nnx.Rngs(0))
    >>> x = jnp.arange(6.0).reshape(2, 3)
    >>> h, y = cell(cell.initialize_carry(x.shape), x)
    >>> _, y_scaled = cell(cell.initialize_carry(x.shape), 100 * x)
    >>> bool(jnp.allclose(y, y_scaled, atol=1e-5))  # the scale of x does not matter
    True
"""
    + _ARGS.replace('{bias}', '``b_i`` and ``b_hn``').replace('{biases}', '``b_i`` and ``b_hn``')
  )

  num_parts = 3

  def _more_params(self, make_norm, make_bias):
    self.bias_hn = make_bias(self.hidden_features)

  def step(self, carry, inputs, recurrent_mask):
    h = carry
    (xr, xz, xn), (hr, hz, hn) = self._normalized(inputs, masked(h, recurrent_mask))
    new_h = gru_update(h, xr, xz, xn, hr, hz, add_bias(hn, self.bias_hn), self.gate_fn,
                       self.activation_fn)
    return new_h, new_h
