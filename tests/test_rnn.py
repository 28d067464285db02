"""RNN and Bidirectional against the NumPy reference, step loops, lax.scan and unpadded runs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.random_params import random_module

ATOL = RTOL = 1e-5

# Lengths for a (2, 3) batch with time 5: empty, one step, full, and between.
LENGTHS = np.array([[0, 1, 5], [3, 5, 2]], np.int32)
BATCH, TIME = LENGTHS.shape, 5


def _close(got, want, atol=ATOL, rtol=RTOL):
  g_leaves, w_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(g_leaves) == len(w_leaves)
  for g, w in zip(g_leaves, w_leaves):
    assert tuple(g.shape) == tuple(w.shape)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               atol=atol, rtol=rtol)


def _inputs(features, time_major, batch=BATCH, time=TIME, seed=0):
  shape = (time, *batch, *features) if time_major else (*batch, time, *features)
  return ref.normal(shape, seed=seed)


@nnx.jit
def jitted(module, x, initial_carry=None, seq_lengths=None):
  """``module(x, ...)`` under nnx.jit: one compile instead of one per eager op.

  (Most tests run jitted for speed; eager calls are covered by the tests that
  call the module directly.)
  """
  return module(x, initial_carry=initial_carry, seq_lengths=seq_lengths)


def _padding_mask(lengths, time, time_major):
  """Boolean ``(*batch, time)`` (or time first): True at padding steps."""
  pad = np.arange(time) >= np.asarray(lengths)[..., None]
  return np.moveaxis(pad, -1, 0) if time_major else pad


# (cell, time_major, reverse, keep_order): every mode and layout for LSTMCell
# (a two-array carry); then one single-array carry (GRUCell) and the strided
# ConvLSTMs, whose carries are spatial and smaller than the inputs, in a mode
# and layout each. The scan, its masking and its flips are the same code for
# every cell: each cell's own step is checked against the NumPy formula in
# tests/test_cells.py (test_cell_matches_numpy_reference: every cell of
# ref.CELLS) and the MGU and OptimizedLSTM cells run through RNN below as well.
MODES = [(False, False), (True, False), (True, True)]  # (reverse, keep_order)
FWD, REV, REV_KEEP = MODES
CASES = [('lstm', tm, rev, keep) for tm in (False, True) for rev, keep in MODES]
CASES += [(name, tm, *mode) for name, tm, mode in [
  ('gru', False, REV_KEEP), ('conv_lstm_1d_s2', True, REV_KEEP), ('conv_lstm_2d_s2', False, FWD),
]]


@pytest.mark.parametrize('name, time_major, reverse, keep_order', CASES)
def test_masked_rnn_matches_reference(name, time_major, reverse, keep_order):
  cell, features = ref.make_cell(name)
  x = _inputs(features, time_major)
  carry0 = ref.random_carry(cell, (*BATCH, *features))  # non-zero: length-0 rows show it
  rnn = nr.RNN(cell, time_major=time_major, reverse=reverse, keep_order=keep_order,
               return_carry=True)
  carry, y = jitted(rnn, x, carry0, jnp.asarray(LENGTHS))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, LENGTHS, carry0, num_batch_dims=2,
                             time_major=time_major, reverse=reverse, keep_order=keep_order)
  _close(y, y_ref)
  _close(carry, carry_ref)
  # Padding outputs are exactly zero, and a length-0 row keeps its initial carry exactly.
  y = np.asarray(y)
  assert not y[_padding_mask(LENGTHS, TIME, time_major)].any()
  assert y[~_padding_mask(LENGTHS, TIME, time_major)].all()
  for leaf, leaf0 in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(carry0)):
    np.testing.assert_array_equal(leaf[0, 0], leaf0[0, 0])


@pytest.mark.parametrize('name, time_major, reverse, keep_order', [
  ('lstm', False, False, False),
  ('gru', True, True, True),
  ('conv_lstm_2d', False, True, False),
])
def test_unmasked_rnn_matches_reference(name, time_major, reverse, keep_order):
  cell, features = ref.make_cell(name)
  x = _inputs(features, time_major, batch=(2,), time=4)
  carry, y = nr.RNN(cell, return_carry=True)(
    x, time_major=time_major, reverse=reverse, keep_order=keep_order)
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, None, cell.initialize_carry(
    (2, *features)), num_batch_dims=1, time_major=time_major, reverse=reverse,
    keep_order=keep_order)
  _close(y, y_ref)
  _close(carry, carry_ref)


# A two-array carry forwards and a one-array carry reversed: one step with a
# length-0 and a length-1 row is the scan's case, not the cell's.
@pytest.mark.parametrize('name, reverse', [('lstm', False), ('mgu', True)])
def test_single_time_step(name, reverse):
  cell, features = ref.make_cell(name)
  lengths = np.array([0, 1], np.int32)
  x = _inputs(features, False, batch=(2,), time=1)
  carry0 = ref.random_carry(cell, (2, *features))
  rnn = nr.RNN(cell, return_carry=True, reverse=reverse, keep_order=reverse)
  carry, y = jitted(rnn, x, carry0, jnp.asarray(lengths))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, lengths, carry0, num_batch_dims=1,
                             reverse=reverse, keep_order=reverse)
  _close(y, y_ref)
  _close(carry, carry_ref)
  assert not np.asarray(y[0]).any()


# A two-array carry and a spatial one; a one-array carry's scan is written out
# in test_masked_rnn_matches_lax_scan[gru].
@pytest.mark.parametrize('name', ['lstm', 'conv_lstm_2d_s2'])
def test_rnn_matches_python_step_loop(name):
  cell, features = ref.make_cell(name)
  x = _inputs(features, False, batch=(2, 3), time=4)
  carry0 = ref.random_carry(cell, (2, 3, *features))
  carry, y = nr.RNN(cell, return_carry=True)(x, initial_carry=carry0)  # eager

  @nnx.jit  # the reference loop, traced step by step into one program
  def loop(cell, loop_carry):
    ys = []
    for t in range(x.shape[2]):
      loop_carry, y_t = cell(loop_carry, x[:, :, t])
      ys.append(y_t)
    return loop_carry, jnp.stack(ys, axis=2)

  loop_carry, loop_y = loop(cell, carry0)
  _close(y, loop_y, atol=1e-6, rtol=1e-6)
  _close(carry, loop_carry, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('name', ['gru', 'optimized_lstm'])
def test_masked_rnn_matches_lax_scan(name):
  # Masking written out here: keep the carry and zero the output at padding.
  cell, features = ref.make_cell(name)
  x = _inputs(features, True)  # time major
  carry0 = ref.random_carry(cell, (*BATCH, *features))
  graphdef, state = nnx.split(cell)
  valid = ~_padding_mask(LENGTHS, TIME, time_major=True)

  def body(carry, inputs):
    x_t, valid_t = inputs
    new_carry, y = nnx.merge(graphdef, state)(carry, x_t)
    keep = lambda new, old: jnp.where(valid_t[..., None], new, old)  # noqa: E731
    return jax.tree_util.tree_map(keep, new_carry, carry), keep(y, jnp.zeros_like(y))

  carry_scan, y_scan = jax.lax.scan(body, carry0, (x, jnp.asarray(valid)))
  carry, y = jitted(nr.RNN(cell, time_major=True, return_carry=True), x, carry0,
                    jnp.asarray(LENGTHS))
  _close(y, y_scan, atol=1e-6, rtol=1e-6)
  _close(carry, carry_scan, atol=1e-6, rtol=1e-6)


# The reversed modes, where padding meets the flips; forwards, the rows of
# test_masked_rnn_matches_reference[lstm-False-False-False] are each run on
# their unpadded part by the NumPy reference.
@pytest.mark.parametrize('reverse, keep_order', [REV, REV_KEEP])
def test_masked_rnn_matches_unpadded_rows(reverse, keep_order):
  cell, features = ref.make_cell('lstm')
  # Empty, partial and full rows; the two partial rows share one compiled row run.
  lengths = np.array([[0, 3], [5, 3]], np.int32)
  x = _inputs(features, False, batch=(2, 2))
  carry0 = ref.random_carry(cell, (2, 2, *features))
  rnn = nr.RNN(cell, return_carry=True, reverse=reverse, keep_order=keep_order)
  carry, y = jax.tree_util.tree_map(np.asarray, jitted(rnn, x, carry0, jnp.asarray(lengths)))
  x, carry0 = jax.tree_util.tree_map(np.asarray, (x, carry0))  # rows sliced on the host

  for b in np.ndindex(lengths.shape):
    n = int(lengths[b])
    carry_row0 = jax.tree_util.tree_map(lambda c, b=b: c[b][None], carry0)
    got_carry = jax.tree_util.tree_map(lambda c, b=b: c[b][None], carry)
    assert not y[b][n:].any()  # padding outputs are exactly zero
    if n == 0:  # nothing to run: the carry is the initial one, exactly
      jax.tree_util.tree_map(np.testing.assert_array_equal, got_carry, carry_row0)
      continue
    row_carry, row_y = jitted(rnn, jnp.asarray(x[b][None, :n]),
                              jax.tree_util.tree_map(jnp.asarray, carry_row0))
    _close(y[b][None, :n], row_y, atol=1e-6, rtol=1e-6)
    _close(got_carry, row_carry, atol=1e-6, rtol=1e-6)


def test_return_carry_several_batch_axes_default_carry():
  # flax raises for return_carry with seq_lengths and more than one batch axis.
  cell, features = ref.make_cell('gru')
  x = _inputs(features, False)
  carry, y = nr.RNN(cell, return_carry=True)(x, seq_lengths=jnp.asarray(LENGTHS))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, LENGTHS, np.zeros((*BATCH, 4)),
                             num_batch_dims=2)
  _close(carry, carry_ref)
  _close(y, y_ref)
  assert not np.asarray(carry[0, 0]).any()  # zeros for the length-0 row


def test_a_list_initial_carry_is_read_as_the_tuple():
  # As the cell reads a list carry (flax's cells unpack it): [c, h] is (c, h).
  cell, features = ref.make_cell('lstm')
  x = _inputs(features, False)
  carry0 = ref.random_carry(cell, (*BATCH, *features))
  carry, y = jitted(nr.RNN(cell, return_carry=True), x, list(carry0), jnp.asarray(LENGTHS))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, LENGTHS, carry0, num_batch_dims=2)
  _close(carry, carry_ref)
  _close(y, y_ref)


# -- Bidirectional --------------------------------------------------------------
def _bidirectional(merge_fn=None, **kw):
  fwd, features = ref.make_cell('lstm', seed=0)
  bwd, _ = ref.make_cell('gru', seed=1)
  extra = {} if merge_fn is None else dict(merge_fn=merge_fn)
  return nr.Bidirectional(nr.RNN(fwd), nr.RNN(bwd), **extra, **kw), fwd, bwd, features


@pytest.mark.parametrize('time_major', [False, True])
def test_bidirectional_matches_reference(time_major):
  bi, fwd, bwd, features = _bidirectional(time_major=time_major, return_carry=True)
  x = _inputs(features, time_major)
  c0_f = ref.random_carry(fwd, (*BATCH, *features), seed=1)
  c0_b = ref.random_carry(bwd, (*BATCH, *features), seed=5)
  (carry_f, carry_b), y = jitted(bi, x, (c0_f, c0_b), jnp.asarray(LENGTHS))
  common = dict(num_batch_dims=2, time_major=time_major)
  ref_cf, ref_yf = ref.rnn(ref.cell_params(fwd), x, LENGTHS, c0_f, **common)
  ref_cb, ref_yb = ref.rnn(ref.cell_params(bwd), x, LENGTHS, c0_b, reverse=True,
                           keep_order=True, **common)
  _close(y, np.concatenate([ref_yf, ref_yb], axis=-1))
  _close(carry_f, ref_cf)
  _close(carry_b, ref_cb)


def test_bidirectional_merge_fn_and_defaults():
  bi, fwd, bwd, features = _bidirectional(merge_fn=lambda a, b: a - 2.0 * b)
  lengths = np.array([4, 0, 2], np.int32)
  x = _inputs(features, False, batch=(3,), time=4)
  y = jitted(bi, x, None, jnp.asarray(lengths))  # default: zero carries, outputs only
  _, ref_yf = ref.rnn(ref.cell_params(fwd), x, lengths, (np.zeros((3, 4)),) * 2,
                      num_batch_dims=1)
  _, ref_yb = ref.rnn(ref.cell_params(bwd), x, lengths, np.zeros((3, 4)), num_batch_dims=1,
                      reverse=True, keep_order=True)
  _close(y, ref_yf - 2.0 * ref_yb)


def test_bidirectional_directions_of_different_hidden_sizes_concatenate():
  # The default merge concatenates on the last axis only: a forward GRU of 4 units and
  # a backward one of 2 give 6 features, as the NumPy reference of each direction.
  fwd, features = ref.make_cell('gru', seed=0)
  bwd = ref.build(lambda: nr.GRUCell(features[-1], 2, rngs=nnx.Rngs(1)), 7)
  lengths = np.array([4, 0, 2], np.int32)
  x = _inputs(features, False, batch=(3,), time=4)
  y = jitted(nr.Bidirectional(nr.RNN(fwd), nr.RNN(bwd)), x, None, jnp.asarray(lengths))
  _, ref_yf = ref.rnn(ref.cell_params(fwd), x, lengths, np.zeros((3, 4)), num_batch_dims=1)
  _, ref_yb = ref.rnn(ref.cell_params(bwd), x, lengths, np.zeros((3, 2)), num_batch_dims=1,
                      reverse=True, keep_order=True)
  _close(y, np.concatenate([ref_yf, ref_yb], axis=-1))


def test_bidirectional_with_one_rnn_twice_warns_and_shares_it():
  rnn = nr.RNN(ref.make_cell('gru')[0])
  with pytest.warns(UserWarning, match='`forward_rnn` and `backward_rnn` are the same object'):
    bi = nr.Bidirectional(rnn, rnn)
  x = _inputs(ref.make_cell('gru')[1], False, batch=(2,), time=3)
  lengths = np.array([3, 2], np.int32)
  y = bi(x, seq_lengths=jnp.asarray(lengths))
  params = ref.cell_params(rnn.cell)
  _, ref_yf = ref.rnn(params, x, lengths, np.zeros((2, 4)), num_batch_dims=1)
  _, ref_yb = ref.rnn(params, x, lengths, np.zeros((2, 4)), num_batch_dims=1, reverse=True,
                      keep_order=True)
  _close(y, np.concatenate([ref_yf, ref_yb], axis=-1))


def test_bidirectional_fixes_each_directions_order_as_flax():
  # As flax.nnx: the forward RNN runs forwards and the backward one reversed,
  # back in input order, whatever `reverse` / `keep_order` they were built with.
  fwd, features = ref.make_cell('gru', seed=0)
  bwd, _ = ref.make_cell('gru', seed=1)
  bi = nr.Bidirectional(nr.RNN(fwd, reverse=True, keep_order=True), nr.RNN(bwd))
  lengths = np.array([4, 0, 2], np.int32)
  x = _inputs(features, False, batch=(3,), time=4)
  y = jitted(bi, x, None, jnp.asarray(lengths))
  zeros = np.zeros((3, 4))
  _, ref_yf = ref.rnn(ref.cell_params(fwd), x, lengths, zeros, num_batch_dims=1)
  _, ref_yb = ref.rnn(ref.cell_params(bwd), x, lengths, zeros, num_batch_dims=1, reverse=True,
                      keep_order=True)
  _close(y, np.concatenate([ref_yf, ref_yb], axis=-1))


def test_bidirectional_time_major_at_call_overrides_the_attribute():
  bi, fwd, bwd, features = _bidirectional()  # built batch-major
  lengths = np.array([4, 0, 2], np.int32)
  x = _inputs(features, True, batch=(3,), time=4)  # (time, batch, features)
  y = nnx.jit(lambda bi, x: bi(x, seq_lengths=jnp.asarray(lengths), time_major=True))(bi, x)
  common = dict(num_batch_dims=1, time_major=True)
  _, ref_yf = ref.rnn(ref.cell_params(fwd), x, lengths, (np.zeros((3, 4)),) * 2, **common)
  _, ref_yb = ref.rnn(ref.cell_params(bwd), x, lengths, np.zeros((3, 4)), reverse=True,
                      keep_order=True, **common)
  _close(y, np.concatenate([ref_yf, ref_yb], axis=-1))


# -- flip_sequences -------------------------------------------------------------
@pytest.mark.parametrize('with_lengths', [False, True])
@pytest.mark.parametrize('time_major', [False, True])
@pytest.mark.parametrize('batch', [(3,), (2, 3)])
def test_flip_sequences_matches_flax_linen(batch, time_major, with_lengths):
  x = _inputs((2,), time_major, batch=batch, time=4)
  lengths = (jnp.asarray(np.arange(int(np.prod(batch))).reshape(batch) % 5, jnp.int32)
             if with_lengths else None)
  kw = dict(num_batch_dims=len(batch), time_major=time_major)
  # Both under one jax.jit: one program instead of one compile per eager op.
  got, want = jax.jit(lambda x, n: (nr.flip_sequences(x, n, **kw),
                                    nn.recurrent.flip_sequences(x, n, **kw)))(x, lengths)
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, x)


@pytest.mark.filterwarnings('ignore:carry_init is provided in __init__')
def test_tabulate_layers_whose_carry_is_learned_or_drawn():
  # nnx.tabulate wraps every public method of the traced classes (and leaves
  # the wrappers in place if anything raises): the base initialize_carry must
  # still be recognised, or it is called with an Rngs tabulate cannot print.
  x = jnp.ones((2, 5, 3))
  layers = [random_module(make) for make in (  # built without running initializers
    lambda: nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)), learn_initial_carry=True),
    lambda: nr.RNN(nr.GRUCell(3, 4, carry_init=jax.nn.initializers.normal(), rngs=nnx.Rngs(0))),
    lambda: nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)),
                                    learn_initial_carry=True),
                             nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))),
  )]
  for layer in layers:
    n = sum(v.size for v in jax.tree.leaves(nnx.state(layer)))  # tabulate counts RNG state too
    assert f'Total Parameters: {n} ' in nnx.tabulate(layer, x)
  # The classes are left as they were: a new layer computes the reference.
  plain = nr.RNN(ref.make_cell('lstm')[0])
  carry0 = plain.cell.initialize_carry((2, 3))
  _, y_ref = ref.rnn(ref.cell_params(plain.cell), x, None, carry0, num_batch_dims=1)
  np.testing.assert_allclose(nnx.jit(lambda plain: plain(x))(plain), y_ref, atol=1e-5)


def test_narrow_integer_lengths_on_a_long_time_axis():
  # clip(lengths, 0, time) in uint8 wraps a time of 300 to 44: the lengths are
  # taken as int32 first (flax.linen's flip_sequences is the reference).
  time = 300
  x = np.random.default_rng(0).normal(size=(2, time, 2)).astype(np.float32)
  wide = np.array([120, 255], np.int32)
  want = nn.recurrent.flip_sequences(x, wide, num_batch_dims=1, time_major=False)
  dtypes = (np.uint8, np.int16, np.uint32, np.int64)
  # Every dtype in one program (the lengths are constants of the trace, as given).
  flips = jax.jit(lambda x: [nr.flip_sequences(x, jnp.asarray(wide.astype(dtype)),
                                               num_batch_dims=1, time_major=False)
                             for dtype in dtypes])(x)
  for dtype, got in zip(dtypes, flips):
    np.testing.assert_array_equal(got, want, err_msg=str(dtype))
  rnn = ref.build(lambda: nr.RNN(nr.SimpleCell(2, 3, rngs=nnx.Rngs(0)), reverse=True,
                                 keep_order=True))
  narrow, wide = jnp.asarray(wide.astype(np.uint8)), jnp.asarray(wide)
  np.testing.assert_array_equal(*nnx.jit(lambda rnn: [rnn(x, seq_lengths=narrow),
                                                      rnn(x, seq_lengths=wide)])(rnn))


def test_numpy_int64_lengths_beyond_int32_act_as_the_time_axis():
  # jax narrows NumPy's int64 to int32 (x64 off), wrapping 2**32 to 0, 2**32 + 2
  # to 2 and int64's maximum to -1: NumPy lengths are capped on the host first.
  # An RNN and the fused GRU against the NumPy reference, outputs and carry.
  time = 3
  big = [2**32, 2**32 + 2, 2**40, np.iinfo(np.int64).max, 2]  # the last row: 2 steps
  x = _inputs((3,), False, batch=(len(big),), time=time)
  rnn = nr.RNN(ref.make_cell('gru')[0])
  gru = ref.build(lambda: nr.GRU(3, 4, rngs=nnx.Rngs(0)))
  lengths = [np.array(big, dtype) for dtype in (np.int64, np.uint64)]
  # The lengths are constants of the trace, as given: one compilation.
  got = nnx.jit(lambda rnn, gru: [m(x, seq_lengths=n, return_carry=True)
                                  for m in (rnn, gru) for n in lengths])(rnn, gru)
  for k, cell in enumerate((rnn.cell, gru.forward[0])):
    want = ref.rnn(ref.cell_params(cell), x, [time] * 4 + [2], np.zeros((len(big), 4)),
                   num_batch_dims=1)
    for n in range(len(lengths)):
      _close(got[2 * k + n], want)


# -- per-step outputs without the batch axes ------------------------------------
class _ScalarPerStepCell(nnx.Module):
  """A tanh cell that also returns one scalar per step, shared by every row
  (the sum of ``h``): an output leaf with no batch axes."""

  num_feature_axes = 1

  def __init__(self, w):
    self.w = nnx.Param(jnp.asarray(w))

  def __call__(self, h, x):
    h = jnp.tanh(x @ self.w[...] + h)
    return h, (h, jnp.sum(h))

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], self.w.shape[1]))


class _LinenScalarPerStepCell(nn.RNNCellBase):
  features: int = 4

  @nn.compact
  def __call__(self, h, x):
    w = self.param('w', nn.initializers.normal(0.5), (x.shape[-1], self.features))
    h = jnp.tanh(x @ w + h)
    return h, (h, jnp.sum(h))

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros((*input_shape[:-1], self.features))

  @property
  def num_feature_axes(self):
    return 1


def _scalar_per_step_reference(w, x, reverse):
  """NumPy: batch-first ``x`` (*batch, time, 3) -> h (*batch, time, 4) and
  the per-step sums (time,), in input order."""
  xs = np.moveaxis(np.asarray(x, np.float64), -2, 0)
  order = range(len(xs))[::-1] if reverse else range(len(xs))
  h, hs, sums = np.zeros(xs.shape[1:-1] + (w.shape[1],)), [None] * len(xs), [0.0] * len(xs)
  for t in order:
    h = np.tanh(xs[t] @ w + h)
    hs[t], sums[t] = h, h.sum()
  return np.moveaxis(np.stack(hs), 0, -2), np.asarray(sums)


@pytest.mark.parametrize('batch', [(2,), (2, 3)])
@pytest.mark.parametrize('reverse', [False, True])
def test_a_per_step_scalar_output_keeps_time_first(batch, reverse):
  # flax.nnx and flax.linen move time after the batch axes in every output
  # leaf and raise 'axis 1 is out of bounds' for a per-step scalar, which has none.
  x = _inputs((3,), False, batch=batch)
  w = np.asarray(ref.normal((3, 4), seed=3, scale=0.5), np.float64)
  want_h, want_sums = _scalar_per_step_reference(w, x, reverse)
  cell = _LinenScalarPerStepCell()
  linen_rnn = nr.compat.RNN(cell, reverse=reverse, keep_order=True)
  for run in (lambda: nr.RNN(_ScalarPerStepCell(w), reverse=reverse, keep_order=True)(x),
              lambda: linen_rnn.apply({'params': {'cell': {'w': jnp.asarray(w)}}}, x)):
    h, sums = run()
    assert sums.shape == (TIME,)
    _close(h, want_h)
    _close(sums, want_sums)


def test_a_per_step_scalar_has_no_order_when_rows_reverse_by_length():
  w = np.asarray(ref.normal((3, 4), seed=3, scale=0.5))
  x = _inputs((3,), False)
  lengths = jnp.asarray(LENGTHS)
  with pytest.raises(ValueError, match=r"`cell` expected per-step outputs that lead with the "
                     r"batch axes \(2, 3\) when keep_order=True .* got an output leaf of "
                     r"per-step shape \(\)"):
    nr.RNN(_ScalarPerStepCell(w), reverse=True, keep_order=True)(x, seq_lengths=lengths)
  with pytest.raises(ValueError, match=r"when keep_order=True \(as in a Bidirectional's "
                     r"backward direction\)"):
    nr.Bidirectional(nr.RNN(_ScalarPerStepCell(w)), nr.RNN(_ScalarPerStepCell(w)),
                     merge_fn=lambda a, b: (a, b))(x, seq_lengths=lengths)
  # In processing order there is nothing to restore: the sums come back. At a
  # row's padding the cell sees zero inputs and its kept carry.
  _, sums = nr.RNN(_ScalarPerStepCell(w), reverse=True)(x, seq_lengths=lengths)
  xs, w = np.asarray(x, np.float64).reshape(-1, TIME, 3), np.asarray(w, np.float64)
  want = np.zeros(TIME)
  for row, n in zip(xs, LENGTHS.reshape(-1)):
    h = np.zeros(4)
    for t in range(TIME):
      out = np.tanh((row[n - 1 - t] if t < n else np.zeros(3)) @ w + h)
      h = out if t < n else h
      want[t] += out.sum()
  _close(sums, want)


# -- gaps found by mutation testing of _scan/_core, _steps, _masking -----------------------
class _TokenCell(nnx.Module):
  """A cell over integer token ids (one feature axis of size 1): an embedding."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], 4))

  def __call__(self, h, x):
    h = jnp.tanh(self.embed(x[..., 0]) + self.lin(h))
    return h, h


def test_integer_inputs_stay_integers_at_padding():
  # The zeros the cell sees at padding are of the inputs' dtype: token ids stay
  # integers (an embedding refuses floats). Reference: flax.nnx's RNN (lengths
  # from 1: its carry for an empty row is the last step's).
  lengths = np.array([5, 2, 1])
  x = np.random.default_rng(0).integers(1, 10, size=(3, 5, 1)).astype(np.int32)
  cell = _TokenCell(nnx.Rngs(0))
  carry, ys = nr.RNN(cell)(x, seq_lengths=lengths, return_carry=True)
  carry_t, ys_t = nnx.RNN(nnx.clone(cell), return_carry=True)(x, seq_lengths=lengths)
  valid = (np.arange(5)[None] < lengths[:, None])[..., None]
  np.testing.assert_allclose(ys, np.where(valid, ys_t, 0), atol=1e-6)
  np.testing.assert_allclose(carry, carry_t, atol=1e-6)
