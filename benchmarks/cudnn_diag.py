"""``jax.experimental.rnn.lstm`` (cuDNN) on its own, without this library.

  python -m benchmarks.cudnn_diag      # needs a CUDA GPU (and torch with CUDA)

1. Against JAX's reference ``lstm_ref``, outputs and gradients, for sorted,
   unsorted and full sequence lengths, one and two directions.
2. Under ``jit`` with an input made batch-major by a transpose (what a
   time-major caller does): XLA turns the transpose into a layout change that
   the custom call does not see (jax-ml/jax#19177). A reshape round trip and
   an optimization barrier do not help; ``with_layout_constraint`` does (it is
   what ``nnx_recurrent._fused._cudnn._row_major`` uses).
3. The raw forward call against ``torch.nn.LSTM`` on the same GPU.

Output recorded in ``benchmarks/gpu/`` (see RESULTS.md, "GPU").
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from jax.experimental import rnn
from jax.experimental.layout import Layout, with_layout_constraint


def _problem(B, T, I, H, bidirectional, seed=0):
  D = 2 if bidirectional else 1
  k = jax.random.split(jax.random.key(seed), 4)
  w = jax.random.normal(k[3], (rnn.get_num_params_in_lstm(I, H, 1, bidirectional),)) * 0.5
  return (jax.random.normal(k[0], (B, T, I)), jax.random.normal(k[1], (D, B, H)),
          jax.random.normal(k[2], (D, B, H)), w)


def against_reference(lengths, bidirectional, *, T=5, I=3, H=4):
  """Max |cuDNN - lstm_ref| of (y, h_n, c_n) and of the gradients of a random
  linear function of them w.r.t. (weights, x, h_0, c_0)."""
  x, h0, c0, w = _problem(len(lengths), T, I, H, bidirectional)
  lengths = jnp.asarray(lengths, jnp.int32)

  def cudnn(w, x, h0, c0):
    return rnn.lstm(x, h0, c0, w, lengths, input_size=I, hidden_size=H, num_layers=1,
                    dropout=0.0, bidirectional=bidirectional)

  def ref(w, x, h0, c0):
    return rnn.lstm_ref(x, h0, c0, *rnn.unpack_lstm_weights(w, I, H, 1, bidirectional), lengths,
                        I, H, 1, 0.0, bidirectional)

  results = []
  for f in (cudnn, ref):
    out, vjp = jax.vjp(f, w, x, h0, c0)
    keys = jax.random.split(jax.random.key(9), len(out))
    results.append(out + vjp(tuple(jax.random.normal(k, o.shape) for k, o in zip(keys, out))))
  return [float(jnp.abs(a - b).max()) for a, b in zip(*results)]


def transposed_input(*, T=5, B=4, I=3, H=4):
  """Max |error| of y under jit when x arrives time-major and is transposed."""
  x, h0, c0, w = _problem(B, T, I, H, False)
  x_tm = jnp.swapaxes(x, 0, 1)
  lengths = jnp.array([5, 1, 3, 2], jnp.int32)
  kw = dict(input_size=I, hidden_size=H, num_layers=1, dropout=0.0, bidirectional=False)
  fixes = {
    'plain transpose': lambda x: x,
    'reshape round trip': lambda x: x.reshape(-1).reshape(x.shape),
    'optimization_barrier': jax.lax.optimization_barrier,
    'with_layout_constraint': lambda x: with_layout_constraint(x, Layout((0, 1, 2))),
  }
  ref = rnn.lstm_ref(x, h0, c0, *rnn.unpack_lstm_weights(w, I, H, 1, False), lengths, I, H, 1,
                     0.0, False)[0]
  out = {}
  for name, fix in fixes.items():
    f = jax.jit(lambda x_tm, fix=fix: rnn.lstm(fix(jnp.swapaxes(x_tm, 0, 1)), h0, c0, w, lengths,
                                               **kw)[0])
    out[name] = float(jnp.abs(f(x_tm) - ref).max())
  return out


def _median_ms(fn, n=20):
  fn()
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def raw_forward_ms(B, T, I, H):
  import torch

  x, h0, c0, w = _problem(B, T, I, H, False)
  lengths = jnp.full((B,), T, jnp.int32)
  f = jax.jit(lambda x, w: rnn.lstm(x, h0, c0, w, lengths, input_size=I, hidden_size=H,
                                    num_layers=1, dropout=0.0, bidirectional=False))
  jax_ms = _median_ms(lambda: jax.block_until_ready(f(x, w)))
  module = torch.nn.LSTM(I, H, batch_first=True).cuda()
  xt = torch.randn(B, T, I, device='cuda')

  def torch_fwd():
    with torch.no_grad():
      module(xt)
    torch.cuda.synchronize()

  return jax_ms, _median_ms(torch_fwd)


def main():
  names = ('y', 'h_n', 'c_n', 'dw', 'dx', 'dh_0', 'dc_0')
  with jax.default_matmul_precision('highest'):
    for bi in (False, True):
      for lengths in ([5, 5, 5, 5], [5, 3, 2, 1], [5, 1, 3, 1], [1, 3, 5, 2], [2, 5, 5, 4]):
        err = against_reference(lengths, bi)
        print(f'bi={bi!s:5} lengths={lengths}: max|cudnn - ref| '
              + ' '.join(f'{n} {e:.1e}' for n, e in zip(names, err)), flush=True)
    for name, err in transposed_input().items():
      print(f'jit, transposed input, {name}: max|y - ref| {err:.1e}', flush=True)
  for shape in ((1, 1000, 32, 64), (8, 500, 64, 128), (64, 100, 128, 256)):
    jax_ms, torch_ms = raw_forward_ms(*shape)
    print(f'raw forward {shape}: jax.experimental.rnn.lstm {jax_ms:.3f} ms, '
          f'torch.nn.LSTM {torch_ms:.3f} ms', flush=True)


if __name__ == '__main__':
  main()
