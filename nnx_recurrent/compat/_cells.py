"""flax.linen cells whose math runs on the nnx_recurrent cells.

Each class is a genuine ``flax.linen.Module`` with the fields, defaults, call
signature and parameters of the flax.linen class of the same name. Its
``__call__`` runs flax.linen's own layers (``Dense``, ``Conv`` or
``DenseParams``, by name and in order, as the flax.linen cell does), which
create its parameters (names, shapes, dtypes, initial values) and show in
``capture_intermediates`` and ``tabulate``; it hands the parameters to
:mod:`nnx_recurrent.compat._convert`, which builds the nnx_recurrent cell
holding them, and runs that cell's step. The math exists once, in the
nnx_recurrent cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from flax.linen import module as _linen_module
from flax.linen.dtypes import promote_dtype
from flax.linen.recurrent import DenseParams
from flax.typing import Array, Dtype, Initializer

from nnx_recurrent import _base, _checks
from nnx_recurrent._conv import _shape_keeping, check_geometry
from nnx_recurrent._updates import gru_update, mgu_update
from nnx_recurrent.compat import _convert

# flax.linen's stack of nn.intercept_methods interceptors (empty: none active).
_INTERCEPTORS = _linen_module._global_interceptor_stack

# flax.linen's defaults, exactly (the same functions give the same initial values).
default_kernel_init = nn.initializers.lecun_normal()
default_recurrent_kernel_init = nn.initializers.orthogonal()
default_bias_init = _zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _kernel_init(group: _convert.Group) -> Initializer:
  """``group``'s kernel initializer; the default orthogonal one computes flax's
  matrix in float32 and casts it for a float16 / bfloat16 ``param_dtype``, where
  flax.linen's raises (QR has no half precision), and is flax's in every other
  dtype (:func:`nnx_recurrent._base.default_recurrent_kernel_init`)."""
  if group.kernel_init is default_recurrent_kernel_init:
    return _base.default_recurrent_kernel_init
  return group.kernel_init


class RNNCellBase(nn.RNNCellBase):
  """Base class of recurrent cells: flax.linen's contract, unchanged.

  A subclass of ``flax.linen.RNNCellBase``: a cell holds its sizes as fields,
  implements ``__call__(carry, inputs) -> (carry, output)``,
  ``initialize_carry(rng, input_shape)`` and ``num_feature_axes``. Your own
  cells work with :class:`RNN` and :class:`Bidirectional` as in flax.linen.

  Example (a user-defined cell)::

    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> class Accumulator(compat.RNNCellBase):
    ...   features: int
    ...   @nn.compact
    ...   def __call__(self, carry, x):
    ...     carry = carry + nn.Dense(self.features)(x)
    ...     return carry, carry
    ...   @nn.nowrap
    ...   def initialize_carry(self, rng, input_shape):
    ...     return jnp.zeros((*input_shape[:-1], self.features))
    ...   @property
    ...   def num_feature_axes(self):
    ...     return 1
    >>> rnn = compat.RNN(Accumulator(2))
    >>> x = jnp.ones((1, 3, 4))
    >>> y, variables = rnn.init_with_output(jax.random.key(0), x)
    >>> bool(jnp.allclose(y[:, 2], 3 * y[:, 0]))
    True
  """


def _check_rng(where: str, rng: Any) -> None:
  """``rng`` a PRNG key (typed, or raw ``uint32`` data) or ``None``: flax.linen
  splits it for a two-array carry whatever the ``carry_init``, and jax's own
  error says only 'invalid PRNG key data'."""
  if rng is None:
    return
  dtype = getattr(rng, 'dtype', None)
  if isinstance(rng, (jax.Array, np.ndarray)) and (
      jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or (dtype == np.uint32 and rng.ndim >= 1)):
    return
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    got = f'{rng!r} (a seed: pass jax.random.key({int(rng)}))'
  elif dtype is not None:
    got = f'an array of dtype {dtype} and shape {tuple(rng.shape)}'
  else:
    got = repr(rng) if isinstance(rng, (str, float, bool)) else type(rng).__name__
  _checks.fail(where, 'rng', 'a PRNG key (jax.random.key(seed)) or None', got, TypeError)


def _is_seed(rng: Any) -> bool:
  return isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)


def _hidden(carry):
  """The ``h`` of a carry: ``(c, h)`` (a tuple or a list) or ``h``."""
  return carry[-1] if isinstance(carry, (tuple, list)) else carry


class _Cell(RNNCellBase):
  """The shared machinery: linen parameters -> nnx_recurrent cell -> one step."""

  _layout_name = ''  # the key of this class in _convert.LAYOUTS (not a field)

  def __post_init__(self):
    where = type(self).__name__
    _checks.check_positive_int(where, 'features', self.features)
    for flag in ('reset_gate', 'residual', 'use_bias'):  # the flags some cells have
      if flag in self.__dataclass_fields__:
        _checks.check_bool(where, flag, getattr(self, flag))
    super().__post_init__()

  @_checks.named_errors  # names the cell, not _Cell
  @nn.compact
  def __call__(self, carry, inputs):
    """Runs one time step: ``(carry, inputs) -> (new_carry, output)``.

    Args:
      carry: the state, from :meth:`initialize_carry`.
      inputs: one step's input ``(*batch, *features)``.

    Returns:
      ``(new_carry, output)``.

    Raises:
      ValueError: ``carry`` does not have the structure and shapes
        :meth:`initialize_carry` gives for ``inputs``, or the parameters
        (a checkpoint) were made for another input or feature size.
    """
    layout = _convert.LAYOUTS[self._layout_name]
    where = layout.name
    inputs = _checks.check_array(where, 'inputs', inputs)
    if inputs.ndim < self.num_feature_axes:
      _checks.fail(where, 'inputs', f'at least {self.num_feature_axes} feature axes',
                   f'shape {tuple(inputs.shape)}')
    in_features = int(inputs.shape[-1])
    sized = self._sized_by(carry)
    self._check_checkpoint(sized, layout, in_features, tuple(inputs.shape))
    shape = tuple(inputs.shape)
    expected = jax.eval_shape(
      lambda: _convert.build_nnx(layout, sized, in_features).initialize_carry(shape))
    if isinstance(expected, tuple) and isinstance(carry, list):
      carry = tuple(carry)  # flax.linen unpacks lists too
    # Leaves that broadcast pass, as in flax.linen (a learned (features,) h0).
    _checks.check_tree_matches(where, 'carry', carry, expected, broadcast=True)
    # flax.linen's own layers, in its order, on what they read: they create the
    # parameters, and `capture_intermediates`, `tabulate` and
    # `nn.intercept_methods` see them as in flax.linen.
    hidden = _hidden(carry)
    outputs = {g.name: self._linen_layer(sized, g)(inputs if g.reads == 'input' else hidden)
               for g in layout.groups(sized)}
    if len(_INTERCEPTORS):
      # Under nn.intercept_methods (LoRA patches, fake quantization) what the
      # inner layers return is the step's input: flax.linen's step formula on
      # them. These layers, not flax.linen's step's own, so that what compat
      # runs beyond flax.linen (a ConvLSTMCell's strides, half-precision
      # parameters' initial values) still runs under an interceptor.
      return self._intercepted_step(carry, inputs, outputs)
    step = self._step_on_layers(carry, outputs)
    if step is not None:
      return step
    # The step runs on the nnx cell, whose matmuls are flax.linen's, so the
    # layers' outputs go unused and jit drops them.
    params = self.variables['params']
    cell = _convert.build_nnx(layout, sized, in_features,
                              {g.name: params[g.name] for g in layout.groups(sized)})
    return cell._call(carry, inputs, {}, keep_carry_dtype=False)  # flax.linen's carry dtype

  # The helpers are @nn.nowrap: flax.linen wraps every other method, and
  # capture_intermediates, tabulate and intercept_methods would see them.
  @nn.nowrap
  def _step_on_layers(self, carry, outputs: dict[str, Any]):
    """``(new_carry, output)`` from the flax.linen layers' ``outputs``, or ``None``
    to run the step on the nnx cell.

    Overridden where the nnx cell joins matmuls that flax.linen's cell runs gate
    by gate (``GRUCell``, ``MGUCell``): XLA rounds one joined matmul and its
    per-gate parts differently (up to 4e-6 in float32 gradients on a CPU), so
    those cells combine flax.linen's own layer outputs with the nnx cell's
    update formula, and give flax.linen's values bit for bit.
    """
    del carry, outputs
    return None

  @nn.nowrap
  def _intercepted_step(self, carry, inputs, outputs: dict[str, Any]):
    """``(new_carry, output)`` under ``nn.intercept_methods``: flax.linen's
    cell's step on the flax.linen layers' ``outputs`` (what interceptors may
    have changed), operation for operation. ``GRUCell`` and ``MGUCell`` step so
    always (:meth:`_step_on_layers`); the others write flax.linen's formula."""
    del inputs
    return self._step_on_layers(carry, outputs)

  @nn.nowrap
  def _sized_by(self, carry) -> _Cell:
    """This cell with flax.linen's hidden size: the carry's, not ``features``.

    flax.linen's ``Dense`` cells read the size off the carry's ``h``
    (``features`` only sizes ``initialize_carry``), and programs rely on it
    (flax's seq2seq example steps an ``LSTMCell(vocab_size)`` on a wider
    carry). A field copy, unbound; ``ConvLSTMCell`` keeps ``features``.
    """
    shape: tuple[int, ...] = tuple(getattr(_hidden(carry), 'shape', ()))
    if len(shape) == 0 or shape[-1] == self.features:
      return self
    return self.clone(parent=None, features=int(shape[-1]))

  @nn.nowrap
  def _linen_layer(self, sized: _Cell, group: _convert.Group) -> nn.Module:
    """The ``Dense`` flax.linen's cell runs for ``group`` (``Conv``, ``DenseParams``: overrides)."""
    return nn.Dense(sized.features, use_bias=group.bias_init is not None, dtype=self.dtype,
                    param_dtype=self.param_dtype, kernel_init=_kernel_init(group),
                    bias_init=group.bias_init or _zeros, name=group.name)

  @nn.nowrap
  def _check_checkpoint(self, sized: _Cell, layout, in_features: int,
                        input_shape: tuple[int, ...]) -> None:
    existing = meta.unbox(self.variables.get('params', {}))
    if not existing or self.is_initializing():
      return  # being initialised (a subclass's own submodules may exist already)
    first = next(g.name for g in layout.groups(sized) if g.reads == 'input')
    group = existing.get(first)
    kernel: Any = group.get('kernel') if isinstance(group, Mapping) else None
    if hasattr(kernel, 'shape') and len(kernel.shape) >= 2 and kernel.shape[-2] != in_features:
      _checks.fail(layout.name, 'inputs',
                   f"last axis of size {kernel.shape[-2]} (the parameter '{first}/kernel' "
                   f'has shape {tuple(kernel.shape)})', f'shape {input_shape}',
                   _checks.ParamShapeError)  # flax.linen's class: the kernel's shape
    if sized is not self:  # sized by the carry: a mismatch is the carry's
      name = next(g.name for g in layout.groups(sized) if g.reads == 'hidden')
      group = existing.get(name)
      kernel = group.get('kernel') if isinstance(group, Mapping) else None
      if hasattr(kernel, 'shape') and len(kernel.shape) >= 2 and \
          kernel.shape[-2] != sized.features:
        raise _checks.CarrySizeError(
          layout.name, f"a last axis of size {kernel.shape[-2]} (the parameter '{name}/kernel' "
          f"has shape {tuple(kernel.shape)}; flax.linen's cells take their size from the "
          'carry)', f'size {sized.features}')
    # Groups beyond the cell's own are a subclass's submodules (or entries a
    # checkpoint carries besides): flax.linen's cells ignore them, so do we.
    # Where `params` is mutable, flax.linen's layers create the groups a
    # checkpoint lacks (a partial one), as in flax.linen: only those present are checked.
    _convert.check_params(layout.name, layout, sized, existing, in_features, allow_extra=True,
                          allow_missing=self.is_mutable_collection('params'))

  @_checks.named_errors  # names the cell, not _Cell
  @nn.nowrap
  def initialize_carry(self, rng, input_shape: tuple[int, ...]):
    """Returns the initial carry for one step's input of shape ``input_shape``.

    Args:
      rng: PRNG key passed to ``carry_init`` (split in two for ``(c, h)``);
        ``None`` (or, for a one-array carry, a seed, which flax.linen passes
        on as given) with a ``carry_init`` that takes none, such as the
        default zeros.
      input_shape: ``(*batch, *features)`` of one step's input; as in
        flax.linen, ``()`` stands for one unbatched vector step.

    Returns:
      The carry in ``param_dtype``, ``(c, h)`` for LSTM cells, else ``h``.
    """
    if not isinstance(self, _Cell):  # the class-method call of flax < 0.7.1
      _checks.fail('initialize_carry', 'self', 'a cell instance: the old class-method call '
                   'Cell.initialize_carry(rng, batch_dims, size) is now '
                   'Cell(features=size).initialize_carry(rng, (*batch_dims, in_features))',
                   type(self).__name__, TypeError)
    layout = _convert.LAYOUTS[self._layout_name]
    input_shape = _checks.check_shape(f'{layout.name}.initialize_carry', 'input_shape',
                                      input_shape, "(the arguments are flax.linen's (rng, "
                                      'input_shape))')
    # The nnx cell checks the number of feature axes (and takes `()`, as
    # flax.linen does); the feature axis's size does not matter here.
    cell = _convert.build_nnx(layout, self, input_shape[-1] if input_shape else 1)
    # flax.linen splits the key for (c, h); a one-array carry gets it as given,
    # so there a seed or None suits the default zeros (and fails in a random
    # carry_init, as in flax.linen).
    if rng is None or (cell.num_carry_arrays == 1 and _is_seed(rng)):
      given = self.carry_init
      return cell.initialize_carry(input_shape, rngs=jax.random.key(0),
                                   carry_init=lambda _, shape, dtype: given(rng, shape, dtype))
    _check_rng(f'{layout.name}.initialize_carry', rng)
    rng = rng if isinstance(rng, jax.Array) else jnp.asarray(rng)
    return cell.initialize_carry(input_shape, rngs=rng, carry_init=self.carry_init)

  @property
  def num_feature_axes(self) -> int:
    """Number of trailing feature axes of one step's input."""
    return 1


