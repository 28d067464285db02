"""Packed sequences (``segment_ids``) in the fused ``nr.LSTM`` / ``nr.GRU``.

As in ``nr.RNN``: ``0`` is padding, every layer and direction starts a row's
first segment from its initial carry and every later segment from zeros (at
the segment's first step), and the backward
direction reverses each segment within its span. Checked against the generic
``RNN`` / ``Bidirectional`` composition over the same cells with the same
``segment_ids`` (values and gradients, every forced XLA plan, garbage at
padding), against separate runs of each segment, and through ``StackedRNN``
and ``Bidirectional`` of one-direction fused layers. The Pallas kernels:
``tests/test_pallas.py``.
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
  H,
  I,
  assert_trees_close,
  build,
  check_plans_against_generic,
  make,
  numpy_layers,
  random_carry,
  values_and_grads,
)

T = 6
# Two segments back to back; padding, a one-step segment, a gap, a segment and
# padding; an empty row. Ids unique in the batch (as pack_sequences makes them).
IDS = np.array([[1, 1, 1, 2, 2, 2], [0, 3, 0, 4, 4, 0], [0, 0, 0, 0, 0, 0]], np.int32)
SEGMENT_ROWS = np.array([0, 0, 1, 1])  # the row of each segment, by id
# Starts from the initial carry (the others: zeros).
FIRST_IN_ROW = np.array([1, 0, 1, 0], np.float32)
P = 3


def np_tree(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_every_plan_matches_generic_and_separate_runs(cls):
  """Every plan (the LSTM projected): values and gradients
  against the generic composition, garbage at padding inert; two layers on the
  default plan (the second reads the first's outputs, zero at padding, and
  starts its segments from its own initial carry), one layer of one direction
  on the others (a plan only sets how one direction's scan runs; the layers
  around it, and the backward direction's segments reversed within their
  spans around that scan, are the same code, checked here on the default
  plan). The outputs of each segment and the final carries (two layers) are
  those of the segments run alone (as the rows of a padded batch, from their
  row's initial carry or zeros) in float64 NumPy (``tests.reference``)."""
  proj = dict(proj_features=P) if cls is nr.LSTM else {}
  layer, one = make(cls, 2, True, seed=41, **proj), make(cls, seed=44, **proj)
  x = ref.normal((B, T, I), seed=42)
  carry0 = random_carry(layer, seed=43)
  results = check_plans_against_generic(layer, x, carry0, ['default'], padding=IDS == 0,
                                        segment_ids=IDS)
  paths = [p for p in PATHS if cls is nr.LSTM or p != 'joint']
  check_plans_against_generic(one, x, random_carry(one, seed=45), paths, padding=IDS == 0,
                              segment_ids=IDS)
  (carry, y), _ = results['default']
  assert not np.asarray(y)[IDS == 0].any()
  segments = nr.unpack_sequences(np.asarray(x), IDS)
  lengths = np.array([len(s) for s in segments])
  alone = np.zeros((len(segments), T, I), np.float32)
  for k, s in enumerate(segments):
    alone[k, : len(s)] = s
  carry_alone, y_alone = numpy_layers(layer, alone, lengths, jax.tree_util.tree_map(
    lambda a: np.asarray(a)[SEGMENT_ROWS] * FIRST_IN_ROW[:, None], carry0))  # float64 NumPy
  for k, y_k in enumerate(nr.unpack_sequences(np.asarray(y), IDS)):
    np.testing.assert_allclose(y_k, y_alone[k, : lengths[k]], atol=2e-5, err_msg=f'id {k + 1}')
  # A packed row's carry: its last segment's (forward; backward: after reading
  # that segment's first step); the empty row keeps its initial carry.
  last = jax.tree_util.tree_map(lambda a, a0: np.stack([a[1], a[3], a0[2]]),
                                *map(np_tree, (carry_alone, carry0)))
  assert_trees_close(carry, last, atol=2e-5)


def test_stack_of_fused_layers():
  """``StackedRNN(Bidirectional(LSTM, LSTM), GRU)`` with ``segment_ids``, time
  major: the one-direction fused layers reverse within each segment
  (``reverse`` / ``keep_order``); values and gradients against the same stack
  of ``nr.RNN``s over the fused layers' cells."""
  def factory():
    rngs = nnx.Rngs(44)
    return nr.StackedRNN(nr.Bidirectional(nr.LSTM(I, H, proj_features=P, rngs=rngs),
                                          nr.LSTM(I, H, proj_features=P, rngs=rngs)),
                         nr.GRU(2 * P, H, rngs=rngs), time_major=True)

  stack = build(factory, seed=45)
  x = ref.normal((T, B, I), seed=46)
  ids = IDS.T  # (time, batch)
  template = jax.eval_shape(lambda: stack(x, segment_ids=ids, return_carry=True)[0])
  carry0 = jax.tree_util.tree_map(lambda s: ref.normal(s.shape, 47, 0.5), template)

  def generic(m, x, c):
    bi = m.layers[0]
    same = nr.StackedRNN(nr.Bidirectional(nr.RNN(bi.forward_rnn.forward[0]),
                                          nr.RNN(bi.backward_rnn.forward[0])),
                         nr.RNN(m.layers[1].forward[0]), time_major=True)
    return same(x, segment_ids=ids, initial_carry=c, return_carry=True)

  (out, grads), (out_g, grads_g) = values_and_grads(stack, x, carry0, lambda m, x, c: m(
    x, segment_ids=ids, initial_carry=c, return_carry=True), generic)
  assert_trees_close(out, out_g)
  assert_trees_close(grads, grads_g)
  assert out[1].shape == (T, B, H) and not np.asarray(out[1])[ids == 0].any()


def test_errors():
  x = jnp.ones((B, T, I))
  lstm = build(lambda: nr.LSTM(I, H, implementation='cudnn', rngs=nnx.Rngs(0)))
  cudnn = (r"LSTM: `implementation` expected 'auto', 'xla' or 'pallas' with segment_ids "
           r"\(jax.experimental.rnn's cuDNN LSTM takes seq_lengths only\), got 'cudnn'")
  with pytest.raises(ValueError, match=cudnn):
    jax.eval_shape(lambda: lstm(x, segment_ids=IDS))  # the masks before it: traced, not run
  with pytest.raises(ValueError, match=cudnn):  # no step to run: refused all the same
    jax.eval_shape(lambda: lstm(x[:, :0], segment_ids=IDS[:, :0]))
  gru = build(lambda: nr.GRU(I, H, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'GRU: `segment_ids` expected None when seq_lengths is '
                                       r'given \(use one of them\), got both'):
    gru(x, segment_ids=IDS, seq_lengths=jnp.array([6, 5, 0]))
  with pytest.raises(ValueError, match=r'GRU: `segment_ids` expected shape \(\*batch, time\) = '
                                       r'\(3, 6\), got shape \(3, 5\)'):
    gru(x, segment_ids=IDS[:, :5])
