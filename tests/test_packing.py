"""Packed sequences (``segment_ids``) and ``pack_sequences`` / ``unpack_sequences``.

The references: every segment run alone — through the NumPy formula of the cell
(tests/reference.py) and through ``nr.RNN`` on a padded batch with one segment
per row (``seq_lengths``, itself checked against NumPy elsewhere).
"""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from fuzz._common import runs
from tests import reference
from tests.random_params import random_module

ATOL = 2e-5
IN, H = 3, 4
# Rows of 9 steps: segments of length 1..4, padding before, between and at
# the end, and equal ids that are *not* consecutive (1 after 0): two segments.
IDS = np.array([
  [1, 1, 1, 2, 0, 1, 1, 3, 3],
  [0, 0, 7, 7, 5, 5, 5, 5, 0],
], np.int32)


def _segments(ids):
  """``(row, start, end)`` of every segment of a ``(rows, time)`` id array."""
  return [(r, s, e) for r, row in enumerate(np.asarray(ids)) for s, e in runs(row)]


CELLS = {
  'SimpleCell': lambda rngs: nr.SimpleCell(IN, H, rngs=rngs),
  'LSTMCell': lambda rngs: nr.LSTMCell(IN, H, rngs=rngs),
  'OptimizedLSTMCell': lambda rngs: nr.OptimizedLSTMCell(IN, H, rngs=rngs),
  'GRUCell': lambda rngs: nr.GRUCell(IN, H, rngs=rngs),
  'MGUCell': lambda rngs: nr.MGUCell(IN, H, rngs=rngs),
  'ConvLSTMCell': lambda rngs: nr.ConvLSTMCell(IN, H, (3,), rngs=rngs),
}


_MADE = {}


def _rnn(name):
  """One randomised ``RNN`` per cell kind for the whole module, built abstractly and
  filled from NumPy (running the initializers compiles)."""
  if name not in _MADE:
    _MADE[name] = random_module(lambda: nr.RNN(CELLS[name](nnx.Rngs(0))))
  return _MADE[name]


MODES = ((False, False), (True, False), (True, True))  # (reverse, keep_order)


@nnx.jit
def _run_modes(rnn, x, initial_carry, segment_ids=None, seq_lengths=None):
  """``(carry, outputs)`` for every mode in ``MODES``, in one compilation."""
  return [rnn(x, initial_carry=initial_carry, segment_ids=segment_ids, seq_lengths=seq_lengths,
              reverse=rev, keep_order=keep, return_carry=True) for rev, keep in MODES]


def _inputs(cell, rows, time, seed=1):
  spatial = (5,) if isinstance(cell, nr.ConvLSTMCell) else ()
  return np.random.default_rng(seed).normal(size=(rows, time, *spatial, IN)).astype(np.float32)


def _start_carry(carry0, ids, r, s):
  """Where the segment of row ``r`` starting at ``s`` starts: the initial carry
  for the row's first segment, zeros (the default carry) for the others."""
  first = s == int(np.flatnonzero(np.asarray(ids)[r])[0])
  return jax.tree_util.tree_map(lambda a: np.asarray(a[r]) * first, carry0)


def _alone(rnn, x, ids, carry0):
  """Every segment as its own row of a padded batch, for every mode."""
  segs = _segments(ids)
  longest = max(e - s for _, s, e in segs)
  batch = np.zeros((len(segs), longest) + x.shape[2:], np.float32)
  for k, (r, s, e) in enumerate(segs):
    batch[k, : e - s] = x[r, s:e]
  c0 = jax.tree_util.tree_map(lambda *a: np.stack(a),
                              *[_start_carry(carry0, ids, r, s) for r, s, _ in segs])
  return _run_modes(rnn, batch, c0, seq_lengths=jnp.array([e - s for _, s, e in segs]))


