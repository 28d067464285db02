"""Training: jit, grad, nnx.value_and_grad with nnx.Optimizer; gradients; bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.random_params import random_module


class MeanRegressor(nnx.Module):
  """Bidirectional LSTM/GRU, masked mean over time, linear head."""

  def __init__(self, rngs):
    self.bi = nr.Bidirectional(nr.RNN(nr.LSTMCell(2, 8, rngs=rngs)),
                               nr.RNN(nr.GRUCell(2, 8, rngs=rngs)))
    self.head = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x, lengths):
    y = self.bi(x, seq_lengths=lengths)  # (batch, time, 16), zero at padding
    pooled = y.sum(axis=1) / jnp.maximum(lengths, 1)[:, None].astype(y.dtype)
    return self.head(pooled)[:, 0]


def _regression_data(n=32, time=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, time, 2)).astype(np.float32)
  lengths = rng.integers(1, time + 1, size=n).astype(np.int32)
  valid = np.arange(time) < lengths[:, None]
  x = np.where(valid[..., None], x, 0.0).astype(np.float32)
  # Target: mean of channel 0 minus channel 1 over the valid steps.
  target = ((x[..., 0] - x[..., 1]) * valid).sum(1) / lengths
  return jnp.asarray(x), jnp.asarray(lengths), jnp.asarray(target.astype(np.float32))


def test_loss_decreases_with_optimizer():
  model = random_module(lambda: MeanRegressor(nnx.Rngs(0)))  # no initializer compiles
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  x, lengths, target = _regression_data()

  def loss_fn(model):
    return jnp.mean((model(x, lengths) - target) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  losses = []
  for _ in range(20):
    loss, grads = train_step(model, optimizer)
    losses.append(float(loss))
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
  assert losses[-1] < 0.5 * losses[0], losses
  # (Eager Bidirectional calls against NumPy: tests/test_rnn.py.)


def _check_grads(module, fn, x, eps=1e-4, tol=1e-2):
  """Reverse-mode gradients of ``fn(module, x)`` against central finite differences in one
  random direction of the parameters and ``x`` (``jax.test_util.check_grads(order=1,
  modes=['rev'])``'s check), all in one program."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rng = np.random.default_rng(0)
  tangent = jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(a.dtype),
                                   (params, x))

  @jax.jit
  def run(params, x, tangent):
    f = lambda params, x: fn(nnx.merge(graphdef, params, rest), x)  # noqa: E731
    grads = jax.grad(f, argnums=(0, 1))(params, x)
    step = lambda sign: jax.tree_util.tree_map(lambda a, t: a + sign * eps * t,  # noqa: E731
                                               (params, x), tangent)
    return grads, f(*step(1.0)), f(*step(-1.0))

  grads, f_pos, f_neg = run(params, x, tangent)
  analytic = sum(np.vdot(np.asarray(g, np.float64), np.asarray(t, np.float64)) for g, t in zip(
    jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(tangent)))
  numeric = (float(f_pos) - float(f_neg)) / (2 * eps)
  assert abs(analytic) > 1e-3  # a direction the loss moves in
  np.testing.assert_allclose(analytic, numeric, atol=tol, rtol=tol)


def test_gradients_match_finite_differences():
  # Forward LSTM and backward GRU (reversed within each row), masked, with carries.
  lengths = jnp.array([4, 2, 0], jnp.int32)
  x = ref.normal((3, 4, 3), seed=1)
  module = nr.Bidirectional(nr.RNN(ref.make_cell('lstm')[0]), nr.RNN(ref.make_cell('gru')[0]),
                            return_carry=True)

  def fn(m, x):
    carry, y = m(x, seq_lengths=lengths)
    return (y ** 2).sum() + sum((c ** 2).sum() for c in jax.tree_util.tree_leaves(carry))

  _check_grads(module, fn, x)


# (A reversed RNN and every other layer: tests/test_dropin.py, garbage at padding.)
@pytest.mark.parametrize('kind', ['bidirectional'])
def test_gradient_is_zero_at_padding(kind):
  lengths = np.array([[5, 2], [0, 3]], np.int32)
  x = ref.normal((2, 2, 5, 3), seed=2)
  if kind == 'rnn_reverse':
    module = nr.RNN(ref.make_cell('optimized_lstm')[0], reverse=True, return_carry=True)
  else:
    module = nr.Bidirectional(nr.RNN(ref.make_cell('lstm')[0]),
                              nr.RNN(ref.make_cell('simple')[0]), return_carry=True)

  def loss(module, x):
    carry, y = module(x, seq_lengths=jnp.asarray(lengths))
    return (y ** 2).sum() + sum((c ** 2).sum() for c in jax.tree_util.tree_leaves(carry))

  # (A closure over the module under plain jax.grad is refused by nnx.scan: use nnx.grad.)
  g = np.asarray(nnx.jit(nnx.grad(loss, argnums=1))(module, x))
  padding = np.arange(5) >= lengths[..., None]
  assert not g[padding].any()  # exactly zero
  assert np.abs(g[~padding]).min(axis=-1).all()  # and non-zero where the data is


