"""``jax.export`` with symbolic batch and time sizes (shape polymorphism).

A model is exported once, for any batch and sequence length, as flax.nnx's and
flax.linen's RNNs can be; the exported program is then called at concrete
sizes and compared with flax running the same parameters (or, for layers flax
does not have, with the module called directly).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

import nnx_recurrent as nr
from nnx_recurrent import compat
from tests.random_params import random_linen_variables
from tests.test_fused import build

IN, H = 3, 4
SIZES = [(3, 7), (1, 2)]  # (batch, time) the one exported program is called at
SYMBOLIC_B, SYMBOLIC_T = export.symbolic_shape('b, t')
X_SPEC = jax.ShapeDtypeStruct((SYMBOLIC_B, SYMBOLIC_T, IN), jnp.float32)
LENGTHS_SPEC = jax.ShapeDtypeStruct((SYMBOLIC_B,), jnp.int32)


def _data(batch, time, seed=0):
  rng = np.random.default_rng(seed + 10 * batch + time)
  x = rng.normal(size=(batch, time, IN)).astype(np.float32)
  lengths = rng.integers(0, time + 1, size=batch).astype(np.int32)
  lengths[0] = time
  return jnp.asarray(x), jnp.asarray(lengths)


def _export_nnx(model, fn=lambda m, x, lengths: m(x, seq_lengths=lengths)):
  graphdef, state = nnx.split(model)
  exported = export.export(jax.jit(lambda s, x, lengths: fn(nnx.merge(graphdef, s), x, lengths)))(
    state, X_SPEC, LENGTHS_SPEC)
  assert exported.out_avals[0].shape[:2] == (SYMBOLIC_B, SYMBOLIC_T)
  return lambda x, lengths: exported.call(state, x, lengths)


def _reference(model, fn=lambda m, x, lengths: m(x, seq_lengths=lengths)):
  """``(reference(state, *args), state)``: ``fn(model, *args)`` for :func:`_together`."""
  graphdef, state = nnx.split(model)
  return lambda state, *args: fn(nnx.merge(graphdef, state), *args), state


def _together(exported_call, reference, state):
  """``(exported_call(*args), reference(state, *args))`` in ONE jitted function:
  the exported call and its reference compile once per size (eagerly, a
  reference's scan compiles at every call and each operation once per shape)."""
  both = jax.jit(lambda state, *args: (exported_call(*args), reference(state, *args)))
  return lambda *args: both(state, *args)


def test_rnn_exports_for_any_batch_and_time_as_flax_nnx():
  # Random parameters (built abstractly: no initializer compiles), the same in both.
  theirs = build(lambda: nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0))))
  ours = nnx.eval_shape(lambda: nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0))))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  run = _together(_export_nnx(ours), *_reference(theirs))
  for batch, time in SIZES:
    x, lengths = _data(batch, time)
    valid = (np.arange(time)[None, :] < np.asarray(lengths)[:, None])[..., None]
    # flax.nnx computes on padding; nr.RNN writes zeros there (its documented choice).
    got, want = run(x, lengths)
    np.testing.assert_allclose(got, np.where(valid, want, 0), atol=1e-6)


def test_compat_rnn_exports_for_any_batch_and_time_as_flax_linen():
  ours, theirs = compat.RNN(compat.GRUCell(H)), nn.RNN(nn.GRUCell(H))
  variables = random_linen_variables(theirs, jnp.ones((2, 5, IN)))  # flax.linen's structure
  exported = export.export(jax.jit(lambda v, x, lengths: ours.apply(v, x, seq_lengths=lengths)))(
    variables, X_SPEC, LENGTHS_SPEC)
  run = _together(lambda x, lengths: exported.call(variables, x, lengths),
                  lambda v, x, lengths: theirs.apply(v, x, seq_lengths=lengths), variables)
  for batch, time in SIZES:
    np.testing.assert_allclose(*run(*_data(batch, time)), atol=1e-6)


LAYERS = {
  'bidirectional': lambda: nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0))),
                                            nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(1)))),
  'stack': lambda: nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=nnx.Rngs(0))),
                                 nr.RNN(nr.OptimizedLSTMCell(H, H, rngs=nnx.Rngs(1)))),
  'lstm': lambda: nr.LSTM(IN, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0)),
  'gru': lambda: nr.GRU(IN, H, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize('name', sorted(LAYERS))
def test_layer_exports_for_any_batch_and_time(name):
  model = build(LAYERS[name])  # random parameters, no initializer compiles
  run = _together(_export_nnx(model), *_reference(model))
  for batch, time in SIZES:
    np.testing.assert_allclose(*run(*_data(batch, time)), atol=1e-6)


def test_fused_layer_gradient_exports_for_any_batch_and_time():
  # The hand-written backward pass (custom_vjp) and its plan, at a symbolic batch.
  model = build(lambda: nr.LSTM(IN, H, bidirectional=True, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)

  def loss(p, x, lengths):
    return jnp.sum(nnx.merge(graphdef, p)(x, seq_lengths=lengths) ** 2)

  exported = export.export(jax.jit(jax.grad(loss)))(params, X_SPEC, LENGTHS_SPEC)
  run = _together(lambda x, lengths: exported.call(params, x, lengths), jax.grad(loss), params)
  for batch, time in SIZES:
    got, want = run(*_data(batch, time))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def test_step_by_step_decoder_exports_with_initialize_carry_of_a_symbolic_batch():
  cell = build(lambda: nr.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  reference = build(lambda: nnx.GRUCell(IN, H, rngs=nnx.Rngs(0)))
  cell.bias_hn[...] = np.zeros(H, np.float32)  # flax.nnx's GRU has no b_hn: set ours to 0
  nnx.update(reference, {'dense_i': nnx.state(cell.dense_i), 'dense_h': nnx.state(cell.dense_h)})

  def first_step(c, x_t):  # zeros: the key flax.nnx asks for draws nothing
    return c(c.initialize_carry(x_t.shape, nnx.Rngs(0)), x_t)[1]

  graphdef, state = nnx.split(cell)
  exported = export.export(jax.jit(lambda s, x_t: first_step(nnx.merge(graphdef, s), x_t)))(
    state, jax.ShapeDtypeStruct((SYMBOLIC_B, IN), jnp.float32))
  run = _together(lambda x_t: exported.call(state, x_t), *_reference(reference, first_step))
  for batch, _ in SIZES:
    np.testing.assert_allclose(*run(_data(batch, 1)[0][:, 0]), atol=1e-6)
