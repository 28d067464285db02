"""Issue 14's verdict from ``benchmarks/gpu.sh``'s Pallas rows, and the table
``implementation='auto'`` reads (``_fused._plans.PALLAS_FASTER``).

``gpu.sh`` times ``nr.LSTM[pallas]`` / ``nr.GRU[pallas]`` beside the scans
(``nr.LSTM[xla]`` / ``nr.GRU[xla]``; ``nr.LSTM`` in older records) and
PyTorch on cuDNN, and writes the ratios of their medians
(``pallas_results.json``, ``pallas_large.json``). This script reads them and
prints, per shape and layer:

* the issue's target: at batch 1-8 the training step within 1.5x PyTorch's
  and the forward within 2x; from batch 64 on no slower than the scans
  (forward and training step);
* whether the kernels were faster than the scans, forward and training step
  (their medians): only there does ``'auto'`` pick them;
* the ``PALLAS_FASTER`` entries to paste (one region per shape measured
  faster: its hidden size exactly, its batch rows up to those that run the
  same kernel programs, the device kind the run recorded), with the numbers in
  a comment.

With ``--sweep`` (``pallas_sweep.json``, ``benchmarks/gpu_plans.py
--pallas``) it also ranks the size variants by their training step, the
geometric mean over the layers, against the default settings::

  python -m benchmarks.pallas_verdict out/gpu/pallas_results.json \\
      [--sweep out/gpu/pallas_fma.json] [--commit abc1234]

and, with runs that timed PyTorch at the same shapes, each variant against
PyTorch at batch 1-8 and whether it meets the issue's target there (session
35: the multiply-adds, ``gpu.sh``'s ``pallas_fma.json``).

With ``--grid`` (``benchmarks/gpu_plans.py --variants pallas`` over a grid of
batch and hidden sizes; ``benchmarks/gpu_grid.sh``) the ``PALLAS_FASTER``
entries come from the grid instead, one region per layer, hidden size and run
of consecutive batch sizes measured faster, and it prints the grid's ratios::

  python -m benchmarks.pallas_verdict --grid out/gpu/pallas_grid.json --commit abc1234 \\
      [--plan pallas/state_elements=512]

``--plan`` picks the variant whose rows give the entries: the settings that
are to be the defaults (``gpu_grid.sh`` times 16-row kernel programs,
``pallas/state_elements=512``, beside the current defaults).

It times nothing and needs no GPU: it reads JSON, and the package for the
kernels' block sizes.
"""

from __future__ import annotations

import argparse
import json
import math

from benchmarks import gpu_plans
from nnx_recurrent._fused import internal

SMALL_BATCH = 8  # up to here: against PyTorch's cuDNN; above: against the scans
TORCH_TRAIN, TORCH_FWD = 1.5, 2.0  # issue 14's targets at small batches
LINE_LENGTH = 100  # pyproject.toml's [tool.ruff] line-length


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
      # The scans: nr.LSTM[xla]; records before 2026-12-04's second GPU session
      # have only nr.LSTM, which 'auto' ran on the scans there.
      scans = by_shape[shape].get((pallas, f'nr.{layer}[xla]'),
                                  by_shape[shape].get((pallas, f'nr.{layer}')))
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
  return _short(kind)


def _short(kind: str) -> str:
  return kind.removeprefix('NVIDIA ').strip()


def _wrap(text: str, width: int) -> list[str]:
  """``text`` in lines of at most ``width`` characters where it can be, broken
  after the commas of its list (``1: 0.50/0.47, 4: ...``), never inside an item."""
  lines = ['']
  for item in text.split(', '):
    joined = f'{lines[-1]}, {item}' if lines[-1] else item
    if len(joined) + 1 > width and lines[-1]:  # + 1: the comma that ends the line
      lines[-1] += ','
      lines.append(item)
    else:
      lines[-1] = joined
  return lines


def _entries(regions: list[tuple[str, str, tuple[int, int], int, str]]) -> str:
  """``PALLAS_FASTER``'s source from ``(comment, layer, rows, hidden, device)``
  regions, each with its numbers in a comment above it, wrapped within the
  package's line length (``ruff``: 100), so that it pastes as printed."""
  if not regions:
    return 'PALLAS_FASTER: tuple[PallasRegion, ...] = ()  # faster nowhere'
  lines = []
  for comment, layer, (lo, hi), h, device in regions:
    lines += [f'  # {part}' for part in _wrap(comment, LINE_LENGTH - len('  # '))]
    lines += [f'  PallasRegion({layer!r}, rows=({lo}, {hi}), hidden=({h}, {h}), '
              f'device={device!r}),']
  return 'PALLAS_FASTER: tuple[PallasRegion, ...] = (\n' + '\n'.join(lines) + '\n)'


