"""Packing variable-length sequences into rows: ``pack_sequences`` / ``unpack_sequences``.

This is data preparation and runs on the host with NumPy (it decides a
layout, which jit cannot do with data-dependent shapes). Pack once per batch
in the input pipeline, then feed the packed batch and its segment ids to
``RNN`` / ``Bidirectional`` / ``StackedRNN`` as ``segment_ids``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nnx_recurrent import _checks


def _first_fit(lengths: np.ndarray, max_length: int, sort_by_length: bool):
  """Greedy first-fit bin packing: ``(row, offset)`` of every sequence, and the
  rows used.

  The lowest row with room is found in a max tree over the rows' free space
  (rows not yet opened are empty, so the first of them opens next): O(log n)
  a sequence, where scanning every open row was quadratic (80k sequences a
  row each: 2.3 s, 4x per doubling).
  """
  order = np.argsort(-lengths, kind='stable') if sort_by_length else np.arange(len(lengths))
  size = 1 << max(int(np.count_nonzero(lengths)) - 1, 0).bit_length()  # leaves: one a row
  free = [max_length] * (2 * size)  # the most free space of any row below each node
  row = np.full(len(lengths), -1, np.int64)
  offset = np.zeros(len(lengths), np.int64)
  rows = 0
  for i in order.tolist():
    n = int(lengths[i])
    if n == 0:
      continue
    k = 1
    while k < size:  # down to the leftmost leaf with room (the root has room: n <= max_length)
      k = 2 * k if free[2 * k] >= n else 2 * k + 1
    row[i], offset[i] = k - size, max_length - free[k]
    rows = max(rows, k - size + 1)
    free[k] -= n
    while k > 1:
      k //= 2
      free[k] = max(free[2 * k], free[2 * k + 1])
  return row, offset, rows


def _check_pad_value(pad_value: Any, dtype: np.dtype) -> None:
  """``pad_value`` is a real number that numeric sequences of ``dtype`` hold as
  itself (a bool too for bool sequences). NumPy would raise its own error for
  a string, overflow an int8, and turn NaN into an integer's minimum unasked."""
  where, boolean = 'pack_sequences', jnp.issubdtype(dtype, jnp.bool_)
  if not (boolean or jnp.issubdtype(dtype, jnp.number)):
    return  # strings, objects: NumPy's rules
  if not (_checks.is_real(pad_value) or (boolean and isinstance(pad_value, (bool, np.bool_)))):
    _checks.fail(where, 'pad_value', f'a real number (the sequences are {dtype})',
                 repr(pad_value), TypeError)
  value = pad_value.item() if hasattr(pad_value, 'item') else pad_value
  if jnp.issubdtype(dtype, jnp.inexact):  # NaN and inf are floats too; a finite value stays so
    largest = float(jnp.finfo(dtype).max)
    if (not isinstance(value, float) or math.isfinite(value)) and abs(value) > largest:
      _checks.fail(where, 'pad_value', f'a number of magnitude at most {largest:g} (the '
                   f'largest {dtype})', repr(pad_value))
    return
  low, high = (0, 1) if boolean else (int(jnp.iinfo(dtype).min), int(jnp.iinfo(dtype).max))
  if (isinstance(value, float) and not value.is_integer()) or not low <= value <= high:
    _checks.fail(where, 'pad_value', f'a whole number in [{low}, {high}] (the sequences are '
                 f'{dtype})', repr(pad_value))