_COMMON_ATTRS = """
  Attributes:
    features: number of output features: the size of the carry
      ``initialize_carry`` makes (a step takes its size from the carry it is
      given, as in flax.linen).
    gate_fn: gate nonlinearity (default sigmoid).
    activation_fn: candidate and output nonlinearity (default tanh).
    kernel_init: initializer of the input kernels (default lecun normal).
    recurrent_kernel_init: initializer of the hidden kernels (default orthogonal).
    bias_init: initializer of the biases (default zeros).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter and carry dtype (default float32).
    carry_init: initializer of the carry (default zeros).
"""


class _GatedCell(_Cell):
  """The fields shared by flax.linen's LSTMCell, OptimizedLSTMCell and GRUCell."""

  features: int
  gate_fn: Callable[..., Any] = nn.sigmoid
  activation_fn: Callable[..., Any] = nn.tanh
  kernel_init: Initializer = default_kernel_init
  recurrent_kernel_init: Initializer = default_recurrent_kernel_init
  bias_init: Initializer = default_bias_init
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  carry_init: Initializer = _zeros


class LSTMCell(_GatedCell):
  __doc__ = r"""LSTM cell: ``flax.linen.LSTMCell``, computed by ``nnx_recurrent.LSTMCell``.

  .. math::

      \begin{array}{ll}
      i = \sigma(W_{ii} x + W_{hi} h + b_{hi}) \\
      f = \sigma(W_{if} x + W_{hf} h + b_{hf}) \\
      g = \tanh(W_{ig} x + W_{hg} h + b_{hg}) \\
      o = \sigma(W_{io} x + W_{ho} h + b_{ho}) \\
      c' = f * c + i * g \\
      h' = o * \tanh(c')
      \end{array}

  The carry is ``(c, h)``. Parameters as flax.linen: ``ii, if, ig, io``
  (``kernel``) and ``hi, hf, hg, ho`` (``kernel``, ``bias``).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jax.random.normal(jax.random.key(0), (2, 3))
    >>> layer = compat.LSTMCell(features=4)
    >>> carry = layer.initialize_carry(jax.random.key(1), x.shape)
    >>> variables = layer.init(jax.random.key(2), carry, x)
    >>> jax.tree.map(jnp.shape, variables['params']['hi'])
    {'bias': (4,), 'kernel': (4, 4)}
    >>> (c, h), y = layer.apply(variables, carry, x)
    >>> y.shape, bool((y == h).all())
    ((2, 4), True)
""" + _COMMON_ATTRS

  _layout_name = 'LSTMCell'

  if TYPE_CHECKING:  # flax.linen's annotations (its Array: jax.Array or Any), not Any
    def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> tuple[Array, Array]: ...

  @nn.nowrap
  def _intercepted_step(self, carry, inputs, outputs):
    # flax.linen's LSTMCell.__call__, on its layers' outputs.
    o = outputs
    new_c, new_h = _base.lstm_update(carry[0], o['ii'] + o['hi'], o['if'] + o['hf'],
                                     o['ig'] + o['hg'], o['io'] + o['ho'], self.gate_fn,
                                     self.activation_fn)
    return (new_c, new_h), new_h


