"""The matmul skeleton: how fast can a training step be with XLA's matmuls?

The issue's targets ask the fused layers for a training step 0.75x flax.nnx's
and 1.25x PyTorch's. Whether that is reachable on a machine depends on how
fast XLA runs the matmuls every exact training step must do. This script
times, interleaved with the real layers, a *skeleton* of the fused training
step that keeps all its matmuls, in the same serial order, and drops all its
pointwise work (gate activations, the cell update, masking, the loss):

* forward scan: per step the pre-activations ``z_t`` of all ``G`` gates, as
  the fused layers compute them (``inputs``): one joint matmul
  ``[x_t, h] [W_i; W_h]`` (LSTM only), two matmuls ``x_t W_i + h W_h``
  ('loop'), or ``x W_i`` for all steps before the loop and ``h W_h`` in it
  ('hoisted'); the next ``h`` is ``z_t``'s first ``H`` columns (so the steps
  stay serial); ``z_t`` and ``h`` are stacked (the residuals);
* backward scan, in reverse: ``dz_t`` is ``z_t`` with ``dh`` added to its
  first ``H`` columns, ``dh = dz_t W_h^T``; ``dz_t`` is stacked;
* weight gradients after the loop: ``dW_i = X^T dZ`` and
  ``dW_h = H_prev^T dZ`` as two large matmuls (materialised transposes above
  ``internal.TRANSPOSE_MIN_MACS``, as in the fused LSTM).

Its matmul FLOPs are the training step's, ``2 B T G H (2 I + 3 H)``. So
if the skeleton's best variant takes longer than ``0.75x`` flax's whole
training step, no implementation made of XLA's matmuls can meet that target
on this machine: the pointwise work only adds to it. (The skeleton writes and
reads one ``(B, G H)`` residual per step; the fused layers write ``(B, 5 H)``.)

  python -m benchmarks.bound [--shapes 8x500x64x128,...] [--rounds 7] [--json PATH]

It prints, per shape and cell, the step times (median of interleaved rounds,
as ``benchmarks.run`` measures them) and the ratios. Results and their reading:
benchmarks/RESULTS.md, "The matmul bound".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import jax
import jax.numpy as jnp

from benchmarks import run
from nnx_recurrent._fused import internal

GATES = {'lstm': 4, 'gru': 3}
INPUTS = {'lstm': ('joint', 'loop', 'hoisted'), 'gru': ('loop', 'hoisted')}
REAL = {  # family: (flax.nnx, ours, torch), as named by benchmarks.run
  'lstm': ('nnx.RNN(OptimizedLSTMCell)', 'nr.LSTM', 'torch.nn.LSTM'),
  'gru': ('nnx.RNN(GRUCell)', 'nr.GRU', 'torch.nn.GRU'),
}


def _train_target(ours: str, theirs: str) -> float:
  """The suite's training-step target for ``ours / theirs`` (``run.COMPARISONS``)."""
  return next(c[3] for c in run.COMPARISONS if c[:2] == (ours, theirs))


# The same for LSTM and GRU: 0.75x flax.nnx, 1.25x PyTorch.
FLAX_TARGET = _train_target('nr.LSTM', 'nnx.RNN(OptimizedLSTMCell)')
TORCH_TARGET = _train_target('nr.LSTM', 'torch.nn.LSTM')


