"""A Mosaic GPU probe for issue 14: how long one LSTM step takes when the
recurrence runs on Hopper's ``wgmma`` (benchmarks/HISTORY.md, "Toward 1.5x
cuDNN").

The Triton kernels (``implementation='pallas'``) spend a step on layout
conversions that Triton chooses (2.1 us a forward step at (1, ., 32, 64) on an
H200, against cuDNN's 0.67). This probe is the design HISTORY.md describes,
reduced to the forward pass of one LSTM direction without a gradient (the
initial carry, lengths by carry selection, zeros at padding, the final carry),
batch up to 16: one warpgroup runs the time loop; the recurrent
weights stay in shared memory, one ``(H, H)`` tile per gate, transposed; each
step computes ``gates^T = W_h^T h^T`` as four ``wgmma`` (M = H, the batch as N
padded to 16), so the tiny batch is not padded to wgmma's 64 rows; ``h``
goes back to shared memory as the next step's operand; the input projections
``x W_i + b`` and each step's valid flags come in by TMA two steps ahead
(double-buffered) and the outputs leave by TMA. The matmul operands are
bfloat16 (float32 accumulation, state and gate math): in float32 (TF32) both
operands must be K-major, ``h``
transposed, which jax 0.10's GPU interpreter cannot run, while in 16-bit the
kernel the interpreter checks is the kernel the GPU runs.

It is not part of the package. On a CPU it runs in the Mosaic GPU interpreter
(tests/test_mosaic_probe.py checks its values against NumPy) and lowers for CUDA
(``jax.export``); on a GPU::

  python -m benchmarks.mosaic_probe [--shapes 1x1000x32x64,8x500x64x128] [--json out.json]

times it beside ``nr.LSTM(implementation='pallas')``'s forward (the same input
projection outside) and prints the time per step.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import median_ms

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


def _body(xw_gmem, valid_gmem, wt_gmem, carry_gmem, ys_gmem, carry_out_gmem, w_smem, h_smem,
          xw_smem, valid_smem, y_smem, bar, *, time_steps, hidden, interpret):
  import jax.experimental.pallas as pl
  plgpu = _plgpu()

  def wgmma_layout(x):  # the interpreter has no layouts
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

  plgpu.copy_gmem_to_smem(wt_gmem, w_smem, bar.at[2])
  plgpu.copy_gmem_to_smem(carry_gmem, y_smem, bar.at[3])  # (c, h): y_smem's two slots
  def fetch(t, slot):  # step t's inputs into a slot: barrier `slot` (x W_i + b), 4 + slot (flags)
    plgpu.copy_gmem_to_smem(xw_gmem.at[t], xw_smem.at[slot], bar.at[slot])
    plgpu.copy_gmem_to_smem(valid_gmem.at[t], valid_smem.at[slot], bar.at[4 + slot])

  for slot in range(2):
    fetch(slot, slot)
  plgpu.barrier_wait(bar.at[3])
  c, h = wgmma_layout(y_smem[0]), wgmma_layout(y_smem[1])
  h_smem[...] = h.astype(OPERAND)
  plgpu.barrier_wait(bar.at[2])
  plgpu.commit_smem()

  def step(t, carry):
    c, h = carry
    slot = t % 2
    plgpu.barrier_wait(bar.at[slot])
    plgpu.barrier_wait(bar.at[4 + slot])
    # The step's x W_i + b, gate by gate, and whether it is valid (1) or padding (0).
    i, f, g, o = [wgmma_layout(xw_smem[slot, k]) for k in range(4)]
    valid = wgmma_layout(valid_smem[slot]).astype(jnp.float32)

    def products(*accs):
      for k in range(4):
        plgpu.wgmma(accs[k], w_smem.at[k], h_smem)
      plgpu.wgmma_wait(0)
      return tuple(acc[...] for acc in accs)

    pre = pl.run_scoped(products, *[plgpu.ACC((hidden, BLOCK_ROWS), jnp.float32)] * 4)
    i, f, g, o = (a + x for a, x in zip(pre, (i, f, g, o)))
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    keep = valid > 0.5  # padding keeps the carry: the last valid step's is the final one
    c, h = jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # y_smem[slot]'s copy of two steps ago
    h_smem[...] = h.astype(OPERAND)
    y_smem[slot] = jnp.where(keep, h_new, 0.0)  # zeros at padding, whatever its inputs
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(y_smem.at[slot], ys_gmem.at[t])  # its own group

    @pl.when(t + 2 < time_steps)
    def _():
      fetch(t + 2, slot)

    return c, h

  c, h = jax.lax.fori_loop(0, time_steps, step, (c, h))
  plgpu.wait_smem_to_gmem(0)
  y_smem[0], y_smem[1] = c, h
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(y_smem, carry_out_gmem)
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
  state = jax.ShapeDtypeStruct((2, hidden, BLOCK_ROWS), f32)  # (c, h), transposed
  return plgpu.kernel(
    functools.partial(_body, time_steps=time_steps, hidden=hidden, interpret=interpret),
    out_type=(jax.ShapeDtypeStruct((time_steps, hidden, BLOCK_ROWS), f32), state),
    scratch_types=[plgpu.SMEM((4, hidden, hidden), OPERAND, transforms=row),
                   plgpu.SMEM((hidden, BLOCK_ROWS), OPERAND, transforms=row),
                   plgpu.SMEM((2, 4, hidden, BLOCK_ROWS), f32, transforms=row32),
                   plgpu.SMEM((2, hidden, BLOCK_ROWS), OPERAND, transforms=row),
                   plgpu.SMEM((2, hidden, BLOCK_ROWS), f32, transforms=row32),
                   plgpu.Barrier(num_barriers=6)],
    interpret=params)


def lstm_forward(xw, w_h, *, lengths=None, carry=None, interpret: bool = False):
  """One LSTM direction over time-major inputs: ``(ys, (c, h))``, the outputs
  ``(time, batch, H)`` (zeros at padding) and the final carry (the last valid
  step's), given the input projections ``xw = x W_i + b`` (``(time, batch,
  4H)`` float32, gates i, f, g, o), ``w_h`` ``(H, 4H)``, optional ``lengths``
  ``(batch,)`` (padded steps keep the carry) and ``carry`` ``(c, h)`` (zeros
  by default). ``H`` a multiple of 64, batch at most 16, at least 2 steps."""
  time_steps, batch, gates = xw.shape
  hidden = gates // 4
  if gates != 4 * hidden or hidden % 64 or w_h.shape != (hidden, gates):
    raise ValueError(f'expected xw (time, batch, 4H) and w_h (H, 4H) with H a multiple of 64, '
                     f'got {xw.shape} and {w_h.shape}')
  if not 1 <= batch <= BLOCK_ROWS or time_steps < 2:
    raise ValueError(f'expected a batch of 1-{BLOCK_ROWS} and at least 2 steps, got '
                     f'{batch} and {time_steps}')
  rows = (0, BLOCK_ROWS - batch)
  if lengths is None:
    lengths = jnp.full((batch,), time_steps)
  valid = jnp.arange(time_steps)[:, None] < jnp.asarray(lengths)[None, :]  # (T, batch)
  valid = jnp.broadcast_to(jnp.pad(valid, ((0, 0), rows))[:, None, :].astype(OPERAND),
                           (time_steps, hidden, BLOCK_ROWS))  # as h^T's tiles, 1 or 0
  xw = xw.astype(jnp.float32).reshape(time_steps, batch, 4, hidden)
  xw = jnp.pad(xw, ((0, 0), rows, (0, 0), (0, 0))).transpose(0, 2, 3, 1)  # (T, 4, H, rows)
  if carry is None:
    carry = (jnp.zeros((batch, hidden)),) * 2
  state = jnp.pad(jnp.stack(carry).astype(jnp.float32), ((0, 0), rows, (0, 0))).transpose(0, 2, 1)
  wt = w_h.reshape(hidden, 4, hidden).transpose(1, 2, 0).astype(OPERAND)  # wt[g, u, k]
  ys, state = _kernel(time_steps, hidden, interpret)(xw, valid, wt, state)
  state = state.transpose(0, 2, 1)[:, :batch]
  return ys.transpose(0, 2, 1)[:, :batch], (state[0], state[1])


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
      jnp.einsum('bti,ig->tbg', x, w_i) + b, w_h, interpret=args.interpret)[0])
    kernels = nnx.jit(lambda layer, x: layer(x))  # the layer's forward
    try:
      y_probe = probe(x, w_i, b, w_h).transpose(1, 0, 2)
      row = dict(shape=[B, T, I, H], probe_ms=median_ms(probe, x, w_i, b, w_h,
                                                         rounds=args.rounds, n=20),
                 max_abs_diff=float(jnp.abs(y_probe - kernels(layer, x)).max()))
    except Exception as e:  # noqa: BLE001 - a probe: report what failed, time the rest
      row = dict(shape=[B, T, I, H], probe_error=f'{type(e).__name__}: {e}'[:2000])
    row['layer'] = f'nr.LSTM[{layer.implementation}]'
    row['layer_ms'] = median_ms(kernels, layer, x, rounds=args.rounds, n=20)
    for key in ('probe_ms', 'layer_ms'):
      if key in row:
        row[key.replace('_ms', '_us_per_step')] = row[key] * 1e3 / T
    print(row, flush=True)
    rows.append(row)
    if args.json:
      write_json(args.json, dict(devices=str(jax.devices()), jax=jax.__version__, rows=rows))
  return 0


def numpy_reference(xw, w_h, lengths=None, carry=None):
  """:func:`lstm_forward` in float64 NumPy, with its bfloat16 rounding of
  ``h`` and ``w_h`` before each product (for the tests)."""
  def bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(OPERAND).astype(jnp.float32), np.float64)

  xw, w = np.asarray(xw, np.float64), bf16(w_h)
  time_steps, batch = xw.shape[:2]
  lengths = np.full(batch, time_steps) if lengths is None else np.asarray(lengths)
  c, h = (np.zeros((batch, w.shape[0])),) * 2 if carry is None else (
    np.asarray(a, np.float64) for a in carry)
  ys = []
  for t in range(time_steps):
    i, f, g, o = np.split(bf16(h) @ w + xw[t], 4, axis=-1)
    c_new = c / (1 + np.exp(-f)) + np.tanh(g) / (1 + np.exp(-i))
    h_new = np.tanh(c_new) / (1 + np.exp(-o))
    valid = (t < lengths)[:, None]
    c, h = np.where(valid, c_new, c), np.where(valid, h_new, h)
    ys.append(np.where(valid, h_new, 0.0))
  return np.stack(ys), (c, h)


if __name__ == '__main__':
  raise SystemExit(main())
