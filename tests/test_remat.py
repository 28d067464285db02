"""``RNN(cell, remat=True)``: the same gradients, and less memory in the compiled executable.

References: ``remat=False``, and for the input gradient a plain ``jax.lax.scan``
of the LSTM formula written here in ``jax.numpy``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests.random_params import ZERO_INIT as _Z
from tests.random_params import randomize_params as _randomize

B, T, IN, H = 3, 7, 4, 5


def _lstm_scan(cell, x):
  """The LSTM formula in jax.numpy over ``lax.scan`` (OptimizedLSTMCell's documented layout)."""
  wi, wh, b = cell.dense_i.kernel[...], cell.dense_h.kernel[...], cell.dense_h.bias[...]

  def step(carry, xt):
    c, h = carry
    i, f, g, o = jnp.split(xt @ wi + h @ wh + b[None], 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (c, h), h

  zeros = jnp.zeros((x.shape[0], H))
  return jnp.swapaxes(jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(x, 0, 1))[1], 0, 1)


def _grads(rnn, x, w, **kw):
  """Gradients of ``sum(w * outputs) + sum(final h)`` wrt the parameters and the input."""
  # nnx.grad, not jax.grad over nnx.merge: flax 0.12.8 refuses to advance an
  # RNG stream merged inside jax.grad ("different trace level"), scan or not.
  def loss(rnn, x):
    (_, h), ys = rnn(x, return_carry=True, **kw)
    return jnp.sum(w * ys) + jnp.sum(h)

  return nnx.grad(loss, argnums=(0, 1))(rnn, x)


@pytest.mark.parametrize('case', ['plain', 'masked_reverse_dropout', 'segments'])
def test_remat_gives_the_same_gradients(case):
  rngs = nnx.Rngs(0)
  drop = dict(dropout_rate=0.3, recurrent_dropout_rate=0.3) if 'dropout' in case else {}
  cell = _randomize(nr.OptimizedLSTMCell(IN, H, **_Z, **drop, rngs=rngs))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  w = rng.normal(size=(B, T, H)).astype(np.float32)
  kw = {'plain': {},
        # The dropout masks are sampled once, outside the rematerialised steps.
        'masked_reverse_dropout': dict(seq_lengths=np.array([7, 0, 4]), reverse=True,
                                       rngs=jax.random.key(2)),
        'segments': dict(segment_ids=np.array([[1, 1, 2, 2, 2, 3, 0]] * B))}[case]

  def ref_loss(cell, x):
    ys = _lstm_scan(cell, x)
    return jnp.sum(w * ys) + jnp.sum(ys[:, -1])

  @nnx.jit  # both gradients (and the reference's) in one program
  def grads(remat, plain, x):
    ref = jax.grad(ref_loss, argnums=1)(plain.cell, x) if case == 'plain' else None
    return _grads(remat, x, w, **kw), _grads(plain, x, w, **kw), ref

  g_remat, g_plain, g_ref = grads(nr.RNN(cell, remat=True), nr.RNN(cell), x)
  leaves = jax.tree_util.tree_leaves(g_remat)
  assert len(leaves) == len(jax.tree_util.tree_leaves(g_plain)) == 4
  for a, b in zip(leaves, jax.tree_util.tree_leaves(g_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(a).max()) > 0
  if case == 'plain':
    np.testing.assert_allclose(g_remat[1], g_ref, rtol=1e-5, atol=1e-6)


def _temp_bytes(remat, time, batch=8, hidden=256, cell=None, padded=False):
  """Scratch memory of the compiled training step (compiled only, never run) of an
  RNN over ``cell(hidden, rngs)`` (default an ``OptimizedLSTMCell``), with
  ``seq_lengths`` if ``padded`` (``segment_ids`` if it is ``'packed'``)."""
  cell = cell or (lambda hidden, rngs: nr.OptimizedLSTMCell(hidden, hidden, **_Z, rngs=rngs))
  graph, params, rest = nnx.split(nr.RNN(cell(hidden, nnx.Rngs(0)), remat=remat),
                                  nnx.Param, ...)

  def loss(params, x, *masks):
    kw = {} if not masks else (
      dict(segment_ids=masks[0]) if padded == 'packed' else dict(seq_lengths=masks[0]))
    return jnp.sum(nnx.merge(graph, params, rest)(x, **kw) ** 2)

  args = [jax.ShapeDtypeStruct((batch, time, hidden), jnp.float32)]
  if padded:
    args.append(jax.ShapeDtypeStruct((batch, time) if padded == 'packed' else (batch,),
                                     jnp.int32))
  compiled = jax.jit(jax.grad(loss)).lower(params, *args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_memory_from_the_compiled_executable():
  # T=512, B=8, H=256: the stored activations dominate without remat.
  plain, remat = _temp_bytes(False, 512), _temp_bytes(True, 512)
  assert remat <= 0.6 * plain, (remat, plain, remat / plain)


@pytest.mark.parametrize('remat', [False, True])
@pytest.mark.parametrize('padded', [True, 'packed'])
@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_padding_and_packing_store_no_mask_per_step_and_feature(remat, padded, cell):
  # Carry selection broadcasts each step's (batch,) mask over the features; the
  # backward pass broadcasts it again rather than the scan saving a (batch,
  # hidden) array of booleans per step and per carry and output leaf (an LSTM
  # with lengths saved three: 3 * time * batch * hidden bytes, 15% more memory
  # with remat=True; packed, five). What the masks need is O(time * batch).
  time, batch, hidden = 256, 8, 128
  make = None if cell == 'lstm' else (
    lambda hidden, rngs: nr.GRUCell(hidden, hidden, **_Z, rngs=rngs))
  plain = _temp_bytes(remat, time, batch, hidden, cell=make)
  masked = _temp_bytes(remat, time, batch, hidden, cell=make, padded=padded)
  assert masked - plain < time * batch * hidden // 4, (masked, plain, (masked - plain) / plain)


class _CountingLSTM(nnx.Module):
  """A user's cell: an LSTM and a step count, a carry leaf shared by the rows
  (no batch axis). Under padding the scan's body masks by the cell's account of
  its rows (the leaves that lead with the batch axes), the count going on."""

  num_feature_axes = 1

  def __init__(self, hidden, rngs):
    self.lstm = nr.OptimizedLSTMCell(hidden, hidden, **_Z, rngs=rngs)

  def initialize_carry(self, input_shape, rngs=None):
    return self.lstm.initialize_carry(input_shape, rngs), jnp.zeros((), jnp.int32)

  def __call__(self, carry, x):
    state, steps = carry
    state, y = self.lstm(state, x)
    return (state, steps + 1), y


def test_remat_memory_of_a_users_cell_with_a_shared_carry_leaf_under_padding():
  # The body that masks by the cell's rows is rematerialised too.
  plain, remat = (_temp_bytes(r, 64, batch=4, hidden=32, cell=_CountingLSTM, padded=True)
                  for r in (False, True))
  assert remat <= 0.6 * plain, (remat, plain, remat / plain)
