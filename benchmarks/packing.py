"""Throughput of packed vs padded batches on a realistic length distribution.

Usage::

  python -m benchmarks.packing                  # writes benchmarks/PACKING.md
  python -m benchmarks.packing --quick          # smoke run, small sizes
  python -m benchmarks.packing --out /tmp/P.md

``N`` sequences with lognormal lengths (like sentence lengths in tokens:
median ``exp(mu)``, clipped to ``[1, 512]``) go through a jitted forward of
``RNN(OptimizedLSTMCell(I, H))`` two ways:

* padded: one ``(N, longest, I)`` batch with ``seq_lengths``;
* packed: :func:`nnx_recurrent.pack_sequences` into rows of ``longest`` steps
  (first-fit decreasing) with ``segment_ids``.

Both compute the same outputs for the real tokens (checked here). Reported:
real tokens per second of the forward (median of ``--reps`` runs after a
warm-up run), the share of the batch that is real tokens, and the host time
of ``pack_sequences``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr


def wait_for_quiet_machine(limit: float = 3.0, tries: int = 3, pause: float = 60.0) -> float:
  """Waits (up to ``tries`` pauses) for the 1-minute load to drop below ``limit``."""
  for _ in range(tries):
    load = os.getloadavg()[0]
    if load <= limit:
      return load
    print(f'load {load:.1f} > {limit}: waiting {pause:.0f} s', file=sys.stderr)
    time.sleep(pause)
  return os.getloadavg()[0]


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return (f'{cpu}, {os.cpu_count()} CPUs, {jax.default_backend()}; python '
          f'{platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, '
          f'numpy {np.__version__}')


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--num', type=int, default=512, help='number of sequences')
  ap.add_argument('--mu', type=float, default=3.0, help='lognormal mu (median exp(mu))')
  ap.add_argument('--sigma', type=float, default=0.8, help='lognormal sigma')
  ap.add_argument('--features', type=int, default=128, help='I')
  ap.add_argument('--hidden', type=int, default=128, help='H')
  ap.add_argument('--reps', type=int, default=5)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--quick', action='store_true', help='small sizes, for a smoke run')
  ap.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'PACKING.md'))
  args = ap.parse_args(argv)
  if args.quick:
    args.num, args.features, args.hidden, args.reps = 64, 16, 32, 2

  load_before = wait_for_quiet_machine()
  rng = np.random.default_rng(args.seed)
  lengths = np.clip(np.rint(rng.lognormal(args.mu, args.sigma, args.num)), 1, 512).astype(int)
  seqs = [rng.normal(size=(n, args.features)).astype(np.float32) for n in lengths]
  longest, tokens = int(lengths.max()), int(lengths.sum())

  padded = np.zeros((args.num, longest, args.features), np.float32)
  for i, s in enumerate(seqs):
    padded[i, : len(s)] = s
  t0 = time.perf_counter()
  packed, ids = nr.pack_sequences(seqs)
  pack_s = time.perf_counter() - t0

  rnn = nr.RNN(nr.OptimizedLSTMCell(args.features, args.hidden, rngs=nnx.Rngs(0)))
  graph, state = nnx.split(rnn)

  def fwd_padded(state, x, lengths):
    return nnx.merge(graph, state)(x, seq_lengths=lengths)

  def fwd_packed(state, x, ids):
    return nnx.merge(graph, state)(x, segment_ids=ids)

  inputs = {
    'padded (seq_lengths)': (fwd_padded, (state, jnp.asarray(padded), jnp.asarray(lengths))),
    'packed (segment_ids)': (fwd_packed, (state, jnp.asarray(packed), jnp.asarray(ids))),
  }
  compiled, results = {}, {}
  for name, (fn, a) in inputs.items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(*a).compile()
    results[name] = dict(compile_s=time.perf_counter() - t0, shape=a[1].shape)
  # Same outputs on the real tokens.
  y_pad = np.asarray(compiled['padded (seq_lengths)'](*inputs['padded (seq_lengths)'][1]))
  y_pack = compiled['packed (segment_ids)'](*inputs['packed (segment_ids)'][1])
  for i, y in enumerate(nr.unpack_sequences(np.asarray(y_pack), ids)):
    np.testing.assert_allclose(y, y_pad[i, : lengths[i]], atol=1e-4)
  # Warm-up, then interleave the two so that background load hits both alike.
  calls = {name: (lambda c=compiled[name], a=a: c(*a)) for name, (_, a) in inputs.items()}
  for call in calls.values():
    _seconds(call)
  times = {name: [] for name in inputs}
  for _ in range(args.reps):
    for name, call in calls.items():
      times[name].append(_seconds(call))
  for name in inputs:
    sec = statistics.median(times[name])
    rows, steps = results[name]['shape'][:2]
    results[name].update(sec=sec, tok_s=tokens / sec, slots=rows * steps,
                         fill=tokens / (rows * steps))
  load_after = os.getloadavg()[0]

  base = results['padded (seq_lengths)']['sec']
  cmd = 'python -m benchmarks.packing' + (' ' + ' '.join(argv if argv is not None
                                                          else sys.argv[1:])).rstrip()
  lines = [
    '# Packing vs padding: forward throughput',
    '',
    f'Command: `{cmd}` (from the repository root).',
    f'Machine: {machine()}.',
    f'1-minute load average: {load_before:.1f} before, {load_after:.1f} after '
    '(2 cores: a load above 2 means other processes competed for the CPU).'
    + (' The machine was busy: absolute times are rough; both layouts were interleaved.'
       if max(load_before, load_after) > 3 else ''),
    '',
    f'{args.num} sequences, lengths lognormal(mu={args.mu}, sigma={args.sigma}) rounded and '
    f'clipped to [1, 512]: median {int(np.median(lengths))}, mean {lengths.mean():.1f}, '
    f'max {longest}, {tokens} tokens. Model: `nr.RNN(nr.OptimizedLSTMCell({args.features}, '
    f'{args.hidden}))`, float32, jitted forward, median of {args.reps} interleaved runs.',
    f'`pack_sequences` (host, NumPy): {pack_s * 1e3:.1f} ms.',
    '',
    '| batch | shape (rows, steps) | real tokens / slots | forward s | tokens/s | speed-up |',
    '|---|---|---|---|---|---|',
  ]
  for name, r in results.items():
    lines.append(f'| {name} | {r["shape"][:2]} | {r["fill"]:.1%} | {r["sec"]:.3f} | '
                 f'{r["tok_s"]:,.0f} | {base / r["sec"]:.1f}x |')
  lines += [
    '',
    'Both layouts run `longest` sequential steps; packing shrinks the batch each step '
    'multiplies, so the gain follows the padding share. Outputs on the real tokens were '
    'checked equal (atol 1e-4) before timing.',
    '',
  ]
  text = '\n'.join(lines)
  print(text)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
