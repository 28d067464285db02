"""LSTM projections (``proj_features``, PyTorch's ``proj_size``) in the cells:
against the NumPy formula (tests/reference.py) and against ``torch.nn.LSTM``."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.random_params import random_module

B, T, IN, H, P = 3, 6, 4, 7, 3
LENGTHS = np.array([6, 3, 0])


def _cell(kind, seed=0, **kw):
  cell = ref.build(lambda: getattr(nr, kind)(IN, H, proj_features=P, rngs=nnx.Rngs(seed), **kw),
                   seed + 10)
  return cell


@pytest.mark.parametrize('kind', ['LSTMCell', 'OptimizedLSTMCell'])
def test_projected_cell_and_rnn_match_the_formula(kind):
  cell = _cell(kind)
  assert cell.proj.kernel.shape == (H, P)
  x = ref.normal((B, T, IN), 1)
  carry = cell.initialize_carry((B, IN))
  assert [a.shape for a in carry] == [(B, H), (B, P)]
  p = ref.cell_params(cell)
  carry0 = ref.random_carry(cell, (B, IN))
  # One step and the RNN, in one program (eager calls: tests/test_rnn.py, test_cells.py).
  ((c, h), y), ((c_seq, h_seq), y_seq) = nnx.jit(lambda cell: (
    cell(carry0, x[:, 0]),
    nr.RNN(cell, return_carry=True)(x, seq_lengths=jnp.asarray(LENGTHS))))(cell)
  (c_r, h_r), y_r = ref.step(p, tuple(np.asarray(a, np.float64) for a in carry0),
                             np.asarray(x[:, 0]))
  for got, want in ((c, c_r), (h, h_r), (y, y_r)):
    np.testing.assert_allclose(got, want, atol=1e-5)
  (c, h), y = (c_seq, h_seq), y_seq
  (c_r, h_r), y_r = ref.rnn(p, np.asarray(x), LENGTHS, tuple(np.zeros(a.shape) for a in carry),
                            num_batch_dims=1)
  np.testing.assert_allclose(y, y_r, atol=1e-5)
  np.testing.assert_allclose(c, c_r, atol=1e-5)
  np.testing.assert_allclose(h, h_r, atol=1e-5)


def test_projected_lstm_matches_pytorch():
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  lstm = torch.nn.LSTM(IN, H, proj_size=P, batch_first=True)
  # Random parameters, no initializer compiles (every parameter is set below).
  cell = ref.build(lambda: nr.OptimizedLSTMCell(IN, H, proj_features=P, rngs=nnx.Rngs(0)))
  w = {n: p.detach().numpy() for n, p in lstm.named_parameters()}
  cell.dense_i.kernel[...] = jnp.asarray(w['weight_ih_l0'].T)
  cell.dense_h.kernel[...] = jnp.asarray(w['weight_hh_l0'].T)
  cell.dense_h.bias[...] = jnp.asarray(w['bias_ih_l0'] + w['bias_hh_l0'])
  cell.proj.kernel[...] = jnp.asarray(w['weight_hr_l0'].T)
  x = np.array(ref.normal((B, T, IN), 2))  # writable, for torch.from_numpy
  y_t, (h_t, c_t) = lstm(torch.from_numpy(x))
  (c, h), y = nnx.jit(lambda cell: nr.RNN(cell, return_carry=True)(jnp.asarray(x)))(cell)
  np.testing.assert_allclose(y, y_t.detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(h, h_t[0].detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(c, c_t[0].detach().numpy(), atol=1e-5)


def test_projection_with_dropout_zoneout_learned_carry_and_stacks():
  # Random parameters, built without running initializers.
  rnn = random_module(lambda: nr.RNN(
    nr.LSTMCell(IN, H, proj_features=P, recurrent_dropout_rate=0.5, zoneout_rate=0.2,
                rngs=nnx.Rngs(0)), learn_initial_carry=True))
  assert [v.shape for v in jax.tree.leaves(nnx.state(rnn, nnx.Param)['initial_carry'])] == [
    (H,), (P,)]

  def make_stack():
    rngs = nnx.Rngs(0)
    return nr.StackedRNN(
      nr.Bidirectional(nr.RNN(nr.OptimizedLSTMCell(IN, H, proj_features=P, rngs=rngs)),
                       nr.RNN(nr.OptimizedLSTMCell(IN, H, proj_features=P, rngs=rngs))),
      nr.RNN(nr.LSTMCell(2 * P, H, proj_features=P, rngs=rngs)))

  x = ref.normal((B, T, IN), 1)

  @nnx.jit  # every call in one program
  def run(rnn, stack):
    return (rnn.cell.dropout_masks((B, IN)), rnn(x, seq_lengths=jnp.asarray(LENGTHS)),
            stack(x, seq_lengths=jnp.asarray(LENGTHS), return_carry=True))

  masks, y_rnn, ((_, (c, h)), y) = run(rnn, random_module(make_stack))
  assert masks.recurrent.shape == (B, P)  # the projected h feeds the recurrent kernels
  assert y_rnn.shape == (B, T, P)
  np.testing.assert_array_equal(y[1, 3:], 0.0)
  np.testing.assert_allclose(h[1], y[1, 2], atol=0)
  assert c.shape == (B, H) and y.shape == (B, T, P)


def test_proj_features_is_checked():
  with pytest.raises(ValueError, match=re.escape(
      'LSTMCell: `proj_features` expected a positive int, got 0.')):
    nr.LSTMCell(IN, H, proj_features=0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=re.escape(
      "OptimizedLSTMCell: `proj_features` expected a positive int, got 2.5.")):
    nr.OptimizedLSTMCell(IN, H, proj_features=2.5, rngs=nnx.Rngs(0))