class OptimizedLSTMCell(_GatedCell):
  __doc__ = r"""LSTM cell with fused matmuls: ``flax.linen.OptimizedLSTMCell``.

  The math and the parameters (per gate: ``ii, if, ig, io, hi, hf, hg, ho``)
  are those of :class:`LSTMCell`, as in flax.linen; the step runs on
  ``nnx_recurrent.OptimizedLSTMCell``, whose fused kernels are the per-gate
  kernels concatenated in the order ``i, f, g, o``.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 3))
    >>> layer = compat.OptimizedLSTMCell(features=4)
    >>> carry = layer.initialize_carry(jax.random.key(1), x.shape)
    >>> variables = layer.init(jax.random.key(2), carry, x)
    >>> sorted(variables['params'])
    ['hf', 'hg', 'hi', 'ho', 'if', 'ig', 'ii', 'io']
    >>> (c, h), y = layer.apply(variables, carry, x)
    >>> y.shape
    (2, 4)
""" + _COMMON_ATTRS

  _layout_name = 'OptimizedLSTMCell'

  if TYPE_CHECKING:  # flax.linen's annotations (its Array: jax.Array or Any), not Any
    def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> tuple[Array, Array]: ...

    def __call__(self, carry: tuple[Array, Array],
                 inputs: Array) -> tuple[tuple[Array, Array], Array]: ...

  @nn.nowrap
  def _intercepted_step(self, carry, inputs, outputs):
    # flax.linen's OptimizedLSTMCell.__call__, on its DenseParams' (kernel, bias).
    c, h = carry
    gates = ('i', 'f', 'g', 'o')
    dense_h = self._concat_dense(h, {k: outputs[f'h{k}'] for k in gates}, use_bias=True)
    dense_i = self._concat_dense(inputs, {k: outputs[f'i{k}'] for k in gates}, use_bias=False)
    new_c, new_h = _base.lstm_update(c, *(dense_h[k] + dense_i[k] for k in gates),
                                     self.gate_fn, self.activation_fn)
    return (new_c, new_h), new_h

  @nn.nowrap
  def _concat_dense(self, inputs, params: dict[str, Any], use_bias: bool) -> dict[str, Any]:
    """flax.linen's ``OptimizedLSTMCell`` ``_concat_dense``: the gates' kernels
    (and biases) joined, one matmul, split back per gate."""
    kernels = [kernel for kernel, _ in params.values()]
    kernel = jnp.concatenate(kernels, axis=-1)
    bias = None
    if use_bias:
      biases = [b for _, b in params.values()]
      if any(b is None for b in biases):
        raise ValueError('bias is None but use_bias is True.')  # flax.linen's words
      bias = jnp.concatenate(biases, axis=-1)
    inputs, kernel, bias = promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    y = jnp.dot(inputs, kernel)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    ys = jnp.split(y, np.cumsum([k.shape[-1] for k in kernels[:-1]]), axis=-1)
    return dict(zip(params.keys(), ys))

  @nn.nowrap
  def _linen_layer(self, sized: _Cell, group: _convert.Group) -> nn.Module:
    # flax.linen's OptimizedLSTMCell only declares the parameters (and
    # returns them); it multiplies the concatenated kernels itself.
    return DenseParams(sized.features, use_bias=group.bias_init is not None,
                       param_dtype=self.param_dtype, kernel_init=_kernel_init(group),
                       bias_init=self.bias_init, name=group.name)


