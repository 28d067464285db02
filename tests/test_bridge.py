"""Linen and NNX in one model through flax's bridge (``flax.nnx.bridge``).

A model migrates a part at a time: ``nnx.bridge.ToLinen`` puts an
``nnx_recurrent`` layer inside a Linen model and ``nnx.bridge.ToNNX`` a compat
layer inside an NNX one. Each is checked against the flax module it replaces
under the same bridge: flax.nnx's ``RNN`` for the first, flax.linen's for the
second.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import nnx_recurrent as nr
from nnx_recurrent import compat

B, T, IN, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 2, 0])
VALID = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None])[..., None]


def _x(seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((B, T, IN)), jnp.float32)


def _same(a, b, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol, rtol=0)


class _Tagger(nn.Module):
  """A Linen model whose recurrent layer is an NNX module (``lib``'s ``RNN``)."""

  lib: object

  @nn.compact
  def __call__(self, x, seq_lengths):
    lib = self.lib
    rnn = bridge.ToLinen(lambda rngs: lib.RNN(lib.LSTMCell(IN, H, rngs=rngs)), name='rnn')
    return nn.Dense(2)(rnn(x, seq_lengths=seq_lengths))


@pytest.mark.parametrize('padding', ['zeros', 'nan'])
def test_an_nr_layer_inside_a_linen_model_is_flax_nnxs(padding):
  """Under ``ToLinen`` the parameters are flax.nnx's (names, shapes, values) and
  the outputs at valid steps flax.nnx's, with their gradients; nr's outputs at
  padding are zeros, whatever the padding holds."""
  x = _x()
  x_in = jnp.where(VALID, x, jnp.nan) if padding == 'nan' else x
  ours, flax = _Tagger(nr), _Tagger(nnx)
  variables = jax.jit(ours.init)(jax.random.key(0), x, LENGTHS)
  _same(variables, jax.jit(flax.init)(jax.random.key(0), x, LENGTHS))

  def run(model, variables, x):
    def loss(variables):
      y = model.apply(variables, x, LENGTHS)
      return jnp.sum(jnp.where(VALID, y, 0.0) ** 2), y
    return jax.value_and_grad(loss, has_aux=True)(variables)

  (loss, y), grads = jax.jit(lambda v, x: run(ours, v, x))(variables, x_in)
  (flax_loss, flax_y), flax_grads = jax.jit(lambda v: run(flax, v, x))(variables)
  np.testing.assert_allclose(loss, flax_loss, rtol=1e-6)
  np.testing.assert_allclose(np.where(VALID, y, 0), np.where(VALID, flax_y, 0), atol=1e-6)
  _same(grads, flax_grads, atol=1e-6)
  # nr's zeros at padding, through the Dense head: its bias.
  bias = np.asarray(variables['params']['Dense_0']['bias'])
  np.testing.assert_array_equal(np.asarray(y)[2], np.broadcast_to(bias, (T, 2)))


def test_an_nr_layers_dropout_draws_from_the_linen_key():
  """Dropout inside ``ToLinen`` draws from the ``rngs={'dropout': key}`` given
  to ``apply``: the same key, the same masks; another key, others."""
  model = bridge.ToLinen(lambda rngs: nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5,
                                              rngs=rngs))
  x = _x()
  variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x)

  @jax.jit
  def apply(key):
    return model.apply(variables, x, rngs={'dropout': key})
  a, b, c = apply(jax.random.key(2)), apply(jax.random.key(2)), apply(jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-2


@pytest.mark.parametrize('layer', ['rnn', 'bidirectional'])
def test_a_compat_layer_inside_an_nnx_model_is_flax_linens(layer):
  """Under ``ToNNX`` (built by ``lazy_init``) compat's layer holds flax.linen's
  parameters and gives its outputs, padding included (compat computes on the
  padding as flax.linen does), and its carries, except by design a length-0
  row's: the initial carry (flax.linen's is its last step's)."""
  def build(lib):
    if layer == 'rnn':
      return lib.RNN(lib.GRUCell(H), return_carry=True)
    return lib.Bidirectional(lib.RNN(lib.LSTMCell(H)), lib.RNN(lib.GRUCell(H)),
                             return_carry=True)
  x = _x(1)
  models = []
  for lib in (compat, nn):
    model = bridge.ToNNX(build(lib), rngs=nnx.Rngs(0))
    bridge.lazy_init(model, x, seq_lengths=LENGTHS)
    models.append(model)
  ours, flax = models
  _same(nnx.state(ours, nnx.Param), nnx.state(flax, nnx.Param))

  @nnx.jit
  def run(model):
    def loss(model):
      carry, y = model(x, seq_lengths=LENGTHS)
      rows = jax.tree.map(lambda c: c[:2], carry)  # the rows of length > 0
      return jnp.sum(y ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(rows)), (carry, y)
    return nnx.value_and_grad(loss, has_aux=True)(model)

  (loss, (carry, y)), grads = run(ours)
  (flax_loss, (flax_carry, flax_y)), flax_grads = run(flax)
  np.testing.assert_allclose(loss, flax_loss, rtol=1e-6)
  _same(y, flax_y, atol=1e-6)
  _same(jax.tree.map(lambda c: c[:2], carry), jax.tree.map(lambda c: c[:2], flax_carry),
        atol=1e-6)
  for leaf in jax.tree.leaves(carry):
    np.testing.assert_array_equal(np.asarray(leaf)[2], 0.0)
  _same(grads, flax_grads, atol=1e-5)
