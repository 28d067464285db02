"""Input validation shared by every front door, with one message template.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong kind of
object) whose message names the module, the argument, what was expected and
what was received, e.g.::

    RNN: `inputs` expected last axis of size 32 (the cell's in_features), got shape (4, 7, 16).

Arguments that do not bind (an unknown keyword, too many positional
arguments) keep Python's message, naming the public class and its method,
with a hint where one exists: :func:`named_errors`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import numbers
import os
import sys
import warnings
from collections.abc import Callable, Collection, Iterator
from types import FrameType
from typing import Any, NamedTuple, NoReturn, TypeVar, cast

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import nnx

# Frames in these directories are not the user's: a warning points past them.
_INTERNAL_DIRS = tuple(os.path.dirname(str(m.__file__)) + os.sep
                       for m in (sys.modules[__package__], flax, jax))


class Origin(NamedTuple):
  """Whom and what an error of this package's blames: the ``where`` and the
  ``arg`` its message begins with (``RNN: `inputs` ...``). :func:`fail` sets
  it on the error it raises (:func:`origin` reads it), and
  :func:`blame_entry` decides from it, not from the message's text."""
  where: str
  arg: str


_ORIGIN = '_nnx_recurrent_origin'  # the attribute: a name no other code's error has


def origin(e: BaseException) -> Origin | None:
  """What ``e`` blames, for an error this package raised (:func:`fail`);
  ``None`` for another's (a user's cell, JAX, flax)."""
  found = getattr(e, _ORIGIN, None)
  return found if isinstance(found, Origin) else None


def reword(e: BaseException, message: str, blames: Origin | None = None) -> None:
  """Gives ``e`` (an error :func:`fail` raised) the ``message`` (and, given,
  what it now ``blames``) in place, to be re-raised as it is: its class stays
  (a subclass of flax's error too stays caught as one), and so do its other
  attributes, its traceback and its notes. A class whose constructor takes
  other arguments than the message is not called again (``CarrySizeError``;
  its ``__reduce__`` pickles the message as it stands)."""
  e.args = (message,)
  if blames is not None:
    setattr(e, _ORIGIN, blames)


def fail(where: str, arg: str, expected: str, got: Any,
         exc: type[Exception] = ValueError) -> NoReturn:
  """Raises ``exc`` with the project's one message template, and its
  :class:`Origin` (``where``, ``arg``) as an attribute (:func:`origin`)."""
  error = exc(f'{where}: `{arg}` expected {expected}, got {got}.')
  setattr(error, _ORIGIN, Origin(where, arg))
  raise error


class _LinenError(ValueError):
  """A ``ValueError`` that is also a flax.linen error class (below): code that
  catches flax.linen's error keeps catching compat's after the import swap.
  The message is ours, without flax's link appended."""

  def __init__(self, message: str):
    Exception.__init__(self, message)  # not flax's __init__, which adds a link

  def _init_args(self) -> tuple[Any, ...]:
    return (str(self),)

  def __reduce__(self):
    # Built from its constructor's arguments, then its state: the message as it
    # stands (reword may have changed it) and its attributes (its Origin).
    return type(self), self._init_args(), {**vars(self), 'args': self.args}


class ParamShapeError(_LinenError, flax_errors.ScopeParamShapeError):
  """A compat parameter of another shape than the module's: flax.linen raises
  ``flax.errors.ScopeParamShapeError`` there."""


class ParamNotFoundError(_LinenError, flax_errors.ScopeParamNotFoundError):
  """A compat parameter missing from the variables: flax.linen raises
  ``flax.errors.ScopeParamNotFoundError`` there."""


class CarrySizeError(ParamShapeError):
  """A carry whose size disagrees with the cell's parameters (compat's cells,
  as flax.linen's, take their size from the carry): an ``RNN`` given the
  carry re-raises it naming its own ``initial_carry``."""

  def __init__(self, where: str, expected: str, got: str):
    super().__init__(f'{where}: `carry` expected {expected}, got {got}.')
    self.where, self.expected, self.got = where, expected, got
    setattr(self, _ORIGIN, Origin(where, 'carry'))  # as fail's

  def _init_args(self) -> tuple[Any, ...]:
    return self.where, self.expected, self.got


def check_concrete(where: str, arg: str, tree: Any, fix: str,
                   expected: str = 'arrays that hold values') -> None:
  """A ``TypeError`` when ``tree`` holds abstract leaves (``jax.ShapeDtypeStruct``:
  from ``jax.eval_shape`` or ``nnx.eval_shape``) where values are needed."""
  if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(tree)):
    fail(where, arg, expected, 'abstract leaves (jax.ShapeDtypeStruct, as jax.eval_shape / '
         f'nnx.eval_shape give): {fix}', TypeError)


def warn(message: str) -> None:
  """``warnings.warn`` pointing at the user's line: the first frame outside
  this package, flax and jax (an nnx module's constructor runs inside flax's
  metaclass, a varying number of frames deep)."""
  frame: FrameType | None = sys._getframe(1)
  level = 2
  while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
    frame, level = frame.f_back, level + 1
  warnings.warn(message, stacklevel=level)


def is_concrete(x: Any) -> bool:
  """True when this process can read ``x``'s values on the host: the guard of
  every check on values.

  False for a tracer (under ``jit``), and for a ``jax.Array`` spanning other
  processes' devices (a global array under ``jax.distributed``) unless it is
  fully replicated with a copy here: fetching one raises a ``RuntimeError``,
  and checking only this process's shards would let processes disagree on
  whether to raise (the others then wait in their next collective forever).
  """
  if isinstance(x, jax.core.Tracer):
    return False
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.is_fully_replicated and x.sharding.has_addressable_devices
  return True


def host_values(x: Any) -> np.ndarray:
  """The values of a concrete array (:func:`is_concrete`) as NumPy's, fetched
  by ``jax.device_get``: an explicit transfer, which
  ``jax.transfer_guard_device_to_host('disallow')`` lets through, where
  NumPy's read of a device array is an implicit one that it refuses (flax's
  eager calls read no values, so code under that guard runs with flax)."""
  return np.asarray(jax.device_get(x))


def is_real(x: Any) -> bool:
  """A Python or NumPy real number (not a bool), or a concrete 0-d floating or
  integer array (as a Python int is taken, ``jnp.array(0)`` is; a bool is not)."""
  dtype = getattr(x, 'dtype', None)
  return (isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))) or (
    dtype is not None and tuple(getattr(x, 'shape', (1,))) == () and is_concrete(x)
    and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)))


def check_rate(where: str, arg: str, rate: float) -> float:
  """A rate in ``[0, 1)``: a Python or NumPy number, or a concrete 0-d array;
  a ``TypeError`` for anything else (a bool, a string, ``None``, a traced
  value), a ``ValueError`` for a number out of range."""
  if not is_real(rate):
    fail(where, arg, 'a float in [0, 1)', repr(rate), TypeError)
  if not 0.0 <= float(rate) < 1.0:
    fail(where, arg, 'a float in [0, 1)', repr(rate))
  return float(rate)