def same_kernel_rows(rows: int, hidden: int) -> int:
  """The most batch rows that run the kernels ``rows`` rows run (the batch
  padded to whole blocks: 16 rows up to 16, ...), which therefore take the
  kernels' measured time, while the scans do no less work with more rows: a
  region measured faster at ``rows`` reaches that far, at the same ``hidden``."""
  return internal.pallas_padded_rows(rows, hidden)


def regions(rows: list[dict], device: str, commit: str) -> str:
  """``PALLAS_FASTER``'s entries: the shapes where the kernels beat the scans,
  each up to the rows that run the same kernel programs."""
  found = []
  for r in rows:
    if not r['faster']:
      continue
    (b, t, i, h), s = r['shape'], r['vs_scans']
    found.append((f"({b}, {t}, {i}, {h}): fwd {s['fwd_ratio']:.2f}x, train "
                  f"{s['train_ratio']:.2f}x the scans ({commit})", r['layer'],
                  (b, same_kernel_rows(b, h)), h, device))
  return _entries(found)


def grid_regions(grid: dict, commit: str, plan: str = 'pallas') -> str:
  """``PALLAS_FASTER``'s entries from a grid of shapes (``gpu_plans --variants
  pallas ...``: each shape's ``plan`` row, the kernels with the settings that
  are to be the defaults, timed against the scans' ``'default'``). Per layer
  and hidden size, each run of consecutive measured batch sizes where the
  kernels were faster (forward and training step) is one region, from its
  first measured batch to the rows that run the same kernels as its last
  (:func:`same_kernel_rows` under the plan's settings: with one row a
  program, ``matmul='auto'``, no more than its own; short of the next
  measured batch): batches in
  between are taken to be faster too (at small batches both sides' step costs
  grow with the rows, the kernels' in steps at whole blocks); none at other
  hidden sizes."""
  kind = grid.get('device_kind')
  if not kind:
    raise ValueError('expected a grid with its `device_kind` (gpu_plans records it since '
                     '2026-12-04), got none')
  device = _short(kind)
  runs: dict[tuple[str, int], list[tuple[int, bool, dict]]] = {}
  for r in grid['rows']:
    if r['plan'] != plan:
      continue
    b, t, i, h = r['shape']
    faster = 'error' not in r and r['fwd_vs_default'] < 1 and r['train_vs_default'] < 1
    runs.setdefault((r['layer'], h), []).append((b, faster, r))
  found = []
  for (layer, h), measured in sorted(runs.items()):
    measured.sort(key=lambda m: m[0])
    group: list[tuple[int, bool, dict]] = []
    for m in measured + [(math.inf, False, {})]:  # a sentinel ends the last run
      if m[1]:
        group.append(m)
        continue
      if group:
        ratios = ', '.join(f"{b}: {r['fwd_vs_default']:.2f}/{r['train_vs_default']:.2f}"
                           for b, _, r in group)
        t, i = group[0][2]['shape'][1:3]
        with gpu_plans.forced(plan):  # the blocks of the plan's kernels
          last = min(same_kernel_rows(group[-1][0], h), m[0] - 1)
        found.append((f'T={t}, I={i}; batch: fwd/train x the scans {ratios} ({commit})',
                      layer, (group[0][0], last), h, device))
      group = []
  return _entries(found)


def grid_table(grid: dict, plan: str = 'pallas') -> str:
  """Markdown: the ``plan`` rows (Pallas) over the scans per layer, batch
  (rows) and hidden size (columns), ``fwd / train``."""
  cells = {(r['layer'], r['shape'][0], r['shape'][3]): r for r in grid['rows']
           if r['plan'] == plan}
  hs = sorted({k[2] for k in cells})
  out = []
  for layer in ('LSTM', 'GRU'):
    bs = sorted({k[1] for k in cells if k[0] == layer})
    if not bs:
      continue
    out += [f'| {layer}: batch \\ hidden | ' + ' | '.join(map(str, hs)) + ' |',
            '|---|' + '---|' * len(hs)]
    for b in bs:
      row = []
      for h in hs:
        r = cells.get((layer, b, h))
        row.append('' if r is None else 'failed' if 'error' in r else
                   f"{r['fwd_vs_default']:.2f} / {r['train_vs_default']:.2f}")
      out.append(f'| {b} | ' + ' | '.join(row) + ' |')
    out.append('')
  return '\n'.join(out)


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