@pytest.mark.parametrize('name', ['lstm', 'conv_lstm_2d'])
def test_bfloat16_compute(name):
  factory, features = ref.CELLS[name]
  cell32 = ref.build(lambda: factory(nnx.Rngs(0)), seed=3)
  cell16 = ref.build(lambda: _with_dtype(factory, jnp.bfloat16))
  nnx.update(cell16, nnx.state(cell32, nnx.Param))
  lengths = jnp.array([4, 1], jnp.int32)
  x = ref.normal((2, 4, *features), seed=4)
  run = lambda cell: nr.RNN(cell, return_carry=True)(x, seq_lengths=lengths)  # noqa: E731
  (c32, y32), (c16, y16) = nnx.jit(lambda a, b: (run(a), run(b)))(cell32, cell16)
  for leaf in jax.tree_util.tree_leaves(c16):
    assert leaf.dtype == jnp.float32  # the carry stays in param_dtype
  # The matmuls ran in bfloat16 (results differ), yet stay within its precision.
  # (Outputs are float32 here: the gates meet the float32 carry, as in flax.linen.)
  y16 = np.asarray(y16, np.float32)
  assert np.abs(y16 - y32).max() > 1e-4
  np.testing.assert_allclose(y16, y32, atol=3e-2, rtol=3e-2)
  for a, b in zip(jax.tree_util.tree_leaves(c16), jax.tree_util.tree_leaves(c32)):
    np.testing.assert_allclose(a, b, atol=3e-2, rtol=3e-2)


def test_bfloat16_gradients_finite():
  cell = ref.build(lambda: nr.LSTMCell(3, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  x, lengths = ref.normal((2, 4, 3), seed=4), jnp.array([4, 1], jnp.int32)
  grads = nnx.jit(nnx.grad(
    lambda c: nr.RNN(c)(x, seq_lengths=lengths).astype(jnp.float32).sum()))(cell)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(g.dtype == jnp.float32 for g in leaves)  # param_dtype
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def _with_dtype(factory, dtype, param_dtype=jnp.float32):
  """The factory's cell, rebuilt with a computation ``dtype`` (and ``param_dtype``)."""
  cell = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
  kw = dict(in_features=cell.in_features, hidden_features=cell.hidden_features)
  if isinstance(cell, nr.ConvLSTMCell):
    kw['kernel_size'] = cell.kernel_size
  if isinstance(cell, nr.MGUCell):
    kw['reset_gate'] = cell.reset_gate
  return type(cell)(**kw, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', ['gru'])
def test_bfloat16_params_and_carry(name):
  # param_dtype=bfloat16: the carry is stored in bfloat16 even though the
  # float32 inputs promote the step's computation to float32.
  factory, features = ref.CELLS[name]
  cell16 = ref.build(lambda: _with_dtype(factory, None, param_dtype=jnp.bfloat16), seed=3)
  cell32 = ref.build(lambda: factory(nnx.Rngs(0)))
  nnx.update(cell32, jax.tree_util.tree_map(lambda p: p.astype(jnp.float32),
                                            nnx.state(cell16, nnx.Param)))
  lengths = jnp.array([4, 1], jnp.int32)
  x = ref.normal((2, 4, *features), seed=4)
  run = lambda cell: nr.RNN(cell, return_carry=True)(x, seq_lengths=lengths)  # noqa: E731
  (c16, y16), (c32, y32) = nnx.jit(lambda a, b: (run(a), run(b)))(cell16, cell32)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(c16))
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=3e-2, rtol=3e-2)


def test_demo_refuses_warmup_not_below_epochs(capsys):
  demo = pytest.importorskip('examples.japanese_vowels')  # needs the examples extra
  with pytest.raises(SystemExit):
    demo.parse_args(['--epochs', '3'])
  assert '--warmup-epochs must be in [0, --epochs) = [0, 3), got 3' in capsys.readouterr().err
  assert demo.parse_args(['--epochs', '4', '--warmup-epochs', '1']).warmup_epochs == 1


@pytest.mark.parametrize('argv, message', [
  (['--batch-size', '0'], '--batch-size must be in [1, 270] (the training set), got 0'),
  (['--batch-size', '271'], '--batch-size must be in [1, 270] (the training set), got 271'),
  (['--dropout', '1.5'], '--dropout must be in [0, 1), got 1.5'),
])
def test_demo_refuses_batch_size_and_dropout_out_of_range(capsys, argv, message):
  # Before: a ZeroDivisionError (0), optax's "positive decay_steps" (above 270: no step per
  # epoch), or a silent run at dropout 1.5.
  demo = pytest.importorskip('examples.japanese_vowels')  # needs the examples extra
  with pytest.raises(SystemExit):
    demo.parse_args(argv)
  assert message in capsys.readouterr().err
  assert demo.parse_args(['--batch-size', '270', '--dropout', '0']).batch_size == 270
