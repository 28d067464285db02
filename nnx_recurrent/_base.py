"""The cell contract: ``RNNCellBase`` and what every cell shares.

A cell is an ``nnx.Module`` that holds its parameters and sizes. It knows one
time step and nothing about sequences: ``cell(carry, x_t) -> (carry, y_t)``.
Sequences are the business of :mod:`nnx_recurrent._scan`.

Cells implement ``step(carry, x, recurrent_mask)`` and say what their carry
looks like (``num_carry_arrays``: how many arrays of the output shape it holds,
or ``_carry_shapes`` where they differ: a projected LSTM's ``c``);
``initialize_carry``, input checks and variational dropout live here, once.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.errors import TraceContextError
from flax.nnx.nn import dtypes, initializers
from flax.typing import Dtype, Initializer, PromoteDtypeFn

from nnx_recurrent import _checks, _scan

Array = jax.Array
# The sequence layers' inputs, lengths and ids: NumPy arrays too (pack_sequences returns
# them; the docs pass them), as their calls take them.
ArrayOrNumPy = jax.Array | np.ndarray
Carry = Any
RngsLike = nnx.Rngs | nnx.RngStream | jax.Array | None

default_kernel_init = initializers.lecun_normal()
_orthogonal = initializers.orthogonal()


def default_recurrent_kernel_init(key, shape, dtype=jnp.float32):
  """Orthogonal, as flax's ``initializers.orthogonal()``: computed in
  ``dtype`` (float64 stays orthogonal to float64 precision, complex64 is
  flax's complex orthogonal matrix); a real ``dtype`` of fewer than 32 bits
  (float16, bfloat16) in float32 and cast, since QR has none (where flax fails)."""
  if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return _orthogonal(key, shape, jnp.float32).astype(dtype)
  return _orthogonal(key, shape, dtype)


def modified_orthogonal(key, shape, dtype=jnp.float32):
  """flax.nnx's ``LSTMCell`` default: orthogonal in JAX's default float type
  (float64 under ``jax_enable_x64``), cast to ``dtype``."""
  return _orthogonal(key, shape).astype(dtype)


default_bias_init = initializers.zeros_init()
default_promote_dtype: PromoteDtypeFn = dtypes.promote_dtype
_NO_METADATA: Mapping[str, Any] = MappingProxyType({})

# flax.nnx's warnings, word for word, so that filters written for flax match ours.
_CARRY_INIT_WARNING = (
  'carry_init is provided in __init__. '
  'Please, use carry_init argument in `initialize_carry` method instead to initialize the carry. '
  'Otherwise, two instances with same configuration but different carry_init '
  'functions will have different graphdefs.'
)
_KEEP_RNGS_WARNING = (
  'keep_rngs argument is deprecated. Please use rngs argument in __call__ instead '
)


class DropoutMasks(NamedTuple):
  """Variational dropout masks, already scaled by ``1 / (1 - rate)``.

  ``input`` multiplies the step input, ``recurrent`` the hidden state that is
  fed back into the recurrent matmul. Either may be ``None``.
  """

  input: Array | None
  recurrent: Array | None


def _key_from(where: str, rngs: RngsLike, stream: str) -> Array:
  """One PRNG key from an ``Rngs`` (named stream), an ``RngStream`` or a key."""
  _checks.check_rngs(where, rngs, allow_none=False)
  _checks.check_stream(where, rngs, stream, f'to draw {stream} keys from')
  if isinstance(rngs, nnx.Rngs):
    return rngs[stream]()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  assert isinstance(rngs, jax.Array)  # check_rngs
  return rngs


def _keys_from(where: str, rngs: RngsLike, stream: str, n: int) -> list[Array]:
  """``n`` PRNG keys, drawn as flax.nnx draws them: one call of the stream per
  key (an ``Rngs``'s named stream or an ``RngStream``); a raw key is split
  (flax.linen's convention; one key is used as it is)."""
  _checks.check_rngs(where, rngs, allow_none=False)
  _checks.check_stream(where, rngs, stream, f'to draw {stream} keys from')
  if isinstance(rngs, nnx.Rngs):
    rngs = rngs[stream]
  if isinstance(rngs, nnx.RngStream):
    return [rngs() for _ in range(n)]
  assert isinstance(rngs, jax.Array)  # check_rngs
  return [rngs] if n == 1 else list(jax.random.split(rngs, n))


def is_package_cell(cell: Any) -> bool:
  """Whether ``cell`` is one of this package's own cells (not a user's
  subclass, not another library's)."""
  return type(cell).__module__.split('.')[0] == 'nnx_recurrent'


# The flax classes this package's cells are built of (projections, convolutions, norms).
_BUILT_OF = (nnx.Linear, nnx.Conv, nnx.LayerNorm)


def swapped_submodules(cell: Any) -> list[str]:
  """The submodules of one of this package's cells that are not of the flax
  classes it builds, ``['dense_h of type LoRALinear']`` after nnx's LoRA
  surgery: what reads the cell's parameters instead of running its
  submodules (the fused layers, ``to_torch``, ``compat.from_nnx``) would run
  the built-in computation and leave them out silently, so it refuses them."""
  return [f'{name} of type {type(value).__name__}' for name, value in vars(cell).items()
          if isinstance(value, nnx.Module) and type(value) not in _BUILT_OF]


def check_not_swapped(where: str, cell: Any) -> None:
  """A conversion's ``module`` argument: a ``TypeError`` for a cell with
  :func:`swapped_submodules` (the conversion reads the built ones' parameters)."""
  swapped = swapped_submodules(cell)
  if swapped:
    _checks.fail(where, 'module', 'cells of the nnx.Linear projections they build (the '
                 'conversion reads their parameters; an adapter such as LoRA\'s would be '
                 'left out)', f'{type(cell).__name__} with {", ".join(swapped)}', TypeError)


def overrides(cell: Any, name: str) -> bool:
  """Whether ``cell``'s class defines its own method ``name`` instead of
  :class:`RNNCellBase`'s. Wrappers made with ``functools.wraps`` are seen
  through, the base's own (:func:`_checks.named_errors`) too: ``nnx.tabulate``
  wraps every public method of the classes it traces, and the base's
  ``initialize_carry`` must still be known for what it is there (else it is
  called as another library's, with an ``Rngs`` that tabulate cannot print)."""
  return (inspect.unwrap(getattr(type(cell), name))
          is not inspect.unwrap(getattr(RNNCellBase, name)))


class MissingCellMethodError(TypeError, NotImplementedError):
  """A cell lacks what :class:`RNNCellBase` needs from it. A ``TypeError``, and
  a ``NotImplementedError`` as flax.nnx's ``RNNCellBase`` raises in its
  place."""


def in_flax_style(cell: Any) -> bool:
  """Whether ``cell`` is written in flax.nnx's style: it overrides
  ``__call__`` and has no ``step`` (its own or a base cell's), so this base's
  machinery is not what it runs. Its ``dropout_rate``, ``zoneout_rate`` or
  ``deterministic`` attributes are its own business, as under flax.nnx's
  ``RNNCellBase``: no per-sequence dropout masks or step keys are passed to it
  and ``nnx.view`` leaves its ``deterministic`` alone."""
  return overrides(cell, '__call__') and not overrides(cell, 'step')


def has_carry_stream(rngs: Any) -> TypeGuard[nnx.Rngs]:
  """Whether ``rngs`` is an ``nnx.Rngs`` that ``rngs.carry`` can draw from (its
  ``carry`` stream, else its ``default`` one)."""
  return isinstance(rngs, nnx.Rngs) and ('carry' in rngs or 'default' in rngs)


def key_beside(stream: nnx.RngStream, tag: int) -> Array:
  """A key for a parameter that flax.nnx's cell does not have, which leaves
  ``stream`` as it was: the stream's next key folded with ``tag``. Drawing it
  instead would shift every later layer built from the same ``Rngs`` away
  from flax.nnx's initialization."""
  return jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]), tag)


