"""Where a fused layer's step spends its time: the device's kernels, from a profile.

``benchmarks.run`` and ``benchmarks.gpu_plans`` time whole calls. On a GPU at
batch 1-8 the Pallas kernels' training step took 2.2-2.8x PyTorch's cuDNN step
(benchmarks/HISTORY.md, session 34), and how that splits between the forward
kernel, the backward kernel and the XLA work around them (the input
projections, the weight gradients, pads and transposes) was never measured.
This script profiles a few calls of each (``jax.profiler.trace``), reads the
trace back (``jax.profiler.ProfileData``) and prints, per call:

* ``wall``: the call's time, measured outside the profiler (median of rounds);
* ``busy``: the time some kernel ran (the union of the kernels' intervals);
  ``wall - busy`` is the device idle between kernels: launches, the host;
* each kernel (by name, with its HLO op): launches per call, microseconds per
  call and share of ``busy``, and its class: ``kernel`` (this package's Pallas
  kernels, ``nr_*``; cuDNN's recurrence kernels for PyTorch), ``gemm``
  (cuBLAS / CUTLASS matmuls), ``copy`` (memcpy, memset, XLA copies and
  transposes) or ``other`` (XLA's fusions, elementwise work)::

  python -m benchmarks.step_profile [--shapes 1x1000x32x64,8x500x64x128]
      [--variants default pallas pallas/matmul=auto] [--torch] [--jobs 12] [--json out.json]
  python -m benchmarks.step_profile --markdown out.json   # the saved rows as one table

Variants are ``benchmarks.gpu_plans``' plans (``'default'`` is the scans as
the layers plan them; ``'pallas[/SETTINGS]'`` the kernels; ``PLAN@BxTxIxH``
at that shape only); ``--torch`` adds
``torch.nn.LSTM`` / ``torch.nn.GRU`` (cuDNN on a GPU), profiled with
``torch.profiler`` after all of JAX's (both take CUPTI: a row that got no
kernel says so in its source). On a CPU the kernels are XLA:CPU's thunks (host threads,
nested: a ``while`` contains its body's ops, so the per-op times overlap;
``busy`` is still a union) and PyTorch's rows are its ``aten`` operators'
self times: the CPU rows test the plumbing, the GPU rows are the measurement.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import re
import tempfile

import jax

from benchmarks import median_ms, write_json

KINDS = ('kernel', 'gemm', 'copy', 'other')
_KERNEL = re.compile(r'^nr_|RNN|rnn_|LSTM|GRU|Persist', re.IGNORECASE)
_GEMM = re.compile(r'gemm|cublas|cutlass|xmma|dot|matmul|\bmm\b|addmm|sgemm', re.IGNORECASE)
_COPY = re.compile(r'memcpy|memset|copy|transpose', re.IGNORECASE)


def kind(name: str) -> str:
  """A kernel's class, from its name and HLO op (``'name [op]'``): see the module
  docstring."""
  if _GEMM.search(name):
    return 'gemm'
  if _KERNEL.search(name):
    return 'kernel'
  if _COPY.search(name):
    return 'copy'
  return 'other'


def _stats(event) -> dict:
  return {k: v for k, v in event.stats}


def device_events(profile) -> tuple[list[tuple[str, int, int]], str]:
  """``[(name, start_ns, duration_ns)]`` of the kernels a profile's device ran,
  and where they were read: a GPU plane's stream lines, or else (a CPU) the host
  threads' events that carry an HLO op."""
  planes = [p for p in profile.planes if p.name.startswith('/device:')]
  events = []
  if planes:
    for plane in planes:
      lines = [ln for ln in plane.lines if ln.name.startswith('Stream')] or list(plane.lines)
      for line in lines:
        for e in line.events:
          op = _stats(e).get('hlo_op')
          name = f'{e.name} [{op}]' if op and op != e.name else e.name
          events.append((name, int(e.start_ns), int(e.duration_ns)))
    return events, ', '.join(p.name for p in planes)
  for plane in profile.planes:
    for line in plane.lines:
      for e in line.events:
        op = _stats(e).get('hlo_op')
        if op is not None:
          events.append((str(op), int(e.start_ns), int(e.duration_ns)))
  if jax.default_backend() == 'cpu':
    return events, 'host threads (XLA:CPU thunks)'
  return events, 'host threads: NO DEVICE PLANE (no CUPTI?), host-side times, not kernels'