def check_positive_float(where: str, arg: str, value: Any) -> float:
  """A finite number above 0 (``epsilon``): a Python or NumPy real, or a
  concrete 0-d floating or integer array; a ``TypeError`` for anything else (a bool, a
  string), a ``ValueError`` for a number out of range."""
  if not is_real(value):
    fail(where, arg, 'a positive float', repr(value), TypeError)
  if not 0.0 < float(value) < float('inf'):
    fail(where, arg, 'a positive float', repr(value))
  return float(value)


def check_bool(where: str, arg: str, value: Any) -> bool:
  """A flag: a Python ``bool``, a NumPy ``bool_``, a concrete boolean array of
  shape ``()`` (``jnp.array(True)``), or the integer 0 or 1 (flags written the
  C way, which flax takes), returned as ``bool``.

  Anything else is refused rather than read as truthy (``reverse='no'``, or
  the old ``RNN(cell, 64)`` whose size flax.linen reads as ``time_major``).
  """
  if (isinstance(value, (jax.Array, np.ndarray)) and value.shape == ()
      and value.dtype == np.bool_ and is_concrete(value)):
    return bool(value)  # a flag computed with jnp, which flax reads with `if`
  is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not (isinstance(value, (bool, np.bool_)) or (is_int and value in (0, 1))):
    got = (repr(value) if isinstance(value, (str, int, float)) or value is None
           else type(value).__name__)
    if isinstance(value, jax.core.Tracer):  # a flag passed through a transform as an array
      got += (' (a traced value: a transform such as jax.jit or nn.remat took the flag as '
              'an array argument; mark it static, e.g. static_argnums)')
    fail(where, arg, 'a bool', got, TypeError)
  return bool(value)


def check_optional_bools(where: str, **flags: Any) -> None:
  """Call-time overrides: each ``None`` (the attribute's value) or a bool."""
  for arg, value in flags.items():
    if value is not None:
      check_bool(where, arg, value)


def call_flags(where: str, module: Any, **flags: Any) -> tuple[Any, ...]:
  """A layer's call-time overrides of its flags (``return_carry``,
  ``time_major``...), checked (:func:`check_optional_bools`) and resolved, in
  the order given: each one given, or where ``None`` the ``module``'s
  attribute of that name."""
  check_optional_bools(where, **flags)
  return tuple(getattr(module, arg) if value is None else value for arg, value in flags.items())


def check_rngs(where: str, rngs: Any, allow_none: bool = True) -> None:
  """A call's PRNG source: an ``nnx.Rngs``, an ``nnx.RngStream`` or a PRNG key
  (with ``allow_none``, also ``None``: the module's own)."""
  from flax import nnx  # flax imports nothing of this package; kept local all the same

  if rngs is None and allow_none:
    return
  expected = f'an nnx.Rngs, nnx.RngStream or a PRNG key{" (or None)" if allow_none else ""}'
  if not isinstance(rngs, (nnx.Rngs, nnx.RngStream, jax.Array)):
    fail(where, 'rngs', expected, type(rngs).__name__, TypeError)
  if isinstance(rngs, jax.Array):
    # Another array would reach jax.random.split / fold_in inside the scan, whose
    # message ("invalid PRNG key data") names neither the module nor the argument.
    shape = tuple(rngs.shape)
    if jax.dtypes.issubdtype(rngs.dtype, jax.dtypes.prng_key):
      if shape != ():
        fail(where, 'rngs', f'{expected}: one key, of shape () (a call splits it, one per use)',
             f'a key array of shape {shape}')
    elif not (rngs.dtype == np.uint32 and shape == _raw_key_shape()):
      fail(where, 'rngs', f"{expected}: jax.random.key(seed), or jax.random.PRNGKey(seed)'s "
           f'uint32 data of shape {_raw_key_shape()}',
           f'an array of dtype {rngs.dtype} and shape {shape}', TypeError)


@functools.lru_cache(maxsize=1)
def _raw_key_shape() -> tuple[int, ...]:
  """The shape of a raw key (``jax.random.PRNGKey``'s uint32 data) of JAX's
  default PRNG implementation: ``(2,)`` for threefry."""
  return tuple(jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape)


def check_filter(where: str, arg: str, value: Any, expected: str) -> None:
  """``value`` an nnx filter (a name, a Variable type, ``...``, ``None``, a
  bool, a predicate, or a tuple or list of filters). Another object fails only
  when the layer is first called, in flax's own check, whose message names
  neither the argument nor the value (flax 0.12: "Invalid format specifier")."""
  from flax.nnx import filterlib

  try:
    filterlib.to_predicate(value)
  except (TypeError, ValueError):
    fail(where, arg, expected, repr(value), TypeError)


def check_real_for(where: str, inputs: Any, param_dtype: Any) -> None:
  """Real ``inputs`` for real parameters: a complex step of real parameters
  gives a complex carry, which the carry's real dtype would cut to its real
  part at every step (with a NumPy ComplexWarning at most)."""
  if (param_dtype is not None and jnp.iscomplexobj(inputs)
      and not jnp.issubdtype(param_dtype, jnp.complexfloating)):
    fail(where, 'inputs', f'real inputs for parameters of dtype {jnp.dtype(param_dtype).name} '
         "(a complex step's carry would lose its imaginary part; complex parameters take "
         'complex inputs)', f'dtype {inputs.dtype}', TypeError)


def check_stream(where: str, rngs: Any, stream: str, why: str) -> None:
  """An ``nnx.Rngs`` that can draw ``stream``: its own, or its ``default``
  one (flax's fallback). Without either flax raises a ``KeyError`` naming
  neither the module nor the argument. Other sources (a stream, a key) pass."""
  from flax import nnx

  if isinstance(rngs, nnx.Rngs) and stream not in rngs and 'default' not in rngs:
    fail(where, 'rngs', f"an nnx.Rngs with a '{stream}' (or 'default') stream {why}",
         f'streams {tuple(rngs)}')


# Strings nnx.Conv and flax.linen's Conv take: jax.lax's (any case) and flax's own
# (upper case only: flax compares them as they are; 'CAUSAL' is for 1-D kernels).
_LAX_PADDINGS = ('SAME', 'SAME_LOWER', 'VALID')
_FLAX_PADDINGS = ('CIRCULAR', 'REFLECT', 'CAUSAL')