class GRUCell(_GatedCell):
  __doc__ = r"""GRU cell: ``flax.linen.GRUCell``, computed by ``nnx_recurrent.GRUCell``'s
  update on flax.linen's per-gate layers (its values, bit for bit).

  .. math::

      \begin{array}{ll}
      r = \sigma(W_{ir} x + b_{ir} + W_{hr} h) \\
      z = \sigma(W_{iz} x + b_{iz} + W_{hz} h) \\
      n = \tanh(W_{in} x + b_{in} + r * (W_{hn} h + b_{hn})) \\
      h' = (1 - z) * n + z * h
      \end{array}

  Parameters as flax.linen: ``ir, iz, in`` (``kernel``, ``bias``), ``hr, hz``
  (``kernel``) and ``hn`` (``kernel``, ``bias``).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 3))
    >>> layer = compat.GRUCell(features=4)
    >>> h0 = layer.initialize_carry(jax.random.key(1), x.shape)
    >>> (h, y), variables = layer.init_with_output(jax.random.key(2), h0, x)
    >>> sorted(variables['params']['hn'])
    ['bias', 'kernel']
    >>> h.shape
    (2, 4)
""" + _COMMON_ATTRS

  _layout_name = 'GRUCell'

  @nn.nowrap
  def _step_on_layers(self, carry, outputs):
    o = outputs
    new_h = gru_update(carry, o['ir'], o['iz'], o['in'], o['hr'], o['hz'], o['hn'],
                       self.gate_fn, self.activation_fn)
    return new_h, new_h


