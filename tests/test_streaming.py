"""Streaming: a sequence run in chunks, each chunk starting from the carry the
previous one returned (with each chunk's own lengths), equals one call on the
whole sequence: outputs and final carry, for every sequence layer that runs
forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from nnx_recurrent._fused import internal
from tests import reference as ref
from tests import test_cudnn
from tests.test_fused import build

B, T, IN, H = 3, 7, 3, 4
LENGTHS = np.array([7, 4, 0])
SPLITS = [(1, 6), (3, 3, 1)]  # chunks of 1 to 6 steps; rows ending mid-chunk


LAYERS = {  # name -> (rngs -> layer, features of one step)
  'RNN(LayerNormLSTMCell)': (lambda rngs: nr.RNN(nr.LayerNormLSTMCell(IN, H, rngs=rngs)), (IN,)),
  'RNN(GRUCell, zoneout, eval)': (
    lambda rngs: nr.RNN(nr.GRUCell(IN, H, zoneout_rate=0.3, rngs=rngs)), (IN,)),
  'RNN(LayerNormGRUCell, learned carry)': (
    lambda rngs: nr.RNN(nr.LayerNormGRUCell(IN, H, rngs=rngs), learn_initial_carry=True), (IN,)),
  'RNN(ConvGRUCell)': (lambda rngs: nr.RNN(nr.ConvGRUCell(IN, H, (3,), rngs=rngs)), (5, IN)),
  'StackedRNN': (lambda rngs: nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=rngs)),
                                            nr.RNN(nr.OptimizedLSTMCell(H, H, rngs=rngs)),
                                            dropout_rate=0.2, rngs=rngs), (IN,)),
  'LSTM(2 layers)': (lambda rngs: nr.LSTM(IN, H, num_layers=2, dropout_rate=0.2, rngs=rngs),
                     (IN,)),
  'GRU': (lambda rngs: nr.GRU(IN, H, rngs=rngs), (IN,)),
  # The Pallas kernels, interpreted on the CPU, and the projected carry (c: H, h: P).
  'LSTM(pallas, projected)': (lambda rngs: nr.LSTM(IN, H, proj_features=2,
                                                   implementation='pallas', rngs=rngs), (IN,)),
  # cuDNN's path, its primitive run by jax.experimental.rnn's reference (no GPU here).
  'LSTM(cudnn)': (lambda rngs: nr.LSTM(IN, H, implementation='cudnn', rngs=rngs), (IN,)),
}


def _layer(name):
  """``(layer, features of one step)``, the layer with random parameters, built
  abstractly (no initializer compiles)."""
  factory, features = LAYERS[name]
  return build(lambda: factory(nnx.Rngs(0)), 3), features


def _chunks(layer, x, lengths, split):
  """Runs ``x`` chunk by chunk, carrying the carry over; returns ``(carry, y)``."""
  carry, ys, start = None, [], 0
  for size in split:
    chunk_lengths = jnp.asarray(np.clip(lengths - start, 0, size))
    carry, y = layer(x[:, start:start + size], seq_lengths=chunk_lengths, initial_carry=carry,
                     return_carry=True)
    ys.append(y)
    start += size
  return carry, jnp.concatenate(ys, axis=1)


_CUDNN_CALLS = []


def _cudnn_reference(*args, **kw):
  _CUDNN_CALLS.append(kw)
  out = test_cudnn.reference_lstm(*args, **kw)
  broken = jnp.any(args[4] < 1)  # cuDNN fails on zero lengths: poison the result, as it would
  return jax.tree_util.tree_map(lambda a: jnp.where(broken, jnp.nan, a), out)


@pytest.mark.parametrize('name', list(LAYERS))
def test_chunks_equal_one_call(name):
  if 'cudnn' in name:
    with internal.fake_cuda(_cudnn_reference):
      _check_chunks(name)
    assert _CUDNN_CALLS  # the layer went through the cuDNN path
  else:
    _check_chunks(name)


def _check_chunks(name):
  layer, features = _layer(name)
  layer.eval()  # dropout and zoneout draw per call: streaming is an inference tool
  if 'learned carry' in name:
    layer.initial_carry[...] = ref.normal((H,), 9)
  x = ref.normal((B, T, *features), 1)
  # Every chunking for two layers, one for the others.
  splits = SPLITS if name in ('RNN(LayerNormLSTMCell)', 'LSTM(2 layers)') else SPLITS[1:]

  @nnx.jit
  def one_call_and_streamed(layer, x):  # one compilation
    one_call = layer(x, seq_lengths=jnp.asarray(LENGTHS), return_carry=True)
    return one_call, [_chunks(layer, x, LENGTHS, split) for split in splits]

  (carry, y), streamed = one_call_and_streamed(layer, x)
  for split, (c_s, y_s) in zip(splits, streamed):
    np.testing.assert_allclose(y_s, y, atol=1e-5, err_msg=str(split))
    jax.tree.map(lambda a, b, s=split: np.testing.assert_allclose(a, b, atol=1e-5,
                                                                  err_msg=str(s)), c_s, carry)
  assert np.abs(np.asarray(y)).max() > 0


# Packed rows in chunks of 3, 3 and 1 steps: a segment going on into a chunk
# and one starting within it (row 0, steps 3 and 4), a segment starting at a
# chunk boundary (row 0, step 6), a chunk opening with padding before a new
# segment (row 1, step 3), a chunk of padding only (row 1, step 6), and one
# segment across every chunk (row 2).
IDS = np.array([[1, 1, 1, 1, 2, 2, 6], [0, 3, 3, 0, 4, 4, 0], [5] * 7], np.int32)
PACKED = ('RNN(LayerNormGRUCell, learned carry)', 'StackedRNN', 'LSTM(2 layers)',
          'LSTM(pallas, projected)')


def _reset_new_segments(carry, ids, start, size, default, after_a_valid_step=True):
  """docs/streaming.md's reset: the rows whose chunk ``ids[:, start:start + size]``
  opens a new segment after a valid step in an earlier chunk start from ``default``."""
  chunk = ids[:, start:start + size]
  new = ((chunk[:, 0] == 0) | (chunk[:, 0] != ids[:, start - 1])) & (chunk != 0).any(1)
  if after_a_valid_step:
    new &= (ids[:, :start] != 0).any(1)
  return jax.tree.map(lambda c: jnp.where(new[:, None], default, c), carry)


def test_a_rows_first_segment_after_chunks_of_padding_goes_on_from_the_initial_carry():
  # Found by the streaming fuzz family: a row whose first segment opens a later
  # chunk (only padding before it) starts from the initial carry in one call, so
  # the caller's reset skips it; docs/streaming.md's recipe reset it to zeros.
  layer = build(lambda: nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0))))
  ids = np.array([[1, 1, 1, 2], [0, 0, 3, 3]], np.int32)
  x, carry0 = ref.normal((2, 4, IN), 1), ref.normal((2, H), 2)

  @nnx.jit
  def runs(layer, x, carry0):  # one compilation
    one_call = layer(x, segment_ids=ids, initial_carry=carry0, return_carry=True)
    streamed = []
    for after_a_valid_step in (True, False):
      carry, ys = carry0, []
      for start in (0, 2):
        if start:
          carry = _reset_new_segments(carry, ids, start, 2, 0.0, after_a_valid_step)
        carry, y = layer(x[:, start:start + 2], segment_ids=ids[:, start:start + 2],
                         initial_carry=carry, return_carry=True)
        ys.append(y)
      streamed.append((carry, jnp.concatenate(ys, axis=1)))
    return one_call, streamed

  (carry, y), [(c_s, y_s), (c_old, y_old)] = runs(layer, x, carry0)
  np.testing.assert_allclose(y_s, y, atol=1e-5)
  np.testing.assert_allclose(c_s, carry, atol=1e-5)
  # Reset without the condition, row 1's segment starts from zeros, not carry0.
  np.testing.assert_allclose(y_old[0], y[0], atol=1e-5)
  assert not np.allclose(y_old[1, 2:], y[1, 2:], atol=1e-3)


@pytest.mark.parametrize('name', PACKED)
def test_packed_chunks_equal_one_call(name):
  """A chunk's first segment goes on from the carry passed in, every later one
  starts from the default carry; where a chunk's first segment is new (its id
  is not the one the previous chunk ended with), the caller resets those rows."""
  layer, features = _layer(name)
  layer.eval()
  learned = 'learned carry' in name
  if learned:
    layer.initial_carry[...] = ref.normal((H,), 9)
  default = layer.initial_carry[...] if learned else 0.0
  x = ref.normal((B, T, *features), 1)

  @nnx.jit
  def one_call_and_streamed(layer, x):  # one compilation
    one_call = layer(x, segment_ids=IDS, return_carry=True)
    carry, ys = None, []
    for start, size in ((0, 3), (3, 3), (6, 1)):
      ids = IDS[:, start:start + size]
      if start:
        carry = _reset_new_segments(carry, IDS, start, size, default)
      carry, y = layer(x[:, start:start + size], segment_ids=ids, initial_carry=carry,
                       return_carry=True)
      ys.append(y)
    return one_call, (carry, jnp.concatenate(ys, axis=1))

  (carry, y), (c_s, y_s) = one_call_and_streamed(layer, x)
  np.testing.assert_allclose(y_s, y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), c_s, carry)


@pytest.mark.parametrize('make', [nr.GRUCell, nr.LSTMCell])
def test_a_cell_stepped_by_hand_keeps_its_carry_dtype(make):
  # bf16 parameters, float32 inputs: each step computes in float32 (promotion)
  # and rounds the bf16 carry back, as RNN does over its steps, so a lax.scan
  # over the cell keeps its carry type and equals RNN.
  cell = build(lambda: make(IN, H, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  x = ref.normal((B, T, IN), 1)

  @nnx.jit
  def both(cell, x):  # one compilation
    return nr.RNN(cell, return_carry=True)(x), jax.lax.scan(
      lambda c, x_t: cell(c, x_t), cell.initialize_carry((B, IN)), jnp.swapaxes(x, 0, 1))

  (want_carry, want), (carry, ys) = both(cell, x)
  assert {leaf.dtype for leaf in jax.tree.leaves(carry)} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_array_equal(jnp.swapaxes(ys, 0, 1), want)
  jax.tree.map(np.testing.assert_array_equal, carry, want_carry)


def _rounding_loop(p, x, lengths, carry0, rnd):
  """:func:`reference.rnn` with the carry rounded by ``rnd`` after every valid
  step (the outputs are not): a cell over a low-precision carry stepped by
  hand. ``(carry leaves, outputs)``, zeros at padding."""
  carries, outs = [], np.zeros(x.shape[:2] + (H,))
  for b, n in enumerate(lengths):
    carry = tuple(np.asarray(c[b], np.float64) for c in carry0)
    carry = carry if len(carry) > 1 else carry[0]
    for t in range(n):
      carry, outs[b, t] = ref.step(p, carry, np.asarray(x[b, t]))
      carry = jax.tree.map(rnd, carry)
    carries.append(jax.tree.leaves(carry))
  return [np.stack(c) for c in zip(*carries)], outs


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_a_low_precision_initial_carry_into_a_float32_layer(cls):
  # A bfloat16 initial carry, float32 parameters and inputs (flax.nnx's RNN
  # refuses this: its carry changes type): nr.RNN over the layer's cell keeps
  # the carry's dtype, rounding it after every step, as stepping the cell by hand
  # does; the fused layer holds it in float32 within the call and rounds only the
  # carry it returns (docs/streaming.md, "Fine print"). The two differ by about
  # 1e-3 here, far outside the tolerance.
  layer = build(lambda: cls(IN, H, rngs=nnx.Rngs(0)), 3)
  x = ref.normal((B, T, IN), 1)
  n_carry = 2 if cls is nr.LSTM else 1
  carry0 = tuple(ref.normal((B, H), 2 + k, dtype=np.float32).astype(jnp.bfloat16)
                 for k in range(n_carry))
  lengths = jnp.asarray(LENGTHS)

  @nnx.jit
  def both(layer, x, carry0):
    init = carry0 if n_carry == 2 else carry0[0]
    kw = dict(seq_lengths=lengths, initial_carry=init, return_carry=True)
    return layer(x, **kw), nr.RNN(layer.forward[0])(x, **kw)

  (fused_carry, fused_y), (rnn_carry, rnn_y) = both(layer, x, carry0)
  for carry in (fused_carry, rnn_carry):
    assert {leaf.dtype for leaf in jax.tree.leaves(carry)} == {jnp.dtype(jnp.bfloat16)}
  p = ref.cell_params(layer.forward[0])

  def rnd(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32),
                      np.float64)

  want_carry, want_y = _rounding_loop(p, x, LENGTHS, carry0, rnd)
  np.testing.assert_allclose(rnn_y, want_y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), b, atol=1e-5),
               jax.tree.leaves(rnn_carry), want_carry)
  plain_carry, plain_y = ref.rnn(p, x, LENGTHS, carry0 if n_carry == 2 else carry0[0],
                                 num_batch_dims=1)
  np.testing.assert_allclose(fused_y, plain_y, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), rnd(b), atol=1e-5),
               jax.tree.leaves(fused_carry), jax.tree.leaves(plain_carry))
  assert np.abs(want_y - plain_y).max() > 1e-4  # the two behaviours are told apart