def check_padding(where: str, padding: Any, rank: int) -> Any:
  """A convolution's ``padding`` as flax's ``Conv`` takes it, for a kernel of
  ``rank`` axes: one of its strings, an int, or ``rank`` entries each an int
  or a ``(low, high)`` tuple of ints. Returned as given."""
  expected = (f"one of {', '.join(map(repr, _LAX_PADDINGS + _FLAX_PADDINGS))} ('CAUSAL' for "
              f'1-D kernels only), an int, or a sequence of {rank} ints or (low, high) tuples '
              '(one per kernel axis)')
  if isinstance(padding, str):
    if padding.upper() not in _LAX_PADDINGS and padding not in _FLAX_PADDINGS:
      fail(where, 'padding', expected, repr(padding))
    if padding == 'CAUSAL' and rank != 1:
      fail(where, 'padding', f"a padding other than 'CAUSAL' for a kernel of {rank} axes (flax "
           "implements 'CAUSAL' for 1-D convolutions only)", repr(padding))
    return padding
  if isinstance(padding, int) and not isinstance(padding, bool):
    return padding
  if not isinstance(padding, (tuple, list)):
    fail(where, 'padding', expected, repr(padding) if padding is None or isinstance(padding, float)
         else type(padding).__name__, TypeError)

  def whole(p: Any) -> bool:
    return isinstance(p, int) and not isinstance(p, bool)

  def entry(p: Any) -> bool:  # flax takes a pair as a tuple only
    return whole(p) or (isinstance(p, tuple) and len(p) == 2 and all(map(whole, p)))

  if len(padding) != rank or not all(map(entry, padding)):
    fail(where, 'padding', expected, repr(padding))
  return padding


def check_positive_int(where: str, arg: str, value: Any) -> int:
  """A size: a positive int (Python's, NumPy's, or a concrete 0-d integer
  array, which flax takes too), returned as a Python int."""
  is_int = not isinstance(value, bool) and (
    isinstance(value, (int, np.integer)) or (hasattr(value, 'dtype') and hasattr(value, 'shape')
                                             and tuple(value.shape) == ()
                                             and jnp.issubdtype(value.dtype, jnp.integer)
                                             and is_concrete(value)))
  if not is_int or value < 1:
    fail(where, arg, 'a positive int', repr(value), ValueError if is_int else TypeError)
  return int(value)


def check_unroll(where: str, unroll: Any) -> int | bool:
  """``jax.lax.scan``'s ``unroll``: a bool, or an int >= 0 (``True`` and ``0``
  unroll every step). A NumPy bool (a flag read off an array or a config) is the
  bool it holds: jax's scan would read ``np.True_`` as the int 1, unrolling nothing."""
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if not isinstance(unroll, (int, np.integer)) or unroll < 0:
    fail(where, 'unroll', 'a bool or a non-negative int', repr(unroll),
         ValueError if isinstance(unroll, (int, np.integer)) else TypeError)
  return int(unroll)


def check_callables(where: str, **named: Any) -> None:
  """Each of ``named`` (a nonlinearity, an initializer...) callable: a string
  such as ``'relu'`` or an array would fail only when the cell first runs,
  inside the scan, naming nothing."""
  for arg, fn in named.items():
    if not callable(fn):
      plain = fn is None or isinstance(fn, (str, int, float))
      fail(where, arg, 'a callable', repr(fn) if plain else type(fn).__name__, TypeError)


def check_broadcasts_to(where: str, arg: str, x: Any, shape: tuple[int, ...], doc: str) -> None:
  """``x`` an array whose shape broadcasts to ``shape`` (not beyond it)."""
  given = tuple(x.shape) if hasattr(x, 'shape') and hasattr(x, 'dtype') else None
  if given is None or len(given) > len(shape) or not all(
      g in (1, e) for g, e in zip(given[::-1], shape[::-1])):
    fail(where, arg, f'an array that broadcasts to {doc} {tuple(shape)}',
         type(x).__name__ if given is None else f'shape {given}')


def check_shape(where: str, arg: str, shape: Any, hint: str = '') -> tuple[int, ...]:
  """A shape: a tuple (or list) of non-negative ints (or jax.export's symbolic
  dimensions, which stay as they are)."""
  if isinstance(shape, np.ndarray) and shape.ndim == 1 and np.issubdtype(shape.dtype, np.integer):
    shape = shape.tolist()  # a NumPy shape array (a jax.Array may be a PRNG key: refused)
  negative = [(_int_value(d) or 0) < 0
              for d in shape] if isinstance(shape, (tuple, list)) else [False]
  if any(negative) and all(n or _is_dim(d) for n, d in zip(negative, shape)):
    fail(where, arg, f'a tuple of non-negative ints{" " + hint if hint else ""}', repr(shape))
  if not isinstance(shape, (tuple, list)) or not all(_is_dim(d) for d in shape):
    if hasattr(shape, 'dtype'):
      got = f'an array of dtype {shape.dtype}'
    else:
      got = repr(shape) if isinstance(shape, (tuple, list, int, float)) else type(shape).__name__
    fail(where, arg, f'a tuple of ints{" " + hint if hint else ""}', got, TypeError)
  # jax.export's symbolic dimensions act as ints (jax types shapes so too).
  return tuple(cast(int, d) if jax.export.is_symbolic_dim(d) else int(d) for d in shape)


def check_dtype(where: str, arg: str, dtype: Any, allow_none: bool = False) -> Any:
  """A floating (or complex) dtype, as given; ``None`` too with ``allow_none``
  (where not, ``None`` passes as flax takes it: JAX's default float dtype)."""
  if dtype is None and allow_none:
    return None
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.inexact)
  except TypeError:
    ok = False
  if not ok:
    fail(where, arg, 'a floating dtype (e.g. jnp.float32, jnp.bfloat16'
         f'{", or None to infer it" if allow_none else ""})',
         dtype.__name__ if isinstance(dtype, type) else repr(dtype), TypeError)
  return dtype


def _int_value(d: Any) -> int | None:
  """``d`` as a Python int when it is an int (Python's, NumPy's or a concrete
  0-d integer array; not a bool), else ``None``."""
  if isinstance(d, bool):
    return None
  if not isinstance(d, (int, np.integer)):
    if not (hasattr(d, 'dtype') and tuple(getattr(d, 'shape', (1,))) == ()
            and jnp.issubdtype(d.dtype, jnp.integer) and is_concrete(d)):
      return None
  return int(d)


def _is_dim(d: Any) -> bool:
  """A non-negative int: Python's, NumPy's or a concrete 0-d integer array."""
  if jax.export.is_symbolic_dim(d):  # jax.export's shape polymorphism: non-negative by construction
    return True
  value = _int_value(d)
  return value is not None and value >= 0


def kind(x: Any) -> str:
  """What ``x`` is, for a message: ``'tuple of length 1'``, ``'dict'``..."""
  if isinstance(x, (tuple, list)):
    return f'{type(x).__name__} of length {len(x)}'
  return type(x).__name__