class MGUCell(_Cell):
  r"""Minimal gated unit: ``flax.linen.MGUCell``, computed by ``nnx_recurrent.MGUCell``'s
  update on flax.linen's per-gate layers (its values, bit for bit).

  .. math::

      \begin{array}{ll}
      f = \sigma(W_{if} x + b_{if} + W_{hf} h) \\
      n = \tanh(W_{in} x + b_{in} + f * (W_{hn} h + b_{hn})) \\
      h' = (1 - f) * n + f * h
      \end{array}

  With ``reset_gate=False``: ``n = tanh(W_in x + b_in + W_hn h)`` and ``hn``
  has no bias. Parameters as flax.linen: ``if, in`` (``kernel``, ``bias``),
  ``hf`` (``kernel``), ``hn`` (``kernel`` and, with the reset gate, ``bias``).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 3))
    >>> layer = compat.MGUCell(features=4, reset_gate=False)
    >>> h0 = layer.initialize_carry(jax.random.key(1), x.shape)
    >>> (h, y), variables = layer.init_with_output(jax.random.key(2), h0, x)
    >>> sorted(variables['params']['hn']), variables['params']['if']['bias'].tolist()
    (['kernel'], [1.0, 1.0, 1.0, 1.0])

  Attributes:
    features: number of output features: the size of the carry
      ``initialize_carry`` makes (a step takes its size from the carry it is
      given, as in flax.linen).
    gate_fn: gate nonlinearity (default sigmoid).
    activation_fn: candidate nonlinearity (default tanh).
    kernel_init: initializer of the input kernels (default lecun normal).
    recurrent_kernel_init: initializer of the hidden kernels (default orthogonal).
    forget_bias_init: initializer of ``b_if`` (default ones).
    activation_bias_init: initializer of ``b_in`` and ``b_hn`` (default zeros).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter and carry dtype (default float32).
    carry_init: initializer of the carry (default zeros).
    reset_gate: apply ``f`` to the hidden candidate term (default True).
  """

  _layout_name = 'MGUCell'

  @nn.nowrap
  def _step_on_layers(self, carry, outputs):
    o = outputs
    new_h = mgu_update(carry, o['if'], o['in'], o['hf'], o['hn'], self.reset_gate,
                       self.gate_fn, self.activation_fn)
    return new_h, new_h

  features: int
  gate_fn: Callable[..., Any] = nn.sigmoid
  activation_fn: Callable[..., Any] = nn.tanh
  kernel_init: Initializer = default_kernel_init
  recurrent_kernel_init: Initializer = default_recurrent_kernel_init
  forget_bias_init: Initializer = _ones
  activation_bias_init: Initializer = _zeros
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  carry_init: Initializer = _zeros
  reset_gate: bool = True


