"""A Mosaic GPU probe for issue 14: how long one LSTM step takes when the
recurrence runs on Hopper's ``wgmma`` (benchmarks/RESULTS.md, "Toward 1.5x
cuDNN").

The Triton kernels (``implementation='pallas'``) spend a step on layout
conversions that Triton chooses (2.1 us a forward step at (1, ., 32, 64) on an
H200, against cuDNN's 0.67). This probe is the design RESULTS.md describes,
reduced to the forward recurrence of one LSTM direction from a zero state, no
lengths, batch up to 16: one warpgroup runs the time loop; the recurrent
weights stay in shared memory, one ``(H, H)`` tile per gate, transposed; each
step computes ``gates^T = W_h^T h^T`` as four ``wgmma`` (M = H, the batch as N
padded to 16), so the tiny batch is not padded to wgmma's 64 rows; ``h``
goes back to shared memory as the next step's operand; the input projections
``x W_i + b`` come in by TMA two steps ahead (double-buffered) and the outputs
leave by TMA. The matmul operands are bfloat16 (float32 accumulation, state
and gate math): in float32 (TF32) both operands must be K-major, ``h``
transposed, which jax 0.10's GPU interpreter cannot run, while in 16-bit the
kernel the interpreter checks is the kernel the GPU runs.

It is not part of the package. On a CPU it runs in the Mosaic GPU interpreter
(tests/test_benchmarks.py checks its values against NumPy) and lowers for CUDA
(``jax.export``); on a GPU::

  python -m benchmarks.mosaic_probe [--shapes 1x1000x32x64,8x500x64x128] [--json out.json]

times it beside ``nr.LSTM(implementation='pallas')``'s forward (the same input
projection outside) and prints the time per step.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

BLOCK_ROWS = 16  # the batch as wgmma's N: 16 bfloat16 = one 32-byte swizzled row
OPERAND = jnp.bfloat16
SHAPES = ((1, 1000, 32, 64), (8, 500, 64, 128))


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


def _transforms(row_bytes: int, dtype):
  """Tiling and swizzle of a shared-memory buffer whose minor dimension has
  ``row_bytes`` bytes (wgmma needs both operands swizzled alike: 32 bytes)."""
  plgpu = _plgpu()
  swizzle = plgpu.find_swizzle(row_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
          plgpu.SwizzleTransform(swizzle))


def _body(xw_gmem, wt_gmem, ys_gmem, w_smem, h_smem, xw_smem, y_smem, bar, *, time_steps,
          hidden, interpret):
  import jax.experimental.pallas as pl
  plgpu = _plgpu()

  def wgmma_layout(x):  # the interpreter has no layouts
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

  plgpu.copy_gmem_to_smem(wt_gmem, w_smem, bar.at[2])
  for slot in range(2):
    plgpu.copy_gmem_to_smem(xw_gmem.at[slot], xw_smem.at[slot], bar.at[slot])
  plgpu.barrier_wait(bar.at[2])
  zeros = wgmma_layout(jnp.zeros((hidden, BLOCK_ROWS), jnp.float32))
  h_smem[...] = zeros.astype(OPERAND)
  plgpu.commit_smem()

  def step(t, c):
    slot = t % 2
    plgpu.barrier_wait(bar.at[slot])
    xs = [wgmma_layout(xw_smem[slot, g]) for g in range(4)]

    def products(*accs):
      for g in range(4):
        plgpu.wgmma(accs[g], w_smem.at[g], h_smem)
      plgpu.wgmma_wait(0)
      return tuple(acc[...] for acc in accs)

    pre = pl.run_scoped(products, *[plgpu.ACC((hidden, BLOCK_ROWS), jnp.float32)] * 4)
    i, f, g, o = (a + x for a, x in zip(pre, xs))
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # y_smem[slot]'s copy of two steps ago
    h_smem[...] = h.astype(OPERAND)
    y_smem[slot] = h
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem.at[slot], ys_gmem.at[t])  # its own group

    @pl.when(t + 2 < time_steps)
    def _():
      plgpu.copy_gmem_to_smem(xw_gmem.at[t + 2], xw_smem.at[slot], bar.at[slot])

    return c

  jax.lax.fori_loop(0, time_steps, step, zeros)
  plgpu.wait_smem_to_gmem(0)


def _kernel(time_steps: int, hidden: int, interpret: bool):
  plgpu = _plgpu()
  f32 = jnp.float32
  params = None
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    params = InterpretGPUParams()
  row = _transforms(BLOCK_ROWS * 2, OPERAND)  # 32 bytes: every buffer wgmma reads
  row32 = _transforms(BLOCK_ROWS * 4, f32)
  return plgpu.kernel(
    functools.partial(_body, time_steps=time_steps, hidden=hidden, interpret=interpret),
    out_type=jax.ShapeDtypeStruct((time_steps, hidden, BLOCK_ROWS), f32),
    scratch_types=[plgpu.SMEM((4, hidden, hidden), OPERAND, transforms=row),
                   plgpu.SMEM((hidden, BLOCK_ROWS), OPERAND, transforms=row),
                   plgpu.SMEM((2, 4, hidden, BLOCK_ROWS), f32, transforms=row32),
                   plgpu.SMEM((2, hidden, BLOCK_ROWS), f32, transforms=row32),
                   plgpu.Barrier(num_barriers=3)],
    interpret=params)


def lstm_forward(xw, w_h, *, interpret: bool = False):
  """The outputs ``(time, batch, H)`` of an LSTM from a zero state, given the
  input projections ``xw = x W_i + b`` (``(time, batch, 4H)`` float32, gates
  i, f, g, o) and ``w_h`` ``(H, 4H)``. ``H`` a multiple of 64, batch at most
  16, at least 2 steps."""
  time_steps, batch, gates = xw.shape
  hidden = gates // 4
  if gates != 4 * hidden or hidden % 64 or w_h.shape != (hidden, gates):
    raise ValueError(f'expected xw (time, batch, 4H) and w_h (H, 4H) with H a multiple of 64, '
                     f'got {xw.shape} and {w_h.shape}')
  if not 1 <= batch <= BLOCK_ROWS or time_steps < 2:
    raise ValueError(f'expected a batch of 1-{BLOCK_ROWS} and at least 2 steps, got '
                     f'{batch} and {time_steps}')
  xw = jnp.pad(xw.astype(jnp.float32), ((0, 0), (0, BLOCK_ROWS - batch), (0, 0)))
  xw = xw.reshape(time_steps, BLOCK_ROWS, 4, hidden).transpose(0, 2, 3, 1)  # (T, 4, H, rows)
  wt = w_h.reshape(hidden, 4, hidden).transpose(1, 2, 0).astype(OPERAND)  # wt[g, u, k]
  ys = _kernel(time_steps, hidden, interpret)(xw, wt)
  return ys.transpose(0, 2, 1)[:, :batch]


def _median_ms(fn, *args, rounds: int, n: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - t0) / n * 1e3)
  return statistics.median(samples)


def main(argv=None) -> int:
  from flax import nnx

  import nnx_recurrent as nr
  from benchmarks import write_json

  p = argparse.ArgumentParser(prog='python -m benchmarks.mosaic_probe')
  p.add_argument('--shapes', default=','.join('x'.join(map(str, s)) for s in SHAPES))
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--json')
  p.add_argument('--interpret', action='store_true',
                 help="the Mosaic GPU interpreter, against implementation='xla' (a CPU check)")
  args = p.parse_args(argv)
  rows = []
  for shape in args.shapes.split(','):
    B, T, I, H = (int(v) for v in shape.split('x'))
    layer = nr.LSTM(I, H, implementation='xla' if args.interpret else 'pallas',
                    rngs=nnx.Rngs(0))
    cell = layer.forward[0]
    w_i, b, w_h = cell.dense_i.kernel[...], cell.dense_h.bias[...], cell.dense_h.kernel[...]
    x = jax.random.normal(jax.random.key(1), (B, T, I))
    probe = jax.jit(lambda x, w_i, b, w_h: lstm_forward(
      jnp.einsum('bti,ig->tbg', x, w_i) + b, w_h, interpret=args.interpret))
    kernels = nnx.jit(lambda layer, x: layer(x))  # the layer's forward
    try:
      y_probe = probe(x, w_i, b, w_h).transpose(1, 0, 2)
      row = dict(shape=[B, T, I, H], probe_ms=_median_ms(probe, x, w_i, b, w_h,
                                                         rounds=args.rounds),
                 max_abs_diff=float(jnp.abs(y_probe - kernels(layer, x)).max()))
    except Exception as e:  # noqa: BLE001 - a probe: report what failed, time the rest
      row = dict(shape=[B, T, I, H], probe_error=f'{type(e).__name__}: {e}'[:2000])
    row['layer'] = f'nr.LSTM[{layer.implementation}]'
    row['layer_ms'] = _median_ms(kernels, layer, x, rounds=args.rounds)
    for key in ('probe_ms', 'layer_ms'):
      if key in row:
        row[key.replace('_ms', '_us_per_step')] = row[key] * 1e3 / T
    print(row, flush=True)
    rows.append(row)
    if args.json:
      write_json(args.json, dict(devices=str(jax.devices()), jax=jax.__version__, rows=rows))
  return 0


def numpy_reference(xw, w_h) -> np.ndarray:
  """:func:`lstm_forward` in float64 NumPy, with its bfloat16 rounding of
  ``h`` and ``w_h`` before each product (for the tests)."""
  def bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(OPERAND).astype(jnp.float32), np.float64)

  xw, w = np.asarray(xw, np.float64), bf16(w_h)
  h = c = np.zeros((xw.shape[1], w.shape[0]))
  ys = []
  for t in range(xw.shape[0]):
    i, f, g, o = np.split(bf16(h) @ w + xw[t], 4, axis=-1)
    c = c / (1 + np.exp(-f)) + np.tanh(g) / (1 + np.exp(-i))
    h = np.tanh(c) / (1 + np.exp(-o))
    ys.append(h)
  return np.stack(ys)


if __name__ == '__main__':
  raise SystemExit(main())