def sweep_vs_torch(sweep: dict, runs: list[dict]) -> str:
  """Markdown: each variant of ``sweep`` (``gpu_plans`` rows) at a batch of at
  most ``SMALL_BATCH``, against PyTorch's medians at the same shape in
  ``runs`` (``benchmarks.run``'s ``results``; the last run with the shape),
  and issue 14's target there. The two are separate steps of one device call:
  each median is over its own rounds."""
  torch = {}
  for run in runs:
    for r in run.get('results', []):
      if r['impl'].startswith('torch.nn.') and not r.get('error'):
        torch[tuple(r['shape']), r['impl'].removeprefix('torch.nn.')] = r
  out = ['| shape (B,T,I,H) | layer | variant | fwd ms | train ms | fwd / PyTorch | '
         'train / PyTorch | target met |', '|---|---|---|---|---|---|---|---|']
  for r in sweep['rows']:
    theirs = torch.get((tuple(r['shape']), r['layer']))
    if 'error' in r or theirs is None or r['shape'][0] > SMALL_BATCH:
      continue
    fwd, train = r['fwd_ms'] / theirs['fwd_ms'], r['train_ms'] / theirs['train_ms']
    met = 'yes' if fwd <= TORCH_FWD and train <= TORCH_TRAIN else 'no'
    out.append(f'| {tuple(r["shape"])} | {r["layer"]} | {r["plan"]} | {r["fwd_ms"]:.2f} | '
               f'{r["train_ms"]:.2f} | {fwd:.2f} | {train:.2f} | {met} |')
  return '\n'.join(out) if len(out) > 2 else ''


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.pallas_verdict',
                              description=__doc__.splitlines()[0])
  p.add_argument('runs', nargs='*', help="benchmarks.run JSON files with the Pallas rows")
  p.add_argument('--sweep', help='gpu_plans --pallas JSON')
  p.add_argument('--grid', help="gpu_plans --variants pallas JSON over a grid of shapes: "
                                "PALLAS_FASTER from it instead of from the runs'")
  p.add_argument('--plan', default='pallas',
                 help="with --grid: the variant whose rows give the table, the settings "
                      "that are to be the defaults (e.g. 'pallas/state_elements=512'; default "
                      "'pallas', the current defaults); every variant's grid is printed")
  p.add_argument('--commit', default='the commit measured', help='named in the comments')
  args = p.parse_args(argv)
  if not args.runs and not args.grid:
    p.error('expected benchmarks.run JSON files, --grid, or both')
  runs = []
  for path in args.runs:
    with open(path) as f:
      runs.append(json.load(f))
  rows = verdicts(runs)
  if runs and not rows:  # not "faster nowhere": nothing was measured
    p.error(f'no nr.LSTM[pallas] / nr.GRU[pallas] ratios in {", ".join(args.runs)} (expected '
            "gpu.sh's pallas_results.json or pallas_large.json, run on a GPU)")
  if rows:
    print(table(rows), '\n')
  if args.grid:
    with open(args.grid) as f:
      grid = json.load(f)
    for plan in dict.fromkeys(r['plan'] for r in grid['rows'] if r['plan'] != 'default'):
      print(f'{plan} over the scans, fwd / train:\n')
      print(grid_table(grid, plan))
    print(grid_regions(grid, args.commit, args.plan))
  else:
    print(regions(rows, device_name(runs), args.commit))
  if args.sweep:
    with open(args.sweep) as f:
      ranking = sweep_ranking(json.load(f))
    print('\nPallas size variants, training step over the default settings (geometric mean):')
    for plan, ratio, n in ranking:
      print(f'  {plan:40s} {ratio:.3f}x ({n} layer{"s" if n > 1 else ""})')
    with open(args.sweep) as f:
      against = sweep_vs_torch(json.load(f), runs)
    if against:
      print("\nEach variant against PyTorch (the runs' medians at the same shape), issue 14's "
            f'target: train <= {TORCH_TRAIN}x, fwd <= {TORCH_FWD}x:\n')
      print(against)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