# The segment resets live in the scan, for any cell: a tuple carry (LSTMCell), a
# single-array one (GRUCell) and a conv cell's feature axes. Every cell's step against
# NumPy: tests/test_cells.py::test_cell_matches_numpy_reference.
@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell', 'ConvLSTMCell'])
def test_packed_equals_segments_run_alone(name):
  rnn = _rnn(name)
  cell = rnn.cell
  x = _inputs(cell, *IDS.shape)
  step_shape = x[:, 0].shape
  # A random initial carry: the row's first segment starts from it, the others from zeros.
  rng = np.random.default_rng(5)
  carry0 = jax.tree_util.tree_map(lambda c: rng.normal(size=c.shape).astype(np.float32),
                                  cell.initialize_carry(step_shape))
  packed = _run_modes(rnn, x, carry0, segment_ids=IDS)
  # Through nr.RNN too, for two cells (each call compiles: keep the suite fast).
  alone = _alone(rnn, x, IDS, carry0) if name in ('LSTMCell', 'GRUCell') else None
  p = reference.cell_params(cell)
  for m, (reverse, keep_order) in enumerate(MODES):
    carry, ys = jax.tree_util.tree_map(np.asarray, packed[m])
    last = {}
    for k, (r, s, e) in enumerate(_segments(IDS)):
      if alone:
        np.testing.assert_allclose(ys[r, s:e], alone[m][1][k, : e - s], atol=ATOL)
      # The NumPy formula on the segment alone.
      seq = x[r, s:e][::-1] if reverse else x[r, s:e]
      c, ref = reference.run_sequence(p, _start_carry(carry0, IDS, r, s), seq)
      if reverse and keep_order:
        ref = ref[::-1]
      np.testing.assert_allclose(ys[r, s:e], np.stack(ref), atol=ATOL)
      last[r] = (k, c)
    # Padding outputs are zero.
    np.testing.assert_array_equal(ys[IDS == 0], 0)
    # The returned carry: the end of each row's last segment (in processing order).
    for r, (k, c) in last.items():
      for i, (got, want) in enumerate(zip(jax.tree_util.tree_leaves(carry),
                                          jax.tree_util.tree_leaves(c))):
        np.testing.assert_allclose(got[r], want, atol=ATOL)
        if alone:
          np.testing.assert_allclose(got[r], jax.tree_util.tree_leaves(alone[m][0])[i][k],
                                     atol=ATOL)


def test_numpy_int64_ids_beyond_int32_stay_distinct():
  # jax narrows NumPy's int64 to int32 (x64 off): 2**40 + 7 would wrap to 7 (one
  # segment with the 7s after it) and 2**40, 2**41 to 0 (padding). NumPy ids are
  # relabelled on the host first. An RNN and the fused GRU against the NumPy
  # reference of each segment alone, in every mode, outputs and carry.
  big = 2**40
  ids = np.array([[big + 7] * 3 + [7] * 3, [0, big, big, 2 * big, 2 * big, 0]], np.int64)
  rnn = _rnn('GRUCell')
  gru = random_module(lambda: nr.GRU(IN, H, rngs=nnx.Rngs(0)))
  x = _inputs(rnn.cell, *ids.shape)
  # The ids are constants of the trace, as given: one compilation.
  got = nnx.jit(lambda rnn, gru: [m(x, segment_ids=ids, reverse=rev, keep_order=keep,
                                    return_carry=True)
                                  for m in (rnn, gru) for rev, keep in MODES])(rnn, gru)
  segments = [(0, 0, 3), (0, 3, 6), (1, 1, 3), (1, 3, 5)]
  assert _segments(ids) == segments
  for k, cell in enumerate((rnn.cell, gru.forward[0])):
    p = reference.cell_params(cell)
    for m, (reverse, keep_order) in enumerate(MODES):
      carry, ys = map(np.asarray, got[k * len(MODES) + m])
      last = {}
      for r, s, e in segments:
        c, want = reference.run_sequence(p, np.zeros(H), x[r, s:e][::-1] if reverse else x[r, s:e])
        np.testing.assert_allclose(ys[r, s:e], np.stack(want[::-1] if keep_order else want),
                                   atol=ATOL)
        last[r] = c
      np.testing.assert_array_equal(ys[ids == 0], 0)
      for r, c in last.items():  # the carry: the end of each row's last segment
        np.testing.assert_allclose(carry[r], c, atol=ATOL)