@contextlib.contextmanager
def blame_entry(where: str, entry: str, layer: str, given: Any,
                passed: tuple[str, ...] = ('inputs', 'seq_lengths', 'segment_ids'),
                ) -> Iterator[None]:
  """Names the argument of a composite layer (a stack, a Bidirectional) in
  the error an inner layer raises about what it was passed: the entry of a
  composite ``initial_carry`` (``StackedRNN: `initial_carry[1]`, the carry of
  layers[1] (GRU): GRU: `initial_carry` expected ...``; ``given``: the entry,
  ``None`` for the layer's default: nothing to blame), and the ``passed``
  arguments it hands on as they are (``Bidirectional: `seq_lengths`, passed
  on to forward_rnn (RNN): RNN: `seq_lengths` expected ...``); any other
  error of an inner layer says which layer raised it (``StackedRNN: in
  layers[1] (RNN): RNN: `cell` expected ...``), its ``Origin`` kept, so each
  composite around it adds its own step of the path.

  Only this package's errors are reworded, as its :class:`Origin` says (not
  from the message's text: a user cell's own ``ValueError`` that happens to
  read ``RNN: `seq_lengths` ...`` passes as it is, as JAX's do). The error
  is re-raised itself (:func:`reword`): its class stays (a ``ParamShapeError``
  is still a ``flax.errors.ScopeParamShapeError``), and its new ``Origin``
  blames the composite's argument, for a composite around this one to name
  its own (a stack of Bidirectionals names both)."""
  try:
    yield
  except (TypeError, ValueError) as e:
    blamed = origin(e)
    if blamed is None:
      raise
    if given is not None and blamed.arg.partition('[')[0] == 'initial_carry':
      arg = f'initial_carry{entry}'
      reword(e, f'{where}: `{arg}`, the carry of {layer}: {e}', Origin(where, arg))
    elif blamed.arg in passed:  # `where` too: a layer of the composite's own class
      reword(e, f'{where}: `{blamed.arg}`, passed on to {layer}: {e}',
             Origin(where, blamed.arg))
    else:  # the inner layer's own (its cell, what it was given inside)
      reword(e, f'{where}: in {layer}: {e}', blamed)
    raise


def torch_rows(layer: Any) -> int | None:
  """The ``num_layers * num_directions`` of PyTorch's layer equivalent to
  ``layer`` (the leading axis of its ``h_0``): an ``RNN`` 1, a
  ``Bidirectional`` of two 2, a fused layer its own, a stack their sum;
  ``None`` for a layer of another kind."""
  if hasattr(layer, 'layers'):  # StackedRNN
    rows = [torch_rows(inner) for inner in layer.layers]
    return None if None in rows else sum(rows)  # type: ignore[arg-type]
  if hasattr(layer, 'forward_rnn'):  # Bidirectional
    pair = [torch_rows(layer.forward_rnn), torch_rows(layer.backward_rnn)]
    return 2 if pair == [1, 1] else None
  if hasattr(layer, 'num_layers') and hasattr(layer, 'bidirectional'):  # nr.LSTM / nr.GRU
    return layer.num_layers * (2 if layer.bidirectional else 1)
  if hasattr(layer, 'cell'):  # RNN over a cell reading one feature axis, as PyTorch's
    return 1 if getattr(layer.cell, 'num_feature_axes', 1) == 1 else None
  return None


def batch_shape_of(inputs: Any, time_major: bool) -> tuple[int, ...] | None:
  """The batch axes of a sequence layer's ``inputs`` with one feature axis
  (``None`` for an input without a shape, or without a time axis)."""
  shape = tuple(getattr(inputs, 'shape', ()))
  n = len(shape) - 2
  if n < 0:
    return None
  return shape[1:1 + n] if time_major else shape[:n]


def torch_carry_hint(given: Any, layer: Any, batch_shape: tuple[int, ...] | None) -> str:
  """A hint for an ``initial_carry`` of ``layer`` laid out as PyTorch's:
  ``h_0``, or a pair ``(h_0, c_0)``, arrays of shape ``(rows, *batch_shape,
  features)``, ``rows`` the layer's :func:`torch_rows`; ``''`` for any other
  carry, or where ``batch_shape`` is unknown (``None``)."""
  rows = torch_rows(layer)
  leaves = list(given) if isinstance(given, (tuple, list)) and len(given) == 2 else [given]
  shapes = [tuple(getattr(leaf, 'shape', None) or ()) for leaf in leaves]
  if not rows or batch_shape is None or not all(
      len(s) == len(batch_shape) + 2 and s[:-1] == (rows, *batch_shape) for s in shapes):
    return ''
  if rows == 1:
    how, lstm = 'index it, h_0[0]', "an LSTM's carry is (c_0[0], h_0[0]), c first"
  elif hasattr(layer, 'forward_rnn'):
    how = 'a (forward, backward) pair, (h_0[0], h_0[1])'
    lstm = "an LSTM's direction d is (c_0[d], h_0[d]), c first"
  else:
    how = ("a tuple over layers of each layer's carry (a bidirectional layer's a (forward, "
           'backward) pair), layer l direction d being h_0[l * num_directions + d]')
    lstm = "an LSTM's (c_0[...], h_0[...]), c first"
  if _may_carry_lstm(layer):  # the order of an LSTM's carry, where the layer holds one
    how += f' ({lstm})'
  return (f"PyTorch's h_0 / c_0, (num_layers * num_directions, batch, hidden) = {shapes[0]}, "
          f'are not a carry here: {how}; see "The carry" in docs/migrating_from_pytorch.md.')


@contextlib.contextmanager
def hint_torch_carry(given: Any, layer: Any,
                     batch_shape: tuple[int, ...] | None) -> Iterator[None]:
  """Adds :func:`torch_carry_hint` to this package's error about
  ``initial_carry`` (or an entry of it) raised inside, when ``given`` has
  PyTorch's layout."""
  try:
    yield
  except (TypeError, ValueError) as e:
    blamed = origin(e)
    if (blamed is not None and blamed.arg.partition('[')[0] == 'initial_carry'
        and "PyTorch's h_0" not in str(e)):
      hint = torch_carry_hint(given, layer, batch_shape)
      if hint:
        reword(e, f'{e} {hint}')
    raise


def carry_pair(where: str, initial_carry: Any, arg: str = 'initial_carry') -> tuple[Any, Any]:
  """A bidirectional layer's ``initial_carry``: ``(forward, backward)``, or
  ``(None, None)`` when it is ``None``."""
  if initial_carry is None:
    return None, None
  if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2:
    fail(where, arg, 'a pair (forward_carry, backward_carry)', kind(initial_carry))
  return initial_carry[0], initial_carry[1]