def pack_sequences(
  sequences: Sequence[np.ndarray | jax.Array],
  max_length: int | None = None,
  num_rows: int | None = None,
  *,
  sort_by_length: bool = True,
  pad_value=0,
) -> tuple[np.ndarray, np.ndarray]:
  """Packs variable-length sequences into the rows of one batch.

  Greedy first-fit bin packing: sequences (longest first, unless
  ``sort_by_length=False`` keeps the given order) go into the first row with
  room left, a new row is opened when none has room. Sequence ``i`` gets the
  segment id ``i + 1`` (ids are unique in the whole batch, so
  :func:`unpack_sequences` can restore the original order); free positions get
  id ``0`` (padding) and ``pad_value``.

  Runs on the host with NumPy and returns NumPy arrays: it is data
  preparation, to be done in the input pipeline, not inside ``jit``.

  A packed segment computes what it would alone, with one exception in
  training: variational dropout samples one mask per *row*, so the segments
  packed into one row share their dropout masks.

  Example::

    >>> import numpy as np
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> seqs = [np.ones((n, 3), np.float32) for n in (5, 2, 3, 1)]
    >>> x, ids = nr.pack_sequences(seqs, max_length=6)
    >>> x.shape, ids
    ((2, 6, 3), array([[1, 1, 1, 1, 1, 4],
           [3, 3, 3, 2, 2, 0]], dtype=int32))
    >>> rnn = nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))
    >>> ys = nr.unpack_sequences(rnn(x, segment_ids=ids), ids)
    >>> [y.shape for y in ys]
    [(5, 4), (2, 4), (3, 4), (1, 4)]
    >>> bool(jnp.allclose(ys[1], rnn(seqs[1][None])[0]))  # as if run alone
    True

  Args:
    sequences: arrays shaped ``(length, *features)`` with equal ``features``
      (``length`` may be 0; ``features`` may be empty, e.g. token ids).
    max_length: the time axis of the packed batch (default: the longest
      sequence). A longer sequence is an error.
    num_rows: rows of the packed batch (default: as many as needed); extra
      rows are all padding, too few is an error.
    sort_by_length: place the longest sequences first (first-fit decreasing,
      fewer rows); ``False`` places them in the given order.
    pad_value: value of the padding positions: a real number that the
      sequences' dtype holds (a whole number in its range for integer
      sequences, no NaN; a number within a float dtype's range).

  Returns:
    ``(packed, segment_ids)``, where ``packed`` is ``(rows, max_length, *features)``
    in the sequences' common dtype; ``segment_ids`` is int32
    ``(rows, max_length)``.

  Raises:
    TypeError: ``pad_value`` is not a real number.
    ValueError: no sequences, a sequence without a time axis, mismatched
      feature shapes, a sequence longer than ``max_length``, more rows needed
      than ``num_rows``, or a ``pad_value`` the sequences' dtype does not hold.
  """
  where = 'pack_sequences'
  # (a string is a Sequence too: of characters, each an array without a time axis)
  if isinstance(sequences, (np.ndarray, jax.Array, str, bytes)) or not isinstance(
      sequences, Sequence):
    _checks.fail(where, 'sequences', 'a list of arrays', type(sequences).__name__, TypeError)
  if not sequences:
    _checks.fail(where, 'sequences', 'at least one array', 'an empty sequence')
  arrays = []
  for i, s in enumerate(sequences):
    if not _checks.is_concrete(s):
      _checks.fail(where, f'sequences[{i}]', 'concrete values (it packs on the host with NumPy: '
                   'call it outside jax.jit, in the input pipeline)',
                   'a traced array' if isinstance(s, jax.core.Tracer)
                   else "an array on other processes' devices", TypeError)
    try:
      arrays.append(np.asarray(s))
    except ValueError:  # nested lists of uneven lengths
      _checks.fail(where, f'sequences[{i}]', 'an array, or nested lists of even lengths, shaped '
                   '(length, *features)', f'a {type(s).__name__} of uneven lengths, which NumPy '
                   'cannot make one array of')
  features = arrays[0].shape[1:]
  for i, a in enumerate(arrays):
    if a.ndim < 1:
      _checks.fail(where, f'sequences[{i}]', 'an array with a time axis, shaped (length, '
                   '*features)', f'shape {a.shape}')
    if a.shape[1:] != features:
      _checks.fail(where, f'sequences[{i}]', f'shape (length, *{features}) like sequences[0]',
                   f'shape {a.shape}')
  dtype = np.result_type(*arrays)
  _check_pad_value(pad_value, dtype)
  lengths = np.array([a.shape[0] for a in arrays], np.int64)
  longest = int(lengths.max())
  if max_length is None:
    max_length = max(longest, 1)
  max_length = _checks.check_positive_int(where, 'max_length', max_length)
  if longest > max_length:
    _checks.fail(where, 'max_length', f'at least the longest sequence ({longest})', max_length)
  sort_by_length = _checks.check_bool(where, 'sort_by_length', sort_by_length)
  row, offset, needed = _first_fit(lengths, max_length, sort_by_length)
  if num_rows is None:
    num_rows = max(needed, 1)
  num_rows = _checks.check_positive_int(where, 'num_rows', num_rows)
  if needed > num_rows:
    _checks.fail(where, 'num_rows', f'at least the {needed} rows the sequences need '
                 f'at max_length={max_length}', num_rows)
  packed = np.full((num_rows, max_length, *features), pad_value, dtype)
  ids = np.zeros((num_rows, max_length), np.int32)
  for i, a in enumerate(arrays):
    if lengths[i]:
      span = slice(offset[i], offset[i] + lengths[i])
      packed[row[i], span] = a
      ids[row[i], span] = i + 1
  return packed, ids


_UNPACK_MAX_IDS = 1 << 16  # list entries unpack_sequences makes without num_sequences