def _scaled_keep_mask(key: Array, rate: float, shape: tuple[int, ...], dtype) -> Array:
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return keep.astype(dtype) / jnp.asarray(1.0 - rate, dtype)


def lstm_update(c: Array, i: Array, f: Array, g: Array, o: Array, gate_fn, activation_fn):
  """The LSTM state update of the LSTM cells, ``ConvLSTMCell`` and the fused
  layers (``LayerNormLSTMCell`` normalizes ``c`` before its output
  activation, so writes its own)."""
  new_c = gate_fn(f) * c + gate_fn(i) * activation_fn(g)
  new_h = gate_fn(o) * activation_fn(new_c)
  return new_c, new_h


class RNNCellBase(nnx.Module):
  """Base class of every recurrent cell.

  Contract (the one flax.linen designed): ``__call__(carry, inputs) ->
  (new_carry, output)``, :meth:`initialize_carry` and :attr:`num_feature_axes`.

  To write a cell, subclass it, call ``super().__init__(in_features,
  hidden_features, rngs=rngs, ...)`` in the constructor (it checks the sizes
  and adds the dtype, dropout and carry options), implement :meth:`step`, and
  set :attr:`num_carry_arrays` when the carry is not a single array (2 for
  ``(c, h)``). The base class then provides ``__call__`` (checks of the
  inputs, the carry and what ``step`` returns; variational dropout; zoneout),
  :meth:`initialize_carry` (zeros shaped like the output: the input's shape
  with ``hidden_features`` last) and :meth:`dropout_masks`. A cell written in
  flax's style, overriding ``__call__`` and ``initialize_carry`` itself, also
  works: ``super().__init__()`` without arguments does nothing.

  Args:
    in_features: the size of one step's input's last axis.
    hidden_features: the size of the carry and output.
    rngs: an ``nnx.Rngs``; the cell forks one stream from it, and only when
      something random needs it (dropout, zoneout or ``keep_rngs``).
    dtype: the computation dtype (``None``: inferred from inputs and
      parameters), read by the cell's layers.
    param_dtype: the parameters' and carry's dtype.
    dropout_rate, recurrent_dropout_rate: variational dropout on the inputs
      and on ``h`` as the recurrent input (one mask per sequence).
    zoneout_rate: the probability that a carry unit keeps its value at a step.
    carry_init: flax.nnx's (deprecated there) default carry initializer.
    promote_dtype: flax.nnx's dtype promotion function.
    keep_rngs: flax.nnx's deprecated option: keep a ``carry`` stream for
      :meth:`initialize_carry`.
  """

  num_carry_arrays: ClassVar[int] = 1
  """How many arrays of the output's shape the carry holds (2 for ``(c, h)``)."""

  in_features: int
  hidden_features: int

  def __init_subclass__(cls, **kwargs: Any) -> None:
    super().__init_subclass__(**kwargs)
    if 'num_carry_arrays' in cls.__dict__:
      _checks.check_positive_int(cls.__name__, 'num_carry_arrays', cls.num_carry_arrays)
    # ``__call__`` runs the class's ``step`` (its own or a base's, a mixin's
    # too) through this private reference, as the library calls its public
    # methods internally: ``nnx.tabulate`` wraps public methods on the classes
    # it traces and would list each step as a row.
    cls._step_impl = cls.step
    # flax's nnx.capture(..., method_outputs=...) records the methods in a
    # class's own __dict__ only; flax's cells each define __call__ and
    # initialize_carry, which this package's inherit: each of its classes
    # holds them itself (the same functions), so that their outputs are recorded.
    if cls.__module__.split('.')[0] == 'nnx_recurrent':
      for name in ('__call__', 'initialize_carry'):
        if name not in cls.__dict__:
          setattr(cls, name, next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__))

  @_checks.named_errors
  def __init__(
    self,
    in_features: int | None = None,
    hidden_features: int | None = None,
    *,
    rngs: nnx.Rngs | None = None,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    zoneout_rate: float = 0.0,
    carry_init: Initializer | None = None,
    promote_dtype: PromoteDtypeFn = default_promote_dtype,
    keep_rngs: bool = False,
  ) -> None:
    where = type(self).__name__
    options_given = (
      rngs is not None or dtype is not None or param_dtype is not jnp.float32
      or dropout_rate or recurrent_dropout_rate or zoneout_rate or carry_init is not None
      or promote_dtype is not default_promote_dtype or keep_rngs
    )
    if in_features is None and hidden_features is None and not options_given:
      return  # a cell in flax's style, with its own __call__ and initialize_carry
    self.in_features = _checks.check_positive_int(where, 'in_features', in_features)
    self.hidden_features = _checks.check_positive_int(where, 'hidden_features', hidden_features)
    if not isinstance(rngs, nnx.Rngs):
      _checks.fail(where, 'rngs', 'an nnx.Rngs', type(rngs).__name__, TypeError)
    self.dtype = _checks.check_dtype(where, 'dtype', dtype, allow_none=True)
    self.param_dtype = _checks.check_dtype(where, 'param_dtype', param_dtype)
    self.dropout_rate = _checks.check_rate(where, 'dropout_rate', dropout_rate)
    self.recurrent_dropout_rate = _checks.check_rate(
      where, 'recurrent_dropout_rate', recurrent_dropout_rate
    )
    self.zoneout_rate = _checks.check_rate(where, 'zoneout_rate', zoneout_rate)
    _checks.check_callables(where, promote_dtype=promote_dtype)
    self.promote_dtype = promote_dtype
    self.deterministic = False
    if carry_init is not None:
      _checks.check_callables(where, carry_init=carry_init)
      _checks.warn(_CARRY_INIT_WARNING)
    self.carry_init = carry_init
    if _checks.check_bool(where, 'keep_rngs', keep_rngs):
      _checks.warn(_KEEP_RNGS_WARNING)
    # No PRNG state unless something random needs it (flax keeps a stream by
    # default, which breaks checkpoints: flax#4509): dropout, or flax.nnx's
    # deprecated keep_rngs (a stream for initialize_carry). One stream serves all.
    rates = {name: getattr(self, name) for name in
             ('dropout_rate', 'recurrent_dropout_rate', 'zoneout_rate') if getattr(self, name)}
    if rates:
      _checks.check_stream(where, rngs, 'dropout', 'for ' + ', '.join(
        f'{name}={rate}' for name, rate in rates.items()))
      self.rngs = rngs['dropout'].fork()
    elif keep_rngs:
      _checks.check_stream(where, rngs, 'carry', 'for keep_rngs=True')
      self.rngs = rngs['carry'].fork()
      self._rngs_is_carry_stream = True  # flax.nnx's: initialize_carry draws from it
    else:
      self.rngs = nnx.data(None)

  # -- construction helpers ---------------------------------------------------
  def _linear(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    kernel_init: Initializer,
    bias_init: Initializer = default_bias_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    rngs: nnx.Rngs,
  ) -> nnx.Linear:
    """The one factory for the dense layers of every cell."""
    return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=kernel_init,
      bias_init=bias_init,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      promote_dtype=getattr(self, 'promote_dtype', default_promote_dtype),
      kernel_metadata=kernel_metadata,
      bias_metadata=bias_metadata,
      rngs=rngs,
    )

  # -- the contract -----------------------------------------------------------
  @property
  def num_feature_axes(self) -> int:
    """Number of trailing feature axes of one step's input (1 for vectors)."""
    return 1

  # The public shape-taking methods delegate to private hooks, which is what
  # the library calls internally: tools that wrap every public method in a
  # trace (``nnx.tabulate``) would otherwise turn the shape tuples into tracers.
  def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one step's output (and of ``h``, the carry's every array but a
    projected LSTM's ``c``, which has ``hidden_features``) for ``input_shape``.

    Args:
      input_shape: one step's input shape ``(*batch, *features)``.

    Returns:
      ``(*batch, hidden_features)`` (``proj_features`` for a projected LSTM;
      a convolutional cell's spatial axes as its input convolution gives them).
    """
    return self._output_shape(self._checked_query_shape('output_shape', input_shape))

  def _checked_query_shape(self, method: str, input_shape: Any) -> tuple[int, ...]:
    """``input_shape`` of a query method (:meth:`output_shape`,
    :meth:`dropout_masks`): a shape whose feature axes the cell reads."""
    where = f'{type(self).__name__}.{method}'
    input_shape = _checks.check_shape(where, 'input_shape', input_shape)
    self._check_input_shape(where, 'input_shape', input_shape)
    return input_shape

  def _output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(input_shape[:-1]) + (self._hidden_features(),)

  def _hidden_features(self) -> int:
    hidden = getattr(self, 'hidden_features', None)
    if hidden is None:
      name = type(self).__name__
      if in_flax_style(self):
        # flax.nnx's base raises NotImplementedError here: code that catches
        # it keeps working, and so does code that catches our TypeError.
        raise MissingCellMethodError(
          f'{name} overrides __call__ but not initialize_carry: define '
          'initialize_carry(input_shape, rngs=None, carry_init=None), as flax.nnx\'s '
          'RNNCellBase requires, or give the cell its sizes with '
          'super().__init__(in_features, hidden_features, rngs=rngs, ...).'
        )
      raise MissingCellMethodError(
        f'{name}: the cell has no `hidden_features`; its constructor must call '
        'super().__init__(in_features, hidden_features, rngs=rngs, ...) (or set them).'
      )
    return hidden

  def _check_not_swapped(self, where: str, carry: Any, shape: tuple[int, ...]) -> None:
    """Names PyTorch's argument order, ``cell(input, hx)``, where an array
    carry has the cell's input size and the inputs its hidden size: the
    arguments were swapped (with ``in_features == hidden_features`` nothing
    tells)."""
    in_features = getattr(self, 'in_features', None)
    hidden = {getattr(self, 'hidden_features', None), getattr(self, 'proj_features', None)}
    carry_shape = tuple(getattr(carry, 'shape', ()))
    if (self.num_feature_axes == 1 and isinstance(in_features, int) and shape
        and shape[-1] != in_features and shape[-1] in hidden and carry_shape
        and carry_shape[-1] == in_features):
      _checks.fail(where, 'inputs', f"last axis of size {in_features} (the cell's in_features; "
                   "a cell is called as cell(carry, inputs), PyTorch's cell(input, hx) the "
                   'other way round)', f'shape {shape}, with a carry of shape {carry_shape}, '
                   "the inputs' size")

  def _check_input_shape(self, where: str, arg: str, shape: tuple[int, ...],
                         sizes: bool = True) -> None:
    nfa = self.num_feature_axes
    if len(shape) < nfa:
      _checks.fail(where, arg, f'at least {nfa} feature axes', f'shape {tuple(shape)}')
    if not sizes:
      return
    in_features = getattr(self, 'in_features', None)
    if in_features is not None and shape[-1] != in_features:
      _checks.fail(
        where, arg, f"last axis of size {in_features} (the cell's in_features)",
        f'shape {tuple(shape)}',
      )

  if TYPE_CHECKING:  # flax.nnx's signature, so that a subclass may override it as
    # flax.nnx's (rngs: Rngs | RngStream | None); this package's cells take a key too: Cell.
    def initialize_carry(self, input_shape: tuple[int, ...],
                         rngs: nnx.Rngs | nnx.RngStream | None = None,
                         carry_init: Initializer | None = None) -> Carry: ...
  else:
    @_checks.named_errors
    def initialize_carry(
      self,
      input_shape: tuple[int, ...],
      rngs: RngsLike = None,
      carry_init: Initializer | None = None,
    ) -> Carry:
      """Returns the initial carry for one step's input of shape ``input_shape``.

      Args:
        input_shape: shape of one step's input, without the time axis:
          ``(*batch, *features)``; only the number of feature axes is read, not
          their sizes. As in flax, ``()`` stands for one unbatched vector step.
        rngs: only needed with a random ``carry_init``: an ``nnx.Rngs`` (its
          ``carry`` stream is called once per carry array, as flax.nnx does), an
          ``nnx.RngStream`` (likewise) or a PRNG key (split, one per array, as
          flax.linen does). Default: the cell's own stream, if it keeps one
          (``keep_rngs`` or dropout).
        carry_init: an initializer ``(key, shape, dtype) -> array``; default the
          ``carry_init`` given at construction, else zeros (which need no RNG).

      Returns:
        The carry, one array of shape ``output_shape(input_shape)`` or a tuple
        of arrays (``(c, h)`` for LSTM cells; with ``proj_features``, ``c`` has
        ``hidden_features`` and ``h`` ``proj_features``), in ``param_dtype``.
      """
      return self._initialize_carry(input_shape, rngs, carry_init)

  def _initialize_carry(self, input_shape, rngs=None, carry_init=None) -> Carry:
    name = type(self).__name__
    input_shape = _checks.check_shape(
      f'{name}.initialize_carry', 'input_shape', input_shape,
      '(the arguments are (input_shape, rngs); flax.linen\'s (rng, input_shape) is '
      'nnx_recurrent.compat\'s)')
    _checks.check_rngs(f'{name}.initialize_carry', rngs)  # zeros ignore it: checked all the same
    # The feature axes' sizes do not matter, as in flax.nnx (code calls
    # initialize_carry((batch, hidden_features))): only their number. flax
    # also reads `()` as one unbatched step without its feature axis.
    if input_shape or self.num_feature_axes != 1:
      self._check_input_shape(f'{name}.initialize_carry', 'input_shape', input_shape,
                              sizes=False)
    shapes = self._carry_shapes(input_shape)
    dtype = getattr(self, 'param_dtype', jnp.float32)
    n = len(shapes)
    if carry_init is None:
      carry_init = getattr(self, 'carry_init', None)
    if carry_init is None:
      # flax.nnx draws one key per carry array from a given stream even for
      # zeros; so do we, so that the stream's later draws (a dropout mask,
      # say) are flax's. Without one, flax.nnx draws from the stream
      # keep_rngs keeps, and so do we; a stream kept for dropout is left.
      if rngs is None and getattr(self, '_rngs_is_carry_stream', False):
        rngs = self.rngs
      if isinstance(rngs, nnx.RngStream) or has_carry_stream(rngs):
        with contextlib.suppress(TraceContextError):  # where flax.nnx raises instead
          _keys_from(f'{name}.initialize_carry', rngs, 'carry', n)
      leaves = [jnp.zeros(shape, dtype) for shape in shapes]
    else:
      _checks.check_callables(f'{name}.initialize_carry', carry_init=carry_init)
      if rngs is None:
        rngs = getattr(self, 'rngs', None)
      if rngs is None:
        _checks.fail(f'{name}.initialize_carry', 'rngs',
                     'a PRNG source because `carry_init` is given', 'None')
      leaves = [carry_init(k, shape, dtype)
                for k, shape in zip(_keys_from(f'{name}.initialize_carry', rngs, 'carry', n),
                                    shapes)]
    return leaves[0] if n == 1 else tuple(leaves)

  def _carry_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape of each carry array: ``num_carry_arrays`` of the output's shape."""
    return [self._output_shape(input_shape)] * self.num_carry_arrays

  def _needs_carry_rngs(self) -> bool:
    """Whether a layer must pass an RNG to the default carry: a random one
    with no stream of the cell's to draw from, or a cell that keeps a stream
    for its carry (``keep_rngs``), which flax.nnx's ``RNN`` never draws: it
    passes its own."""
    if getattr(self, '_rngs_is_carry_stream', False):
      return True
    return getattr(self, 'carry_init', None) is not None and getattr(self, 'rngs', None) is None

  def set_view(self, deterministic: bool | None = None):
    """Used by ``nnx.view(model, deterministic=...)``, as for ``nnx.Dropout``.

    A cell in flax.nnx's style (its own ``__call__``, no ``step``) keeps its
    own ``deterministic``, as flax.nnx's base has no ``set_view``.

    Args:
      deterministic: if True, disables variational dropout.
    """
    if deterministic is not None and not in_flax_style(self):
      self.deterministic = deterministic

  def dropout_masks(
    self, input_shape: tuple[int, ...], rngs: RngsLike = None, dtype=None
  ) -> DropoutMasks | None:
    """Samples the variational dropout masks for one sequence batch.

    One mask per batch row, to be shared by every time step (Gal & Ghahramani).
    Returns ``None`` when dropout is off: both rates 0, or ``deterministic``.

    Args:
      input_shape: one step's input shape ``(*batch, *features)``.
      rngs: the PRNG source (an ``nnx.Rngs``, whose ``dropout`` stream is
        drawn, an ``nnx.RngStream`` or a key); default the cell's own stream.
      dtype: the masks' dtype (default, and for an integer ``dtype``, the
        cell's ``dtype``, else float32).
    """
    return self._dropout_masks(self._checked_query_shape('dropout_masks', input_shape), rngs,
                               dtype)

  def _dropout_masks(self, input_shape, rngs=None, dtype=None) -> DropoutMasks | None:
    rate_in = getattr(self, 'dropout_rate', 0.0)
    rate_rec = getattr(self, 'recurrent_dropout_rate', 0.0)
    if getattr(self, 'deterministic', True) or not (rate_in or rate_rec):
      return None
    rngs = rngs if rngs is not None else getattr(self, 'rngs', None)
    if rngs is None:
      _checks.fail(type(self).__name__, 'rngs', 'a PRNG source for dropout in training mode',
                   'None (pass rngs=nnx.Rngs(...) at construction or call time, or call .eval())')
    key_in, key_rec = jax.random.split(_key_from(type(self).__name__, rngs, 'dropout'))
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):  # integer inputs: not theirs
      dtype = jnp.result_type(getattr(self, 'dtype', None) or jnp.float32)
    input_shape = tuple(input_shape)
    return DropoutMasks(
      _scaled_keep_mask(key_in, rate_in, input_shape, dtype) if rate_in else None,
      _scaled_keep_mask(key_rec, rate_rec, self._output_shape(input_shape), dtype)
      if rate_rec else None,
    )

  if TYPE_CHECKING:  # flax.nnx's signature, so that a subclass may override it as
    # flax.nnx's, without **options; this package's cells take the options: Cell.
    def __call__(self, carry: Carry, inputs: Array) -> tuple[Carry, Array]: ...
  else:
    @_checks.named_errors
    def __call__(self, carry: Carry, inputs: Array, **options: Any) -> tuple[Carry, Array]:
      """Runs one time step.

      The signature is flax.nnx's ``(carry, inputs)``, with the options as
      ``**options``: flax's transforms take a cell itself (``nnx.scan(cell,
      in_axes=(nnx.Carry, 0), ...)``, ``nnx.vmap(cell)``) only when it has no
      keyword-only arguments with defaults.

      Args:
        carry: the state, as returned by :meth:`initialize_carry`.
        inputs: one step's input ``(*batch, *features)``.
        **options: keywords only. ``dropout_masks``: masks from
          :meth:`dropout_masks` (what ``RNN`` passes so that every step shares
          them); sampled afresh when absent and dropout is on. ``rngs``:
          overrides the construction-time dropout RNG (variational dropout
          masks when sampled here, and zoneout).

      Returns:
        ``(new_carry, output)``; the new carry in the dtypes of ``carry`` (a
        bfloat16 carry of bfloat16 parameters, computed in float32, is rounded
        back), as over ``RNN``'s steps.

      Raises:
        TypeError: an option other than ``dropout_masks`` and ``rngs``.
      """
      return self._call(carry, inputs, options, keep_carry_dtype=True)

  def _call(self, carry: Carry, inputs: Array, options: dict[str, Any],
            keep_carry_dtype: bool) -> tuple[Carry, Array]:
    """:meth:`__call__`; without ``keep_carry_dtype`` the new carry comes in
    the dtypes the step computed (flax.linen's cells, for compat)."""
    where = type(self).__name__
    step = type(self)._step_impl
    current = inspect.unwrap(type(self).step)  # (through nnx.tabulate's wrapper)
    if current is not inspect.unwrap(step):  # one assigned since the class was made (a patch)
      step = current
    if step is RNNCellBase.step:
      RNNCellBase.step(self, carry, inputs, None)  # raises: neither step nor __call__
    if not callable(step):
      _checks.fail(where, 'step', 'a method step(carry, inputs, recurrent_mask)',
                   type(step).__name__, TypeError)
    unknown = [k for k in options if k not in ('dropout_masks', 'rngs')]
    if unknown:
      raise TypeError(_checks.unexpected_keyword(
        f'{where}.__call__', unknown[0], ('carry', 'inputs', 'dropout_masks', 'rngs'),
        accepted="A cell's options are the keywords dropout_masks and rngs"))
    dropout_masks: DropoutMasks | None = options.get('dropout_masks')
    rngs: RngsLike = options.get('rngs')
    _checks.check_rngs(where, rngs)
    if isinstance(inputs, list):  # nested lists of numbers, as flax's cells take them
      try:
        inputs = jnp.asarray(inputs)
      except (TypeError, ValueError):
        _checks.fail(where, 'inputs', 'an array or nested lists of numbers',
                     'a list that makes no array (ragged, or not numbers)', TypeError)
    if not hasattr(inputs, 'shape') or not hasattr(inputs, 'dtype'):
      _checks.fail(where, 'inputs', 'an array (a cell is called as cell(carry, inputs))',
                   type(inputs).__name__, TypeError)
    _checks.check_not_foreign(where, 'inputs', inputs)
    _checks.check_real_for(where, inputs, getattr(self, 'param_dtype', None))
    self._check_not_swapped(where, carry, tuple(inputs.shape))
    self._check_input_shape(where, 'inputs', tuple(inputs.shape))
    shapes = self._checked_carry_shapes(tuple(inputs.shape))
    carry = self._check_carry(where, carry, shapes)
    if dropout_masks is not None:
      self._check_dropout_masks(where, dropout_masks, tuple(inputs.shape))
    else:
      dropout_masks = self._dropout_masks(tuple(inputs.shape), rngs, inputs.dtype)
    recurrent_mask = None
    if dropout_masks is not None:
      if dropout_masks.input is not None:
        inputs = inputs * dropout_masks.input
      recurrent_mask = dropout_masks.recurrent
    with jax.named_scope(f'nr.{where}'):  # names the step in profiles and HLO dumps
      result = step(self, carry, inputs, recurrent_mask)
    if not (isinstance(result, tuple) and len(result) == 2):
      _checks.fail(f'{where}.step', 'return value', 'a pair (new_carry, output)',
                   f'{type(result).__name__} of length {len(result)}'
                   if isinstance(result, (tuple, list)) else type(result).__name__, TypeError)
    new_carry, y = result
    new_carry = self._check_carry(f'{where}.step', new_carry, shapes, 'new_carry')
    if getattr(self, 'zoneout_rate', 0.0):
      new_carry = self._zoneout(carry, new_carry, rngs)
    structure: Any = jax.tree_util.tree_structure(new_carry)  # jax's PyTreeDef (untyped for mypy)
    kept = shapes is not None or structure == jax.tree_util.tree_structure(carry)
    if keep_carry_dtype and kept:
      # As over RNN's steps, so that a cell stepped by hand equals RNN and a
      # lax.scan over it keeps its carry type (a Python number leaf: as computed);
      # a carry of a cell's own initialize_carry too, where the step keeps its structure.
      new_carry = jax.tree_util.tree_map(_in_dtype_of, new_carry, carry)
    return new_carry, y

  def _check_dropout_masks(self, where: str, masks: Any, input_shape: tuple[int, ...]) -> None:
    """Masks as :meth:`dropout_masks` makes them for ``input_shape``: each
    broadcasts to the step input (``input``) or to ``h`` (``recurrent``)."""
    if not isinstance(masks, DropoutMasks):
      _checks.fail(where, 'dropout_masks', 'None or the DropoutMasks of dropout_masks()',
                   type(masks).__name__, TypeError)
    if masks.input is not None:
      _checks.check_broadcasts_to(where, 'dropout_masks.input', masks.input, input_shape,
                                  'the inputs\' shape')
    if masks.recurrent is not None:
      _checks.check_broadcasts_to(where, 'dropout_masks.recurrent', masks.recurrent,
                                  self._output_shape(input_shape), 'the shape of h')

  def _checked_carry_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """:meth:`_carry_shapes` for the carry checks, or ``None``: a subclass with
    its own ``initialize_carry`` has its own carry, not checked."""
    if overrides(self, 'initialize_carry') or overrides(self, '_initialize_carry'):
      return None
    return self._carry_shapes(input_shape)

  def _check_carry(self, where: str, carry: Carry, shapes: list[tuple[int, ...]] | None,
                   arg: str = 'carry') -> Carry:
    """``carry`` (the one given, or the one :meth:`step` returned) checked
    against the carry of ``shapes`` that :meth:`initialize_carry` makes (leaves
    that broadcast with it pass, as they compute; a list is a tuple, as flax
    unpacks it); ``None``: not checked."""
    if shapes is None:
      return carry
    # param_dtype=None: JAX's default float (float64 under x64), as flax takes it
    dtype = jnp.result_type(getattr(self, 'param_dtype', jnp.float32) or float)
    leaves = [jax.ShapeDtypeStruct(shape, dtype) for shape in shapes]
    if isinstance(carry, list) and len(leaves) > 1:
      carry = tuple(carry)
    try:
      _checks.check_tree_matches(where, arg, carry,
                                 leaves[0] if len(leaves) == 1 else tuple(leaves), broadcast=True)
    except (TypeError, ValueError) as e:
      if arg == 'carry':
        raise
      # A cell's own step: say what the carry should be and where that is set
      # (the error itself, reworded: its class and Origin stay).
      _checks.reword(e, f'{str(e)[:-1]} (the carry is num_carry_arrays = {len(shapes)} '
                        f'array(s) of shapes {", ".join(map(str, shapes))}, as '
                        'initialize_carry makes it).')
      raise
    if arg == 'carry' and is_package_cell(self):
      # The last array is h, which the recurrent product reads: a scalar or a
      # narrower h broadcasts with the carry above, then fails in the product
      # with jax's dot_general error (in flax.nnx's cells too).
      n = self.num_feature_axes
      h, want = jnp.shape(jax.tree_util.tree_leaves(carry)[-1]), tuple(shapes[-1][-n:])
      if len(h) < n or tuple(h[-n:]) != want:
        _checks.fail(where, arg, f'its last array (h, which the recurrent product reads) to '
                     f'end in the feature axes {want}', f'shape {h}')
    return carry

  def _zoneout(self, carry: Carry, new_carry: Carry, rngs: RngsLike) -> Carry:
    """Zoneout (Krueger et al. 2017): each unit of each carry array keeps its
    previous value with probability ``zoneout_rate`` (a new mask at every step,
    from the ``dropout`` stream); deterministic: the expectation."""
    rate = self.zoneout_rate
    treedef: Any  # jax's PyTreeDef (untyped for mypy)
    old_leaves, treedef = jax.tree_util.tree_flatten(carry)
    new_leaves = treedef.flatten_up_to(new_carry)
    # Mixed in the wider of the two dtypes: a float32 carry stepped in bfloat16
    # keeps its units exactly (the caller casts back to the carry's dtype; a
    # Python number leaf stays as computed).
    pairs = []
    for o, n in zip(old_leaves, new_leaves):
      dtype = jnp.promote_types(o.dtype, n.dtype) if hasattr(o, 'dtype') else n.dtype
      pairs.append((jnp.asarray(o, dtype), n.astype(dtype)))
    if self.deterministic:
      mixed = [n + jnp.asarray(rate, n.dtype) * (o - n) for o, n in pairs]
    else:
      rngs = rngs if rngs is not None else self.rngs
      keys = _keys_from(type(self).__name__, rngs, 'dropout', len(new_leaves))
      # (under an Explicit mesh the mask and the old carry are split over the mesh
      # as the new carry is: where() takes one sharding)
      mixed = [jnp.where(_scan.typed_as(jax.random.bernoulli(k, rate, n.shape), n),
                         _scan.typed_as(o, n), n) for k, (o, n) in zip(keys, pairs)]
    return treedef.unflatten(mixed)

  def step(
    self, carry: Carry, inputs: Array, recurrent_mask: Array | None
  ) -> tuple[Carry, Array]:
    """One time step's math: what a cell written on this base implements.

    ``__call__`` calls it after checking the inputs and the carry and applying
    the input dropout mask, and applies zoneout to the carry it returns; call
    the cell, not this method.

    Args:
      carry: the carry, as :meth:`initialize_carry` makes it.
      inputs: one step's input ``(*batch, *features)``, input dropout applied.
      recurrent_mask: the recurrent dropout mask for ``h`` (broadcasts to the
        output's shape), or ``None`` when recurrent dropout is off. Multiply
        the carry's ``h`` by it where it enters the recurrent product.

    Returns:
      ``(new_carry, output)``.
    """
    renamed = (' (earlier versions of nnx_recurrent called it _step: rename it step)'
               if hasattr(type(self), '_step') else '')
    raise NotImplementedError(
      f'{type(self).__name__} must implement step(carry, inputs, recurrent_mask){renamed}, '
      'or __call__ and initialize_carry as in flax.'
    )

  _step_impl = step