def union_ns(intervals) -> int:
  """The length of the union of ``(start, duration)`` intervals."""
  total, end = 0, None
  for start, duration in sorted(intervals):
    stop = start + duration
    if end is None or start >= end:
      total += duration
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarise(events, calls: int, top: int = 12) -> dict:
  """Per call: the busy time (us), the time by class, and the ``top`` kernels by
  time (name, class, launches and us per call, share of busy)."""
  by_name: dict = collections.defaultdict(lambda: [0, 0])
  for name, _, duration in events:
    by_name[name][0] += 1
    by_name[name][1] += duration
  busy = union_ns((s, d) for _, s, d in events) / calls / 1e3
  kinds = dict.fromkeys(KINDS, 0.0)
  for name, (_, ns) in by_name.items():
    kinds[kind(name)] += ns / calls / 1e3
  ops = sorted(by_name.items(), key=lambda item: -item[1][1])
  return dict(
    busy_us=busy, launches=sum(n for n, _ in by_name.values()) / calls, kinds_us=kinds,
    ops=[dict(name=name[:160], kind=kind(name), launches=n / calls, us=ns / calls / 1e3,
              share=ns / calls / 1e3 / busy if busy else 0.0)
         for name, (n, ns) in ops[:top]])


def profile(fn, calls: int) -> tuple[list, str]:
  """Runs ``fn`` (which waits for its result) ``calls`` times under the JAX
  profiler; the device's kernels and where they were read."""
  fn()
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(calls):
        fn()
    files = glob.glob(f'{tmp}/**/*.xplane.pb', recursive=True)
    if not files:
      raise RuntimeError(f'the profiler wrote no trace under {tmp}')
    return device_events(jax.profiler.ProfileData.from_file(files[0]))


def torch_profile(fn, calls: int, cuda: bool) -> tuple[list, str]:
  """Like :func:`profile`, for PyTorch (``torch.profiler``): its CUDA kernels,
  or on a CPU its operators' self times (top-level ``aten`` ops only)."""
  import torch

  fn()
  activity = torch.profiler.ProfilerActivity
  with torch.profiler.profile(activities=[activity.CUDA if cuda else activity.CPU]) as prof:
    for _ in range(calls):
      fn()
  events = []
  for e in prof.events():
    on_device = str(getattr(e, 'device_type', '')).endswith('CUDA')
    if cuda and not on_device:
      continue
    if not cuda and (on_device or not e.name.startswith('aten::')):
      continue
    start = int(e.time_range.start * 1e3)
    duration = int(e.time_range.elapsed_us() * 1e3) if cuda else int(e.self_cpu_time_total * 1e3)
    events.append((e.name, start, duration))
  if cuda and not events:  # CUPTI held by another profiler (jax's, in this process)?
    return events, 'torch.profiler: NO CUDA EVENTS'
  return events, 'torch.profiler ' + ('CUDA kernels' if cuda else 'CPU aten ops (self time)')


def _torch_cuda() -> bool:
  import torch

  return torch.cuda.is_available()


def _jax_pair(cls, shape, variant, ahead=None):
  """The forward and training step, compiled (``ahead``: ``gpu_plans.compile_ahead``'s
  futures, else now), each waiting for its result."""
  from benchmarks import gpu_plans

  key = (cls, shape, variant)
  f, t = ahead[key].result() if ahead is not None else gpu_plans.build(*key)
  return (lambda: jax.block_until_ready(f())), (lambda: jax.block_until_ready(t()))


def _torch_pair(name, shape):
  from benchmarks import run

  runner = run._torch_builder(name)(*shape, jax.random.key(1))
  return runner.fwd, runner.train


def rows_for(label, shape, pair, calls, prof) -> list[dict]:
  rows = []
  for mode, fn in zip(('forward', 'train'), pair):
    events, source = prof(fn, calls)
    row = dict(shape=list(shape), layer=label[0], variant=label[1], mode=mode, source=source,
               wall_us=median_ms(fn, rounds=3, n=calls) * 1e3, **summarise(events, calls))
    rows.append(row)
    print(format_row(row), flush=True)
  return rows


