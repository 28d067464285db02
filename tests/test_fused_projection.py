"""``nr.LSTM(..., proj_features=P)`` (PyTorch's ``proj_size``) on the XLA paths.

The fused layer's hand-written backward covers the projection ``h = W_hr (o *
tanh(c'))``; here its values and gradients (``W_hr`` included, inputs,
initial carries) are checked against the generic ``RNN`` / ``Bidirectional``
composition over the same ``OptimizedLSTMCell(..., proj_features=P)`` cells,
differentiated by JAX. Packed sequences with a projection, every forced XLA
plan: ``tests/test_fused_packing.py``; the Pallas kernels:
``tests/test_pallas.py``; PyTorch's ``proj_size``: ``tests/test_interop_torch.py``.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.test_fused import (
  B,
  H,
  I,
  T,
  assert_trees_close,
  call,
  check_plans_against_generic,
  make,
  random_carry,
  values_and_grads,
)

P = 3
LENGTHS = np.array([5, 1, 0], np.int32)


def make_projected(num_layers=2, bidirectional=True, seed=0, **kw):
  return make(nr.LSTM, num_layers, bidirectional, seed, proj_features=P, **kw)


def test_matches_generic():
  """A bidirectional layer, lengths 5, 1 and 0, the default plan: values and
  gradients, garbage at padding inert, zeros at padding, the length-0 row's
  carry. Every other plan with the projection: the packed test (one projected
  layer per plan; lengths and packed sequences mask the same carry selection,
  packed sequences adding the restarts); every plan with lengths: the
  unprojected LSTM in ``tests/test_fused_padding.py``."""
  layer = make_projected(1, seed=1)
  assert layer.out_features == P and layer.forward[0].proj.kernel.shape == (H, P)
  assert layer.forward[0].dense_h.kernel.shape == (P, 4 * H)  # the recurrent kernel reads h
  x = ref.normal((B, T, I), seed=2)
  carry0 = random_carry(layer, seed=3)
  padding = np.arange(T)[None, :] >= LENGTHS[:, None]  # garbage there changes nothing
  results = check_plans_against_generic(layer, x, carry0, ['default'], padding,
                                        seq_lengths=LENGTHS)
  (carry, y), grads = results['default']
  assert y.shape == (B, T, 2 * P) and not np.asarray(y[1, 1:]).any()
  assert [a.shape for a in carry[0][0]] == [(B, H), (B, P)]
  assert_trees_close(jax.tree_util.tree_map(lambda a: a[2], carry),
                     jax.tree_util.tree_map(lambda a: a[2], carry0), atol=0, rtol=0)
  assert np.abs(np.asarray(grads[0]['forward'][0]['proj']['kernel'][...])).max() > 0


def test_one_layer_is_the_projected_cell():
  """One direction, no padding, and zero time steps: ``nr.RNN`` over the cell."""
  layer = make_projected(1, False, seed=4)
  x = ref.normal((B, T, I), seed=5)
  carry0 = random_carry(layer, seed=6)
  (out, grads), (out_g, grads_g) = values_and_grads(
    layer, x, carry0, lambda m, x, c: m(x, initial_carry=c, return_carry=True),
    lambda m, x, c: nr.RNN(m.forward[0])(x, initial_carry=c, return_carry=True))
  assert_trees_close(out, out_g)
  assert_trees_close(grads, grads_g)
  carry, y = call(layer, x[:, :0], initial_carry=carry0, return_carry=True)
  assert y.shape == (B, 0, P)
  assert_trees_close(carry, carry0, atol=0, rtol=0)


def test_errors():
  with pytest.raises(ValueError, match=r'LSTM: `proj_features` expected a positive int, got 0'):
    nr.LSTM(I, H, proj_features=0, rngs=nnx.Rngs(0))
  cudnn = (r"LSTM: `implementation` expected 'auto', 'xla' or 'pallas' with proj_features "
           r"\(jax.experimental.rnn's cuDNN LSTM has no projection\), got 'cudnn'")
  with pytest.raises(ValueError, match=cudnn):
    nr.LSTM(I, H, proj_features=2, implementation='cudnn', rngs=nnx.Rngs(0))
  layer = make_projected(1, False)
  layer.implementation = 'cudnn'  # changed after construction: the call checks again
  with pytest.raises(ValueError, match=cudnn):
    jax.eval_shape(layer, jnp.ones((B, T, I)))  # raised while tracing: nothing compiles
  with pytest.raises(TypeError, match='proj_features'):
    nr.GRU(I, H, proj_features=2, rngs=nnx.Rngs(0))


def test_projected_layer_has_a_hashable_graphdef_and_copies():
  # The functional pattern: the graphdef as a static argument of jax.jit.
  layer = make_projected(num_layers=1, bidirectional=False)
  graphdef, state = nnx.split(layer)
  x = ref.normal((B, T, I), seed=1)
  run = jax.jit(lambda g, s, x: nnx.merge(g, s)(x, seq_lengths=LENGTHS), static_argnums=0)
  got = run(graphdef, state, x)
  _, want = ref.rnn(ref.cell_params(layer.forward[0]), x, LENGTHS,  # float64 NumPy
                    jax.tree_util.tree_map(np.zeros_like, random_carry(layer)), num_batch_dims=1)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  # The copy through the same jitted function (eagerly, every operation would run again).
  np.testing.assert_array_equal(run(*nnx.split(copy.deepcopy(layer)), x), got)
