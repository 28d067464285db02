"""Variational dropout (``dropout_rate`` / ``recurrent_dropout_rate``) on every cell.

References: the cell without dropout (same parameters) for evaluation mode;
the masks observed through cells built to expose them (identity weights); and
the NumPy formula of LSTM and GRU with the masks applied (tests/reference.py).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference
from tests.random_params import ZERO_INIT as _Z
from tests.random_params import random_module
from tests.random_params import randomize_params as _randomize

ATOL = 2e-5
B, T, IN, H = 3, 5, 4, 6
CELLS = {
  'SimpleCell': lambda **kw: nr.SimpleCell(IN, H, **_Z, **kw),
  'LSTMCell': lambda **kw: nr.LSTMCell(IN, H, **_Z, **kw),
  'OptimizedLSTMCell': lambda **kw: nr.OptimizedLSTMCell(IN, H, **_Z, **kw),
  'GRUCell': lambda **kw: nr.GRUCell(IN, H, **_Z, **kw),
  'MGUCell': lambda **kw: nr.MGUCell(IN, H, **_Z, **kw),
  'ConvLSTMCell': lambda **kw: nr.ConvLSTMCell(IN, H, (3,), strides=2, **kw),
}
RATES = dict(dropout_rate=0.3, recurrent_dropout_rate=0.4)


def _x(cell, seed=1):
  spatial = (6,) if isinstance(cell, nr.ConvLSTMCell) else ()
  return np.random.default_rng(seed).normal(size=(B, T, *spatial, IN)).astype(np.float32)


def _pair(name):
  """A cell with dropout and the same cell without it, with equal parameters
  (random, built without running initializers)."""
  drop = random_module(lambda: CELLS[name](**RATES, rngs=nnx.Rngs(params=0, dropout=1)), 1)
  plain = nnx.eval_shape(lambda: CELLS[name](rngs=nnx.Rngs(params=0)))  # no state but params
  nnx.update(plain, nnx.state(drop, nnx.Param))
  return nr.RNN(drop), nr.RNN(plain)


# The dropout and its views live in the base class: one LSTM, gated and conv cell.
@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell', 'ConvLSTMCell'])
def test_eval_equals_dropout_free_cell(name):
  rnn, plain = _pair(name)
  x = _x(rnn.cell)
  run = nnx.jit(lambda m, x: m(x))
  want = np.asarray(run(plain, x))
  view = nnx.view(rnn, deterministic=True)
  np.testing.assert_allclose(run(view, x), want, atol=ATOL)
  # The view does not change the model, which is still training.
  assert rnn.cell.deterministic is False
  assert np.abs(np.asarray(run(rnn, x)) - want).max() > 1e-3
  rnn.eval()
  np.testing.assert_allclose(run(rnn, x), want, atol=ATOL)
  rnn.train()
  assert np.abs(np.asarray(run(rnn, x)) - want).max() > 1e-3


def test_eval_reaches_cells_inside_bidirectional_and_stacks():
  def make():  # built abstractly: only the flags matter here
    rngs = nnx.Rngs(0)
    cells = [nr.GRUCell(IN, H, **RATES, rngs=rngs), nr.GRUCell(IN, H, **RATES, rngs=rngs),
             nr.LSTMCell(2 * H, H, **RATES, rngs=rngs)]
    return nr.StackedRNN(nr.Bidirectional(nr.RNN(cells[0]), nr.RNN(cells[1])),
                         nr.RNN(cells[2]), dropout_rate=0.5, rngs=rngs)

  stack = nnx.eval_shape(make)
  cells = [stack.layers[0].forward_rnn.cell, stack.layers[0].backward_rnn.cell,
           stack.layers[1].cell]
  view = nnx.view(stack, deterministic=True)
  assert [c.deterministic for c in cells] == [False] * 3
  assert all(c.deterministic for c in (view.layers[0].forward_rnn.cell,
                                       view.layers[0].backward_rnn.cell,
                                       view.layers[1].cell, view.dropout))
  stack.eval()
  assert all(c.deterministic for c in cells) and stack.dropout.deterministic


def test_masks_observed_constant_across_time_and_different_across_rows():
  rows, time, width = 16, 6, 8
  ident = dict(activation_fn=lambda a: a, kernel_init=nnx.initializers.zeros_init(),
               recurrent_kernel_init=nnx.initializers.zeros_init())
  # Input mask: h_t = W_i (m * x_t) with W_i = I, W_h = 0, so y_t = m for x = 1.
  cell = nr.SimpleCell(width, width, dropout_rate=0.5, **ident, rngs=nnx.Rngs(0))
  cell.dense_i.kernel[...] = jnp.eye(width)
  run = nnx.jit(lambda cell, x: nr.RNN(cell)(x))
  y = np.asarray(run(cell, jnp.ones((rows, time, width))))
  m = y[:, 0]
  np.testing.assert_array_equal(y, np.broadcast_to(m[:, None], y.shape))  # same every step
  assert set(np.unique(m)) == {0.0, 2.0}  # inverted scaling 1 / (1 - 0.5)
  assert len({tuple(r) for r in m}) > rows // 2  # rows get their own masks
  assert 0.3 < (m > 0).mean() < 0.7
  # Recurrent mask: h_t = 1 + W_h (m * h_{t-1}) with b_i = 1, W_h = I.
  cell = nr.SimpleCell(width, width, recurrent_dropout_rate=0.5, **ident, rngs=nnx.Rngs(1))
  cell.dense_i.bias[...] = jnp.ones(width)
  cell.dense_h.kernel[...] = jnp.eye(width)
  y = np.asarray(run(cell, jnp.zeros((rows, time, width))))
  m = y[:, 1] - 1.0  # h_1 = 1 + m * 1
  want = np.cumsum(m[:, None] ** np.arange(time)[None, :, None], axis=1)  # 1 + m + m^2 ...
  np.testing.assert_allclose(y, want, rtol=1e-6)  # one mask for every step
  assert set(np.unique(m)) == {0.0, 2.0}
  assert len({tuple(r) for r in m}) > rows // 2
  assert 0.3 < (m > 0).mean() < 0.7


def test_masks_keep_units_with_probability_one_minus_the_rate():
  # Rates away from 0.5, where rate and 1 - rate tell apart: 20,000 units per mask.
  cell = nnx.eval_shape(lambda: nr.SimpleCell(100, 100, dropout_rate=0.2,
                                              recurrent_dropout_rate=0.7, rngs=nnx.Rngs(0)))
  masks = cell.dropout_masks((200, 100), rngs=jax.random.key(0))
  for mask, rate in ((masks.input, 0.2), (masks.recurrent, 0.7)):
    mask = np.asarray(mask)
    assert mask.dtype == np.float32
    np.testing.assert_allclose(np.unique(mask), [0.0, 1.0 / (1.0 - rate)], rtol=1e-6)
    assert abs((mask > 0).mean() - (1.0 - rate)) < 0.015, rate


def test_masks_come_in_the_requested_or_the_cells_float_dtype():
  cell = nnx.eval_shape(lambda: nr.GRUCell(IN, H, dropout_rate=0.25, recurrent_dropout_rate=0.5,
                                           dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  key = jax.random.key(0)
  # No dtype or an integer one: the cell's; a float one: that.
  for dtype, want in ((None, jnp.bfloat16), (jnp.int32, jnp.bfloat16),
                      (jnp.float16, jnp.float16)):
    masks = cell.dropout_masks((B, IN), key, dtype)
    assert [mk.dtype for mk in masks] == [jnp.dtype(want)] * 2, dtype
    assert set(np.unique(np.asarray(masks.input, np.float32))) <= {
      0.0, float(jnp.asarray(1 / 0.75, want))}  # 1 / (1 - rate) rounded to the dtype
    assert set(np.unique(np.asarray(masks.recurrent, np.float32))) <= {0.0, 2.0}
  # A complex one (complex inputs, which complex cells take): that too.
  assert [mk.dtype for mk in cell.dropout_masks((B, IN), key, jnp.complex64)] == [
    jnp.dtype(jnp.complex64)] * 2


def test_a_bfloat16_cell_with_dropout_steps_in_bfloat16_as_flax():
  # Masks sampled by the call come in the inputs' dtype, and a recurrent mask
  # given in float32 (dropout_masks' default for a cell without a dtype) is
  # cast to h's: neither promotes the step, which flax.nnx's cell runs in bfloat16.
  kw = dict(param_dtype=jnp.bfloat16, recurrent_kernel_init=nnx.initializers.lecun_normal())
  theirs = nnx.eval_shape(lambda: nnx.GRUCell(IN, H, **kw, rngs=nnx.Rngs(0)))
  x, h = jnp.ones((B, IN), jnp.bfloat16), jnp.ones((B, H), jnp.bfloat16)
  want = nnx.eval_shape(lambda cell: cell(h, x)[1], theirs).dtype
  assert want == jnp.bfloat16
  both = random_module(lambda: nr.GRUCell(IN, H, **kw, **RATES, rngs=nnx.Rngs(0)))
  rec = random_module(lambda: nr.GRUCell(IN, H, **kw, recurrent_dropout_rate=0.4,
                                         rngs=nnx.Rngs(0)))
  masks = rec.dropout_masks((B, IN), jax.random.key(1))
  assert masks.input is None and masks.recurrent.dtype == jnp.float32
  ys = nnx.jit(lambda both, rec: (both(h, x)[1], rec(h, x, dropout_masks=masks)[1]))(both, rec)
  assert [y.dtype for y in ys] == [want] * 2
  assert all(np.isfinite(np.asarray(y, np.float32)).all() for y in ys)


def test_input_and_recurrent_masks_are_drawn_independently():
  # Equal rates and widths: masks drawn from one key would be the same mask.
  rows, width = 16, 8
  cell = nr.SimpleCell(width, width, **_Z, dropout_rate=0.5, recurrent_dropout_rate=0.5,
                       rngs=nnx.Rngs(0))
  masks = cell.dropout_masks((rows, width), rngs=jax.random.key(3))
  m_in, m_rec = np.asarray(masks.input) > 0, np.asarray(masks.recurrent) > 0
  assert 0.3 < m_in.mean() < 0.7 and 0.3 < m_rec.mean() < 0.7
  assert 0.3 < (m_in == m_rec).mean() < 0.7  # as for two independent masks (128 units)


class _Passes(nr.SimpleCell):
  """A subclass that overrides ``__call__`` and passes the options on."""

  def __call__(self, carry, inputs, **options):
    return super().__call__(carry, inputs, **options)


class _Drops(nr.SimpleCell):
  """A subclass whose ``__call__`` takes no options: RNN cannot hand it masks."""

  def __call__(self, carry, inputs):
    return super().__call__(carry, inputs)


def test_a_subclass_whose_call_takes_no_options_is_warned_about_its_masks():
  rows, time, width = 16, 6, 8
  ident = dict(activation_fn=lambda a: a, kernel_init=nnx.initializers.zeros_init(),
               recurrent_kernel_init=nnx.initializers.zeros_init())
  run = nnx.jit(lambda rnn, x: rnn(x))
  x = jnp.ones((rows, time, width))
  ys = {}
  for cls in (_Passes, _Drops):  # y_t is the input mask of step t (W_i = I, W_h = 0)
    cell = cls(width, width, dropout_rate=0.5, **ident, rngs=nnx.Rngs(0))
    cell.dense_i.kernel[...] = jnp.eye(width)
    if cls is _Drops:
      with pytest.warns(UserWarning, match=(
          r"RNN: _Drops.__call__ overrides RNNCellBase.__call__ without taking \*\*options, "
          r"so RNN cannot pass it one dropout mask per sequence or a call's `rngs` "
          r'\(dropout_rate=0.5\): the cell draws new masks from its own stream at every step. '
          r'Define `__call__\(self, carry, inputs, \*\*options\)`')) as record:
        rnn = nr.RNN(cell)
      assert record[0].filename == __file__  # the caller's line, past flax's constructor
    else:
      with warnings.catch_warnings():
        warnings.simplefilter('error')
        rnn = nr.RNN(cell)  # takes the options: nothing to warn about
    ys[cls] = np.asarray(run(rnn, x))
  y = ys[_Passes]
  np.testing.assert_array_equal(y, np.broadcast_to(y[:, :1], y.shape))  # one mask per row
  y = ys[_Drops]
  assert (y != y[:, :1]).any(axis=(0, 2)).sum() == time - 1  # a new mask at every step


def test_a_subclass_dropping_options_is_warned_about_zoneout_alone():
  # Zoneout's per-step keys come from the call's RNG as the dropout masks do.
  cell = random_module(lambda: _Drops(4, 4, zoneout_rate=0.25, rngs=nnx.Rngs(0)))
  with pytest.warns(UserWarning, match=r'RNN: _Drops.__call__ overrides .*\(zoneout_rate=0.25\)'):
    nr.RNN(cell)


def _identity_rnns(width, n):
  """``n`` RNNs whose SimpleCell outputs its input after its input dropout mask."""
  ident = dict(activation_fn=lambda a: a, kernel_init=nnx.initializers.zeros_init(),
               recurrent_kernel_init=nnx.initializers.zeros_init())
  rnns = []
  for seed in range(n):
    cell = nr.SimpleCell(width, width, dropout_rate=0.5, **ident, rngs=nnx.Rngs(seed))
    cell.dense_i.kernel[...] = jnp.eye(width)
    rnns.append(nr.RNN(cell))
  return rnns


def test_bidirectional_directions_get_their_own_masks_from_one_key():
  width = 8
  y = np.asarray(nnx.jit(lambda bi: bi(jnp.ones((4, 3, width)), rngs=jax.random.key(0)))(
    nr.Bidirectional(*_identity_rnns(width, 2))))
  fwd, bwd = y[..., :width], y[..., width:]  # the input masks, one per row and direction
  np.testing.assert_array_equal(fwd, np.broadcast_to(fwd[:, :1], fwd.shape))
  np.testing.assert_array_equal(bwd, np.broadcast_to(bwd[:, :1], bwd.shape))
  assert not np.array_equal(fwd, bwd)


def test_stacked_layers_get_their_own_masks_from_one_key():
  # A key at call time is split, one per layer: the second layer's mask is
  # not the first's again (which would keep exactly the first's zeros).
  width = 8
  (h1, h2), y = nnx.jit(lambda s: s(jnp.ones((4, 3, width)), rngs=jax.random.key(0),
                                    return_carry=True))(
    nr.StackedRNN(*_identity_rnns(width, 2)))
  h1, h2 = np.asarray(h1), np.asarray(h2)
  assert set(np.unique(h1)) == {0.0, 2.0} and set(np.unique(h2)) == {0.0, 4.0}
  np.testing.assert_array_equal(np.asarray(y)[:, -1], h2)
  assert ((h1 != 0) & (h2 == 0)).any()  # a unit the first layer kept, the second dropped


def _gru_masked(p, h, x, mh):
  """GRU step with the recurrent mask on the matmul input only (h itself is kept)."""
  hm = h * mh
  r = reference.sigmoid(x @ p['W_ir'] + p['b_ir'] + hm @ p['W_hr'])
  z = reference.sigmoid(x @ p['W_iz'] + p['b_iz'] + hm @ p['W_hz'])
  n = np.tanh(x @ p['W_in'] + p['b_in'] + r * (hm @ p['W_hn'] + p['b_hn']))
  return (1.0 - z) * n + z * h


def _mgu_masked(p, h, x, mh):
  """MGU step with the recurrent mask on the matmul input only (h itself is kept)."""
  hm = h * mh
  f = reference.sigmoid(x @ p['W_if'] + p['b_if'] + hm @ p['W_hf'])
  n = np.tanh(x @ p['W_in'] + p['b_in'] + f * (hm @ p['W_hn'] + p['b_hn']))
  return (1.0 - f) * n + f * h


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell',
                                  'ConvLSTMCell'])
def test_numpy_reference_given_the_masks(name):
  # SimpleCell with residual=True: the residual h is the carry itself, not the masked h.
  extra = dict(residual=True) if name == 'SimpleCell' else {}
  cell = _randomize(nnx.eval_shape(lambda: CELLS[name](**RATES, **extra, rngs=nnx.Rngs(0))))
  cell.rngs = nnx.RngStream(0, tag='dropout')  # eval_shape left it abstract
  x = _x(cell)
  key = jax.random.key(7)
  # A key at call time overrides the stream; the masks it gives, in the same program.
  ys, masks = nnx.jit(lambda cell: (nr.RNN(cell)(x, rngs=key),
                                    cell.dropout_masks(x[:, 0].shape, key)))(cell)
  ys = np.asarray(ys)
  mi, mh = (np.asarray(m, np.float64) for m in masks)
  assert mi.shape == x[:, 0].shape and mh.shape == cell.output_shape(x[:, 0].shape)
  p = reference.cell_params(cell)
  h = np.zeros(mh.shape)
  c = np.zeros(mh.shape)
  for t in range(T):
    xt = x[:, t] * mi
    if name in ('LSTMCell', 'ConvLSTMCell'):  # h only enters the matmuls (convolutions)
      (c, h), _ = reference.step(p, (c, h * mh), xt)
    elif name == 'GRUCell':
      h = _gru_masked(p, h, xt, mh)
    elif name == 'MGUCell':
      h = _mgu_masked(p, h, xt, mh)
    else:
      h = np.tanh(xt @ p['W_i'] + p['b_i'] + (h * mh) @ p['W_h'] + h)
    np.testing.assert_allclose(ys[:, t], h, atol=ATOL)


def test_integer_inputs_get_float_masks():
  # Masks in the inputs' dtype divided by 0 for int32 inputs (keep / int(1 - rate)):
  # NaN and inf outputs. Int inputs are the float inputs of the same values, masks included.
  rnn, _ = _pair('LSTMCell')
  x = np.round(_x(rnn.cell) * 3)
  key = jax.random.key(7)
  got, want, masks = nnx.jit(lambda rnn: (  # one program
    rnn(x.astype(np.int32), rngs=key), rnn(x, rngs=key),
    rnn.cell.dropout_masks(x[:, 0].shape, key, jnp.int32)))(rnn)
  got = np.asarray(got)
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got, want)
  assert {m.dtype for m in masks} == {jnp.dtype(jnp.float32)}


def test_training_calls_differ_and_the_stream_advances():
  rnn, _ = _pair('LSTMCell')
  x = _x(rnn.cell)
  count = lambda: int(nnx.state(rnn, nnx.RngCount)['cell']['rngs']['count'][...])  # noqa: E731
  c0 = count()
  eager_twin = nnx.clone(rnn)
  run = nnx.jit(lambda m, x: m(x))
  a, b = np.asarray(run(rnn, x)), np.asarray(run(rnn, x))
  assert count() == c0 + 2  # the stream advanced inside jit, once per call
  assert np.abs(a - b).max() > 1e-3
  # Same stream state, same masks: jit and eager agree.
  np.testing.assert_allclose(eager_twin(x), a, atol=ATOL)
  # rngs at call time: reproducible, and the cell's own stream is left alone.
  c1 = count()
  r1, r2 = nnx.jit(lambda m, x, a, b: (m(x, rngs=a), m(x, rngs=b)))(  # one program
    rnn, x, nnx.Rngs(dropout=3), nnx.Rngs(dropout=3))
  np.testing.assert_array_equal(r1, r2)
  assert count() == c1
  assert np.abs(np.asarray(r1) - a).max() > 1e-3


def test_the_cells_stream_is_the_dropout_stream_forked_as_nnx_dropouts():
  # As nnx.Dropout(rate, rngs=rngs): the cell forks the `dropout` stream (not
  # `params`, nor the stream itself, which later layers draw from), and leaves
  # the Rngs's stream where nnx.Dropout leaves it.
  ours, theirs = nnx.Rngs(params=0, dropout=1), nnx.Rngs(params=0, dropout=1)
  cell = CELLS['GRUCell'](dropout_rate=0.3, rngs=ours)
  flax_dropout = nnx.Dropout(0.3, rngs=theirs)
  key_data = lambda stream: np.asarray(jax.random.key_data(stream.key[...]))  # noqa: E731
  np.testing.assert_array_equal(key_data(cell.rngs), key_data(flax_dropout.rngs))
  assert int(cell.rngs.count[...]) == int(flax_dropout.rngs.count[...]) == 0
  np.testing.assert_array_equal(jax.random.key_data(ours.dropout()),
                                jax.random.key_data(theirs.dropout()))


def test_gradients_finite_under_jit():
  rnn, _ = _pair('GRUCell')
  x = _x(rnn.cell)

  @nnx.jit
  def grad_step(m, x):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)

  (l1, g1), (l2, _) = grad_step(rnn, x), grad_step(rnn, x)
  leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(g1)]
  assert leaves and all(np.isfinite(g).all() for g in leaves)
  assert any(np.abs(g).max() > 0 for g in leaves)
  assert float(l1) != float(l2)  # fresh masks on the second step


def test_rates_zero_need_no_rng():
  cell = CELLS['GRUCell'](rngs=nnx.Rngs(0))
  assert not jax.tree_util.tree_leaves(nnx.state(cell, nnx.RngState))
  assert cell.dropout_masks((B, IN)) is None
  rnn = nr.RNN(cell)
  x = _x(cell)
  y = rnn(x)  # training mode, no rngs anywhere
  rnn.eval()
  np.testing.assert_array_equal(rnn(x), y)
  stack = nr.StackedRNN(rnn, nr.RNN(nnx.eval_shape(lambda: nr.GRUCell(H, H, rngs=nnx.Rngs(1)))))
  assert not jax.tree_util.tree_leaves(nnx.state(stack, nnx.RngState))


def test_a_view_of_other_modules_options_leaves_the_cells_mode():
  # nnx.view(model, use_running_average=...) calls every set_view, ours without
  # deterministic: a cell in evaluation must stay deterministic (no dropout).
  cell = random_module(lambda: nr.GRUCell(IN, H, **RATES, rngs=nnx.Rngs(0)))
  model = nnx.List([nr.RNN(cell), nnx.BatchNorm(H, rngs=nnx.Rngs(0))])
  model.eval()
  view = nnx.view(model, use_running_average=False)
  assert view[0].cell.deterministic is True and view[1].use_running_average is False
  x = _x(cell)
  np.testing.assert_array_equal(view[0](x), view[0](x))  # no masks: the same output


def test_a_random_carry_init_draws_from_the_cells_own_dropout_stream():
  # A cell with a stream of its own needs no carry stream from its layer:
  # the RNN keeps no PRNG state, and the carry's key comes from the cell's stream.
  with pytest.warns(UserWarning, match='carry_init is provided in __init__'):
    cell = random_module(lambda: nr.GRUCell(IN, H, dropout_rate=0.3,
                                            carry_init=jax.nn.initializers.normal(1.0),
                                            rngs=nnx.Rngs(0)))
  rnn = nr.RNN(cell, rngs=nnx.Rngs(5))
  paths = [path for path, _ in nnx.to_flat_state(nnx.state(rnn, nnx.RngState))]
  assert paths and all(path[0] == 'cell' for path in paths), paths
  count = int(cell.rngs.count[...])
  rnn(_x(cell))
  assert int(cell.rngs.count[...]) == count + 2  # the carry's key and the masks'


def test_rate_errors():
  with pytest.raises(ValueError, match=r'GRUCell: `dropout_rate` expected a float in \[0, 1\), '
                     r'got 1.0'):
    nr.GRUCell(IN, H, dropout_rate=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'LSTMCell: `recurrent_dropout_rate` expected a float in '
                     r'\[0, 1\), got -0.1'):
    nr.LSTMCell(IN, H, recurrent_dropout_rate=-0.1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'StackedRNN: `dropout_rate` expected a float in \[0, 1\)'):
    nr.StackedRNN(nr.RNN(nnx.eval_shape(lambda: nr.GRUCell(IN, H, rngs=nnx.Rngs(0)))),
                  dropout_rate=2.0)
