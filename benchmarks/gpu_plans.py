"""Which scan plan is fastest for the fused layers on this machine (made for GPUs).

The fused layers pick how a direction is scanned from the shape of one step
(``nnx_recurrent/_fused/_plans.py``); its thresholds were measured on a 2-core
CPU. On an H200 every JAX scan at batch 1-8 cost 6.7-9 us per step (XLA's
per-iteration cost, see benchmarks/RESULTS.md, "GPU"), so unrolling, which the
CPU plans avoid, pays there. This script times ``nr.LSTM`` / ``nr.GRU`` (the
XLA scans) with each plan forced, forward and training step, interleaved, and
prints the median times and the best plan per shape::

  python -m benchmarks.gpu_plans [--shapes 8x500x64x128,...] [--rounds 5] [--json out.json]

A plan is ``inputs/unroll/backward-unroll``: ``inputs`` is 'hoisted', 'loop'
or 'joint' (LSTM only; see ``_fused/_plans.py``), the forward scans (with and
without a gradient) are unrolled ``unroll`` times, without the CPU's
prefetching, and the backward scan ``backward-unroll`` times. 'default' is
what the layers pick. Nothing here changes the library: the plan is forced
(``nnx_recurrent._fused.internal.forced_plan``) for the measurement only. Each
plan's forward output is compared with the default's (``|y - y_default|``).
On an H200 (2026-12-04, session 34) the scan plans at the suite's four shapes
chose the GPU plan of ``_fused/_plans.py``
(``benchmarks/gpu/2026-12-04-s34/call1_scan_plans.json``); ``--pallas`` ran
there too (44 s at one shape, ``benchmarks/gpu/2026-12-04/pallas_sweep.json``).

With ``--pallas`` it times the Pallas kernels (``implementation='pallas'``)
instead, with each variant of their sizes (``internal.pallas_settings``:
``pallas/hold_bytes=0`` reads every weight tile at each step, ``num_warps``,
``chunk``, ``unrolled_chunks=0`` loops over the column chunks), against the
scans' default::

  python -m benchmarks.gpu_plans --pallas --shapes 8x500x64x128 --rounds 3

``--variants`` names the plans or variants to time beside 'default' (e.g.
``pallas pallas/num_stages=2``; Pallas against the scans over a grid of shapes
is ``--variants pallas``, what ``benchmarks.pallas_verdict --grid`` reads).
``--jobs N`` compiles every variant of every shape first, in ``N`` threads,
then times them: a GPU machine's cores compile in parallel (one at a time,
compiling took most of ``gpu.sh``'s Pallas steps)::

  python -m benchmarks.gpu_plans --variants pallas --jobs 12 --shapes 1x300x16x32,...

``--bidirectional`` times bidirectional layers (rows marked ``bidirectional``):
the kernels run both directions in one launch, so on a GPU a bidirectional
Pallas layer should take about a one-directional one's time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import nnx_recurrent as nr
from benchmarks import write_json
from nnx_recurrent._fused import internal

SHAPES = ((8, 500, 64, 128), (64, 100, 128, 256), (1, 1000, 32, 64), (256, 50, 256, 512))


# Not 'pallas/chunk=32': at (8, ., 64, 128) its LSTM kernels took Triton 22.7 s (forward) and
# 17.7 s (backward) to compile on a 2-core CPU (triton 3.6.0, benchmarks/triton_resources.py
# --settings chunk=32), about 63 s for the layer's three kernels, where all the variants below
# take about 77 s for both layers together: with it, gpu.sh's step would be cut off in the LSTM
# before writing anything.
# 'pallas/unrolled_chunks=0': a loop over the column chunks, as the kernels run from H = 512 on
# (1-2 s a kernel to compile here).
# 'pallas/prefetch=0': each step's loads issued in the step itself (the loads a step ahead are
# the default since session 34).
# 'pallas/matmul=fma,...': the products as multiply-adds in registers, no 16-row minimum, one
# row a program (state_elements=32, up to any hidden size), in 8, 2 or 1 warps;
# 'pallas/matmul=auto': those in 1 warp up to hidden 32, 2 up to 64, the dot beyond.
PALLAS_VARIANTS = ('pallas', 'pallas/hold_bytes=0', 'pallas/hold_bytes=98304',
                   'pallas/num_warps=4', 'pallas/chunk=128,hold_bytes=131072',
                   'pallas/unrolled_chunks=0', 'pallas/prefetch=0',
                   'pallas/matmul=fma,state_elements=32',
                   'pallas/matmul=fma,state_elements=32,num_warps=2',
                   'pallas/matmul=fma,state_elements=32,num_warps=1', 'pallas/matmul=auto')


def plans(cls, pallas=False):
  if pallas:
    return ['default', *PALLAS_VARIANTS]
  inputs = ('hoisted', 'loop', 'joint') if cls is nr.LSTM else ('hoisted', 'loop')
  out = ['default']
  for inp in inputs:
    for unroll in (1, 4, 8):
      out.append(f'{inp}/{unroll}/{unroll}')
  return out


@contextlib.contextmanager
def forced(plan: str):
  """Forces ``plan`` on the fused layers traced inside (the forward scans and
  the backward scan's unroll, one step per iteration); yields the
  ``internal.Plan`` (``None`` for 'default')."""
  if plan == 'default':
    yield None
    return
  if plan.startswith('pallas'):
    with internal.pallas_settings(**parse_settings(plan.partition('/')[2])):
      yield None
    return
  inputs, unroll, back = plan.split('/')
  scan = internal.ScanPlan(inputs, prefetch=False, unroll=int(unroll))
  with internal.forced_plan(internal.Plan(scan, scan, backward_unroll=int(back))) as forced:
    yield forced


def parse_settings(text: str) -> dict:
  """``'chunk=32,matmul=fma'`` as ``internal.pallas_settings``' changes: integers
  where the value is one, else the text."""
  if not text:
    return {}
  return {k: int(v) if v.lstrip('-').isdigit() else v
          for k, v in (item.split('=') for item in text.split(','))}


def build(cls, shape, plan, **options):
  """The forward and the training step of ``cls(..., **options)`` at ``shape``
  under ``plan``, compiled: two functions of no arguments."""
  return lower(cls, shape, plan, **options)()


def lower(cls, shape, plan, **options):
  """:func:`build` in two parts: traced and lowered now (the plan is read while
  tracing), compiled when the returned function is called (XLA releases the
  GIL while compiling: ``--jobs`` compiles in threads)."""
  B, T, I, H = shape
  implementation = 'pallas' if plan.startswith('pallas') else 'xla'
  model = cls(I, H, implementation=implementation, rngs=nnx.Rngs(0), **options)
  graphdef, params = nnx.split(model)
  x = jax.random.normal(jax.random.key(1), (B, T, I))

  def fwd(params, x):
    return nnx.merge(graphdef, params)(x)

  def train(params, x):
    return jax.value_and_grad(lambda p: jnp.mean(fwd(p, x) ** 2))(params)

  with forced(plan):  # the plan is read while tracing: lower inside the patch
    lf = jax.jit(fwd).lower(params, x)
    lt = jax.jit(train).lower(params, x)

  def compile_both():
    f, t = lf.compile(), lt.compile()
    return (lambda: f(params, x)), (lambda: t(params, x))

  return compile_both


def compile_ahead(tasks, jobs: int, timeout: float | None = None, log=print, **options):
  """Lowers each ``(cls, shape, plan)`` of ``tasks`` in turn, compiles them in
  ``jobs`` threads, and returns once all are compiled, or after ``timeout``
  seconds: ``{task: Future of build's pair}`` (a failed lowering or compile is
  the future's exception; one still compiling then is reported as not compiled
  in time, and left to finish in the background). Timing starts after, so no
  compile competes with it for the CPU (the scans' loop is driven from the
  host)."""
  futures = {}
  t0 = time.perf_counter()
  pool = concurrent.futures.ThreadPoolExecutor(jobs)
  for task in tasks:
    try:
      futures[task] = pool.submit(lower(*task, **options))
    except Exception as e:  # noqa: BLE001  (reported when the task is timed)
      futures[task] = concurrent.futures.Future()
      futures[task].set_exception(e)
  done, late = concurrent.futures.wait(futures.values(), timeout=timeout)
  pool.shutdown(wait=False, cancel_futures=True)
  for task, future in futures.items():
    if future in late:
      stand_in = futures[task] = concurrent.futures.Future()
      stand_in.set_exception(TimeoutError(f'not compiled within {timeout:g} s'))
  compiled = sum(1 for f in done if f.exception() is None)
  log(f'lowered and compiled {compiled} of {len(tasks)} variants in '
      f'{time.perf_counter() - t0:.1f} s ({jobs} threads)', flush=True)
  return futures


def sample_ms(fn, n):
  jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(n):
    jax.block_until_ready(fn())
  return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.gpu_plans')
  p.add_argument('--shapes', default=','.join('x'.join(map(str, s)) for s in SHAPES))
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--calls', type=int, default=5, help='calls per sample')
  p.add_argument('--pallas', action='store_true',
                 help="time the Pallas kernels' size variants instead of the scan plans")
  p.add_argument('--variants', nargs='+', metavar='PLAN',
                 help="time these plans or Pallas variants (e.g. 'pallas/num_stages=2') "
                      "beside 'default' instead of the lists above")
  p.add_argument('--jobs', type=int, default=1,
                 help='compile every variant first, in this many threads (default: one '
                      'at a time, each before it is timed)')
  p.add_argument('--compile-timeout', type=float, metavar='S',
                 help='with --jobs: time what compiled within S seconds, report the rest')
  p.add_argument('--bidirectional', action='store_true',
                 help='bidirectional layers (the kernels run both directions in one launch)')
  p.add_argument('--json', metavar='PATH')
  args = p.parse_args(argv)
  options = dict(bidirectional=True) if args.bidirectional else {}
  shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes.split(',')]
  print(f'devices {jax.devices()}; jax {jax.__version__}', flush=True)

  def variants(cls):
    return ['default', *args.variants] if args.variants else plans(cls, args.pallas)

  def get(cls, shape, plan):
    return build(cls, shape, plan, **options)

  if args.jobs > 1:
    ahead = compile_ahead([(cls, shape, plan) for shape in shapes for cls in (nr.LSTM, nr.GRU)
                           for plan in variants(cls)], args.jobs, args.compile_timeout,
                          **options)

    def get(cls, shape, plan):
      return ahead[cls, shape, plan].result()

  rows = []
  for shape in shapes:
    for cls in (nr.LSTM, nr.GRU):
      fns = {}
      for plan in variants(cls):
        try:  # a variant that fails to compile or run (e.g. too much shared memory) is skipped
          fns[plan] = f, t = get(cls, shape, plan)
          jax.block_until_ready((f(), t()))  # a Triton kernel may fail at its first launch
        except Exception as e:  # noqa: BLE001
          fns.pop(plan, None)
          print(f'{shape} {cls.__name__:4} {plan:>12}: FAILED {type(e).__name__}: '
                f'{str(e).splitlines()[0][:300] if str(e) else ""}', flush=True)
          rows.append(dict(shape=shape, layer=cls.__name__, plan=plan, error=str(e)[:2000],
                           **options))
      if 'default' not in fns:  # nothing to compare with
        write(args.json, rows)
        continue
      y_default = fns['default'][0]()
      errors = {plan: float(jnp.abs(f() - y_default).max()) for plan, (f, _) in fns.items()}
      times = {plan: ([], []) for plan in fns}
      order = list(fns)
      for r in range(args.rounds):
        for plan in order[r % len(order):] + order[: r % len(order)]:
          f, t = fns[plan]
          times[plan][0].append(sample_ms(f, args.calls))
          times[plan][1].append(sample_ms(t, args.calls))
      default = [statistics.median(v) for v in times['default']]
      for plan, (tf, tt) in times.items():
        row = dict(shape=shape, layer=cls.__name__, plan=plan, fwd_ms=statistics.median(tf),
                   train_ms=statistics.median(tt), max_abs_diff_vs_default=errors[plan],
                   **options)
        row['fwd_vs_default'] = row['fwd_ms'] / default[0]
        row['train_vs_default'] = row['train_ms'] / default[1]
        rows.append(row)
        print(f'{shape} {cls.__name__:4} {plan:>12}: fwd {row["fwd_ms"]:8.3f} ms '
              f'({row["fwd_vs_default"]:.2f}x default)  train {row["train_ms"]:8.3f} ms '
              f'({row["train_vs_default"]:.2f}x)  |y - y_default| {errors[plan]:.1e}', flush=True)
      write(args.json, rows)  # so far: a run cut off by its time limit keeps what it measured
  print('\nbest plan per shape and layer (fwd | train):')
  for shape in shapes:
    for layer in ('LSTM', 'GRU'):
      mine = [r for r in rows if r['shape'] == shape and r['layer'] == layer and 'error' not in r]
      if not mine:
        print(f'{shape} {layer:4}: none ran')
        continue
      bf = min(mine, key=lambda r: r['fwd_ms'])
      bt = min(mine, key=lambda r: r['train_ms'])
      print(f'{shape} {layer:4}: {bf["plan"]} {bf["fwd_vs_default"]:.2f}x | '
            f'{bt["plan"]} {bt["train_vs_default"]:.2f}x')
  write(args.json, rows)
  return 0


def write(path, rows):
  if path:
    write_json(path, dict(devices=[str(d) for d in jax.devices()],
                          device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                          rows=rows))


if __name__ == '__main__':
  raise SystemExit(main())
