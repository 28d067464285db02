"""Every module's ``nnx.state`` round-trips through orbax-checkpoint.

One container module holds one instance of every module kind (each cell, RNN,
Bidirectional, StackedRNN, the fused LSTM / GRU), so a single save and restore
covers them all. The restored model is built abstractly with ``nnx.eval_shape``; a model with
other parameters gives other outputs, so equality can only come from the
checkpoint.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests.random_params import random_module

ocp = pytest.importorskip('orbax.checkpoint')

B, T, IN, H = 2, 4, 3, 5


class Zoo(nnx.Module):
  """One of every module, each applied to its input by :meth:`__call__`."""

  def __init__(self, rngs: nnx.Rngs):
    self.cells = nnx.Dict(
      simple=nr.SimpleCell(IN, H, rngs=rngs),
      lstm=nr.LSTMCell(IN, H, rngs=rngs),
      optimized_lstm=nr.OptimizedLSTMCell(IN, H, rngs=rngs),
      gru=nr.GRUCell(IN, H, rngs=rngs),
      mgu=nr.MGUCell(IN, H, rngs=rngs),
      conv_lstm=nr.ConvLSTMCell(IN, H, (3,), rngs=rngs),
    )
    self.rnn = nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=rngs))
    self.bidirectional = nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=rngs)),
                                          nr.RNN(nr.GRUCell(IN, H, rngs=rngs)))
    self.stack = nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=rngs)),
                               nr.RNN(nr.MGUCell(H, H, rngs=rngs)))
    self.lstm = nr.LSTM(IN, H, num_layers=2, bidirectional=True, rngs=rngs)
    self.gru = nr.GRU(IN, H, rngs=rngs)

  def __call__(self, x, conv_x, lengths):
    out = {}
    for name, cell in self.cells.items():
      inp = conv_x if name == 'conv_lstm' else x[:, 0]
      out[name] = cell(cell.initialize_carry(inp.shape), inp)[1]
    for name in ('rnn', 'bidirectional', 'stack', 'lstm', 'gru'):
      out[f'layer_{name}'] = getattr(self, name)(x, seq_lengths=lengths)
    return out


@nnx.jit
def _outputs(model):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(B, T, IN)), jnp.float32)
  conv_x = jnp.asarray(rng.normal(size=(B, 7, IN)), jnp.float32)
  return model(x, conv_x, jnp.array([T, 2]))


def _assert_no_prng_keys(state):
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    assert not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key), path


def _committed(abstract_state):
  """Arrays committed to the device, as orbax restores them: jit keys its programs on
  that, so the three models of the test share one compiled program."""
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_state_round_trips_through_orbax(tmp_path):
  model = random_module(lambda: Zoo(nnx.Rngs(0)), seed=1, sharding=_committed)
  state = nnx.state(model)
  _assert_no_prng_keys(state)  # no RngStream lives in the state by default
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'zoo', state)
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: Zoo(nnx.Rngs(0)))
    restored = checkpointer.restore(tmp_path / 'zoo', nnx.state(abstract))
  nnx.update(abstract, restored)

  expected, got = _outputs(model), _outputs(abstract)
  fresh = _outputs(random_module(lambda: Zoo(nnx.Rngs(0)), seed=2, sharding=_committed))
  assert set(expected) == set(got) == {
    'simple', 'lstm', 'optimized_lstm', 'gru', 'mgu', 'conv_lstm', 'layer_rnn',
    'layer_bidirectional', 'layer_stack', 'layer_lstm', 'layer_gru'}
  for name in expected:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), name)
    # Other parameters give other outputs: equality came from the checkpoint.
    assert not np.allclose(np.asarray(fresh[name]), np.asarray(expected[name])), name


def test_dropout_model_saves_its_parameters(tmp_path):
  """With dropout the state holds an RNG stream; the parameters alone still round-trip."""
  model = random_module(lambda: nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5,
                                        rngs=nnx.Rngs(0)), seed=1)
  params = nnx.state(model, nnx.Param)
  _assert_no_prng_keys(params)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'params', params)
    checkpointer.wait_until_finished()
    abstract = nnx.eval_shape(lambda: nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5,
                                              rngs=nnx.Rngs(0)))
    restored = checkpointer.restore(tmp_path / 'params', nnx.state(abstract, nnx.Param))
  nnx.update(abstract, restored)
  x = jnp.ones((B, T, IN))
  model.eval()
  abstract.eval()
  # One program, over the parameters only: the abstract model's RNG stream holds no
  # arrays (the evaluation call reads none).
  (g_abstract, p_abstract, rest_abstract), (g_model, p_model, rest_model) = (
    nnx.split(m, nnx.Param, ...) for m in (abstract, model))
  got, want = jax.jit(lambda p_abstract, p_model: (
    nnx.merge(g_abstract, p_abstract, rest_abstract)(x),
    nnx.merge(g_model, p_model, rest_model)(x)))(p_abstract, p_model)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