def test_a_lower_precision_initial_carry_keeps_its_dtype_across_segment_resets():
  # A bfloat16 carry for a float32 cell: the later segments restart from the
  # default (float32) carry cast to the carry's dtype, as each step rounds it.
  rnn = _rnn('GRUCell')
  x = _inputs(rnn.cell, *IDS.shape)
  carry0 = np.random.default_rng(5).normal(size=(IDS.shape[0], H)).astype(np.float32)
  carry, ys = nnx.jit(lambda rnn: rnn(x, initial_carry=jnp.asarray(carry0, jnp.bfloat16),
                                      segment_ids=IDS, return_carry=True))(rnn)
  assert carry.dtype == jnp.bfloat16
  bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)  # noqa: E731
  p = reference.cell_params(rnn.cell)
  for r, s, e in _segments(IDS):
    h = bf16(_start_carry(carry0, IDS, r, s))
    for t in range(s, e):  # the NumPy formula, the carry rounded at every step
      new, y = reference.step(p, h, x[r, t])
      np.testing.assert_allclose(ys[r, t], y, atol=2e-2)
      h = bf16(new)
  np.testing.assert_array_equal(np.asarray(ys)[IDS == 0], 0)
  np.testing.assert_allclose(np.asarray(carry, np.float64)[1], h, atol=2e-2)


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])
def test_a_numpy_float64_initial_carry_runs_packed_without_a_warning(name):
  # Without x64 JAX holds a NumPy float64 carry as float32: the later segments
  # restart from zeros in that dtype, with no warning about a float64 it
  # cannot make (as without segment_ids).
  if jax.config.jax_enable_x64:
    pytest.skip('a float64 carry is float64 under x64')
  rnn = _rnn(name)
  x = _inputs(rnn.cell, *IDS.shape)
  rng = np.random.default_rng(5)
  carry0 = jax.tree_util.tree_map(lambda _: rng.normal(size=(IDS.shape[0], H)),
                                  rnn.cell.initialize_carry(x[:, 0].shape))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    carry, ys = rnn(x, initial_carry=carry0, segment_ids=IDS, return_carry=True)
  assert {a.dtype for a in jax.tree_util.tree_leaves(carry)} == {jnp.dtype(jnp.float32)}
  p = reference.cell_params(rnn.cell)
  for r, s, e in _segments(IDS):
    c = _start_carry(carry0, IDS, r, s)
    for t in range(s, e):
      c, y = reference.step(p, c, x[r, t])
      np.testing.assert_allclose(ys[r, t], y, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(ys)[IDS == 0], 0)
  np.testing.assert_allclose(np.asarray(jax.tree_util.tree_leaves(carry)[-1])[1],
                             jax.tree_util.tree_leaves(c)[-1], atol=ATOL)


def test_consecutive_equal_ids_form_one_segment():
  # [1 1 2 2] is two segments, [1 1 1 1] one: the second half differs.
  rnn = _rnn('GRUCell')
  x = np.tile(_inputs(rnn.cell, 1, 2), (1, 2, 1))
  two, one = (np.asarray(a) for a in nnx.jit(lambda rnn: (  # one program
    rnn(x, segment_ids=np.array([[1, 1, 2, 2]])), rnn(x, segment_ids=np.array([[1, 1, 1, 1]]))))(
      rnn))
  np.testing.assert_allclose(two[0, 2:], two[0, :2], atol=ATOL)  # restarted
  assert np.abs(one[0, 2:] - two[0, 2:]).min() > 1e-4  # continued


@pytest.mark.parametrize('time_major', [False, True])
def test_bidirectional_reverses_within_segments(time_major):
  bi = nr.Bidirectional(_rnn('LSTMCell'), _rnn('GRUCell'))
  x = _inputs(bi.forward_rnn.cell, *IDS.shape)
  xt, idt = (np.swapaxes(x, 0, 1), IDS.T) if time_major else (x, IDS)
  (cf, cb), ys = nnx.jit(lambda bi: bi(xt, segment_ids=idt, time_major=time_major,
                                       return_carry=True))(bi)
  ys = np.asarray(ys)
  if time_major:
    ys = np.swapaxes(ys, 0, 1)
  pf = reference.cell_params(bi.forward_rnn.cell)
  pb = reference.cell_params(bi.backward_rnn.cell)
  zeros = np.zeros(H)
  for r, s, e in _segments(IDS):
    hf = np.stack(reference.run_sequence(pf, (zeros, zeros), x[r, s:e])[1])
    hb = np.stack(reference.run_sequence(pb, zeros, x[r, s:e][::-1])[1])[::-1]
    np.testing.assert_allclose(ys[r, s:e], np.concatenate([hf, hb], -1), atol=ATOL)
  np.testing.assert_array_equal(np.asarray(ys)[IDS == 0], 0)
  # Row 1 ends with segment 5 at [4, 8): its backward carry saw x[1, 7..4].
  hb_last = reference.run_sequence(pb, zeros, x[1, 4:8][::-1])[0]
  np.testing.assert_allclose(cb[1], hb_last, atol=ATOL)


def test_several_batch_axes_and_jit():
  rnn = nr.RNN(_rnn('SimpleCell').cell, reverse=True)
  ids = np.stack([IDS, IDS[::-1, ::-1]])  # (2, 2, time); not symmetric in its batch axes
  x = _inputs(rnn.cell, 4, IDS.shape[1]).reshape(2, 2, IDS.shape[1], IN)
  # Both in one program (eager packed calls: tests/test_dropin.py, tests/test_multihost.py).
  ys, flat = nnx.jit(lambda m, x, ids: (
    m(x, segment_ids=ids), m(x.reshape(4, -1, IN), segment_ids=ids.reshape(4, -1))))(rnn, x, ids)
  flat = np.asarray(flat)
  np.testing.assert_allclose(ys.reshape(4, -1, H), flat, atol=ATOL)
  p = reference.cell_params(rnn.cell)
  for r, s, e in _segments(ids.reshape(4, -1)):
    ref = np.stack(reference.run_sequence(p, np.zeros(H), x.reshape(4, -1, IN)[r, s:e][::-1])[1])
    np.testing.assert_allclose(flat[r, s:e], ref, atol=ATOL)


