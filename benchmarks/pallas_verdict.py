"""Issue 14's verdict from ``benchmarks/gpu.sh``'s Pallas rows, and the table
``implementation='auto'`` reads (``_fused._plans.PALLAS_FASTER``).

``gpu.sh`` times ``nr.LSTM[pallas]`` / ``nr.GRU[pallas]`` beside the scans
(``nr.LSTM`` / ``nr.GRU``) and PyTorch on cuDNN, and writes the ratios of
their medians (``pallas_results.json``, ``pallas_large.json``). This script
reads them and prints, per shape and layer:

* the issue's target: at batch 1-8 the training step within 1.5x PyTorch's
  and the forward within 2x; from batch 64 on no slower than the scans
  (forward and training step);
* whether the kernels were faster than the scans, forward and training step
  (their medians): only there does ``'auto'`` pick them;
* the ``PALLAS_FASTER`` entries to paste (one region per shape measured
  faster: its batch rows and hidden size exactly, the device kind the run
  recorded), with the numbers in a comment.

With ``--sweep`` (``pallas_sweep.json``, ``benchmarks/gpu_plans.py
--pallas``) it also ranks the size variants by their training step, the
geometric mean over the layers, against the default settings::

  python -m benchmarks.pallas_verdict out/gpu/pallas_results.json out/gpu/pallas_large.json \\
      [--sweep out/gpu/pallas_sweep.json] [--commit abc1234]

It reads JSON only: no JAX, no timing.
"""

from __future__ import annotations

import argparse
import json
import math

SMALL_BATCH = 8  # up to here: against PyTorch's cuDNN; above: against the scans
TORCH_TRAIN, TORCH_FWD = 1.5, 2.0  # issue 14's targets at small batches


def verdicts(runs: list[dict]) -> list[dict]:
  """One row per shape and layer that has Pallas ratios in ``runs`` (the
  ``ratios`` of ``benchmarks.run``'s JSON; a later run's shape replaces an
  earlier one's)."""
  by_shape: dict[tuple, dict] = {}
  for run in runs:
    latest: dict[tuple, dict] = {}
    for r in run.get('ratios', []):
      latest.setdefault(tuple(r['shape']), {})[(r['ours'], r['theirs'])] = r
    by_shape.update(latest)  # the whole shape: no comparison left over from an earlier run
  rows = []
  for shape in sorted(by_shape):
    for layer in ('LSTM', 'GRU'):
      pallas = f'nr.{layer}[pallas]'
      scans = by_shape[shape].get((pallas, f'nr.{layer}'))
      torch = by_shape[shape].get((pallas, f'torch.nn.{layer}'))
      if scans is None and torch is None:
        continue
      row = dict(shape=shape, layer=layer, vs_scans=scans, vs_torch=torch,
                 faster=scans is not None and scans['fwd_ratio'] < 1 and scans['train_ratio'] < 1)
      if shape[0] <= SMALL_BATCH:
        row['target'] = f'train <= {TORCH_TRAIN}x, fwd <= {TORCH_FWD}x PyTorch'
        row['met'] = None if torch is None else (torch['train_ratio'] <= TORCH_TRAIN
                                                 and torch['fwd_ratio'] <= TORCH_FWD)
      else:
        row['target'] = 'no slower than the scans'
        row['met'] = None if scans is None else (scans['train_ratio'] <= 1
                                                 and scans['fwd_ratio'] <= 1)
      rows.append(row)
  return rows


def _ratio(r: dict | None, kind: str) -> str:
  if r is None:
    return 'not measured'
  lo, _, hi = r[f'{kind}_round_ratios']
  return f'{r[f"{kind}_ratio"]:.2f} [{lo:.2f}-{hi:.2f}]'


