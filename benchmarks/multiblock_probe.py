"""A multi-block probe for issue 14: how long an LSTM step takes at hidden 128
when several blocks share its recurrent weights (FlashRNN's design), and what a
grid-wide barrier costs a step on a GPU.

An LSTM's ``W_h`` at hidden 128 in float32 is 256 KiB: more than a block's
shared memory (227 KiB) and as much as an SM's register file. The Triton
kernels (``implementation='pallas'``) hold 176 KiB of it and read the rest
from L2 at every step: 5.3 us a forward step at (8, 500, 64, 128) on an H200,
where cuDNN took 2.8 (benchmarks/HISTORY.md, session 34). This probe is the
design HISTORY.md names for that shape, reduced to an LSTM's forward
recurrence from zeros without lengths (its input projections given):

* ``blocks`` programs, each holding the columns ``[k n, (k + 1) n)`` of every
  gate (``n = H / blocks``): four ``(H, n)`` tiles of ``W_h`` (128 KiB each of
  two blocks at hidden 128), and its slice of ``c``;
* a step: the whole ``h`` read from a global buffer (volatile loads, past
  L1), the block's four gate slices as ``dot``s, its slice of the new ``h``
  written to the buffer's other half (double-buffered by step parity); then a
  grid-wide barrier: the block's threads meet (``debug_barrier``), one thread
  adds 1 to a global counter (an atomic with acquire-release semantics at GPU
  scope) and spins on it until every block has added its step's 1;
* with one block, ``h`` stays on chip (no exchange, no barrier), as in the
  package's kernels: the baseline the exchange is set against.

The spin gives up after ``max_spins`` reads (a block never scheduled, or a
run in Pallas' interpret mode, which runs the programs one after another):
each program counts the steps it gave up on (``late``), and the values are
then wrong. On a CPU, one block runs in interpret mode and equals NumPy
(tests/test_multiblock_probe.py), and every variant lowers for CUDA; the
barrier itself runs only on a GPU::

  python -m benchmarks.multiblock_probe [--json out.json]             # on a GPU
  python -m benchmarks.multiblock_probe --static --triton-python PY   # a CPU: sm_90a counts
  python -m benchmarks.multiblock_probe --rounding   # float16 against TF32 rounding (NumPy)

On a GPU it times each variant (``VARIANTS``) and checks it against an XLA
scan of the same step (``max_abs_err``, ``late``); ``--static`` compiles them
with Triton for an H200 instead (``benchmarks/triton_resources.py``'s child):
shared memory, registers, spills and one step's instructions and barriers.
It is not part of the package.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import median_ms

ROWS = 16  # Triton's dot: at least 16 rows (batch 8 padded)
STEPS = 500


class Variant(NamedTuple):
  hidden: int
  blocks: int
  num_warps: int = 4
  weights: str = 'float32'  # the held W_h's dtype: 'float16' has TF32's 10 mantissa bits

  @property
  def name(self) -> str:
    return (f'H{self.hidden}_blocks{self.blocks}_warps{self.num_warps}'
            + ('' if self.weights == 'float32' else f'_{self.weights}'))


# Hidden 128 first (issue 14's (8, 500, 64, 128), where no one block holds float32 W_h): a run
# cut off by its time limit keeps those.
VARIANTS = (
  Variant(128, 1, 8, 'float16'), Variant(128, 2, 8), Variant(128, 4), Variant(128, 2),
  Variant(128, 2, 4, 'float16'), Variant(128, 8),
  Variant(64, 1, 8), Variant(64, 2), Variant(64, 4), Variant(64, 1),
)


def _kernel(xg_ref, w_ref, hbuf_in, count_in, ys_ref, hbuf_ref, count_ref, late_ref, *,
            blocks: int, steps: int, max_spins: int, interpret: bool):
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  del hbuf_in, count_in  # aliased to hbuf_ref, count_ref
  hidden = w_ref.shape[0]
  n = hidden // blocks
  col = pl.ds(pl.program_id(0) * n, n)
  tiles = [w_ref[:, j, col] for j in range(4)]  # (H, n) each, held across steps
  rows = hbuf_ref.shape[1]

  def gates_of(h, t):
    out = []
    for j in range(4):
      g = jax.lax.dot_general(h.astype(tiles[j].dtype), tiles[j], (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
      out.append(g + xg_ref[t, :, j, col])
    i, f, g, o = out
    return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)

  def barrier():
    if not interpret:
      plgpu.debug_barrier()

  def step(t, carry):
    h, c, late = carry
    slot = t & 1  # (t % 2 fails to lower: Pallas gives the 2 a 1-bit type)
    if blocks > 1:
      h = plgpu.load(hbuf_ref.at[slot], volatile=True)
    i, f, g, o = gates_of(h, t)
    c = f * c + i * g
    h_new = o * jnp.tanh(c)
    ys_ref[t, :, col] = h_new
    if blocks == 1:
      return h_new, c, late
    plgpu.store(hbuf_ref.at[1 - slot, :, col], h_new)
    barrier()  # the block's slice is written before its thread adds to the count
    target = (t + 1) * blocks
    zero = t * 0  # traced (the interpreter's discharge of a loop takes no constants)
    seen = plgpu.atomic_add(count_ref, zero, zero + 1) + 1

    def spin(state):  # an atomic read: acquires the other blocks' slices
      zero = state[1] * 0
      return plgpu.atomic_add(count_ref, zero, zero), state[1] + 1

    seen, _ = jax.lax.while_loop(lambda s: (s[0] < target) & (s[1] < max_spins), spin,
                                 (seen, jnp.int32(0)))
    barrier()
    return h, c, late + (seen < target).astype(jnp.int32)

  h0 = hbuf_ref[0]
  c0 = jnp.zeros((rows, n), jnp.float32)
  _, _, late = jax.lax.fori_loop(0, steps, step, (h0, c0, jnp.int32(0)))
  late_ref[pl.program_id(0)] = late


def lstm_steps(xg, w_h, h0=None, *, blocks: int, num_warps: int = 4, weights=jnp.float32,
               max_spins: int = 1 << 14, interpret: bool = False):
  """An LSTM's forward recurrence from ``h0`` (default zeros) and ``c = 0``:
  ``xg`` ``(T, rows, 4, H)`` the input projections (gates ``i, f, g, o``),
  ``w_h`` ``(H, 4, H)``. Returns
  ``ys`` ``(T, rows, H)`` and each program's count of steps whose barrier gave
  up (``late``, zeros when every block met every step)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  steps, rows, _, hidden = xg.shape
  if hidden % blocks:
    raise ValueError(f'blocks must divide the hidden size {hidden}, got {blocks}')
  whole = lambda shape: pl.BlockSpec(shape, lambda k: (0,) * len(shape))  # noqa: E731
  hbuf = jnp.zeros((2, rows, hidden), jnp.float32)
  if h0 is not None:
    hbuf = hbuf.at[0].set(h0)
  count = jnp.zeros((1,), jnp.int32)
  out_shape = [jax.ShapeDtypeStruct((steps, rows, hidden), jnp.float32),
               jax.ShapeDtypeStruct(hbuf.shape, jnp.float32),
               jax.ShapeDtypeStruct(count.shape, jnp.int32),
               jax.ShapeDtypeStruct((blocks,), jnp.int32)]
  ys, _, _, late = pl.pallas_call(
    functools.partial(_kernel, blocks=blocks, steps=steps, max_spins=max_spins,
                      interpret=interpret),
    out_shape=out_shape,
    grid=(blocks,),
    in_specs=[whole(xg.shape), whole(w_h.shape), whole(hbuf.shape), whole(count.shape)],
    out_specs=[whole(s.shape) for s in out_shape],
    input_output_aliases={2: 1, 3: 2},
    interpret=interpret,
    name=f'multiblock_lstm_{blocks}',
    compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps,
                                                                num_stages=1),
  )(xg, w_h.astype(weights), hbuf, count)
  return ys, late


