"""Training-step memory of ``RNN(cell, remat=True)`` vs ``remat=False``.

Usage::

  python -m benchmarks.remat_memory                 # writes benchmarks/REMAT.md
  python -m benchmarks.remat_memory --lengths 128 512 --no-run --out /tmp/R.md

For each sequence length ``T`` it AOT-compiles the jitted gradient step
``grad(sum(RNN(OptimizedLSTMCell(H, H))(x) ** 2))`` for ``x`` of shape
``(B, T, H)`` and reads ``compiled.memory_analysis().temp_size_in_bytes``: the
scratch memory of the executable (activations saved for the backward pass,
and the carries), a property of the compiled program, not a measurement of
a run. Unless ``--no-run``, it also times the step (median of ``--reps``
runs after a warm-up), which shows the price of recomputing every step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from benchmarks.packing import machine, wait_for_quiet_machine


def compile_step(remat: bool, time_steps: int, batch: int, hidden: int):
  """The compiled gradient step and its arguments."""
  rnn = nr.RNN(nr.OptimizedLSTMCell(hidden, hidden, rngs=nnx.Rngs(0)), remat=remat)
  graph, state = nnx.split(rnn)

  def loss(state, x):
    return jnp.sum(nnx.merge(graph, state)(x) ** 2)

  x = jax.ShapeDtypeStruct((batch, time_steps, hidden), jnp.float32)
  t0 = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(state, x).compile()
  return compiled, state, time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--lengths', type=int, nargs='+', default=[128, 512, 2000, 10000])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--hidden', type=int, default=256)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--no-run', action='store_true', help='compile only, do not time the step')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'REMAT.md'))
  args = ap.parse_args(argv)

  load_before = wait_for_quiet_machine()
  rows = []
  for t in args.lengths:
    row = dict(T=t)
    for remat in (False, True):
      compiled, state, compile_s = compile_step(remat, t, args.batch, args.hidden)
      row[remat] = dict(temp=compiled.memory_analysis().temp_size_in_bytes, compile_s=compile_s)
      if not args.no_run:
        x = jnp.asarray(np.random.default_rng(0).normal(size=(args.batch, t, args.hidden)),
                        jnp.float32)
        jax.block_until_ready(compiled(state, x))  # warm-up
        times = []
        for _ in range(args.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(state, x))
          times.append(time.perf_counter() - t0)
        row[remat]['step_s'] = statistics.median(times)
      print(t, remat, row[remat], file=sys.stderr)
    rows.append(row)
  load_after = os.getloadavg()[0]

  mib = 2.0 ** 20
  cmd = 'python -m benchmarks.remat_memory' + (' ' + ' '.join(argv if argv is not None
                                                               else sys.argv[1:])).rstrip()
  b, h = args.batch, args.hidden
  lines = [
    '# Rematerialised scan: training-step memory',
    '',
    f'Command: `{cmd}` (from the repository root).',
    f'Machine: {machine()}.',
    f'1-minute load average: {load_before:.1f} before, {load_after:.1f} after.'
    + (' The machine was busy: the step times are rough; the memory column is exact.'
       if max(load_before, load_after) > 3 else ''),
    '',
    f'`jax.jit(jax.grad(loss))` of `loss = sum(nr.RNN(nr.OptimizedLSTMCell({h}, {h}), '
    f'remat=...)(x) ** 2)`, x float32 `(B={b}, T, {h})`. temp = '
    '`compiled.memory_analysis().temp_size_in_bytes` (XLA CPU), MiB. One `(B, T, H)` '
    f'float32 array is {b * h * 4 / mib * 1000:.1f} MiB per 1000 steps.',
    '',
  ]
  timed = not args.no_run
  head = ('| T | temp MiB, remat=False | temp MiB, remat=True | ratio | '
          '(B, T, H) arrays (off / on) | compile s (off / on) |')
  rule = '|---|---|---|---|---|---|'
  if timed:
    head += f' step s (off / on, median of {args.reps}) |'
    rule += '---|'
  lines += [head, rule]
  for r in rows:
    off, on = r[False], r[True]
    unit = b * r['T'] * h * 4  # bytes of one (B, T, H) float32 array
    line = (f'| {r["T"]} | {off["temp"] / mib:.1f} | {on["temp"] / mib:.1f} | '
            f'{on["temp"] / off["temp"]:.2f} | {off["temp"] / unit:.1f} / {on["temp"] / unit:.1f} '
            f'| {off["compile_s"]:.1f} / {on["compile_s"]:.1f} |')
    if timed:
      line += f' {off["step_s"]:.3f} / {on["step_s"]:.3f} |'
    lines.append(line)
  lines += [
    '',
    'The "arrays" column is temp divided by the size of one `(B, T, H)` float32 array: '
    'what the step stores per time step, in units of one hidden vector. Without remat the '
    'backward pass keeps every step\'s gate pre-activations and activations (`4H` wide '
    'each) besides the carries; with remat it keeps the carries `(c, h)` per step and '
    'recomputes the gates, i.e. runs each step\'s forward a second time in the backward '
    'pass. Memory is linear in T either way; remat divides the slope.',
    '',
  ]
  text = '\n'.join(lines)
  print(text)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
