"""nr.LSTM on a GPU: cuDNN against the XLA scans and a float64 NumPy loop.

Usage (on a machine with a CUDA GPU)::

  python -m benchmarks.cudnn_check [--json out.json]
  python -m benchmarks.cudnn_check --dry   # CPU: jax.experimental.rnn.lstm_ref stands in for cuDNN

For each matmul precision (``jax_default_matmul_precision`` unset, i.e. TF32
on Ampere and later, and ``'highest'``) and each implementation it prints the
relative error ``|y - y64| / |y64|`` of the outputs against a float64 NumPy
LSTM, and the relative difference of the parameter gradients from the XLA
scans' at ``'highest'``; then step times (median of jitted calls) of cuDNN and
the scans for a one-layer and a two-layer bidirectional LSTM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from benchmarks import write_json
from nnx_recurrent._fused import internal


def numpy_lstm(layer, x, lengths):
  """Float64 outputs of a one-layer, one-direction ``nr.LSTM`` from zero carries,
  by the test suite's NumPy reference (``tests/reference.py``)."""
  from tests import reference

  cell = layer.forward[0]
  zeros = np.zeros((x.shape[0], cell.hidden_features))
  return reference.rnn(reference.cell_params(cell), x, lengths, (zeros, zeros),
                       num_batch_dims=1)[1]


def step_fns(layer):
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def fwd(params, x, lengths):
    return nnx.merge(graphdef, params, rest)(x, seq_lengths=lengths)

  def loss(params, x, lengths):
    return jnp.mean(fwd(params, x, lengths) ** 2)

  return params, jax.jit(fwd), jax.jit(jax.value_and_grad(loss))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tree_rel(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return max(rel(x, y) for x, y in zip(la, lb))


def median_ms(fn, *args, repeats=20):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def accuracy(shape, log):
  B, T, I, H = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, T, I)), jnp.float32)
  lengths = jnp.asarray(rng.integers(0, T + 1, B), jnp.int32).at[0].set(T).at[1].set(0)
  rows = []
  grads_ref = None
  for precision in ('highest', None):
    for impl in ('xla', 'cudnn'):
      layer = nr.LSTM(I, H, implementation=impl, rngs=nnx.Rngs(0))
      with jax.default_matmul_precision(precision):
        params, fwd, train = step_fns(layer)
        y = fwd(params, x, lengths)
        _, grads = train(params, x, lengths)
      if grads_ref is None:
        grads_ref = grads  # xla at 'highest'
      y64 = numpy_lstm(layer, x, np.asarray(lengths))
      row = dict(shape=shape, precision=precision or 'default', impl=impl,
                 y_rel_err_vs_float64=rel(y, y64), grad_rel_diff_vs_xla_highest=tree_rel(
                   grads, grads_ref))
      rows.append(row)
      log(f'  {row["precision"]:>8} {impl:>5}: |y - y64|/|y64| = {row["y_rel_err_vs_float64"]:.2e}'
          f'   grads vs xla/highest {row["grad_rel_diff_vs_xla_highest"]:.2e}')
  return rows


def timings(shape, num_layers, bidirectional, log):
  B, T, I, H = shape
  x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
  lengths = jnp.full((B,), T, jnp.int32)
  out = {}
  for impl in ('cudnn', 'xla'):
    layer = nr.LSTM(I, H, num_layers=num_layers, bidirectional=bidirectional,
                    implementation=impl, rngs=nnx.Rngs(0))
    params, fwd, train = step_fns(layer)
    out[impl] = (median_ms(fwd, params, x, lengths), median_ms(train, params, x, lengths))
  log(f'  {shape} layers={num_layers} bi={bidirectional}: cudnn fwd {out["cudnn"][0]:.3f} ms '
      f'train {out["cudnn"][1]:.3f} ms | xla fwd {out["xla"][0]:.3f} ms train '
      f'{out["xla"][1]:.3f} ms | train ratio cudnn/xla {out["cudnn"][1] / out["xla"][1]:.3f}')
  return dict(shape=shape, num_layers=num_layers, bidirectional=bidirectional,
              cudnn_fwd_ms=out['cudnn'][0], cudnn_train_ms=out['cudnn'][1],
              xla_fwd_ms=out['xla'][0], xla_train_ms=out['xla'][1])


ACCURACY_SHAPES = ((16, 50, 32, 64), (64, 100, 128, 256))
# (shape, num_layers, bidirectional)
TIMINGS = tuple((s, 1, False) for s in
                 ((8, 500, 64, 128), (64, 100, 128, 256), (1, 1000, 32, 64), (256, 50, 256, 512)))
TIMINGS += (((64, 100, 128, 256), 2, True),)


def _check(args, log) -> int:
  log(f'devices {jax.devices()}; jax {jax.__version__}')
  acc, times = [], []

  def write(complete):
    # After each part, whole or not at all: a run cut off by a time limit keeps what it measured.
    if args.json:
      write_json(args.json, dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__,
                                 complete=complete, accuracy=acc, timings=times))

  log('accuracy (one layer, random lengths incl. 0 and T):')
  for shape in ACCURACY_SHAPES:
    acc += accuracy(shape, log)
    write(False)
  log('timings (default precision, full lengths):')
  for shape, num_layers, bidirectional in TIMINGS:
    times.append(timings(shape, num_layers, bidirectional, log))
    write(False)
  write(True)
  if args.json:
    log(f'wrote {args.json}')
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.cudnn_check')
  p.add_argument('--json', metavar='PATH')
  p.add_argument('--dry', action='store_true',
                 help='no GPU: jax.experimental.rnn.lstm_ref stands in for cuDNN')
  args = p.parse_args(argv)

  def log(msg=''):
    print(msg, flush=True)

  if args.dry:
    from tests.test_cudnn import reference_lstm

    with internal.fake_cuda(reference_lstm):
      return _check(args, log)
  if not internal.cuda_backend():
    log(f'no CUDA GPU (default backend {jax.default_backend()!r}); use --dry')
    return 1
  return _check(args, log)


if __name__ == '__main__':
  raise SystemExit(main())
