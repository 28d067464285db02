"""Garbage at padding is inert in ``nr.LSTM`` / ``nr.GRU``, on every implementation path.

NaN, inf or 1e30 in the inputs at padded positions (``seq_lengths``) must
change no output, no final carry and no gradient: the gradient with respect to
the padded inputs is exactly zero, and every other value and gradient equals
that of the same batch padded with zeros (bit for bit on the CPU). A ``where``
that discards a value computed on garbage does not discard its gradient
(NaN * 0 is NaN), so each path is forced: here the XLA scans' plans (the
custom VJP and the JAX-differentiated plan; also against the generic
composition), with dropout, reversed. The default plan with two layers:
``tests/test_fused.py::test_matches_generic_values_and_grads`` (and JAX's
differentiation of a large GRU batch: ``test_large_gru_batch_matches_generic``);
cuDNN (run by ``jax.experimental.rnn``'s reference on the CPU):
``tests/test_cudnn.py::test_matches_generic_values_and_grads``; the Pallas
kernels (interpret mode on the CPU): ``tests/test_pallas.py``; the LSTM
projected: ``tests/test_fused_projection.py``; packed sequences:
``tests/test_fused_packing.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.test_fused import (
  PATHS,
  B,
  I,
  T,
  check_plans_against_generic,
  make,
  random_carry,
  weighted_loss,
)

LENGTHS = np.array([5, 1, 0], np.int32)  # full, one step, empty
GARBAGE = (np.nan, np.inf, -np.inf, 1e30)
# Bit for bit on the CPU; a GPU may add in another order from one run to the next.
TOLERANCE = dict(rtol=0, atol=0) if jax.default_backend() == 'cpu' else dict(rtol=1e-6, atol=1e-7)


def with_padding(x, fill):
  """``x`` with ``fill`` at every padded position (``LENGTHS``); NumPy: nothing to compile."""
  pad = np.arange(T)[None, :] >= LENGTHS[:, None]
  return jnp.asarray(np.where(pad[..., None], np.asarray(fill, x.dtype), np.asarray(x)))


def runs(layer, fills, dropout_seed=None):
  """``(outputs, final carry)`` and the gradients (parameters, inputs) of a
  weighted loss, for the inputs padded with each of ``fills``, compiled once."""
  graphdef, params = nnx.split(layer)
  x = ref.normal((B, T, I), seed=3)
  carry0 = random_carry(layer, seed=4)

  @jax.jit
  def both(params, x):
    def f(params, x):
      rngs = None if dropout_seed is None else nnx.Rngs(dropout=dropout_seed)
      return nnx.merge(graphdef, params)(x, initial_carry=carry0, seq_lengths=LENGTHS,
                                         return_carry=True, rngs=rngs)

    out, vjp = jax.vjp(f, params, x)
    _, loss_vjp = jax.vjp(weighted_loss, out)
    return out, vjp(loss_vjp(jnp.ones(()))[0])

  return [both(params, with_padding(x, fill)) for fill in fills]


def assert_inert(results):
  (out0, (dparams0, dx0)), *garbage = results
  pad = np.arange(T)[None, :] >= LENGTHS[:, None]
  assert np.all(np.asarray(dx0)[pad] == 0)
  for fill, (out, (dparams, dx)) in zip(GARBAGE, garbage):
    for a, b in zip(jax.tree_util.tree_leaves((out0, dparams0, dx0)),
                    jax.tree_util.tree_leaves((out, dparams, dx))):
      a, b = np.asarray(a), np.asarray(b)
      if not np.issubdtype(a.dtype, np.inexact):  # PRNG keys and their float0 gradients
        np.testing.assert_array_equal(b, a)
        continue
      np.testing.assert_allclose(b, a, **TOLERANCE, err_msg=f'padding {fill}')


LSTM_PATHS = ['loop', 'hoisted', 'unrolled', 'joint', 'autodiff', 'gpu']
# The GRU's 'autodiff' (JAX differentiating the forward scan) with lengths and
# garbage at padding, one direction, against the generic composition: the plan
# the GRU takes by itself at 2 x 64 rows, tests/test_fused.py::
# test_large_gru_batch_matches_generic (the same check, more rows).
GRU_PATHS = ['loop', 'hoisted', 'unrolled', 'gpu']


@pytest.mark.parametrize('cls,paths', [(nr.LSTM, LSTM_PATHS), (nr.GRU, GRU_PATHS)])
def test_garbage_padding_is_inert(cls, paths):
  """Every XLA plan but the default (and the GRU's 'autodiff', above; compiled
  together, with the generic composition, which they match in values and
  gradients), one layer of one direction, lengths 5, 1 and 0 (the inputs are
  zeroed at padding before any backend runs: one layer is where garbage would
  enter; a plan sets how one direction's scan runs, and the backward direction
  of a bidirectional layer is that scan over each row's valid part reversed,
  the padding where it was: with garbage on the default plan in
  ``tests/test_fused.py::test_matches_generic_values_and_grads[2-bi-lengths-*]``)."""
  layer = make(cls)
  x = ref.normal((B, T, I), seed=3)
  padding = np.arange(T)[None, :] >= LENGTHS[:, None]
  check_plans_against_generic(layer, x, random_carry(layer, seed=4), paths, padding,
                              seq_lengths=LENGTHS)  # finite, too


# The dropout between layers and the reversal are the layers' own code, shared
# by both (as in tests/test_fused.py::test_dropout_between_layers).
@pytest.mark.parametrize('cls', [nr.GRU])
def test_garbage_padding_is_inert_with_dropout_and_reverse(cls):
  """Dropout between layers (the same key in every run), one direction, reversed."""
  layer = make(cls, 2, dropout_rate=0.5, reverse=True)
  assert_inert(runs(layer, (0.0, *GARBAGE), dropout_seed=5))


def test_paths_cover_the_plans():
  assert set(LSTM_PATHS) == set(PATHS)