def structure(tree: Any) -> str:
  """A carry's structure for a message, its arrays as ``array``: ``(array, None)``,
  ``[array, array]``, ``{'h': array}``, ``Carry(c=array, h=array)`` (jax's
  ``PyTreeDef((*, None))`` says the same less plainly; other containers keep
  jax's form)."""
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):  # a NamedTuple
    return (f'{type(tree).__name__}('
            + ', '.join(f'{k}={structure(v)}' for k, v in zip(tree._fields, tree)) + ')')
  if isinstance(tree, (tuple, list)):
    inner = ', '.join(map(structure, tree)) + (',' if type(tree) is tuple and len(tree) == 1
                                               else '')
    return f'({inner})' if isinstance(tree, tuple) else f'[{inner}]'
  if isinstance(tree, dict):
    return '{' + ', '.join(f'{k!r}: {structure(v)}' for k, v in tree.items()) + '}'
  if tree is None:
    return 'None'
  if hasattr(tree, 'shape') or isinstance(tree, (int, float, complex, bool, np.generic)):
    return 'array'
  return str(jax.tree_util.tree_structure(tree))


def public_name(obj: Any) -> str:
  """The name a user knows ``obj``'s class by: ``nr.LSTM``, ``compat.RNN``, or
  its module path for other libraries' classes (``flax.nnx.nn.linear.Linear``)."""
  return public_class_name(type(obj))


def public_class_name(cls: type) -> str:
  """:func:`public_name` of a class."""
  import nnx_recurrent
  from nnx_recurrent import compat

  if cls.__module__.split('.')[0] == 'nnx_recurrent':  # compat falls through to flax.linen
    for prefix, namespace in (('nr', nnx_recurrent), ('compat', compat)):
      if getattr(namespace, cls.__name__, None) is cls:
        return f'{prefix}.{cls.__name__}'
  return f'{cls.__module__}.{cls.__name__}'


# What every class body has, or a metaclass (flax's, abc's) or RNNCellBase adds.
_CLASS_PLUMBING = frozenset({
  '__init__', '__module__', '__qualname__', '__doc__', '__annotations__', '__dict__',
  '__weakref__', '__abstractmethods__', '_abc_impl', '__firstlineno__', '__static_attributes__',
  '__orig_bases__', '__parameters__', '_step_impl',
})


def check_computes_as_builtin(where: str, module: Any, builtins: Any = None,
                              ignore: frozenset = frozenset(),
                              allowed: str = 'a subclass may change __init__ or add members: '
                              'the conversion rebuilds the built-in computation') -> None:
  """Refuses a subclass of one of this package's modules that redefines
  anything of it (``step``, ``__call__``, a class attribute), as converters to
  other libraries must: they rebuild what the built-in class computes. A new
  ``__init__`` (other defaults) and new members are fine. ``builtins``: the
  classes to check against instead (flax.linen's and compat's, for ``to_nnx``),
  with the names in ``ignore`` (their dataclass fields and plumbing) fine too;
  ``allowed`` says what a subclass may do."""
  cls = type(module)
  if builtins is None:
    builtin = next((k for k in cls.__mro__ if k.__module__.split('.')[0] == 'nnx_recurrent'),
                   None)
    if builtin is not None and builtin.__name__ == 'RNNCellBase':
      return  # a cell of the user's own (refused as such by the caller)
  else:
    builtin = next((k for k in cls.__mro__ if k in builtins), None)
  if builtin is None or builtin is cls:
    return  # not one of these (refused as such by the caller), or the built-in one
  redefined = sorted({name for k in cls.__mro__[:cls.__mro__.index(builtin)] for name in vars(k)
                      if name not in _CLASS_PLUMBING and name not in ignore
                      and not name.startswith('_pytree__') and hasattr(builtin, name)})
  if redefined:
    fail(where, 'module', f'{public_class_name(builtin)} computing as the built-in one '
         f'({allowed})', f'{cls.__name__}, a subclass that redefines {", ".join(redefined)}',
         TypeError)


def check_not_foreign(where: str, arg: str, x: Any) -> None:
  """A PyTorch or TensorFlow tensor has ``shape`` and ``dtype`` but fails
  deep inside numpy/JAX (``Cannot interpret 'torch.int64' as a data type``)."""
  cls = type(x)
  if cls.__module__.split('.')[0] in ('torch', 'tensorflow'):
    if cls.__name__ == 'PackedSequence':  # torch.nn.utils.rnn's, a tuple without a shape
      fail(where, arg, "a JAX or NumPy array (PyTorch's PackedSequence is the padded array "
           'with seq_lengths=lengths here: padded, lengths = pad_packed_sequence(packed, '
           'batch_first=...), then padded.numpy(), lengths.numpy())',
           f'{cls.__module__}.{cls.__name__}', TypeError)
    fail(where, arg, 'a JAX or NumPy array (convert a tensor first, e.g. x.numpy())',
         f'{cls.__module__}.{cls.__name__}', TypeError)


def check_array(where: str, arg: str, x: Any) -> jax.Array:
  """An array of numbers (or bools): a string or object array, or PRNG keys,
  are a ``TypeError`` naming ``arg`` here, not jax's when it first computes."""
  check_not_foreign(where, arg, x)
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    fail(where, arg, 'an array', type(x).__name__, TypeError)
  if not _numeric_dtype(x.dtype):
    fail(where, arg, 'an array of numbers', f'dtype {x.dtype}', TypeError)
  return x


def _numeric_dtype(dtype: Any) -> bool:
  try:
    return bool(jnp.issubdtype(dtype, np.number) or dtype == np.bool_)
  except TypeError:  # a dtype jax does not know (a string array's)
    return False


def check_integer_array(where: str, arg: str, x: Any, shape: tuple[int, ...], shape_doc: str,
                        dtype_error: type[Exception] = TypeError):
  """Checks an integer array (``seq_lengths``, ``segment_ids``) and its shape."""
  check_not_foreign(where, arg, x)
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    converted = sequence_as_array(x)
    if converted is None:  # a ragged list: numpy's message names nothing
      fail(where, arg, f'an integer array of shape {shape_doc}', f'a ragged {kind(x)}',
           dtype_error)
    x = converted
  if not jnp.issubdtype(x.dtype, jnp.integer):
    # A boolean mask given as lengths: flax reads each row's True/False as a
    # length of 1/0, which is never what was meant.
    hint = (' (lengths, not a mask: a boolean mask of shape (*batch, time) gives them as '
            'mask.sum(-1))' if x.dtype == np.bool_ and arg == 'seq_lengths' else '')
    fail(where, arg, f'an integer array of shape {shape_doc}{hint}', f'dtype {x.dtype}',
         dtype_error)
  if tuple(x.shape) != tuple(shape):
    fail(where, arg, f'shape {shape_doc} = {tuple(shape)}', f'shape {tuple(x.shape)}')
  # NumPy stays NumPy: jax would narrow int64 to int32 (x64 off), wrapping values
  # beyond int32's range before the caller reads them (as_int32, ids_as_jax).
  return x if on_host(x) else jnp.asarray(x)