def skeleton(family: str, inputs: str, H: int):
  """``(fwd, train)``: the skeleton's forward ``(w_i, w_h, xs) -> ys`` and
  training step ``(w_i, w_h, xs) -> (dW_i, dW_h)``, for time-major ``xs``."""
  if inputs not in INPUTS[family]:
    raise ValueError(f'`inputs` must be one of {INPUTS[family]} for {family!r}, got {inputs!r}')

  def forward(w_i, w_h, xs):
    seq = internal.dot(xs, w_i) if inputs == 'hoisted' else xs
    w_joint = jnp.concatenate([w_i, w_h], axis=0) if inputs == 'joint' else None

    def step(h, s_t):
      if inputs == 'joint':
        z = internal.dot(jnp.concatenate([s_t, h], axis=-1), w_joint)
      elif inputs == 'loop':
        z = internal.dot(s_t, w_i) + internal.dot(h, w_h)
      else:
        z = s_t + internal.dot(h, w_h)
      return z[:, :H], (z[:, :H], z)

    h0 = jnp.zeros((xs.shape[1], H), xs.dtype)
    _, (ys, zs) = jax.lax.scan(step, h0, seq)
    return ys, zs

  def fwd(w_i, w_h, xs):
    return forward(w_i, w_h, xs)[0]

  def train(w_i, w_h, xs):
    ys, zs = forward(w_i, w_h, xs)
    w_h_t = w_h.T

    def step(dh, z_t):
      dz = z_t.at[:, :H].add(dh)
      return internal.dot(dz, w_h_t), dz

    _, dzs = jax.lax.scan(step, jnp.zeros_like(ys[0]), zs, reverse=True)
    h_prev = internal.shift(jnp.zeros_like(ys[0]), ys)
    return (internal.flat_dot_t(xs, dzs, transpose=True),
            internal.flat_dot_t(h_prev, dzs, transpose=True))

  return fwd, train


def skeleton_args(family: str, B: int, T: int, I: int, H: int, key):
  """``(w_i, w_h, xs)``: weights scaled so that the skeleton's recurrence
  neither grows nor vanishes (no infinities or denormals in the timing)."""
  k_i, k_h, k_x = jax.random.split(key, 3)
  G = GATES[family]
  w_i = jax.random.normal(k_i, (I, G * H), jnp.float32) * (0.5 / I**0.5)
  w_h = jax.random.normal(k_h, (H, G * H), jnp.float32) * (0.5 / H**0.5)
  return w_i, w_h, jax.random.normal(k_x, (T, B, I), jnp.float32)


def skeleton_name(family: str, inputs: str) -> str:
  return f'skeleton.{family.upper()}[{inputs}]'


def _skeleton_impl(family: str, inputs: str) -> run.Impl:
  def build(B, T, I, H, key):
    fwd, train = skeleton(family, inputs, H)
    return run._jax_runner(fwd, train, skeleton_args(family, B, T, I, H, key))

  return run.Impl(skeleton_name(family, inputs), family, 'skeleton', build)


def impls(families=('lstm', 'gru')) -> list[run.Impl]:
  wanted = {name for fam in families for name in REAL[fam]}
  out = [i for i in run._impls() if i.name in wanted]
  for fam in families:
    out += [_skeleton_impl(fam, inputs) for inputs in INPUTS[fam]]
  return out


def bound_rows(results: list[run.Result]) -> list[dict]:
  """Per shape and family: the real layers' and the best skeleton's times, and
  the ratios that decide whether a target is within XLA's matmul bound."""
  by = {(tuple(r.shape), r.impl): r for r in results if r.train_ms is not None}
  rows = []
  for shape in dict.fromkeys(tuple(r.shape) for r in results):
    for fam, (flax_name, ours_name, torch_name) in REAL.items():
      sk = [by[shape, skeleton_name(fam, i)] for i in INPUTS[fam]
            if (shape, skeleton_name(fam, i)) in by]
      flax, ours, torch = (by.get((shape, n)) for n in (flax_name, ours_name, torch_name))
      if not sk or flax is None:
        continue
      best_t = min(sk, key=lambda r: r.train_ms)
      best_f = min(sk, key=lambda r: r.fwd_ms)
      row = dict(shape=list(shape), family=fam,
                 flax_fwd_ms=flax.fwd_ms, flax_train_ms=flax.train_ms,
                 ours_fwd_ms=ours.fwd_ms if ours else None,
                 ours_train_ms=ours.train_ms if ours else None,
                 torch_train_ms=torch.train_ms if torch else None,
                 skeleton_train=best_t.impl, skeleton_train_ms=best_t.train_ms,
                 skeleton_fwd=best_f.impl, skeleton_fwd_ms=best_f.fwd_ms,
                 skeleton_train_vs_flax=best_t.train_ms / flax.train_ms,
                 skeleton_fwd_vs_flax=best_f.fwd_ms / flax.fwd_ms,
                 skeleton_train_vs_torch=best_t.train_ms / torch.train_ms if torch else None)
      row['flax_0.75x_below_bound'] = row['skeleton_train_vs_flax'] > FLAX_TARGET
      row['torch_1.25x_below_bound'] = (None if torch is None
                                        else row['skeleton_train_vs_torch'] > TORCH_TARGET)
      rows.append(row)
  return rows