def test_packed_runs_under_strict_dtype_promotion():
  # jax_numpy_dtype_promotion='strict' refuses implicit promotions; the
  # segment masks compared an int32 count with the bool mask (bool > int32).
  rnn = _rnn('GRUCell')
  lstm = nr.LSTM(IN, H, implementation='xla', rngs=nnx.Rngs(0))
  x = _inputs(rnn.cell, *IDS.shape)
  with jax.numpy_dtype_promotion('strict'):
    ys = rnn(x, segment_ids=IDS)
    # The fused layer's hand-written backward reads the masks again.
    grads = nnx.grad(lambda m, x: m(x, segment_ids=IDS).sum(), argnums=1)(lstm, x)
  p = reference.cell_params(rnn.cell)
  for r, s, e in _segments(IDS):
    ref = np.stack(reference.run_sequence(p, np.zeros(H), x[r, s:e])[1])
    np.testing.assert_allclose(np.asarray(ys)[r, s:e], ref, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(grads)[IDS == 0], 0)
  assert np.isfinite(np.asarray(grads)).all() and np.abs(np.asarray(grads)[IDS != 0]).max() > 0


def test_segment_id_errors():
  rnn = _rnn('SimpleCell')
  x = jnp.ones((2, 9, IN))
  with pytest.raises(ValueError, match=r'RNN: `segment_ids` expected None when seq_lengths'):
    rnn(x, segment_ids=IDS, seq_lengths=jnp.array([9, 9]))
  with pytest.raises(ValueError, match=r'RNN: `segment_ids` expected shape \(\*batch, time\) '
                     r'= \(2, 9\), got shape \(9, 2\)'):
    rnn(x, segment_ids=IDS.T)
  with pytest.raises(ValueError, match=r'RNN: `segment_ids` expected shape \(time, \*batch\) '
                     r'= \(9, 2\), got shape \(2, 9\)'):
    rnn(jnp.swapaxes(x, 0, 1), segment_ids=IDS, time_major=True)
  with pytest.raises(ValueError, match=r'RNN: `segment_ids` expected an integer array .* '
                     r'got dtype float32'):
    rnn(x, segment_ids=IDS.astype(np.float32))
  with pytest.raises(ValueError, match=r'`segment_ids` expected non-negative .* got minimum -7'):
    rnn(x, segment_ids=-IDS)
  with pytest.raises(ValueError, match=re.escape(  # the boundary: -1 is no padding either
      'RNN: `segment_ids` expected non-negative ids (0 = padding), got minimum -1.')):
    rnn(x, segment_ids=IDS - 1)
  with pytest.raises(ValueError, match=re.escape(  # NumPy's int64 read before jax wraps it to 1
      'RNN: `segment_ids` expected non-negative ids (0 = padding), got minimum -1099511627775.')):
    rnn(x, segment_ids=np.where(IDS == 1, 1 - 2**40, IDS.astype(np.int64)))
  bi = nr.Bidirectional(_rnn('LSTMCell'), _rnn('GRUCell'))
  with pytest.raises(ValueError, match=r'`segment_ids` expected an integer array'):
    bi(x, segment_ids=IDS == 1)



def test_an_empty_packed_batch_returns_the_given_carry():
  # No step (time 0) and no segment id: nothing to check the ids' minimum of.
  h0 = jnp.arange(2 * H, dtype=jnp.float32).reshape(2, H)
  carry, y = _rnn('SimpleCell')(jnp.ones((2, 0, IN)), initial_carry=h0,
                                segment_ids=np.zeros((2, 0), np.int32), return_carry=True)
  np.testing.assert_array_equal(carry, h0)
  assert y.shape == (2, 0, H)
  # unpack_sequences of it: no id occurs (nor any minimum to check), every sequence is empty.
  assert nr.unpack_sequences(y, np.zeros((2, 0), np.int32)) == []
  back = nr.unpack_sequences(y, np.zeros((2, 0), np.int32), num_sequences=2)
  assert [(type(b), b.shape) for b in back] == [(type(y), (0, H))] * 2