class SimpleCell(_Cell):
  r"""Elman cell: ``flax.linen.SimpleCell``, computed by ``nnx_recurrent.SimpleCell``.

  :math:`h' = \tanh(W_i x + b_i + W_h h)`, plus ``h`` inside the ``tanh``
  with ``residual=True``. Parameters as flax.linen: ``i`` (``kernel``,
  ``bias``) and ``h`` (``kernel``).

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 3))
    >>> layer = compat.SimpleCell(features=4, residual=True)
    >>> h0 = layer.initialize_carry(jax.random.key(1), x.shape)
    >>> variables = layer.init(jax.random.key(2), h0, x)
    >>> jax.tree.map(jnp.shape, variables['params'])
    {'h': {'kernel': (4, 4)}, 'i': {'bias': (4,), 'kernel': (3, 4)}}
    >>> h, y = layer.apply(variables, h0, x)
    >>> y.shape
    (2, 4)

  Attributes:
    features: number of output features: the size of the carry
      ``initialize_carry`` makes (a step takes its size from the carry it is
      given, as in flax.linen).
    activation_fn: nonlinearity (default tanh).
    kernel_init: initializer of the input kernel (default lecun normal).
    recurrent_kernel_init: initializer of the hidden kernel (default orthogonal).
    bias_init: initializer of the bias (default zeros).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter and carry dtype (default float32).
    carry_init: initializer of the carry (default zeros).
    residual: pre-activation residual connection (default False).
  """

  _layout_name = 'SimpleCell'

  @nn.nowrap
  def _intercepted_step(self, carry, inputs, outputs):
    # flax.linen's SimpleCell.__call__, on its layers' outputs.
    new_carry = outputs['i'] + outputs['h']
    if self.residual:
      new_carry += carry
    new_carry = self.activation_fn(new_carry)
    return new_carry, new_carry

  features: int
  activation_fn: Callable[..., Any] = nn.tanh
  kernel_init: Initializer = default_kernel_init
  recurrent_kernel_init: Initializer = default_recurrent_kernel_init
  bias_init: Initializer = default_bias_init
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  carry_init: Initializer = _zeros
  residual: bool = False