def bound_table(rows: list[dict]) -> str:
  f = run._fmt
  lines = [
    '| shape | cell | train ms: flax.nnx / ours / torch / skeleton (best) | skeleton / flax, '
    f'train (target {FLAX_TARGET:.2f}) | skeleton / torch, train (target {TORCH_TARGET:.2f}) | '
    'fwd ms: flax.nnx / ours / skeleton | skeleton / flax, fwd |',
    '|---|---|---|---:|---:|---|---:|',
  ]
  for r in rows:
    below = f' **> {FLAX_TARGET:.2f}**' if r['flax_0.75x_below_bound'] else ''
    below_t = f' **> {TORCH_TARGET:.2f}**' if r['torch_1.25x_below_bound'] else ''
    best = r['skeleton_train'].split('[')[1].rstrip(']')
    lines.append(
      f"| {tuple(r['shape'])} | {r['family'].upper()} | {f(r['flax_train_ms'], '.1f')} / "
      f"{f(r['ours_train_ms'], '.1f')} / {f(r['torch_train_ms'], '.1f')} / "
      f"{f(r['skeleton_train_ms'], '.1f')} ({best}) | {r['skeleton_train_vs_flax']:.3f}{below} | "
      f"{f(r['skeleton_train_vs_torch'], '.3f')}{below_t} | {f(r['flax_fwd_ms'], '.1f')} / "
      f"{f(r['ours_fwd_ms'], '.1f')} / {f(r['skeleton_fwd_ms'], '.1f')} | "
      f"{r['skeleton_fwd_vs_flax']:.3f} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.bound',
                              description=__doc__.split('\n')[0])
  p.add_argument('--shapes', type=run._parse_shapes, default=run.FULL_SHAPES,
                 help='comma-separated BxTxIxH (default: the suite\'s four shapes)')
  p.add_argument('--families', default='lstm,gru', help='lstm, gru or both (comma-separated)')
  p.add_argument('--rounds', type=int, default=7, help='interleaved rounds per shape')
  p.add_argument('--min-sample-s', type=float, default=0.05, help=argparse.SUPPRESS)
  p.add_argument('--json', metavar='PATH', help='write results and rows as JSON')
  args = p.parse_args(argv)
  families = tuple(f.strip() for f in args.families.split(','))
  for fam in families:
    if fam not in GATES:
      p.error(f'--families: expected lstm and/or gru, got {fam!r}')

  def log(msg=''):
    print(msg, flush=True)

  info = run.machine_info()
  log(f'machine: {info["cpu"]}, {info["cores"]} cores; {info["versions"]}')
  t0 = time.perf_counter()
  results = []
  chosen = impls(families)
  for shape in args.shapes:
    log(f'shape (B, T, I, H) = {shape}; load average {os.getloadavg()[0]:.2f}')
    results += run.bench_shape(shape, chosen, rounds=args.rounds,
                               min_sample_s=args.min_sample_s, budget_s=120.0, log=log)
  rows = bound_rows(results)
  log()
  log(bound_table(rows))
  command = ' '.join(['python -m benchmarks.bound', *(sys.argv[1:] if argv is None else argv)])
  log(f'\n{command}: {time.perf_counter() - t0:.0f} s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(machine=info, command=command, rows=rows,
                     results=[asdict(r) for r in results]), f, indent=1)
    log(f'wrote {args.json}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