# -- pack_sequences / unpack_sequences ------------------------------------------
def test_pack_first_fit_layout():
  seqs = [np.full((n, 2), i, np.float32) for i, n in enumerate((2, 5, 3, 1, 4))]
  x, ids = nr.pack_sequences(seqs, max_length=6)
  # Longest first: 5 -> row 0; 4 -> row 1; 3 -> row 2; 2 -> row 1; 1 -> row 0.
  np.testing.assert_array_equal(ids, [[2, 2, 2, 2, 2, 4],
                                      [5, 5, 5, 5, 1, 1],
                                      [3, 3, 3, 0, 0, 0]])
  assert x.dtype == np.float32 and x.shape == (3, 6, 2)
  np.testing.assert_array_equal(x[..., 0], np.where(ids > 0, ids - 1, 0))
  _, ids = nr.pack_sequences(seqs, max_length=6, sort_by_length=False, num_rows=4)
  np.testing.assert_array_equal(ids, [[1, 1, 3, 3, 3, 4],
                                      [2, 2, 2, 2, 2, 0],
                                      [5, 5, 5, 5, 0, 0],
                                      [0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize('sort_by_length', [True, False])
def test_pack_places_every_sequence_in_the_first_row_with_room(sort_by_length):
  """The layout against first-fit written plainly (each sequence in the lowest
  row with room, a new row when none has): many rows, near-full ones, empty
  sequences."""
  rng = np.random.default_rng(5)
  for lengths, max_length in ((rng.integers(0, 9, size=300), 8),
                              (rng.integers(40, 51, size=200), 50),
                              (rng.integers(0, 30, size=500), 64)):
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort_by_length \
      else range(len(lengths))
    free: list[int] = []
    want = np.zeros((0, max_length), np.int32)
    for i in order:
      n = int(lengths[i])
      if n == 0:
        continue
      r = next((r for r, f in enumerate(free) if f >= n), len(free))
      if r == len(free):
        free.append(max_length)
        want = np.concatenate([want, np.zeros((1, max_length), np.int32)])
      start = max_length - free[r]
      want[r, start:start + n] = i + 1
      free[r] -= n
    _, ids = nr.pack_sequences([np.zeros(n) for n in lengths], max_length=max_length,
                               sort_by_length=sort_by_length)
    np.testing.assert_array_equal(ids, want)


def test_pack_sequences_of_equal_length_keep_their_given_order():
  # First-fit decreasing with a stable sort: among equal lengths the given order
  # decides, the same layout everywhere (NumPy's default argsort, an introsort,
  # reorders these ties). Lengths 2 go two a row, then the 1s fill the last row.
  lengths = [2, 2, 1, 2, 2, 1, 2, 2, 1, 2, 2]
  _, ids = nr.pack_sequences([np.zeros(n) for n in lengths], max_length=4)
  np.testing.assert_array_equal(ids, [[1, 1, 2, 2],
                                      [4, 4, 5, 5],
                                      [7, 7, 8, 8],
                                      [10, 10, 11, 11],
                                      [3, 6, 9, 0]])


def test_pack_unpack_round_trip():
  rng = np.random.default_rng(0)
  lengths = list(rng.integers(0, 12, size=40)) + [12, 0]
  seqs = [rng.normal(size=(n, 2, 3)) for n in lengths]
  x, ids = nr.pack_sequences(seqs, pad_value=-1.0)
  assert x.shape[1] == 12 and ids.dtype == np.int32
  assert -(-sum(lengths) // 12) <= x.shape[0] < len(lengths)
  assert (ids > 0).sum() == sum(lengths)
  assert (x[ids == 0] == -1).all()
  # Every id is one contiguous span of one row with the sequence's length.
  for r, s, e in _segments(ids):
    np.testing.assert_array_equal(x[r, s:e], seqs[ids[r, s] - 1])
  back = nr.unpack_sequences(x, ids, num_sequences=len(seqs))
  assert len(back) == len(seqs)
  for a, b in zip(back, seqs):
    np.testing.assert_array_equal(a, b)
  # Token ids: no feature axes.
  toks = [np.arange(n) for n in (3, 1, 2)]
  packed, tids = nr.pack_sequences(toks, max_length=3)
  np.testing.assert_array_equal(packed, [[0, 1, 2], [0, 1, 0]])
  np.testing.assert_array_equal(tids, [[1, 1, 1], [3, 3, 2]])
  assert [list(t) for t in nr.unpack_sequences(packed, tids)] == [[0, 1, 2], [0], [0, 1]]


def test_pack_rnn_unpack_equals_separate_runs():
  rnn = _rnn('OptimizedLSTMCell')
  cell = rnn.cell
  rng = np.random.default_rng(2)
  seqs = [rng.normal(size=(n, IN)).astype(np.float32) for n in (6, 1, 3, 4, 2, 5)]
  x, ids = nr.pack_sequences(seqs, max_length=8)
  ys = nr.unpack_sequences(nnx.jit(lambda m, x, i: m(x, segment_ids=i))(rnn, x, ids), ids)
  assert all(isinstance(y, jax.Array) for y in ys)
  p = reference.cell_params(cell)
  zeros = np.zeros(H)
  for y, seq in zip(ys, seqs):
    np.testing.assert_allclose(y, np.stack(reference.run_sequence(p, (zeros, zeros), seq)[1]),
                               atol=ATOL)

  # unpack keeps gradients flowing into the packed outputs.
  def loss(out):
    return nr.unpack_sequences(out, ids)[2].sum()

  g = jax.jit(jax.grad(loss))(jnp.ones(x.shape[:2] + (H,)))
  np.testing.assert_array_equal(g[..., 0], (ids == 3).astype(np.float32))


def test_pack_only_empty_sequences_and_mixed_dtypes():
  # Only empty sequences: one row of length 1, all padding; unpack gives them back empty.
  x, ids = nr.pack_sequences([np.zeros((0, 2), np.float32)] * 2, pad_value=7)
  np.testing.assert_array_equal(x, np.full((1, 1, 2), 7, np.float32))
  np.testing.assert_array_equal(ids, [[0]])
  back = nr.unpack_sequences(x, ids, num_sequences=2)
  assert [b.shape for b in back] == [(0, 2), (0, 2)]
  assert nr.unpack_sequences(x, ids) == []  # no id occurs: no sequence
  # The common dtype of all sequences, not the first one's: no value is truncated.
  x, ids = nr.pack_sequences([np.arange(2), np.array([0.5, 1.5])], max_length=4)
  assert x.dtype == np.float64
  np.testing.assert_array_equal(x, [[0, 1, 0.5, 1.5]])
  np.testing.assert_array_equal(ids, [[1, 1, 2, 2]])


def test_pack_unpack_errors():
  seqs = [np.ones((3, 2)), np.ones((5, 2))]
  with pytest.raises(ValueError, match=r'pack_sequences: `max_length` expected at least the '
                     r'longest sequence \(5\), got 4'):
    nr.pack_sequences(seqs, max_length=4)
  with pytest.raises(ValueError, match=r'`num_rows` expected at least the 2 rows .* got 1'):
    nr.pack_sequences(seqs, max_length=5, num_rows=1)
  with pytest.raises(ValueError, match=r'`sequences\[1\]` expected shape \(length, \*\(2,\)\) '
                     r'like sequences\[0\], got shape \(5, 3\)'):
    nr.pack_sequences([np.ones((3, 2)), np.ones((5, 3))])
  with pytest.raises(ValueError, match=r'`sequences` expected at least one array'):
    nr.pack_sequences([])
  with pytest.raises(TypeError, match=r'`sequences` expected a list of arrays, got ndarray'):
    nr.pack_sequences(np.ones((2, 3)))
  with pytest.raises(TypeError, match=r'`sequences` expected a list of arrays, got str'):
    nr.pack_sequences('abc')  # a Sequence of characters
  with pytest.raises(TypeError, match=r'`sequences` expected a list of arrays, got bytes'):
    nr.pack_sequences(b'abc')  # a Sequence of ints
  for scalar_first in (False, True):  # a scalar has no length, wherever it is
    seqs_0d = [np.arange(3), np.float32(1)][::-1 if scalar_first else 1]
    with pytest.raises(ValueError, match=rf'^pack_sequences: `sequences\[{1 - scalar_first}\]` '
                       r'expected an array with a time axis, shaped \(length, \*features\), got '
                       r'shape \(\)\.$'):
      nr.pack_sequences(seqs_0d)
  # Nested lists of uneven lengths, and traced arrays: NumPy's and jax's own errors
  # ("inhomogeneous shape", TracerArrayConversionError) named no argument before.
  with pytest.raises(ValueError, match=r'^pack_sequences: `sequences\[1\]` expected an array, or '
                     r'nested lists of even lengths, shaped \(length, \*features\), got a list of '
                     r'uneven lengths, which NumPy cannot make one array of\.$'):
    nr.pack_sequences([[[1.0, 2.0]], [[1.0, 2.0], [3.0]]])
  with pytest.raises(TypeError, match=r'^pack_sequences: `sequences\[0\]` expected concrete '
                     r'values \(it packs on the host.*call it outside jax.jit.*got a traced '
                     r'array\.'):  # (jax appends its traceback note)
    jax.jit(lambda a: nr.pack_sequences([a])[0])(jnp.ones((3, 2)))
  with pytest.raises(ValueError, match=r'pack_sequences: `max_length` expected a positive int, '
                     r'got 0'):
    nr.pack_sequences([np.ones((0, 2))], max_length=0)  # fits, but no time axis of size 0
  with pytest.raises(TypeError, match=r'pack_sequences: `num_rows` expected a positive int, '
                     r'got True'):
    nr.pack_sequences(seqs[:1], num_rows=True)
  out = np.zeros((2, 4, 3))
  with pytest.raises(ValueError, match=r'unpack_sequences: `segment_ids` expected each positive '
                     r'id in one contiguous span of one row .* got id 1 in several spans'):
    nr.unpack_sequences(out, np.array([[1, 1, 2, 2], [1, 1, 0, 0]]))
  with pytest.raises(ValueError, match=r'got id 1 in several spans'):  # two spans of one row
    nr.unpack_sequences(out, np.array([[1, 0, 1, 2], [0, 0, 0, 0]]))
  with pytest.raises(ValueError, match=r'got id 2 in several spans'):  # rows 0 and 1, columns 1, 2
    nr.unpack_sequences(out, np.array([[1, 2, 0, 0], [0, 0, 2, 0]]))
  with pytest.raises(TypeError, match=r'unpack_sequences: `segment_ids` expected an integer '
                     r'array, got dtype float32'):
    nr.unpack_sequences(out, np.array([[1, 1, 2, 2], [0, 0, 0, 0]], np.float32))
  with pytest.raises(ValueError, match=r'unpack_sequences: `segment_ids` expected non-negative '
                     r'ids, got minimum -1'):
    nr.unpack_sequences(out, np.array([[1, 1, -1, 0], [0, 0, 0, 0]]))
  with pytest.raises(ValueError, match=r'`segment_ids` expected shape \(rows, time\) = '
                     r'\(2, 4\) .* got shape \(4, 2\)'):
    nr.unpack_sequences(out, np.zeros((4, 2), np.int32))
  # Outputs without a time axis: named as such (not "expected shape (rows, time) = (4,), got
  # shape (4,)", the first two axes of a 1-D array read as (rows, time)).
  for flat in (np.zeros(4), np.zeros(())):
    with pytest.raises(ValueError, match=re.escape(
        'unpack_sequences: `outputs` expected at least 2 axes (rows, time, *features), got '
        f'shape {flat.shape}.')):
      nr.unpack_sequences(flat, np.ones(flat.shape, np.int32))
  with pytest.raises(ValueError, match=r'`num_sequences` expected an int of at least the largest '
                     r'id \(2\), got 1'):
    nr.unpack_sequences(out, np.array([[1, 1, 2, 2], [0, 0, 0, 0]]), num_sequences=1)
  # Not an int at all: a TypeError (a bool is not a count; nor is a string).
  with pytest.raises(TypeError, match=r'`num_sequences` expected an int of at least the largest '
                     r'id \(1\), got True'):
    nr.unpack_sequences(out, np.array([[1, 1, 0, 0], [0, 0, 0, 0]]), num_sequences=True)
  with pytest.raises(TypeError, match=r"`num_sequences` expected an int .*, got '2'"):
    nr.unpack_sequences(out, np.array([[1, 1, 0, 0], [0, 0, 0, 0]]), num_sequences='2')


def test_unpack_without_num_sequences_takes_ids_up_to_a_bound():
  """The default ``num_sequences`` is the largest id, one list entry per id up
  to it: at most the larger of ``rows * time`` and 65536, so an id of 2**40
  is a ValueError, not an 8 TiB allocation; pack_sequences' own ids pass."""
  out = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
  some = np.array([[6, 6, 0], [2, 0, 0]])
  back = nr.unpack_sequences(out, some)
  empty = out[0, :0]
  want = [empty, out[1, :1], empty, empty, empty, out[0, :2]]  # ids 2 and 6 occur
  assert len(back) == 6
  for a, b in zip(back, want):
    np.testing.assert_array_equal(a, b)
  assert len(nr.unpack_sequences(out, np.array([[2**16, 2**16, 0], [2, 0, 0]]))) == 2**16
  for largest in (2**16 + 1, 2**40):
    above = np.array([[largest, largest, 0], [2, 0, 0]])
    with pytest.raises(ValueError, match=r'^unpack_sequences: `segment_ids` expected ids of at '
                       r'most 65536 without num_sequences \(the larger of the number of '
                       r'positions, rows \* time, and 65536\), got id '
                       rf'{largest} \(pass num_sequences, or number the sequences 1\.\.N as '
                       r'pack_sequences does\)\.$'):
      nr.unpack_sequences(out, above)
  # More positions than 65536: ids up to their number pass, one above it does not.
  many = np.zeros((2, 2**15 + 2), np.int32)
  many[1, -2:] = many.size  # 65540
  values = np.arange(many.size, dtype=np.float32).reshape(*many.shape, 1)
  back = nr.unpack_sequences(values, many)
  assert len(back) == many.size and all(a.shape == (0, 1) for a in back[:-1])
  np.testing.assert_array_equal(back[-1], [[many.size - 2], [many.size - 1]])
  many[1, -2:] = many.size + 1
  with pytest.raises(ValueError, match=r'`segment_ids` expected ids of at most 65540 without '
                     r'num_sequences .*, got id 65541 '):
    nr.unpack_sequences(values, many)
  # pack_sequences numbers empty sequences too: its round trip needs no num_sequences.
  seqs = [np.zeros((0, 1), np.float32)] * 3 + [np.ones((1, 1), np.float32)]
  x, ids = nr.pack_sequences(seqs)
  np.testing.assert_array_equal(ids, [[4]])
  back = nr.unpack_sequences(x, ids)
  assert [a.shape for a in back] == [(0, 1)] * 3 + [(1, 1)]
  np.testing.assert_array_equal(back[3], seqs[3])


def test_pack_pad_value_is_a_number_the_sequences_dtype_holds():
  ints8 = [np.arange(3, dtype=np.int8)]
  for pad, seqs, want in [
    (-1, ints8, [0, 1, 2, -1, -1]),
    (np.float32(2.0), ints8, [0, 1, 2, 2, 2]),  # a whole float is the int
    (2**63 - 1, [np.arange(3)], [0, 1, 2, 2**63 - 1, 2**63 - 1]),  # exactly, not via a float
    (True, [np.array([False, True, False])], [False, True, False, True, True]),
    (np.nan, [np.arange(3, dtype=np.float32)], [0, 1, 2, np.nan, np.nan]),
    (jnp.array(-np.inf), [np.arange(3, dtype=np.float16)], [0, 1, 2, -np.inf, -np.inf]),
    # The ends of each dtype's range are in it: the default 0 of uint8 tokens and of bool
    # masks, int8's minimum, float16's largest finite value.
    (0, [np.array([3, 1, 2], np.uint8)], [3, 1, 2, 0, 0]),
    (False, [np.array([True, True, True])], [True, True, True, False, False]),
    (-128, ints8, [0, 1, 2, -128, -128]),
    (-65504.0, [np.arange(3, dtype=np.float16)], [0, 1, 2, -65504, -65504]),
    # A NumPy bool for bool sequences; complex sequences take a real pad (finfo's range);
    # strings are NumPy's business.
    (np.bool_(True), [np.array([False, False, False])], [False, False, False, True, True]),
    (-1, [np.arange(3, dtype=np.complex64) * 1j], [0, 1j, 2j, -1, -1]),
    ('', [np.array(['a', 'b', 'c'])], ['a', 'b', 'c', '', '']),
  ]:
    x, _ = nr.pack_sequences(seqs, max_length=5, pad_value=pad)
    assert x.dtype == seqs[0].dtype
    np.testing.assert_array_equal(x[0], np.array(want, seqs[0].dtype))
  floats = [np.ones((2, 3), np.float32)]
  for pad, seqs, exc, message in [
    ('x', floats, TypeError, r"a real number \(the sequences are float32\), got 'x'"),
    (None, floats, TypeError, r'a real number \(the sequences are float32\), got None'),
    (np.ones(3), floats, TypeError, r'a real number .*, got array\(\[1\., 1\., 1\.\]\)'),
    (True, ints8, TypeError, r'a real number \(the sequences are int8\), got True'),
    (1000, ints8, ValueError, r'a whole number in \[-128, 127\] \(the sequences are int8\), '
     r'got 1000'),
    (np.nan, [np.arange(3)], ValueError, r'a whole number in \[-9223372036854775808, '
     r'9223372036854775807\] \(the sequences are int64\), got nan'),
    (0.5, [np.arange(3)], ValueError, r'a whole number in .*, got 0\.5'),
    (2, [np.array([True])], ValueError, r'a whole number in \[0, 1\] \(the sequences are '
     r'bool\), got 2'),
    (1e5, [np.ones(2, np.float16)], ValueError, r'a number of magnitude at most 65504 \(the '
     r'largest float16\), got 100000\.0'),
    (10**400, floats, ValueError, r'a number of magnitude at most 3\.40282e\+38 \(the largest '
     r'float32\), got 1000\d+'),  # an int no float holds: not Python's OverflowError
  ]:
    with pytest.raises(exc, match=rf'^pack_sequences: `pad_value` expected {message}\.$'):
      nr.pack_sequences(seqs, max_length=5, pad_value=pad)


def test_a_negative_id_under_jit_is_one_more_segment():
  # Documented: under jit a negative id is not caught and acts as one more segment
  # (not as padding). Reference: flax.nnx's RNN over each segment alone.
  cell = nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(1, 5, 3)).astype(np.float32)
  ids = np.array([[1, 1, -1, -1, -1]], np.int32)
  ys = nnx.jit(lambda rnn, x, ids: rnn(x, segment_ids=ids))(nr.RNN(nnx.clone(cell)), x, ids)
  theirs = nnx.RNN(cell)
  np.testing.assert_allclose(ys, np.concatenate([theirs(x[:, :2]), theirs(x[:, 2:])], 1),
                             atol=1e-6)