def on_host(x: Any) -> bool:
  """A NumPy array or scalar: its values are read on the host, as given."""
  return isinstance(x, (np.ndarray, np.generic))


def sequence_as_array(x: Any) -> Any:
  """A list, tuple or number as the array it spells, or ``None`` (a ragged
  list). NumPy's array; jax's where it holds traced values (a list of lengths
  passed to a ``jit``ted function arrives as a list of tracers, which NumPy
  cannot read), so that such a list means under ``jit`` what it means outside."""
  try:
    return np.asarray(x)
  except (TypeError, ValueError):
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x)):
      return None
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError):  # ragged
    return None


def numeric_array(where: str, arg: str, x: Any, expected: str) -> Any:
  """``x`` as an array of numbers (or bools, for the dtype check that follows):
  an array as it is, a list or a Python number through ``np.asarray`` (so a
  list of floats is what the same ``jnp.array`` is). Strings, ragged lists and
  other objects, and arrays of no number dtype, are a ``TypeError`` here, before
  any jax operation fails on them."""
  check_not_foreign(where, arg, x)
  if not (hasattr(x, 'shape') and hasattr(x, 'dtype')):
    converted = sequence_as_array(x)  # None for a ragged list
    if converted is None or converted.dtype == object or not (
        np.issubdtype(converted.dtype, np.number) or converted.dtype == np.bool_):
      fail(where, arg, expected, repr(x) if isinstance(x, str) else kind(x), TypeError)
    x = converted
  if not _numeric_dtype(x.dtype):
    fail(where, arg, expected, f'dtype {x.dtype}', TypeError)
  return x


def whole_lengths(where: str, seq_lengths: Any) -> Any:
  """Float lengths (``mask.sum(-1)`` of a float mask) as ``int32``.

  flax runs with them where it ignores them, so code passes them; their
  values must be whole numbers (checked when concrete; under ``jit`` they are
  rounded to the nearest, so that a sum computed a rounding error below a
  length is that length). Other dtypes pass through to the integer check.
  """
  seq_lengths = numeric_array(where, 'seq_lengths', seq_lengths, 'an integer array of shape '
                              'batch shape')
  dtype = seq_lengths.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    return seq_lengths
  if is_concrete(seq_lengths):
    host = host_values(seq_lengths)
    bad = host[~np.isfinite(host) | (host != np.round(host))]
    if bad.size:
      fail(where, 'seq_lengths', 'whole numbers (an integer array, or floats such as the sum '
           'of a float mask)', f'{bad.ravel()[:3].tolist()} among them')
  return jnp.round(jnp.asarray(seq_lengths)).astype(jnp.int32)


def check_seq_lengths(where: str, seq_lengths: Any, batch_shape: tuple[int, ...]):
  """Checks ``seq_lengths``; a negative length is refused only when concrete.

  A length above the time axis acts as the time axis, as in flax (code that
  truncates its inputs and keeps the original lengths runs): every reader of
  the lengths clips them to it.

  Under ``jit``, and for a global array with shards on other processes, the
  values are not checked (see :func:`is_concrete`); there a negative length
  acts as ``0``.
  """
  seq_lengths = whole_lengths(where, seq_lengths)
  shape, batch_shape = tuple(np.shape(seq_lengths)), tuple(batch_shape)
  if shape != batch_shape and len(shape) <= len(batch_shape) and all(
      s in (1, b) for s, b in zip(shape[::-1], batch_shape[::-1])):
    # Lengths that broadcast to the batch (a scalar or shape (1,): every row's),
    # as flax.nnx and flax.linen broadcast them.
    xp = np if on_host(seq_lengths) else jnp  # NumPy's int64 unnarrowed (as_int32)
    seq_lengths = xp.broadcast_to(xp.asarray(seq_lengths), batch_shape)
  seq_lengths = check_integer_array(where, 'seq_lengths', seq_lengths, batch_shape,
                                    'batch shape')
  if is_concrete(seq_lengths) and seq_lengths.size:
    lowest = int(host_values(seq_lengths).min())  # on the host: jnp would compile a reduction
    if lowest < 0:
      fail(where, 'seq_lengths', 'non-negative lengths', f'minimum {lowest}')
  return as_int32(seq_lengths)


def as_int32(lengths: Any) -> Any:
  """Integer lengths as ``int32``, which holds every time index: the lengths'
  own dtype may not (``clip(uint8 lengths, 0, 300)`` wraps 300 to 44); wider
  ones are first capped at int32's maximum (unchecked values above ``time``
  act as ``time``). NumPy's are capped on the host: jax would narrow int64
  to int32 first (x64 off), wrapping a length of 2**32 to 0."""
  dtype = jnp.dtype(lengths.dtype)
  if dtype == jnp.int32:
    return jnp.asarray(lengths)
  if dtype.itemsize >= 4:
    xp = np if on_host(lengths) else jnp
    lengths = xp.minimum(lengths, np.array(np.iinfo(np.int32).max).astype(dtype))
  return jnp.asarray(lengths).astype(jnp.int32)


def ids_as_jax(ids: Any) -> Any:
  """Checked (non-negative) segment ids as a jax array. NumPy ids beyond
  int32's range (document ids, 2**40) are relabelled on the host by rank: jax
  would narrow int64 to int32 (x64 off), wrapping 2**40 + 7 to 7 (merging two
  segments) and 2**40 to 0 (padding). The scans read only which ids are 0 and
  which neighbours are equal, which ranks keep (0 stays 0); ids in range keep
  their values."""
  if on_host(ids) and ids.size and int(ids.max()) > np.iinfo(np.int32).max:
    values, ranks = np.unique(ids, return_inverse=True)
    ids = (ranks.reshape(ids.shape) + (values[0] != 0)).astype(np.int32)
  return jnp.asarray(ids)


def check_tree_structure(where: str, arg: str, given: Any, expected: Any) -> None:
  """Checks that ``given`` has the pytree structure of ``expected`` (leaves aside)."""
  g_def: Any  # jax's PyTreeDef (untyped for mypy)
  e_def: Any
  g_def = jax.tree_util.tree_structure(given)
  e_def = jax.tree_util.tree_structure(expected)
  if g_def != e_def:
    fail(where, arg, f'a pytree with structure {structure(expected)}',
         f'structure {structure(given)}')