def table(rows: list[dict]) -> str:
  """Markdown for benchmarks/RESULTS.md: Pallas over PyTorch and over the scans,
  the median ratio and the range over rounds."""
  out = ['| shape (B,T,I,H) | layer | fwd / PyTorch | train / PyTorch | fwd / scans | '
         'train / scans | target | met | auto picks Pallas |',
         '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    met = {True: 'yes', False: '**no**', None: 'not measured'}[r['met']]
    out.append(f'| {r["shape"]} | {r["layer"]} | {_ratio(r["vs_torch"], "fwd")} | '
               f'{_ratio(r["vs_torch"], "train")} | {_ratio(r["vs_scans"], "fwd")} | '
               f'{_ratio(r["vs_scans"], "train")} | {r["target"]} | {met} | '
               f'{"yes" if r["faster"] else "no"} |')
  return '\n'.join(out)


def device_name(runs: list[dict]) -> str:
  """The part of ``device_kind`` a region names ('NVIDIA H200' -> 'H200')."""
  kinds = {run.get('machine', {}).get('device_kind') for run in runs}
  if len(kinds) != 1 or None in kinds:  # a run without one may have been on another GPU
    raise ValueError(f'expected runs on one recorded kind of device, got device kinds '
                     f'{sorted(kinds, key=str)} (benchmarks.run records `machine.device_kind` '
                     'since 2026-12-02)')
  kind, = kinds
  return kind.removeprefix('NVIDIA ').strip()


def regions(rows: list[dict], device: str, commit: str) -> str:
  """``PALLAS_FASTER``'s entries: the shapes where the kernels beat the scans."""
  lines = []
  for r in rows:
    if not r['faster']:
      continue
    (b, t, i, h), s = r['shape'], r['vs_scans']
    lines.append(f"  PallasRegion({r['layer']!r}, rows=({b}, {b}), hidden=({h}, {h}), "
                 f"device={device!r}),  # ({b}, {t}, {i}, {h}): fwd {s['fwd_ratio']:.2f}x, "
                 f"train {s['train_ratio']:.2f}x the scans ({commit})")
  if not lines:
    return 'PALLAS_FASTER: tuple[PallasRegion, ...] = ()  # faster nowhere'
  return 'PALLAS_FASTER: tuple[PallasRegion, ...] = (\n' + '\n'.join(lines) + '\n)'


def sweep_ranking(sweep: dict) -> list[tuple[str, float, int]]:
  """``(variant, geometric mean of train time / the default settings', layers)``
  best first, over the layers and shapes where both ran."""
  base = {(tuple(r['shape']), r['layer']): r['train_ms'] for r in sweep['rows']
          if r['plan'] == 'pallas' and 'error' not in r}
  logs: dict[str, list[float]] = {}
  for r in sweep['rows']:
    key = (tuple(r['shape']), r['layer'])
    if r['plan'].startswith('pallas') and 'error' not in r and key in base:
      logs.setdefault(r['plan'], []).append(math.log(r['train_ms'] / base[key]))
  ranking = [(plan, math.exp(sum(v) / len(v)), len(v)) for plan, v in logs.items()]
  return sorted(ranking, key=lambda x: x[1])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.pallas_verdict',
                              description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='+', help="benchmarks.run JSON files with the Pallas rows")
  p.add_argument('--sweep', help='gpu_plans --pallas JSON')
  p.add_argument('--commit', default='the commit measured', help='named in the comments')
  args = p.parse_args(argv)
  runs = []
  for path in args.runs:
    with open(path) as f:
      runs.append(json.load(f))
  rows = verdicts(runs)
  if not rows:  # not "faster nowhere": nothing was measured
    p.error(f'no nr.LSTM[pallas] / nr.GRU[pallas] ratios in {", ".join(args.runs)} (expected '
            "gpu.sh's pallas_results.json or pallas_large.json, run on a GPU)")
  print(table(rows), '\n')
  print(regions(rows, device_name(runs), args.commit))
  if args.sweep:
    with open(args.sweep) as f:
      ranking = sweep_ranking(json.load(f))
    print('\nPallas size variants, training step over the default settings (geometric mean):')
    for plan, ratio, n in ranking:
      print(f'  {plan:40s} {ratio:.3f}x ({n} layer{"s" if n > 1 else ""})')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
