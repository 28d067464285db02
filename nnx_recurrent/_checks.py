"""Input validation shared by every front door, with one message template.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong kind of
object) whose message names the module, the argument, what was expected and
what was received, e.g.::

    RNN: `inputs` expected last axis of size 32 (the cell's in_features), got shape (4, 7, 16).
"""

from __future__ import annotations

import numbers
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np


def fail(where: str, arg: str, expected: str, got: Any,
         exc: type[Exception] = ValueError) -> NoReturn:
  """Raises ``exc`` with the project's one message template."""
  raise exc(f'{where}: `{arg}` expected {expected}, got {got}.')


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


def check_rate(where: str, arg: str, rate: float) -> float:
  """A rate in ``[0, 1)``: a Python or NumPy number, or a concrete 0-d array."""
  dtype = getattr(rate, 'dtype', None)
  number = (isinstance(rate, numbers.Real) and not isinstance(rate, bool)) or (
    dtype is not None and tuple(getattr(rate, 'shape', (1,))) == () and is_concrete(rate)
    and jnp.issubdtype(dtype, jnp.floating))
  if not number or not 0.0 <= float(rate) < 1.0:
    fail(where, arg, 'a float in [0, 1)', repr(rate))
  return float(rate)


def check_positive_int(where: str, arg: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    fail(where, arg, 'a positive int', repr(value),
         TypeError if not isinstance(value, (int, np.integer)) else ValueError)
  return int(value)


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
  """A shape: a tuple (or list) of non-negative ints."""
  if isinstance(shape, np.ndarray) and shape.ndim == 1 and np.issubdtype(shape.dtype, np.integer):
    shape = shape.tolist()  # a NumPy shape array (a jax.Array may be a PRNG key: refused)
  if not isinstance(shape, (tuple, list)) or not all(_is_dim(d) for d in shape):
    if hasattr(shape, 'dtype'):
      got = f'an array of dtype {shape.dtype}'
    else:
      got = repr(shape) if isinstance(shape, (tuple, list, int, float)) else type(shape).__name__
    fail(where, arg, f'a tuple of ints{" " + hint if hint else ""}', got, TypeError)
  return tuple(int(d) for d in shape)


def check_dtype(where: str, arg: str, dtype: Any, allow_none: bool = False) -> Any:
  """A floating (or complex) dtype, as given; ``None`` too with ``allow_none``."""
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


def _is_dim(d: Any) -> bool:
  """A non-negative int: Python's, NumPy's or a concrete 0-d integer array."""
  if isinstance(d, bool):
    return False
  if not isinstance(d, (int, np.integer)):
    if not (hasattr(d, 'dtype') and tuple(getattr(d, 'shape', (1,))) == ()
            and jnp.issubdtype(d.dtype, jnp.integer) and is_concrete(d)):
      return False
  return int(d) >= 0


def kind(x: Any) -> str:
  """What ``x`` is, for a message: ``'tuple of length 1'``, ``'dict'``..."""
  if isinstance(x, (tuple, list)):
    return f'{type(x).__name__} of length {len(x)}'
  return type(x).__name__


def carry_pair(where: str, initial_carry: Any) -> tuple[Any, Any]:
  """A bidirectional layer's ``initial_carry``: ``(forward, backward)``, or
  ``(None, None)`` when it is ``None``."""
  if initial_carry is None:
    return None, None
  if not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2:
    fail(where, 'initial_carry', 'a pair (forward_carry, backward_carry)', kind(initial_carry))
  return initial_carry[0], initial_carry[1]


def check_not_foreign(where: str, arg: str, x: Any) -> None:
  """A PyTorch or TensorFlow tensor has ``shape`` and ``dtype`` but fails
  deep inside numpy/JAX (``Cannot interpret 'torch.int64' as a data type``)."""
  cls = type(x)
  if cls.__module__.split('.')[0] in ('torch', 'tensorflow'):
    fail(where, arg, 'a JAX or NumPy array (convert a tensor first, e.g. x.numpy())',
         f'{cls.__module__}.{cls.__name__}', TypeError)


def check_array(where: str, arg: str, x: Any) -> jax.Array:
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    fail(where, arg, 'an array', type(x).__name__, TypeError)
  check_not_foreign(where, arg, x)
  return x


def check_integer_array(where: str, arg: str, x: Any, shape: tuple[int, ...], shape_doc: str,
                        dtype_error: type[Exception] = TypeError):
  """Checks an integer array (``seq_lengths``, ``segment_ids``) and its shape."""
  check_not_foreign(where, arg, x)
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    fail(where, arg, f'an integer array of shape {shape_doc}', f'dtype {x.dtype}', dtype_error)
  if tuple(x.shape) != tuple(shape):
    fail(where, arg, f'shape {shape_doc} = {tuple(shape)}', f'shape {tuple(x.shape)}')
  return jnp.asarray(x)


def whole_lengths(where: str, seq_lengths: Any) -> Any:
  """Float lengths (``mask.sum(-1)`` of a float mask) as ``int32``.

  flax runs with them where it ignores them, so code passes them; their
  values must be whole numbers (checked when concrete; under ``jit`` the cast
  truncates). Other dtypes pass through to the integer check.
  """
  check_not_foreign(where, 'seq_lengths', seq_lengths)
  dtype = getattr(seq_lengths, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return seq_lengths
  if is_concrete(seq_lengths):
    host = np.asarray(seq_lengths)
    bad = host[~np.isfinite(host) | (host != np.round(host))]
    if bad.size:
      fail(where, 'seq_lengths', 'whole numbers (an integer array, or floats such as the sum '
           'of a float mask)', f'{bad.ravel()[:3].tolist()} among them')
  return jnp.asarray(seq_lengths).astype(jnp.int32)


def check_seq_lengths(where: str, seq_lengths: Any, batch_shape: tuple[int, ...], time: int):
  """Checks ``seq_lengths``; values are range-checked only when concrete.

  Under ``jit``, and for a global array with shards on other processes, the
  values are not checked (see :func:`is_concrete`); there a length above
  ``time`` acts as ``time`` and a negative length as ``0``.
  """
  seq_lengths = check_integer_array(where, 'seq_lengths', whole_lengths(where, seq_lengths),
                                    batch_shape, 'batch shape')
  if is_concrete(seq_lengths) and seq_lengths.size:
    host = np.asarray(seq_lengths)  # host values: jnp reductions would trace under jit
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi > time:
      fail(where, 'seq_lengths', f'values in [0, {time}] (the time axis length)',
           f'values in [{lo}, {hi}]')
  return seq_lengths


def check_tree_matches(where: str, arg: str, given: Any, expected: Any,
                       broadcast: bool = False):
  """Checks that ``given`` has the structure and leaf shapes of ``expected``
  (with ``broadcast``: shapes that broadcast to them), and floating leaves
  where ``expected`` has them (an integer carry would be truncated)."""
  g_def: Any  # jax's PyTreeDef (untyped for mypy)
  e_def: Any
  g_leaves, g_def = jax.tree_util.tree_flatten(given)
  e_leaves, e_def = jax.tree_util.tree_flatten(expected)
  if g_def != e_def:
    fail(where, arg, f'a pytree with structure {e_def}', f'structure {g_def}')
  for g, e in zip(g_leaves, e_leaves):
    scalar = broadcast and isinstance(g, (int, float)) and not isinstance(g, bool)
    if not scalar and (not hasattr(g, 'shape')
                       or not _shape_fits(tuple(g.shape), tuple(e.shape), broadcast)):
      got = [tuple(getattr(leaf, 'shape', ())) for leaf in g_leaves]
      fail(where, arg, f'leaf shapes {"that broadcast with " if broadcast else ""}'
           f'{[tuple(leaf.shape) for leaf in e_leaves]}', f'{got}')
  for g, e in zip(g_leaves, e_leaves):
    if (hasattr(g, 'dtype') and jnp.issubdtype(e.dtype, jnp.inexact)
        and not jnp.issubdtype(g.dtype, jnp.inexact)):
      fail(where, arg, f'floating leaves (dtype {e.dtype})',
           f'dtypes {[str(getattr(leaf, "dtype", "?")) for leaf in g_leaves]}', TypeError)


def _shape_fits(given: tuple[int, ...], expected: tuple[int, ...], broadcast: bool) -> bool:
  """Equal shapes, or with ``broadcast`` shapes that broadcast together either
  way (a carry for 8 rows stepped on one shared input row computes)."""
  if not broadcast:
    return given == expected
  return all(g == e or 1 in (g, e) for g, e in zip(given[::-1], expected[::-1]))