def check_tree_matches(where: str, arg: str, given: Any, expected: Any,
                       broadcast: bool | str = False):
  """Checks that ``given`` has the structure and leaf shapes of ``expected``
  (with ``broadcast``: shapes that broadcast with them; ``'given'``: shapes
  they broadcast to, which a step keeps), and floating leaves where
  ``expected`` has them (an integer carry would be truncated)."""
  for leaf in jax.tree_util.tree_leaves(given):
    check_not_foreign(where, arg, leaf)
  check_tree_structure(where, arg, given, expected)
  g_leaves = jax.tree_util.tree_leaves(given)
  e_leaves = jax.tree_util.tree_leaves(expected)
  for g, e in zip(g_leaves, e_leaves):
    # A Python number broadcasts with any leaf; as a scan's carry, which must
    # keep its shape, it is a leaf of shape () ('given').
    number = isinstance(g, (int, float)) and not isinstance(g, bool)
    shape = getattr(g, 'shape', () if number else None)
    if not (number and broadcast is True) and (
        shape is None or not _shape_fits(tuple(shape), tuple(e.shape), broadcast)):
      got = [tuple(getattr(leaf, 'shape', ())) for leaf in g_leaves]
      shapes = [tuple(leaf.shape) for leaf in e_leaves]
      wanted = (f'leaf shapes {shapes} (or larger shapes they broadcast to)' if broadcast == 'given'
                else f'leaf shapes {"that broadcast with " if broadcast else ""}{shapes}')
      if len(shapes) == 2 and shapes[0] != shapes[1] and got == shapes[::-1]:
        # A projected LSTM's (h, c), PyTorch's order (PyTorch's cells take (h_0, c_0)).
        wanted += f" ({_CARRY_ORDER}; PyTorch's (h_0, c_0) is the other way round)"
      fail(where, arg, wanted, f'{got}')
  for g, e in zip(g_leaves, e_leaves):
    if (hasattr(g, 'dtype') and jnp.issubdtype(e.dtype, jnp.inexact)
        and not jnp.issubdtype(g.dtype, jnp.inexact)):
      fail(where, arg, f'floating leaves (dtype {e.dtype})',
           f'dtypes {[str(getattr(leaf, "dtype", "?")) for leaf in g_leaves]}', TypeError)


def _shape_fits(given: tuple[int, ...], expected: tuple[int, ...],
                broadcast: bool | str) -> bool:
  """Equal shapes, or with ``broadcast`` shapes that broadcast together either
  way (a carry for 8 rows stepped on one shared input row computes); with
  ``'given'``, ``given`` is what ``expected`` broadcasts to (a carry of beams
  over shared inputs: more leading axes, or rows where ``expected`` has one)."""
  if not broadcast:
    return given == expected
  if broadcast == 'given':
    return len(given) >= len(expected) and all(
      g == e or e == 1 for g, e in zip(given[::-1], expected[::-1]))
  return all(g == e or 1 in (g, e) for g, e in zip(given[::-1], expected[::-1]))


# -- arguments that do not bind -----------------------------------------------------------
# Other libraries' names for our parameters, in one place. Each maps to pairs
# (our parameter, the hint); the first pair whose parameter the method takes
# gives the hint, and a method that takes none of them gets none (a hint names
# only what exists). Checked against the signatures by tests/test_keyword_hints.py.
_CARRY_ORDER = 'an LSTM carry is (c, h), c first'
_OTHER_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
  # PyTorch's torch.nn.LSTM / GRU / RNN and their cells
  'batch_first': (('time_major', "PyTorch's batch_first: inputs here are batch-major by default "
                                 '(time_major=False, as batch_first=True); batch_first=False is '
                                 'time_major=True'),),
  'input_size': (('in_features', "PyTorch's input_size is in_features here"),),
  'hidden_size': (('hidden_features', "PyTorch's hidden_size is hidden_features here"),),
  'proj_size': (('proj_features', "PyTorch's proj_size is proj_features here"),),
  'bias': (('use_bias', "PyTorch's bias is use_bias here"),
           ('bias_init', "PyTorch's bias: there is no bias=False here; the biases start at zero "
                         '(bias_init), and stay there when left out of the optimizer (see '
                         'docs/migrating_from_pytorch.md)')),
  'dropout': (('recurrent_dropout_rate', "PyTorch's dropout, between layers, is dropout_rate of "
                                         'nr.StackedRNN, nr.LSTM and nr.GRU; a cell\'s '
                                         'dropout_rate and recurrent_dropout_rate are variational '
                                         'dropout within the cell'),
              ('dropout_rate', "PyTorch's dropout is dropout_rate here")),
  'nonlinearity': (('activation_fn', "PyTorch's nonlinearity is activation_fn here, a function "
                                     "(jax.nn.relu), not a string ('relu')"),),
  'hx': (('initial_carry', f"PyTorch's hx is initial_carry here ({_CARRY_ORDER})"),
         ('carry', "PyTorch's hx is the carry here, the first argument: new_carry, y = "
                   'cell(carry, inputs)')),
  'h_0': (('initial_carry', f"PyTorch's h_0 and c_0 are initial_carry here ({_CARRY_ORDER})"),),
  'c_0': (('initial_carry', f"PyTorch's h_0 and c_0 are initial_carry here ({_CARRY_ORDER})"),),
  'lengths': (('seq_lengths', "PyTorch's lengths (of pack_padded_sequence) are seq_lengths "
                              'here'),),
  # flax.linen's, given to the NNX modules
  'features': (('hidden_features', "flax.linen's features is hidden_features here (an NNX cell "
                                   'takes in_features too: it makes its parameters when built)'),),
  'cell_size': (('cell', "flax.linen's cell_size: not needed here, the NNX cell knows its "
                         'sizes'),),
  **{name: (('state_axes', f"flax.linen's {name}: one mapping here, state_axes (flax.nnx's: "
                           'state filters to nnx.Carry, None to broadcast, or an axis)'),)
     for name in ('variable_axes', 'variable_broadcast', 'variable_carry')},
  'split_rngs': (('broadcast_rngs', "flax.linen's split_rngs: here, as in flax.nnx, RNG "
                                    'streams are split over the steps but those named in '
                                    'broadcast_rngs'),),
  'init_key': (('rngs', "flax.linen's init_key is rngs here"),),
  'deterministic': (('rngs', 'Dropout is switched off by model.eval() (or nnx.view(model, '
                             'deterministic=True)) here, not by an argument'),),
}


def keyword_hint(keyword: str, names: Collection[str], var_positional: str | None = None,
                 lstm_carry: bool = True) -> str:
  """A hint for an unknown ``keyword`` of a method that takes the keywords
  ``names``: another library's name for one of them, a close match, or
  (``var_positional``: the name of its ``*args``) positional arguments given as
  a keyword. ``''`` when there is none. ``lstm_carry``: whether the object may
  carry an LSTM's ``(c, h)`` (the hints for PyTorch's ``hx`` then give its order)."""
  for ours, hint in _OTHER_NAMES.get(keyword, ()):
    if ours in names:
      return hint if lstm_carry else hint.replace(f' ({_CARRY_ORDER})', '')
  if keyword == var_positional:
    return f'Pass the {keyword} positionally, as *{keyword}'
  close = difflib.get_close_matches(keyword, list(names), n=1)
  return f"Did you mean '{close[0]}'?" if close else ''