def format_row(row) -> str:
  kinds = '  '.join(f'{k} {v:.0f}' for k, v in row['kinds_us'].items() if v)
  lines = [f"{tuple(row['shape'])} {row['layer']} {row['variant']} {row['mode']}: wall "
           f"{row['wall_us']:.0f} us, busy {row['busy_us']:.0f} us, {row['launches']:.0f} "
           f'launches a call ({kinds}; {row["source"]})']
  for op in row['ops']:
    lines.append(f"    {op['us']:9.1f} us {op['share']:6.1%} x{op['launches']:<6.4g} "
                 f"{op['kind']:6} {op['name'][:110]}")
  return '\n'.join(lines)


def markdown(rows: list[dict]) -> str:
  """A saved profile's rows as one Markdown table (for RESULTS.md): per call, the
  wall time, the busy time and the idle share of the wall, the time by class, and
  the launches."""
  out = ['| (B, T, I, H) | layer | variant | mode | wall us | busy us | idle | kernel us | '
         'gemm us | copy us | other us | launches |', '|---|---|---|---|' + '---:|' * 8]
  for r in rows:
    if 'error' in r:
      out.append(f"| {tuple(r['shape'])} | {r['layer']} | {r['variant']} | failed | "
                 + ' |' * 8)
      continue
    k = r['kinds_us']
    idle = 1 - r['busy_us'] / r['wall_us'] if r['wall_us'] else 0.0
    out.append(f"| {tuple(r['shape'])} | {r['layer']} | {r['variant']} | {r['mode']} | "
               f"{r['wall_us']:.0f} | {r['busy_us']:.0f} | {idle:.0%} | {k['kernel']:.0f} | "
               f"{k['gemm']:.0f} | {k['copy']:.0f} | {k['other']:.0f} | {r['launches']:.0f} |")
  return '\n'.join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.step_profile')
  p.add_argument('--shapes', default='1x1000x32x64,8x500x64x128')
  p.add_argument('--layers', default='LSTM,GRU')
  p.add_argument('--variants', nargs='+', default=['default', 'pallas'], metavar='PLAN',
                 help="benchmarks.gpu_plans' plans: 'default' (the scans), 'pallas[/SETTINGS]'; "
                      "PLAN@BxTxIxH: at that shape only")
  p.add_argument('--torch', action='store_true', help='also torch.nn.LSTM / torch.nn.GRU')
  p.add_argument('--calls', type=int, default=5, help='calls profiled (and per wall sample)')
  p.add_argument('--jobs', type=int, default=1,
                 help="compile every variant first, in this many threads (gpu_plans')")
  p.add_argument('--compile-timeout', type=float, metavar='S',
                 help='with --jobs: profile what compiled within S seconds, report the rest')
  p.add_argument('--json', metavar='PATH')
  p.add_argument('--markdown', metavar='JSON',
                 help="print a saved profile (--json's file) as a Markdown table, and stop")
  args = p.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown(json.load(f)['rows']))
    return 0
  import nnx_recurrent as nr

  shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes.split(',')]
  gpu = jax.default_backend() == 'gpu'
  print(f'devices {jax.devices()}; jax {jax.__version__}', flush=True)
  rows: list[dict] = []

  def save():
    if args.json:
      write_json(args.json, dict(device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
                                 rows=rows))

  layers = args.layers.split(',')
  tasks = []
  for shape in shapes:
    for layer in layers:
      for variant in args.variants:
        variant, _, only = variant.partition('@')
        if not only or only == 'x'.join(map(str, shape)):
          tasks.append((getattr(nr, layer), shape, variant))
  ahead = None
  if args.jobs > 1:
    from benchmarks import gpu_plans

    ahead = gpu_plans.compile_ahead(tasks, args.jobs, args.compile_timeout)
  for cls, shape, variant in tasks:
    layer = cls.__name__
    try:
      rows += rows_for((layer, variant), shape, _jax_pair(cls, shape, variant, ahead),
                       args.calls, profile)
    except Exception as e:  # noqa: BLE001  (a variant that fails or did not compile in time)
      print(f'{shape} {layer} {variant}: FAILED {type(e).__name__}: '
            f'{str(e).splitlines()[0][:300] if str(e) else ""}', flush=True)
      rows.append(dict(shape=list(shape), layer=layer, variant=variant, error=str(e)[:2000]))
    save()
  if args.torch:  # last: PyTorch's profiler may keep CUPTI, which jax's then would not get
    prof = functools.partial(torch_profile, cuda=gpu and _torch_cuda())
    for shape in shapes:
      for layer in layers:
        rows += rows_for((layer, 'torch'), shape, _torch_pair(layer, shape), args.calls, prof)
        save()
  save()
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
