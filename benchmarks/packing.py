"""Throughput of packed vs padded batches on a realistic length distribution.

Usage::

  python -m benchmarks.packing                  # writes benchmarks/PACKING.md
  python -m benchmarks.packing --quick          # smoke run, small sizes
  python -m benchmarks.packing --layers nr.LSTM --passes forward --out /tmp/P.md

``N`` sequences with lognormal lengths (like sentence lengths in tokens:
median ``exp(mu)``, clipped to ``[1, 512]``) go through each layer two ways:

* padded: one ``(N, longest, I)`` batch with ``seq_lengths``;
* packed: :func:`nnx_recurrent.pack_sequences` into rows of ``longest`` steps
  (first-fit decreasing) with ``segment_ids``.

Layers: the generic ``RNN(OptimizedLSTMCell(I, H))`` and the fused
``nr.LSTM(I, H)`` / ``nr.GRU(I, H)`` (default implementation). Passes: the
jitted forward, and the jitted training step (the gradient of the mean square
of the outputs with respect to the parameters). Both layouts compute the same
outputs for the real tokens (checked here for every layer). Reported: real
tokens per second (median of ``--reps`` interleaved runs after a warm-up run),
the share of the batch that is real tokens, and the host time of
``pack_sequences``.
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


LAYERS = {  # name -> (I, H) -> layer
  'nr.RNN(OptimizedLSTMCell)': lambda i, h: nr.RNN(nr.OptimizedLSTMCell(i, h, rngs=nnx.Rngs(0))),
  'nr.LSTM': lambda i, h: nr.LSTM(i, h, rngs=nnx.Rngs(0)),
  'nr.GRU': lambda i, h: nr.GRU(i, h, rngs=nnx.Rngs(0)),
}


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
  ap.add_argument('--layers', nargs='+', choices=list(LAYERS), default=list(LAYERS))
  ap.add_argument('--passes', nargs='+', choices=['forward', 'train'],
                  default=['forward', 'train'])
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

  x_pad, x_pack = jnp.asarray(padded), jnp.asarray(packed)
  masks = {'padded (seq_lengths)': (x_pad, dict(seq_lengths=jnp.asarray(lengths))),
           'packed (segment_ids)': (x_pack, dict(segment_ids=jnp.asarray(ids)))}
  compiled, results, checks = {}, {}, []
  for layer_name in args.layers:
    graph, state = nnx.split(LAYERS[layer_name](args.features, args.hidden))
    for pass_name in args.passes:
      for batch, (x, mask) in masks.items():
        def fwd(state, x, mask=mask, graph=graph):
          return nnx.merge(graph, state)(x, **mask)

        def train(state, x, fwd=fwd):
          return jax.grad(lambda s: jnp.mean(fwd(s, x) ** 2))(state)

        key = (layer_name, pass_name, batch)
        t0 = time.perf_counter()
        compiled[key] = (jax.jit(fwd if pass_name == 'forward' else train).lower(state, x)
                         .compile(), (state, x))
        results[key] = dict(compile_s=time.perf_counter() - t0, shape=x.shape)
      if pass_name == 'forward':  # same outputs on the real tokens
        y_pad, y_pack = (np.asarray(compiled[(layer_name, pass_name, b)][0](
          *compiled[(layer_name, pass_name, b)][1])) for b in masks)
        for i, y in enumerate(nr.unpack_sequences(y_pack, ids)):
          np.testing.assert_allclose(y, y_pad[i, : lengths[i]], atol=1e-4)
        checks.append(layer_name)
  # Warm-up, then interleave everything so that background load hits all alike.
  calls = {key: (lambda c=c, a=a: c(*a)) for key, (c, a) in compiled.items()}
  for call in calls.values():
    _seconds(call)
  times: dict = {key: [] for key in calls}
  for _ in range(args.reps):
    for key, call in calls.items():
      times[key].append(_seconds(call))
  for key in calls:
    sec = statistics.median(times[key])
    rows, steps = results[key]['shape'][:2]
    results[key].update(sec=sec, tok_s=tokens / sec, slots=rows * steps,
                        fill=tokens / (rows * steps))
  load_after = os.getloadavg()[0]

  cmd = 'python -m benchmarks.packing' + (' ' + ' '.join(argv if argv is not None
                                                          else sys.argv[1:])).rstrip()
  lines = [
    '# Packing vs padding: throughput',
    '',
    f'Command: `{cmd}` (from the repository root).',
    f'Machine: {machine()}.',
    f'1-minute load average: {load_before:.1f} before, {load_after:.1f} after '
    '(2 cores: a load above 2 means other processes competed for the CPU).'
    + (' The machine was busy: absolute times are rough; all runs were interleaved.'
       if max(load_before, load_after) > 3 else ''),
    '',
    f'{args.num} sequences, lengths lognormal(mu={args.mu}, sigma={args.sigma}) rounded and '
    f'clipped to [1, 512]: median {int(np.median(lengths))}, mean {lengths.mean():.1f}, '
    f'max {longest}, {tokens} tokens. I = {args.features}, H = {args.hidden}, float32, '
    f'jitted, median of {args.reps} interleaved runs; training step: the gradient of the '
    'mean square of the outputs with respect to the parameters.',
    f'`pack_sequences` (host, NumPy): {pack_s * 1e3:.1f} ms.',
    '',
    '| layer | pass | batch | shape (rows, steps) | real tokens / slots | s | tokens/s | '
    'packed / padded |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for (layer_name, pass_name, batch), r in results.items():
    base = results[(layer_name, pass_name, 'padded (seq_lengths)')]['sec']
    lines.append(f'| `{layer_name}` | {pass_name} | {batch} | {r["shape"][:2]} | '
                 f'{r["fill"]:.1%} | {r["sec"]:.3f} | {r["tok_s"]:,.0f} | '
                 f'{base / r["sec"]:.1f}x |')
  lines += [
    '',
    'Both layouts run `longest` sequential steps; packing shrinks the batch each step '
    'multiplies, so the gain follows the padding share (and how well the smaller batch '
    'uses the machine). Outputs on the real tokens were checked equal (atol 1e-4) before '
    f'timing, for {", ".join(f"`{c}`" for c in checks)}.',
    '',
  ]
  text = '\n'.join(lines)
  print(text)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