def unexpected_keyword(where: str, keyword: str, names: Collection[str],
                       var_positional: str | None = None, accepted: str = '',
                       lstm_carry: bool = True) -> str:
  """Python's message for an unknown ``keyword`` of ``where`` (``LSTM.__call__``),
  with :func:`keyword_hint`'s hint and ``accepted`` (what it takes) after it."""
  return _with_hints(f"{where}() got an unexpected keyword argument '{keyword}'",
                     keyword_hint(keyword, names, var_positional, lstm_carry), accepted)


def _may_carry_lstm(obj: Any) -> bool:
  """Whether ``obj``'s carry may be an LSTM's ``(c, h)``: it is, or holds, a
  cell of two carry arrays (this package's LSTM cells, flax.nnx's), or is no
  NNX module (a compat module: its cell is not built yet)."""
  from flax.nnx.nn import recurrent as flax_recurrent

  if not isinstance(obj, nnx.Module):
    return True
  flax_lstms = (flax_recurrent.LSTMCell, flax_recurrent.OptimizedLSTMCell)
  return any(getattr(type(node), 'num_carry_arrays', 1) == 2 or isinstance(node, flax_lstms)
             for _, node in nnx.iter_graph(obj))


def _with_hints(message: str, *hints: str) -> str:
  """``message`` (Python's, without a full stop) and each non-empty hint
  after it, as sentences."""
  parts = [message, *filter(None, hints)]
  if len(parts) == 1:
    return message
  return ' '.join(p if p.endswith(('?', '.')) else p + '.' for p in parts)


F = TypeVar('F', bound=Callable[..., Any])


def named_errors(method: F) -> F:
  """Decorates a public method (``__init__``, ``__call__``...) so that
  arguments that do not bind raise Python's ``TypeError`` naming the class the
  method was called on (not a private base class: ``LSTM.__call__()``, not
  ``_FusedBase.__call__()``), with a hint for an unknown keyword
  (:func:`keyword_hint`) or for too many positional arguments (the
  keyword-only ones).

  The signature, docstring and ``help()`` stay the method's (``functools.wraps``);
  a call that binds costs one Python call more. A ``TypeError`` raised inside
  the method is not touched: one raised by binding has no frame below this
  wrapper's (the method's frame never started), and is re-checked with
  ``inspect.signature(...).bind``.
  """
  @functools.wraps(method)
  def wrapper(self, *args, **kwargs):
    try:
      return method(self, *args, **kwargs)
    except TypeError as e:
      if e.__traceback__ is None or e.__traceback__.tb_next is not None:
        # raised inside the method: left as it is, but for JAX's or flax's
        # error about a variable still abstract, which names no variable
        abstract = _abstract_variable(self) if 'ShapeDtypeStruct' in str(e) else None
        if abstract is None:
          raise
        raise TypeError(_abstract_message(_caller_class(self, method), method.__name__,
                                          abstract)) from e
      message = _binding_message(method, self, args, kwargs, str(e))
      if message is None:
        raise
      raise TypeError(message) from None

  return cast(F, wrapper)


def _abstract_variable(obj: Any) -> str | None:
  """The path (``'cell.bias_hn'``) of the first of ``obj``'s variables that
  holds a ``jax.ShapeDtypeStruct`` (an entry of a module made under
  ``nnx.eval_shape`` that nothing restored or updated), or ``None``. Read
  only after a ``TypeError``: a call costs nothing more."""
  if not isinstance(obj, nnx.Module):
    return None
  try:
    for path, node in nnx.iter_graph(obj):
      if isinstance(node, nnx.Variable) and isinstance(node.get_raw_value(),
                                                       jax.ShapeDtypeStruct):
        return '.'.join(map(str, path))
  except Exception:  # a graph nnx cannot walk: leave the original error
    return None
  return None


def _abstract_message(cls: str, method: str, path: str) -> str:
  hint = (' A checkpoint of flax.nnx\'s GRUCell has no `bias_hn`: build '
          'nr.GRUCell(..., use_bias_hn=False), or restore the rest into a concrete module, '
          'whose bias_hn stays at zero (docs/migrating_from_nnx.md)'
          if path.rsplit('.', 1)[-1] == 'bias_hn' else '')
  return (f'{cls}.{method}: the variable `{path}` holds a jax.ShapeDtypeStruct, not an '
          'array: the module was made abstract (nnx.eval_shape) and that entry was not '
          'restored or updated since (a partial restore from a checkpoint that lacks '
          f'it).{hint}')


def _binding_message(method: Callable[..., Any], obj: Any, args: tuple[Any, ...],
                     kwargs: dict[str, Any], python_message: str) -> str | None:
  """The message for arguments of ``method`` that do not bind (``None`` when
  they do: the ``TypeError`` came from elsewhere)."""
  signature = inspect.signature(method)
  try:
    signature.bind(obj, *args, **kwargs)
  except TypeError:
    pass
  else:
    return None
  where = f'{_caller_class(obj, method)}.{method.__name__}'
  params = list(signature.parameters.values())[1:]  # self
  kinds = inspect.Parameter
  names = [p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
  var_positional = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
  has_var_keyword = any(p.kind is kinds.VAR_KEYWORD for p in params)
  unknown = [k for k in kwargs if k not in names]
  lstm_carry = _may_carry_lstm(obj)
  if unknown and not has_var_keyword:
    return unexpected_keyword(where, unknown[0], names, var_positional, lstm_carry=lstm_carry)
  # Python's message (it begins with the method's qualified name), renamed.
  prefix = f'{method.__qualname__}()'
  message = where + '()' + python_message[len(prefix):] if python_message.startswith(
    prefix) else python_message
  hints = [hint for k in unknown  # into **kwargs
           if (hint := keyword_hint(k, names, lstm_carry=lstm_carry))]
  if 'positional argument' in message and 'were given' in message:
    keyword_only = [p.name for p in params if p.kind is kinds.KEYWORD_ONLY]
    if keyword_only:
      hints.append('Its other arguments are keyword-only: ' + ', '.join(keyword_only) + (
        " (PyTorch's layer(x, hx) is layer(x, initial_carry=hx) here)"
        if 'initial_carry' in keyword_only else ''))
  return _with_hints(message, *hints)


def _caller_class(obj: Any, method: Callable[..., Any]) -> str:
  """The name of the class whose method was called: the first class of
  ``obj``'s that has ``method`` (a user's subclass that inherits it: the
  user's class; one that overrides it and calls ``super()``: the base called),
  passing over this package's private base classes."""
  name = method.__name__
  for cls in type(obj).__mro__:
    fn = getattr(cls, name, None)
    if fn is not None and inspect.unwrap(fn) is method and not (
        cls.__name__.startswith('_') and cls.__module__.split('.')[0] == 'nnx_recurrent'):
      return cls.__name__
  return type(obj).__name__
