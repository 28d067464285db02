"""``benchmarks/mosaic_probe.py``: issue 14's Mosaic GPU design, an LSTM's
forward recurrence on wgmma, checked on any machine (the Mosaic GPU
interpreter, the lowering for CUDA); its speed is measured on a GPU only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import mosaic_probe


def _mosaic_gpu_of_jax_0_10_2():
  """The probe is written for the Mosaic GPU of jax 0.10.2 and later (the GPU
  machine has 0.11.2). jax 0.10.0's takes ``out_shape`` for ``out_type``, its
  interpreter fails on the probe's barrier arrays ("Too many leaves for
  PyTreeDef") and its lowering on one of its copies ("Async copies only
  support striding up to 5 dimensions"), found on the oldest jax we support."""
  if jax.__version_info__[:3] < (0, 10, 2):
    pytest.skip(f'the probe needs the Mosaic GPU of jax 0.10.2 or later, not {jax.__version__}')


def _mosaic_gpu_interpreter():
  _mosaic_gpu_of_jax_0_10_2()
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: F401
  except ImportError:
    pytest.skip(f'jax {jax.__version__} has no Mosaic GPU interpreter here')


@pytest.mark.parametrize('batch,time,hidden', [(3, 5, 64), (16, 3, 128)])
def test_mosaic_probe_is_an_lstm_in_the_gpu_interpreter(batch, time, hidden):
  """``benchmarks/mosaic_probe.py`` (issue 14's Mosaic GPU design, timed on a
  GPU only): its kernel, run by the Mosaic GPU interpreter, is an LSTM's
  forward against float64 NumPy with the same bfloat16 rounding of ``h`` and
  ``W_h``: from zeros and full length, and from a random carry with lengths
  (0, 1 and the whole sequence among them: padded steps keep the carry, output
  zeros, and NaN in their inputs reaches nothing); more steps than its two
  input buffers (each refilled two steps ahead), batch 3 padded to its 16
  rows, and H = 128 (two 64-row wgmma tiles per gate)."""
  _mosaic_gpu_interpreter()
  rng = np.random.default_rng(hidden)
  xw = rng.normal(size=(time, batch, 4 * hidden)).astype(np.float32)
  w_h = (rng.normal(size=(hidden, 4 * hidden)) / 8).astype(np.float32)
  lengths = np.arange(batch) % (time + 1)
  carry = tuple(rng.normal(size=(batch, hidden)).astype(np.float32) for _ in range(2))
  garbage = np.where((np.arange(time)[:, None] >= lengths)[..., None], np.nan, xw)
  for got, want in (
      (mosaic_probe.lstm_forward(jnp.asarray(xw), jnp.asarray(w_h), interpret=True),
       mosaic_probe.numpy_reference(xw, w_h)),
      (mosaic_probe.lstm_forward(jnp.asarray(garbage), jnp.asarray(w_h), interpret=True,
                                 lengths=jnp.asarray(lengths), carry=carry),
       mosaic_probe.numpy_reference(xw, w_h, lengths, carry))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), b, atol=2e-6, rtol=2e-6)
  with pytest.raises(ValueError, match=r'expected a batch of 1-16 and at least 2 steps, got 17'):
    mosaic_probe.lstm_forward(jnp.zeros((time, 17, 4 * hidden)), jnp.asarray(w_h))
  with pytest.raises(ValueError, match=r'H a multiple of 64, got \(2, 1, 128\)'):
    mosaic_probe.lstm_forward(jnp.zeros((2, 1, 128)), jnp.zeros((32, 128)))


def test_mosaic_probe_lowers_to_one_mosaic_gpu_call():
  """Exported for CUDA on any machine: the probe is one ``mosaic_gpu_v2``
  custom call (Mosaic GPU's lowering accepted its swizzles, wgmma operands and
  TMA copies; whether it runs, and how fast, only a GPU says)."""
  from jax import export

  _mosaic_gpu_of_jax_0_10_2()
  xw = jax.ShapeDtypeStruct((5, 8, 512), jnp.float32)
  w_h = jax.ShapeDtypeStruct((128, 512), jnp.float32)
  try:
    exported = export.export(jax.jit(mosaic_probe.lstm_forward), platforms=['cuda'])(xw, w_h)
  except ImportError as e:
    pytest.skip(f'no Mosaic GPU lowering in jax {jax.__version__}: {e}')
  assert exported.mlir_module().count('custom_call @mosaic_gpu_v2') == 1
