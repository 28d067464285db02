"""``benchmarks/multiblock_probe.py``: issue 14's multi-block LSTM step (FlashRNN's
design for hidden 128), checked on any machine: one block in Pallas' interpret
mode against NumPy, the barrier's give-up count, every variant's lowering for
CUDA. Its speed (and the barrier across blocks) is measured on a GPU only."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import multiblock_probe as probe


@pytest.mark.parametrize('hidden,weights', [(32, 'float32'), (64, 'float32'), (32, 'float16')])
def test_one_block_is_an_lstm_in_interpret_mode(hidden, weights):
  """One block (``h`` on chip, no barrier) runs an LSTM's forward recurrence from
  zeros: its outputs equal float64 NumPy's over 7 steps and 16 rows, with ``W_h`` and
  ``h`` rounded to float16 before each product where the variant holds float16
  weights; and the XLA scan the GPU run checks against is that recurrence too."""
  xg, w_h = probe.inputs(hidden, steps=7, seed=hidden)
  dtype = np.dtype(weights)
  ys, late = probe.lstm_steps(xg, w_h, blocks=1, weights=dtype, interpret=True)
  want = probe.numpy_reference(xg, w_h, weights=dtype)
  assert np.asarray(late).tolist() == [0]
  # float16: a 1e-7 difference in h can move its rounding by one float16 step
  atol = 2e-6 if weights == 'float32' else 2e-5
  np.testing.assert_allclose(np.asarray(ys), want, atol=atol, rtol=0)
  np.testing.assert_allclose(np.asarray(probe.xla_reference(xg, w_h, dtype)), want, atol=atol,
                             rtol=0)
  if weights == 'float16':  # the rounding matters: unrounded NumPy is further away
    assert np.abs(np.asarray(ys) - probe.numpy_reference(xg, w_h)).max() > 2 * atol


def test_the_barrier_gives_up_and_counts_the_steps_it_gave_up_on():
  """Two blocks in interpret mode run one after the other, so the first never sees
  the second's arrival: its spin gives up after ``max_spins`` reads at every
  step (``late`` counts them), while the second, which runs after the first has
  added all its steps, never waits. (On a GPU the blocks run at once.)"""
  xg, w_h = probe.inputs(32, steps=5, seed=1)
  _, late = probe.lstm_steps(xg, w_h, blocks=2, max_spins=3, interpret=True)
  assert np.asarray(late).tolist() == [5, 0]


@pytest.mark.parametrize('blocks', [2, 4])
def test_each_block_computes_its_columns_from_the_whole_h(blocks):
  """Several blocks' first step, from a random ``h0``: each block reads the whole
  ``h`` from the exchange buffer and writes its own columns of every gate, so the
  step equals NumPy's in every column (interpret mode runs the blocks one after
  the other: later steps would read slices not yet written, so one step only)."""
  xg, w_h = probe.inputs(64, steps=1, seed=blocks)
  h0 = np.random.default_rng(blocks).normal(size=(probe.ROWS, 64)).astype(np.float32)
  ys, _ = probe.lstm_steps(xg, w_h, jnp.asarray(h0), blocks=blocks, max_spins=1,
                           interpret=True)
  np.testing.assert_allclose(np.asarray(ys), probe.numpy_reference(xg, w_h, h0=h0), atol=2e-6,
                             rtol=0)


def test_blocks_must_divide_the_hidden_size():
  xg, w_h = probe.inputs(32, steps=2)
  with pytest.raises(ValueError, match='blocks must divide the hidden size 32, got 3'):
    probe.lstm_steps(xg, w_h, blocks=3, interpret=True)


def test_every_variant_lowers_for_cuda():
  """Each variant exports for CUDA as one Triton kernel: with several blocks, the
  step's count is an atomic add and its slices of ``h`` volatile loads; one block
  has neither; float16 weights make float16 ``dot`` operands."""
  for v in probe.VARIANTS:
    ir = probe.triton_ir(v)
    assert ('tt.atomic_rmw' in ir) == (v.blocks > 1), v
    assert ('isVolatile = true' in ir) == (v.blocks > 1), v
    assert ('tensor<16x' in ir and 'xf16>' in ir) == (v.weights == 'float16'), v


def test_tf32_rounds_to_ten_mantissa_bits_ties_away():
  one = 1.0
  assert probe.tf32([one + 2**-11, -(one + 2**-11), one + 2**-12, one + 3 * 2**-12, 3.0]).tolist() \
    == [one + 2**-10, -(one + 2**-10), one, one + 2**-10, 3.0]


def test_rounding_errors_of_float16_products_are_tf32s():
  """``--rounding`` (HISTORY.md, session 36): products of ``h`` and ``W_h`` rounded
  to float16 move an LSTM's outputs about as far from float64 as TF32's do, and
  both much further than float32's."""
  errors = probe.rounding_errors(hidden=32, steps=40, rows=4)
  assert errors['float32'][0] < 1e-6
  assert 1e-6 < errors['tf32'][0] < 1e-2
  assert 0.5 < errors['float16'][0] / errors['tf32'][0] < 2


def test_timed_reports_the_error_and_the_steps_given_up(monkeypatch):
  """``timed`` (what a GPU run records for each variant), here in interpret mode:
  one float16 block agrees with the XLA scan of the same rounding and gave up no
  step; two blocks run one after the other give up every step of the first and
  are far from the scan, which is what the record must show."""
  import functools

  monkeypatch.setattr(probe, 'lstm_steps', functools.partial(probe.lstm_steps, interpret=True))
  one = probe.timed(probe.Variant(32, 1, 4, 'float16'), steps=6)
  assert one['late'] == [0] and one['max_abs_err'] < 1e-5 and one['us_per_step'] > 0
  assert (one['hidden'], one['blocks'], one['weights'], one['steps']) == (32, 1, 'float16', 6)
  two = probe.timed(probe.Variant(32, 2), steps=3)
  assert two['late'] == [3, 0] and two['max_abs_err'] > 1e-2