if TYPE_CHECKING:
  class Cell(RNNCellBase):
    """This package's cells as type checkers see them: ``RNNCellBase`` presents
    flax.nnx's signatures (which a flax-style subclass overrides); the
    package's cells take the options and a PRNG key for ``rngs``."""

    def __call__(self, carry: Carry, inputs: Array, **options: Any) -> tuple[Carry, Array]: ...

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: RngsLike = None,
                         carry_init: Initializer | None = None) -> Carry: ...

  class HCell(Cell):
    """A cell whose carry is one array ``h``, annotated as flax.nnx's GRU and
    simple cells are (``Cell``'s carry is ``Any``)."""

    def __call__(self, carry: Carry, inputs: Array, **options: Any) -> tuple[Array, Array]: ...

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: RngsLike = None,
                         carry_init: Initializer | None = None) -> Array: ...

  class CHCell(Cell):
    """A cell whose carry is the pair ``(c, h)``, annotated as flax.nnx's LSTM
    cells are."""

    def __call__(self, carry: Carry, inputs: Array,
                 **options: Any) -> tuple[tuple[Array, Array], Array]: ...

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: RngsLike = None,
                         carry_init: Initializer | None = None) -> tuple[Array, Array]: ...
else:
  Cell = HCell = CHCell = RNNCellBase  # the same class at run time


def _in_dtype_of(new: Any, old: Any) -> Any:
  """``new`` in ``old``'s dtype as JAX holds it (a NumPy float64 leaf without
  x64 is float32: no truncation warning), or as computed where ``old`` has
  no dtype (a Python number)."""
  if not hasattr(old, 'dtype'):
    return new
  return new.astype(_scan.held_dtype(old))


def add_bias(z: Array, param: nnx.Param | None) -> Array:
  """``z + param`` over the last axis, or ``z`` without ``param`` (explicit
  reshape: no implicit rank promotion)."""
  if param is None:
    return z
  return z + param[...].astype(z.dtype).reshape((1,) * (z.ndim - 1) + (-1,))


def masked(h: Array, mask: Array | None) -> Array:
  """``h * mask`` for the recurrent input, or ``h`` when there is no mask."""
  return h if mask is None else h * mask.astype(h.dtype)

