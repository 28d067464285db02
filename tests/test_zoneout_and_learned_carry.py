"""Zoneout on every built-in cell, and ``RNN(learn_initial_carry=True)``.

Zoneout is checked against the NumPy formula of each cell (tests/reference.py)
mixed with the previous carry, and a step loop against the scan; the learned
carry against explicit, hand-broadcast initial carries.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.random_params import random_module

B, T = 3, 6


def m(*parts):
  return '.*'.join(re.escape(p) for p in parts)


def _zoned(name, rate, seed=0):
  """A reference cell with zoneout and a plain twin holding the same parameters."""
  factory, features = ref.CELLS[name]
  plain, _ = ref.make_cell(name, seed)
  cell = nnx.eval_shape(lambda: _with_zoneout(factory, rate))
  nnx.update(cell, nnx.state(plain, nnx.Param))
  cell.rngs = nnx.RngStream(0, tag='dropout')  # eval_shape left it abstract
  return cell, plain, features


def _with_zoneout(factory, rate):
  cell = factory(nnx.Rngs(0))
  kind = type(cell)
  kwargs = dict(zoneout_rate=rate, rngs=nnx.Rngs(0))
  if kind is nr.ConvLSTMCell:
    return kind(cell.in_features, cell.hidden_features, cell.kernel_size, strides=cell.strides,
                **kwargs)
  extra = {'residual': cell.residual} if kind is nr.SimpleCell else {}
  if kind is nr.MGUCell:
    extra = {'reset_gate': cell.reset_gate}
  return kind(cell.in_features, cell.hidden_features, **extra, **kwargs)


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# Zoneout lives in the base class, over the carry's arrays: a tuple carry (LSTM), a single
# array (GRU; SimpleCell and MGUCell alike) and a conv cell's. Each cell's step against
# NumPy: tests/test_cells.py; that each constructor passes the rate on: the last test below.
@pytest.mark.parametrize('name', ['lstm', 'gru', 'conv_lstm_1d_s2'])
def test_zoneout_step_against_the_formula(name):
  rate = 0.4
  cell, plain, features = _zoned(name, rate)
  p = ref.cell_params(plain)
  x = ref.normal((B, *features), 3)
  carry = ref.random_carry(plain, (B, *features))
  new_ref, y_ref = ref.step(p, _np(carry), np.asarray(x))
  # Training: each unit keeps its old value where the mask (one key per carry array) says.
  key = jax.random.key(5)
  leaves = jax.tree.leaves(carry)

  @nnx.jit  # the step and the masks the key gives, in one program
  def training(cell):
    keys = [key] if len(leaves) == 1 else list(jax.random.split(key, len(leaves)))
    return cell(carry, x, rngs=key), [jax.random.bernoulli(k, rate, a.shape)
                                      for k, a in zip(keys, leaves)]

  (new, y), keep = training(cell)
  keep = [np.asarray(k) for k in keep]
  want = [np.where(k, o, n) for k, o, n in
          zip(keep, jax.tree.leaves(_np(carry)), jax.tree.leaves(new_ref))]
  for got, w in zip(jax.tree.leaves(new), want):
    np.testing.assert_allclose(got, w, atol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)  # the output is the new h, not zoned
  assert 0 < np.mean(np.concatenate([k.ravel() for k in keep])) < 1
  # Deterministic: the expectation.
  cell.eval()
  new, y = nnx.jit(lambda cell: cell(carry, x))(cell)
  for got, o, n in zip(jax.tree.leaves(new), jax.tree.leaves(_np(carry)),
                       jax.tree.leaves(new_ref)):
    np.testing.assert_allclose(got, rate * o + (1 - rate) * n, atol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_zoneout_keeps_units_at_the_rate():
  # Small random parameters (no initializer to compile): no gate saturates, so
  # no unit keeps its value but by zoneout.
  cell = random_module(lambda: nr.GRUCell(8, 250, zoneout_rate=0.3, rngs=nnx.Rngs(0)),
                       scale=0.01)
  h = jnp.full((40, 250), 7.0)  # far from anything a step computes: 10,000 units
  new, _ = nnx.jit(lambda cell: cell(h, jnp.ones((40, 8))))(cell)
  frac = float(jnp.mean(new == 7.0))
  assert abs(frac - 0.3) < 0.01, frac


def test_zoneout_keeps_a_float32_carry_exactly_under_bfloat16_computation():
  # A float32 carry stepped in bfloat16 (SimpleCell's new carry is bfloat16;
  # the gated cells' mix in the old float32 carry): the units zoneout keeps are
  # the old float32 values, not their bfloat16 rounding (7.0001 -> 7.0), and the
  # expectation is taken in float32.
  def make(rate):
    return random_module(lambda: nr.SimpleCell(8, 250, dtype=jnp.bfloat16, zoneout_rate=rate,
                                            rngs=nnx.Rngs(0)), scale=0.01)
  cell, plain = make(0.3), make(0.0)  # the same seed: the same parameters
  h = jnp.asarray(7.0001 + np.linspace(0, 1e-3, 250, dtype=np.float32)[None].repeat(40, 0))
  x = jnp.ones((40, 8))

  @nnx.jit
  def steps(cell, plain):
    return cell(h, x)[0], plain(h, x)[0], nnx.view(cell, deterministic=True)(h, x)[0]

  new, plain_new, expected = (np.asarray(a) for a in steps(cell, plain))
  assert new.dtype == expected.dtype == np.float32
  frac = np.mean(new == np.asarray(h))
  assert abs(frac - 0.3) < 0.01, frac
  others = new != np.asarray(h)
  np.testing.assert_array_equal(new[others], plain_new[others])
  np.testing.assert_allclose(expected, 0.3 * np.float64(h) + 0.7 * np.float64(plain_new),
                             rtol=1e-6)


def test_zoneout_in_rnn_new_mask_every_step_and_call_padding_keeps_the_carry():
  cell = random_module(lambda: nr.LSTMCell(3, 16, zoneout_rate=0.5,
                                           rngs=nnx.Rngs(0, dropout=1)))
  rnn = nr.RNN(cell, return_carry=True)
  x = ref.normal((B, T, 3), 4)
  lengths = jnp.array([T, 3, 0])
  # nnx.jit carries the stream's updates out; its second call is the same program.
  call = nnx.jit(lambda rnn, rngs=None: rnn(x, seq_lengths=lengths, rngs=rngs))
  count = int(cell.rngs.count[...])
  (c1, h1), y1 = call(rnn)
  assert int(cell.rngs.count[...]) == count + 2 * T  # one key per carry array per step
  (c2, h2), y2 = call(rnn)
  assert not np.allclose(y1[0], y2[0])  # new masks each call
  # The scan against a loop over the cell with the keys the call's rngs give each step.
  key = jax.random.key(9)

  @nnx.jit  # the call and the loop, traced step by step, in one program
  def loop(rnn):
    cell = rnn.cell
    scanned = rnn(x, seq_lengths=lengths, rngs=key)
    step_keys = jax.random.split(jax.random.fold_in(key, 1), T)
    carry = cell.initialize_carry((B, 3))
    ys, kept = [], []
    for t in range(T):
      new, y_t = cell(carry, x[:, t], rngs=step_keys[t])
      valid = (t < lengths)[:, None]
      kept.append(new[0] == carry[0])
      carry = jax.tree.map(lambda n, o, valid=valid: jnp.where(valid, n, o), new, carry)
      ys.append(jnp.where(valid, y_t, 0))
    return scanned, carry, jnp.stack(ys, 1), kept

  ((c, h), y), carry, ys, kept = loop(rnn)
  kept = [np.asarray(k) for k in kept]
  np.testing.assert_allclose(y, ys, atol=1e-6)
  np.testing.assert_allclose(c, carry[0], atol=1e-6)
  np.testing.assert_allclose(h, carry[1], atol=1e-6)
  assert not (kept[1] == kept[2]).all()  # a new mask at every step
  np.testing.assert_array_equal(h[2], 0.0)  # a length-0 row keeps its initial carry


def test_zoneout_deterministic_packed_segments_equal_separate_runs():
  cell = random_module(lambda: nr.GRUCell(3, 5, zoneout_rate=0.25, rngs=nnx.Rngs(0)), 2)
  rnn = nnx.view(nr.RNN(cell), deterministic=True)
  x = ref.normal((1, T, 3), 6)
  ids = jnp.array([[1, 1, 1, 2, 2, 0]])
  # The packed run and the separate ones, in one program.
  y, first, second = nnx.jit(lambda rnn: (rnn(x, segment_ids=ids), rnn(x[:, :3]),
                                          rnn(x[:, 3:5])))(rnn)
  np.testing.assert_allclose(y[:, :3], first, atol=1e-6)
  np.testing.assert_allclose(y[:, 3:5], second, atol=1e-6)
  np.testing.assert_array_equal(y[:, 5], 0.0)


def test_zoneout_draws_from_the_dropout_stream_of_a_calls_rngs():
  cell = random_module(lambda: nr.GRUCell(3, 50, zoneout_rate=0.5, rngs=nnx.Rngs(0)),
                       scale=0.01)  # no gate saturates: only zoneout keeps a unit
  h = jnp.full((4, 50), 7.0)  # far from anything a step computes: the kept units are the mask
  rngs = nnx.Rngs(dropout=3, carry=4)
  new, _ = cell(h, jnp.ones((4, 3)), rngs=rngs)
  assert int(rngs.dropout.count[...]) == 1 and int(rngs.carry.count[...]) == 0
  keep = jax.random.bernoulli(nnx.Rngs(dropout=3).dropout(), 0.5, (4, 50))  # flax's first key
  np.testing.assert_array_equal(np.asarray(new) == 7.0, np.asarray(keep))


def test_evaluation_draws_nothing_from_the_calls_rngs():
  # Deterministic zoneout is the expectation: no keys, so an nnx.Rngs passed to an
  # evaluation call is left as it was, as flax's nnx.Dropout in evaluation leaves it.
  cell = random_module(lambda: nr.GRUCell(3, 5, zoneout_rate=0.3, dropout_rate=0.2,
                                          rngs=nnx.Rngs(0)), 2)
  rnn = nnx.view(nr.RNN(cell), deterministic=True)
  ours, theirs = nnx.Rngs(dropout=3), nnx.Rngs(dropout=3)
  x = ref.normal((B, T, 3), 6)
  nnx.jit(lambda rnn, rngs: rnn(x, rngs=rngs))(rnn, ours)
  nnx.Dropout(0.5, deterministic=True)(x, rngs=theirs)
  assert int(ours.dropout.count[...]) == int(theirs.dropout.count[...]) == 0


def test_zoneout_rate_is_checked():
  with pytest.raises(ValueError, match=m('GRUCell: `zoneout_rate` expected a float in [0, 1)',
                                         'got 1.0')):
    nr.GRUCell(3, 4, zoneout_rate=1.0, rngs=nnx.Rngs(0))
  # No PRNG state without randomness; a stream with zoneout (built abstractly).
  assert nnx.eval_shape(lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(0))).rngs is None
  assert nnx.eval_shape(lambda: nr.GRUCell(3, 4, zoneout_rate=0.1,
                                           rngs=nnx.Rngs(0))).rngs is not None
  # Every built-in cell's constructor hands the rate to the base class, which applies it.
  for name in ('simple', 'optimized_lstm', 'mgu', 'mgu_no_reset'):
    cell = nnx.eval_shape(lambda name=name: _with_zoneout(ref.CELLS[name][0], 0.3))
    assert cell.zoneout_rate == 0.3 and cell.rngs is not None, name


# -- learned initial carry ---------------------------------------------------------
def _lstm_rnn(seed=0, **kw):
  cell = ref.build(lambda: nr.LSTMCell(3, 4, rngs=nnx.Rngs(seed)), seed)  # no initializers
  return nr.RNN(cell, learn_initial_carry=True, return_carry=True, **kw)


def test_learned_carry_starts_at_zero_and_is_one_row_per_leaf():
  rnn = _lstm_rnn()
  leaves = nnx.state(rnn, nnx.Param)['initial_carry']
  assert [tuple(v.shape) for v in jax.tree.leaves(leaves)] == [(4,), (4,)]
  x = ref.normal((B, T, 3), 1)
  plain = nr.RNN(rnn.cell, return_carry=True)
  jax.tree.map(np.testing.assert_array_equal, *nnx.jit(lambda a, b: (a(x), b(x)))(rnn, plain))


def test_learned_carry_is_the_default_carry_for_rows_segments_and_empty_rows():
  rnn = _lstm_rnn()
  c0, h0 = ref.normal((4,), 7), ref.normal((4,), 8)
  rnn.initial_carry[0][...] = c0
  rnn.initial_carry[1][...] = h0
  x = ref.normal((B, T, 3), 1)
  explicit = (jnp.broadcast_to(c0, (B, 4)), jnp.broadcast_to(h0, (B, 4)))
  lengths = jnp.array([T, 2, 0])
  ids = jnp.array([[1, 1, 2, 2, 2, 0]] * B)
  zeros = rnn.cell.initialize_carry((B, 3))

  @nnx.jit  # every run in one program
  def runs(rnn, plain):
    return ((rnn(x, seq_lengths=lengths), rnn(x, seq_lengths=lengths, initial_carry=explicit)),
            (rnn(x, segment_ids=ids)[1], rnn(x[:, 2:5], initial_carry=explicit)[1],
             rnn(x, segment_ids=ids, initial_carry=zeros)[1]),
            (rnn(x, initial_carry=zeros), plain(x)))

  (got, want), (y, y2, y_given), (given, plain) = runs(rnn, nr.RNN(rnn.cell, return_carry=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
  np.testing.assert_allclose(got[0][1][2], h0, atol=0)  # the length-0 row returns it
  # Packed: every segment starts from the learned carry.
  np.testing.assert_allclose(y[:, 2:5], y2, atol=1e-6)
  # An explicit initial carry starts each row's first segment only; the later ones start
  # from the learned carry.
  np.testing.assert_allclose(y_given[:, 2:5], y2, atol=1e-6)
  assert np.abs(np.asarray(y_given[:, :2]) - np.asarray(y[:, :2])).max() > 1e-3
  # An explicit initial carry wins.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), given, plain)


def test_learned_carry_is_a_parameter_of_the_cells_param_dtype():
  # A bfloat16 cell's learned carry is a bfloat16 parameter like its kernels (trained and
  # checkpointed as they are), and a length-0 row returns its value as it is.
  cell = nr.GRUCell(3, 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  rnn = nr.RNN(cell, learn_initial_carry=True, return_carry=True)
  kernels = {v.dtype for v in jax.tree.leaves(nnx.state(cell, nnx.Param))}
  assert kernels == {jnp.dtype(jnp.bfloat16)}
  assert rnn.initial_carry[...].dtype == jnp.bfloat16
  h0 = jnp.asarray(ref.normal((4,), 2), jnp.bfloat16)
  rnn.initial_carry[...] = h0
  h, _ = rnn(ref.normal((B, T, 3), 1).astype(jnp.bfloat16), seq_lengths=jnp.array([T, 1, 0]))
  np.testing.assert_array_equal(np.asarray(h[2], np.float32), np.asarray(h0, np.float32))


def test_a_learned_carry_held_in_another_dtype_starts_the_cells_carry_in_its_own():
  # A learned carry loaded in bfloat16 (a half-precision checkpoint) beside a float32
  # cell: the carry a length-0 row returns is its value, in the cell's float32.
  rnn = nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)), learn_initial_carry=True, return_carry=True)
  h0 = jnp.asarray(ref.normal((4,), 2), jnp.bfloat16)
  rnn.initial_carry = nnx.Param(h0)
  h, _ = rnn(ref.normal((B, T, 3), 1), seq_lengths=jnp.array([T, 1, 0]))
  assert h.dtype == jnp.float32
  np.testing.assert_array_equal(h[2], np.asarray(h0, np.float32))


def test_a_complex_cell_learns_a_complex_initial_carry():
  # Complex parameters take complex inputs and carry complex values: the learned carry
  # is a complex parameter (inexact, trained as any), which a length-0 row returns.
  rnn = nr.RNN(nr.SimpleCell(3, 4, dtype=jnp.complex64, param_dtype=jnp.complex64,
                             rngs=nnx.Rngs(0)),
               learn_initial_carry=True, return_carry=True)
  assert rnn.initial_carry[...].dtype == jnp.complex64
  h0 = jnp.asarray(ref.normal((4,), 2) + 1j * ref.normal((4,), 3), jnp.complex64)
  rnn.initial_carry[...] = h0
  h, _ = rnn(ref.normal((B, T, 3), 1).astype(jnp.complex64), seq_lengths=jnp.array([T, 1, 0]))
  np.testing.assert_array_equal(h[2], h0)


def test_learned_carry_gradient_and_training():
  rnn = _lstm_rnn()
  x = ref.normal((B, T, 3), 1)
  lengths = jnp.array([T, 4, 1])

  def loss(rnn):
    (c, h), y = rnn(x, seq_lengths=lengths)
    return jnp.sum(y ** 2) + jnp.sum(h)

  grads = nnx.jit(nnx.grad(loss))(rnn)
  # Independent: the gradient w.r.t. an explicit, per-row initial carry, summed over rows.
  def loss_explicit(cell, carry):
    (c, h), y = nr.RNN(cell, return_carry=True)(x, seq_lengths=lengths, initial_carry=carry)
    return jnp.sum(y ** 2) + jnp.sum(h)

  g_rows = nnx.jit(nnx.grad(loss_explicit, argnums=1))(rnn.cell,
                                                       rnn.cell.initialize_carry((B, 3)))
  for got, rows in zip(jax.tree.leaves(grads['initial_carry']), g_rows):
    np.testing.assert_allclose(got, rows.sum(0), atol=1e-5)
  optimizer = nnx.Optimizer(rnn, optax.sgd(0.5), wrt=nnx.Param)
  before = np.asarray(rnn.initial_carry[1][...])
  nnx.jit(lambda optimizer, rnn, grads: optimizer.update(rnn, grads))(optimizer, rnn, grads)
  assert not np.allclose(rnn.initial_carry[1][...], before)  # trained like any parameter


def test_learned_carry_through_bidirectional_stacks_and_conv_cells():
  # Random parameters built without running initializers.
  fwd = nr.RNN(ref.make_cell('gru', 0)[0], learn_initial_carry=True)
  bwd = nr.RNN(ref.make_cell('gru', 1)[0], learn_initial_carry=True)
  fwd.initial_carry[...] = ref.normal((4,), 2)
  bwd.initial_carry[...] = ref.normal((4,), 3)
  stack = nr.StackedRNN(nr.Bidirectional(fwd, bwd))
  x = ref.normal((B, T, 3), 1)
  lengths = jnp.array([T, 2, 0])

  @nnx.jit  # the run and the gradient in one program
  def run(stack):
    return (stack(x, seq_lengths=lengths, return_carry=True),
            nnx.grad(lambda s: jnp.sum(s(x, seq_lengths=lengths) ** 2))(stack))

  (((h_f, h_b),), y), grads = run(stack)
  np.testing.assert_allclose(h_f[2], fwd.initial_carry[...], atol=0)
  np.testing.assert_allclose(h_b[2], bwd.initial_carry[...], atol=0)
  for g in jax.tree.leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  flat = nnx.to_flat_state(grads)
  assert any('initial_carry' in path and np.abs(v[...]).max() > 0 for path, v in flat)
  # A convolutional cell: one value per channel, broadcast over positions.
  conv = nr.RNN(ref.build(lambda: nr.ConvLSTMCell(2, 3, (3,), padding='CIRCULAR',
                                                   rngs=nnx.Rngs(0))),
                learn_initial_carry=True)
  conv.initial_carry[1][...] = ref.normal((3,), 4)
  xc = ref.normal((B, T, 5, 2), 5)
  rolled_after, rolled_before = nnx.jit(lambda conv: (jnp.roll(conv(xc), 2, axis=2),
                                                      conv(jnp.roll(xc, 2, axis=2))))(conv)
  # Still translation equivariant.
  np.testing.assert_allclose(rolled_after, rolled_before, atol=1e-5)
  # 'VALID', kernel 2, stride 2: 5 positions give (5 - 2) // 2 + 1 = 2 for the
  # state (a one-position probe would give none), each starting at the learned values.
  valid = nr.RNN(ref.build(lambda: nr.ConvGRUCell(2, 3, (2,), strides=2, padding='VALID',
                                                  rngs=nnx.Rngs(0))),
                 learn_initial_carry=True, return_carry=True)
  h0 = ref.normal((3,), 6)
  valid.initial_carry[...] = h0
  (h, y), (h_given, y_given) = nnx.jit(lambda rnn: (
    rnn(xc, seq_lengths=lengths),
    rnn(xc, seq_lengths=lengths, initial_carry=jnp.broadcast_to(h0, (B, 2, 3)))))(valid)
  assert y.shape == (B, T, 2, 3)
  np.testing.assert_allclose(h[2], np.broadcast_to(h0, (2, 3)), atol=0)  # the length-0 row
  np.testing.assert_allclose(y, y_given, atol=1e-6)
  np.testing.assert_allclose(h, h_given, atol=1e-6)


def test_learned_carry_errors():
  class NoSize(nnx.Module):
    num_feature_axes = 1

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros(input_shape)

    def __call__(self, carry, x):
      return x, x

  with pytest.raises(TypeError, match=m('RNN: `learn_initial_carry` expected a cell with an '
                                        'int in_features', 'got NoSize without one')):
    nr.RNN(NoSize(), learn_initial_carry=True)
  from nnx_recurrent import compat
  with pytest.raises(ValueError, match=m('from_nnx: `module` expected an RNN without '
                                         'learn_initial_carry')):
    compat.from_nnx(_lstm_rnn())
