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


def test_rnn_exports_for_any_batch_and_time_as_flax_nnx():
  ours = nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)))
  theirs = nnx.RNN(nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0)))  # the same parameters
  run = _export_nnx(ours)
  for batch, time in SIZES:
    x, lengths = _data(batch, time)
    valid = (np.arange(time)[None, :] < np.asarray(lengths)[:, None])[..., None]
    # flax.nnx computes on padding; nr.RNN writes zeros there (its documented choice).
    np.testing.assert_allclose(run(x, lengths), np.where(valid, theirs(x, seq_lengths=lengths), 0),
                               atol=1e-6)


def test_compat_rnn_exports_for_any_batch_and_time_as_flax_linen():
  ours, theirs = compat.RNN(compat.GRUCell(H)), nn.RNN(nn.GRUCell(H))
  variables = theirs.init(jax.random.key(0), jnp.ones((2, 5, IN)))
  exported = export.export(jax.jit(lambda v, x, lengths: ours.apply(v, x, seq_lengths=lengths)))(
    variables, X_SPEC, LENGTHS_SPEC)
  for batch, time in SIZES:
    x, lengths = _data(batch, time)
    np.testing.assert_allclose(exported.call(variables, x, lengths),
                               theirs.apply(variables, x, seq_lengths=lengths), atol=1e-6)


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
  model = LAYERS[name]()
  run = _export_nnx(model)
  for batch, time in SIZES:
    x, lengths = _data(batch, time)
    np.testing.assert_allclose(run(x, lengths), model(x, seq_lengths=lengths), atol=1e-6)


def test_fused_layer_gradient_exports_for_any_batch_and_time():
  # The hand-written backward pass (custom_vjp) and its plan, at a symbolic batch.
  model = nr.LSTM(IN, H, bidirectional=True, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(p, x, lengths):
    return jnp.sum(nnx.merge(graphdef, p)(x, seq_lengths=lengths) ** 2)

  exported = export.export(jax.jit(jax.grad(loss)))(params, X_SPEC, LENGTHS_SPEC)
  for batch, time in SIZES:
    x, lengths = _data(batch, time)
    got, want = exported.call(params, x, lengths), jax.grad(loss)(params, x, lengths)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)


def test_step_by_step_decoder_exports_with_initialize_carry_of_a_symbolic_batch():
  cell = nr.GRUCell(IN, H, rngs=nnx.Rngs(0))
  reference = nnx.GRUCell(IN, H, rngs=nnx.Rngs(0))  # flax.nnx's GRU has no b_hn: set ours to 0
  cell.bias_hn[...] = jnp.zeros_like(cell.bias_hn[...])
  nnx.update(reference, {'dense_i': nnx.state(cell.dense_i), 'dense_h': nnx.state(cell.dense_h)})

  def first_step(c, x_t):  # zeros: the key flax.nnx asks for draws nothing
    return c(c.initialize_carry(x_t.shape, nnx.Rngs(0)), x_t)[1]

  graphdef, state = nnx.split(cell)
  exported = export.export(jax.jit(lambda s, x_t: first_step(nnx.merge(graphdef, s), x_t)))(
    state, jax.ShapeDtypeStruct((SYMBOLIC_B, IN), jnp.float32))
  for batch, _ in SIZES:
    x_t = _data(batch, 1)[0][:, 0]
    np.testing.assert_allclose(exported.call(state, x_t), first_step(reference, x_t), atol=1e-6)