def xla_reference(xg, w_h, weights=jnp.float32):
  """The same recurrence as an XLA scan (``W_h`` and ``h`` rounded to ``weights``
  as the kernel's ``dot`` takes them), for the GPU run's check."""
  w = w_h.astype(weights)

  def step(carry, x):
    h, c = carry
    g = jnp.einsum('bk,kjn->bjn', h.astype(weights), w,
                   preferred_element_type=jnp.float32) + x
    i, f, o = (jax.nn.sigmoid(g[:, j]) for j in (0, 1, 3))
    c = f * c + i * jnp.tanh(g[:, 2])
    h = o * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros(xg.shape[1:2] + xg.shape[3:], jnp.float32)
  return jax.lax.scan(step, (zeros, zeros), xg)[1]


def numpy_reference(xg, w_h, weights=np.float64, h0=None):
  """Float64 NumPy: the recurrence the probe computes (``W_h`` and ``h`` rounded
  to ``weights`` before each product, as the kernel's ``dot`` takes them)."""
  return _rounded_reference(xg, w_h, lambda a: np.asarray(a, weights).astype(np.float64), h0)


def tf32(a) -> np.ndarray:
  """``a`` rounded to TF32 (10 explicit mantissa bits, to nearest, ties away from
  zero, as ``cvt.rna.tf32.f32``), in float64."""
  bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
  return ((bits + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32).astype(np.float64)


def rounding_errors(hidden: int = 128, steps: int = STEPS, rows: int = 8, seed: int = 0) -> dict:
  """How far an LSTM's outputs move from float64's when every recurrent product
  takes ``h`` and ``W_h`` rounded to float32, TF32 or float16 (NumPy, the probe's
  random inputs): ``{name: (max, mean) |y - y_float64|}``."""
  xg, w_h = inputs(hidden, steps, rows, seed)
  roundings = dict(float32=lambda a: np.asarray(a, np.float32).astype(np.float64), tf32=tf32,
                   float16=lambda a: np.asarray(a, np.float16).astype(np.float64))
  exact = numpy_reference(xg, w_h)
  out = {}
  for name, rounded in roundings.items():
    d = np.abs(_rounded_reference(xg, w_h, rounded) - exact)
    out[name] = (float(d.max()), float(d.mean()))
  return out


def _rounded_reference(xg, w_h, rounded, h0=None):
  xg, w = np.asarray(xg, np.float64), rounded(w_h)
  h = np.zeros(xg.shape[1:2] + xg.shape[3:]) if h0 is None else np.asarray(h0, np.float64)
  c = np.zeros_like(h)
  sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
  ys = []
  for x in xg:
    g = np.einsum('bk,kjn->bjn', rounded(h), w) + x
    c = sig(g[:, 1]) * c + sig(g[:, 0]) * np.tanh(g[:, 2])
    h = sig(g[:, 3]) * np.tanh(c)
    ys.append(h)
  return np.stack(ys)


def inputs(hidden: int, steps: int = STEPS, rows: int = ROWS, seed: int = 0):
  rng = np.random.default_rng(seed)
  xg = rng.normal(size=(steps, rows, 4, hidden)).astype(np.float32)
  w_h = (rng.normal(size=(hidden, 4, hidden)) / np.sqrt(hidden)).astype(np.float32)
  return jnp.asarray(xg), jnp.asarray(w_h)


def timed(variant: Variant, steps: int = STEPS) -> dict:
  """One variant on the GPU: us a step, ``late``, and its largest difference from
  :func:`xla_reference`."""
  xg, w_h = inputs(variant.hidden, steps)
  weights = jnp.dtype(variant.weights)
  run = jax.jit(functools.partial(lstm_steps, blocks=variant.blocks,
                                  num_warps=variant.num_warps, weights=weights))
  ys, late = jax.block_until_ready(run(xg, w_h))
  want = jax.jit(functools.partial(xla_reference, weights=weights))(xg, w_h)
  return dict(variant=variant.name, **variant._asdict(), steps=steps, rows=ROWS,
              us_per_step=median_ms(run, xg, w_h, rounds=5, n=10) * 1e3 / steps,
              late=[int(v) for v in np.asarray(late)],
              max_abs_err=float(jnp.max(jnp.abs(ys - want))))


def triton_ir(variant: Variant, steps: int = 8) -> str:
  """The variant's kernel as Triton IR (lowered for CUDA on any machine)."""
  from jax import export

  from benchmarks.triton_resources import _captured_triton_ir
  from nnx_recurrent._fused import internal

  xg = jax.ShapeDtypeStruct((steps, ROWS, 4, variant.hidden), jnp.float32)
  w_h = jax.ShapeDtypeStruct((variant.hidden, 4, variant.hidden), jnp.float32)
  fn = functools.partial(lstm_steps, blocks=variant.blocks, num_warps=variant.num_warps,
                         weights=jnp.dtype(variant.weights))
  unchecked = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  with _captured_triton_ir() as modules, internal.triton_lowering():
    export.export(jax.jit(fn), platforms=['cuda'], disabled_checks=unchecked)(xg, w_h)
  if len(modules) != 1:
    raise RuntimeError(f'expected one kernel, captured {len(modules)}')
  return modules[0]


def static(variants, triton_python: str) -> list[dict]:
  """Each variant compiled with Triton for an H200 (no GPU): shared memory,
  registers, spills, one step's instructions and barriers."""
  child = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_triton_compile.py')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in variants:
      path = os.path.join(tmp, f'{v.name}.ttir')
      with open(path, 'w') as f:
        f.write(triton_ir(v))
      env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(tmp, 'cache'))
      done = subprocess.run([triton_python, child, str(v.num_warps), '1', path],
                            capture_output=True, text=True, env=env)
      got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
      row = got[0] if got else dict(ok=False, error=done.stderr.strip()[-300:])
      rows.append(dict(variant=v.name, **v._asdict(), **row))
      loop = row.get('loop') or {}
      print(f'{v.name:32s} ' + (f'shared {row["shared"] / 1024:5.0f} KiB  regs '
                                f'{row["registers"]:3d}  spill {row["spill_bytes"]:5d} B  step: '
                                f'{loop.get("instructions")} instructions, '
                                f'{loop.get("barriers")} barriers'
                                if row.get('ok') else f'FAILED: {row.get("error")}'), flush=True)
  return rows