def unpack_sequences(
  outputs: np.ndarray | jax.Array,
  segment_ids: np.ndarray | jax.Array,
  num_sequences: int | None = None,
) -> list:
  """Splits a packed batch back into its sequences, in their original order.

  The inverse of :func:`pack_sequences`: sequence ``i`` is the span of id
  ``i + 1``. The ids are read on the host; the values are gathered from
  ``outputs`` with one indexing operation, so a ``jax.Array`` stays a
  ``jax.Array`` (and differentiable), a NumPy array a NumPy array.

  Example::

    >>> import numpy as np
    >>> import nnx_recurrent as nr
    >>> seqs = [np.arange(n) for n in (3, 0, 2)]
    >>> packed, ids = nr.pack_sequences(seqs, max_length=5)
    >>> packed, ids
    (array([[0, 1, 2, 0, 1]]), array([[1, 1, 1, 3, 3]], dtype=int32))
    >>> nr.unpack_sequences(packed, ids, num_sequences=3)
    [array([0, 1, 2]), array([], dtype=int64), array([0, 1])]

  Args:
    outputs: ``(rows, time, *features)``, e.g. a layer's outputs on the
      packed batch.
    segment_ids: ``(rows, time)`` integers as made by :func:`pack_sequences`
      (each positive id one contiguous span of one row, ``0`` padding).
    num_sequences: how many sequences to return (default: the largest id,
      which must then be at most the larger of ``rows * time``, the number
      of positions, and 65536: with larger ids, from sequences numbered
      otherwise, pass it); sequences whose id does not occur (length 0) come
      back empty.

  Returns:
    A list of ``(length, *features)`` arrays.

  Raises:
    ValueError: mismatched shapes, an id that is negative or not one
      contiguous span of one row, or, without ``num_sequences``, one above
      that bound.
  """
  where = 'unpack_sequences'
  outputs = _checks.check_array(where, 'outputs', outputs)
  if outputs.ndim < 2:
    _checks.fail(where, 'outputs', 'at least 2 axes (rows, time, *features)',
                 f'shape {tuple(outputs.shape)}')
  if not _checks.is_concrete(segment_ids):
    _checks.fail(where, 'segment_ids', 'concrete values (it splits on the host: call it outside '
                 'jax.jit)', 'a traced array', TypeError)
  ids = np.asarray(segment_ids)
  if not np.issubdtype(ids.dtype, np.integer):
    _checks.fail(where, 'segment_ids', 'an integer array', f'dtype {ids.dtype}', TypeError)
  if ids.ndim != 2 or tuple(outputs.shape[:2]) != ids.shape:
    _checks.fail(where, 'segment_ids', f'shape (rows, time) = {tuple(outputs.shape[:2])} '
                 "(the first two axes of `outputs`)", f'shape {ids.shape}')
  if ids.size and ids.min() < 0:
    _checks.fail(where, 'segment_ids', 'non-negative ids', f'minimum {ids.min()}')
  rows, cols = np.nonzero(ids)  # row-major: time order within each row
  vals = ids[rows, cols]
  order = np.argsort(vals, kind='stable')
  rows, cols, vals = rows[order], cols[order], vals[order]
  same = vals[1:] == vals[:-1]
  broken = same & ((rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1] + 1))
  if broken.any():
    bad = int(vals[1:][broken][0])
    _checks.fail(where, 'segment_ids', 'each positive id in one contiguous span of one row '
                 '(ids from pack_sequences)', f'id {bad} in several spans')
  largest = int(vals[-1]) if vals.size else 0
  if num_sequences is None:
    # One list entry per id up to the largest: a bound on that list, so that
    # an id from elsewhere (a document id, 2**40) is not a huge allocation.
    # pack_sequences' ids pass: each of its sequences takes a position, but
    # the empty ones, which it numbers too (a few of them).
    bound = max(ids.size, _UNPACK_MAX_IDS)
    if largest > bound:
      _checks.fail(where, 'segment_ids', f'ids of at most {bound} without num_sequences (the '
                   f'larger of the number of positions, rows * time, and {_UNPACK_MAX_IDS})',
                   f'id {largest} (pass num_sequences, or number the sequences 1..N as '
                   'pack_sequences does)')
    num_sequences = largest
  elif isinstance(num_sequences, bool) or not isinstance(num_sequences, (int, np.integer)):
    _checks.fail(where, 'num_sequences', f'an int of at least the largest id ({largest})',
                 repr(num_sequences), TypeError)
  elif num_sequences < largest:
    _checks.fail(where, 'num_sequences', f'an int of at least the largest id ({largest})',
                 repr(num_sequences))
  if num_sequences == 0:
    return []
  counts = np.bincount(vals, minlength=num_sequences + 1)[1:]
  xp = jnp if isinstance(outputs, jax.Array) else np
  flat = outputs[rows, cols]
  return list(xp.split(flat, np.cumsum(counts)[:-1], axis=0))