class ConvLSTMCell(_Cell):
  r"""Convolutional LSTM: ``flax.linen.ConvLSTMCell``, computed by ``nnx_recurrent.ConvLSTMCell``.

  .. math::

     \begin{array}{ll}
     i = \sigma(W_{ii} * x + W_{hi} * h + b_i) \\
     f = \sigma(W_{if} * x + W_{hf} * h + b_f + 1) \\
     g = \tanh(W_{ig} * x + W_{hg} * h + b_g) \\
     o = \sigma(W_{io} * x + W_{ho} * h + b_o) \\
     c' = f c + i g \qquad h' = o \tanh(c')
     \end{array}

  with ``*`` a convolution. Parameters as flax.linen: ``ih`` and ``hh``
  (``kernel`` of shape ``(*kernel_size, channels, 4 * features)``, ``bias``),
  gate order ``i, g, f, o``. Inputs are ``(*batch, *spatial, channels)``.

  One deliberate difference: the hidden-to-hidden convolution always uses
  stride 1, so the state keeps its shape (flax.linen applies ``strides`` to it
  too, which fails for ``strides > 1``); with strides the carry has the input
  convolution's output shape. It uses ``padding`` where a stride-1 convolution
  with it keeps the shape (``'SAME'``, ``'SAME_LOWER'``, ``'CIRCULAR'``,
  ``'REFLECT'``, ``'CAUSAL'``, explicit pads summing to ``kernel_size - 1``), else ``'SAME'``.
  With stride 1 the two are the same.

  Example::

    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 4, 4, 3))  # (batch, *image_shape, channels)
    >>> lstm = compat.ConvLSTMCell(features=6, kernel_size=(3, 3))
    >>> carry = lstm.initialize_carry(jax.random.key(1), input_shape=x.shape)
    >>> (carry, y), variables = lstm.init_with_output(jax.random.key(2), carry, x)
    >>> y.shape, variables['params']['hh']['kernel'].shape, lstm.num_feature_axes
    ((2, 4, 4, 6), (3, 3, 6, 24), 3)

  Attributes:
    features: number of convolution filters (channels of the state).
    kernel_size: shape of the convolution kernel (1 to 3 ints).
    strides: strides of the input convolution (default 1).
    padding: padding of the input convolution (default ``'SAME'``).
    use_bias: add biases (default True).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter and carry dtype (default float32).
    carry_init: initializer of the carry (default zeros).
  """

  _layout_name = 'ConvLSTMCell'

  @nn.nowrap
  def _intercepted_step(self, carry, inputs, outputs):
    # flax.linen's ConvLSTMCell.__call__, on its convolutions' outputs (the
    # hidden one of stride 1 and shape-keeping padding, as in every step here).
    i, g, f, o = jnp.split(outputs['ih'] + outputs['hh'], indices_or_sections=4, axis=-1)
    new_c, new_h = _base.lstm_update(carry[0], i, f + 1, g, o, nn.sigmoid, jnp.tanh)
    return (new_c, new_h), new_h

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: str | Sequence[tuple[int, int]] = 'SAME'
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  carry_init: Initializer = _zeros

  def __post_init__(self):
    # flax.linen's takes what its Conv takes but fails on an int kernel_size
    # (len() of an int) and on a bad padding only at the first step, in jax.
    check_geometry('ConvLSTMCell', self.kernel_size, self.strides, self.padding)
    super().__post_init__()

  @nn.nowrap
  def _sized_by(self, carry) -> _Cell:
    return self  # flax.linen's ConvLSTMCell sizes its convolutions by `features`

  @nn.nowrap
  def _linen_layer(self, sized: _Cell, group: _convert.Group) -> nn.Module:
    # The hidden convolution as nnx_recurrent's: stride 1, shape-keeping padding.
    hidden = group.reads == 'hidden'
    return nn.Conv(4 * self.features, tuple(self.kernel_size),
                   strides=None if hidden else self.strides,
                   padding=_shape_keeping(self.padding, tuple(self.kernel_size)) if hidden
                   else self.padding,
                   use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=group.kernel_init, bias_init=group.bias_init or _zeros,
                   name=group.name)

  @property
  def num_feature_axes(self) -> int:
    """Spatial axes plus the channel axis: ``len(kernel_size) + 1``."""
    return len(self.kernel_size) + 1


CELLS = {cls._layout_name: cls for cls in
         (LSTMCell, OptimizedLSTMCell, GRUCell, MGUCell, SimpleCell, ConvLSTMCell)}