def main(argv=None) -> int:
  from benchmarks import write_json

  p = argparse.ArgumentParser(prog='python -m benchmarks.multiblock_probe')
  p.add_argument('--variants', help='names from VARIANTS, comma-separated (default: all)')
  p.add_argument('--static', action='store_true',
                 help='compile for an H200 with Triton (no GPU) instead of timing')
  p.add_argument('--triton-python', default=sys.executable)
  p.add_argument('--rounding', action='store_true',
                 help="NumPy only: an LSTM's outputs with h W_h rounded to float32, TF32 or "
                      'float16, against float64 (hidden 128, 500 steps, 8 rows)')
  p.add_argument('--json')
  args = p.parse_args(argv)
  chosen = [v for v in VARIANTS if not args.variants or v.name in args.variants.split(',')]
  if args.rounding:
    for name, (worst, mean) in rounding_errors().items():
      print(f'{name:8s} max |y - y_float64| {worst:.2e}  mean {mean:.2e}')
    return 0
  if args.static:
    rows = static(chosen, args.triton_python)
  else:
    print(f'devices {jax.devices()}; jax {jax.__version__}; {STEPS} steps, {ROWS} rows',
          flush=True)
    rows = []
    for v in chosen:
      try:
        rows.append(timed(v))
        r = rows[-1]
        print(f'{v.name:32s} {r["us_per_step"]:7.2f} us a step  late {r["late"]}  '
              f'max |y - xla| {r["max_abs_err"]:.1e}', flush=True)
      except Exception as e:  # noqa: BLE001  (a variant that fails to compile or run)
        rows.append(dict(variant=v.name, error=f'{type(e).__name__}: {str(e)[:1500]}'))
        print(f'{v.name:32s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}',
              flush=True)
      if args.json:
        write_json(args.json, dict(device_kind=jax.devices()[0].device_kind,
                                   jax=jax.__version__, rows=rows))
  if args.json:
    write_json(args.json, dict(device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                               static=args.static, rows=rows))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
