"""The compiled programs of the benchmarked paths, to compare two trees without timing.

The rule "new features must not slow the existing paths" is checked here by
program identity first: this CPU's speed varies by up to 1.7x between sessions
and helpers share it, so a timing A/B needs a quiet machine, but a program that
XLA compiles to the same optimised HLO runs in the same time. Only programs
that differ need timing (``benchmarks/run.py``).

Usage (``--tree`` is imported instead of the working tree, so an older commit,
checked out elsewhere with ``git worktree add --detach``, needs no copy of this
file)::

  python -m benchmarks.programs --out /tmp/old --tree /tmp/wt-old
  python -m benchmarks.programs --out /tmp/new
  python -m benchmarks.programs --compare /tmp/old /tmp/new

For every shape ``(B, T, I, H)`` (the benchmark's four by default) it builds the
forward and training step of ``nr.RNN(OptimizedLSTMCell)``, ``nr.LSTM`` and
``nr.GRU`` (``implementation='auto'``) as ``benchmarks/run.py`` builds them,
without a mask and with ``seq_lengths`` or ``segment_ids`` passed as jit
arguments; ``nr.RNN(LSTMCell)`` and ``nr.RNN(GRUCell)`` at the first shape. Each
program's jaxpr, StableHLO and optimised HLO go to ``OUT/<name>.{jaxpr,stablehlo,hlo}``,
with ``OUT/summary.json`` (hashes, temp memory). ``--compare`` prints one line
per program: for each of the three, ``=`` the same, ``~`` the same but for the
names of values (HLO only), ``X`` different; it exits with 1 where an
optimised HLO differs. The HLO is compared without its source locations (the
``FileNames`` ... ``StackFrames`` tables and each instruction's ``metadata``),
which name the tree's paths and lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

PROGRAM_SHAPES = ((8, 500, 64, 128), (64, 100, 128, 256), (1, 1000, 32, 64), (256, 50, 256, 512))
MASKS = ('plain', 'seq_lengths', 'segment_ids')
LEVELS = ('jaxpr', 'stablehlo', 'hlo')
_TABLES = ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')


def normalize_hlo(text: str) -> str:
  """``text`` (an optimised HLO module) without its source locations."""
  lines, skipping = [], False
  for line in text.split('\n'):
    if line in _TABLES:
      skipping = True
      continue
    if skipping and line.startswith(('%', 'ENTRY', 'HloModule')):
      skipping = False
    if not skipping:
      lines.append(line)
  text = '\n'.join(lines)
  text = re.sub(r',?\s*metadata=\{[^{}]*\}', '', text)
  return re.sub(r',?\s*stack_frame_id=\d+', '', text)


def canonical_names(text: str) -> str:
  """``text`` with every ``%name`` renamed in order of first use: two modules
  equal after this differ only in the names XLA gave their values."""
  names: dict[str, str] = {}

  def rename(m: re.Match) -> str:
    return '%' + names.setdefault(m.group(1), f'v{len(names)}')

  return re.sub(r'%([A-Za-z_][\w.\-]*)', rename, text)


def _mask(kind: str, B: int, T: int) -> Any:
  import jax.numpy as jnp
  import numpy as np
  if kind == 'seq_lengths':
    return jnp.asarray(np.random.default_rng(1).integers(T // 2, T + 1, size=(B,)), jnp.int32)
  rng, ids = np.random.default_rng(2), np.zeros((B, T), np.int32)
  for b in range(B):  # segments of 1 to T / 3 steps, then up to T / 10 of padding
    t, segment = 0, 1
    while t < T:
      n = int(rng.integers(1, max(2, T // 3)))
      ids[b, t:t + n] = segment
      t, segment = t + n, segment + 1
    pad = int(rng.integers(0, T // 10 + 1))
    if pad:
      ids[b, T - pad:] = 0
  return jnp.asarray(ids)


def programs(shapes, match: str | None = None) -> Iterator[tuple[str, Callable, tuple]]:
  """``(name, fn, args)`` for every program whose name ``match`` (a regex)
  searches, built as ``benchmarks/run.py``'s ``_nnx_builder`` builds its steps
  (the mask, if any, a jit argument); no other layer is built."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import nnx_recurrent as nr
  layers = {'nr.RNN(OptimizedLSTMCell)': lambda I, H, r: nr.RNN(nr.OptimizedLSTMCell(I, H, rngs=r)),
            'nr.LSTM': lambda I, H, r: nr.LSTM(I, H, rngs=r),
            'nr.GRU': lambda I, H, r: nr.GRU(I, H, rngs=r)}
  cells = {'nr.RNN(LSTMCell)': lambda I, H, r: nr.RNN(nr.LSTMCell(I, H, rngs=r)),
           'nr.RNN(GRUCell)': lambda I, H, r: nr.RNN(nr.GRUCell(I, H, rngs=r))}
  todo = [(name, make, shape) for shape in shapes for name, make in layers.items()]
  todo += [(name, make, shapes[0]) for name, make in cells.items()]
  for name, make, (B, T, I, H) in todo:
    for mask in MASKS:
      key = f'{name}@{B}x{T}x{I}x{H}@{mask}'
      wanted = [step for step in ('fwd', 'train')
                if not match or re.search(match, f'{key}@{step}')]
      if not wanted:
        continue
      graphdef, params, rest = nnx.split(make(I, H, nnx.Rngs(0)), nnx.Param, ...)
      x = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
      extra = None if mask == 'plain' else _mask(mask, B, T)

      def call(p, rest, x, extra, mask=mask, graphdef=graphdef):
        kwargs = {} if mask == 'plain' else {mask: extra}
        return nnx.merge(graphdef, p, rest)(x, **kwargs)

      def train(p, rest, x, extra, call=call):
        return jax.value_and_grad(lambda p: jnp.mean(call(p, rest, x, extra) ** 2))(p)

      for step, fn in (('fwd', call), ('train', train)):
        if step in wanted:
          yield f'{key}@{step}', fn, (params, rest, x, extra)


def dump(out: str, shapes, match: str | None = None, log=print) -> dict:
  """Writes every program's three texts to ``out`` and returns the summary."""
  import jax
  os.makedirs(out, exist_ok=True)
  summary = {}
  for name, fn, args in programs(shapes, match):
    lowered = jax.jit(fn).lower(*args)
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    texts = {'jaxpr': str(jax.make_jaxpr(fn)(*args)), 'stablehlo': lowered.as_text(),
             'hlo': normalize_hlo(compiled.as_text())}
    entry: dict[str, Any] = {'temp_bytes': getattr(memory, 'temp_size_in_bytes', None)}
    for level, text in texts.items():
      with open(os.path.join(out, f'{name}.{level}'), 'w') as f:
        f.write(text)
      entry[level] = hashlib.sha1(text.encode()).hexdigest()[:12]
    summary[name] = entry
    log(f'{name}: {entry}')
  with open(os.path.join(out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def compare(a: str, b: str) -> list[tuple[str, str]]:
  """``(program, marks)`` for the programs in both ``a`` and ``b``; marks is
  one of ``=``, ``~``, ``X`` per level (see the module's docstring)."""
  with open(os.path.join(a, 'summary.json')) as f:
    names = [n for n in json.load(f) if os.path.exists(os.path.join(b, f'{n}.hlo'))]
  rows = []
  for name in names:
    marks = ''
    for level in LEVELS:
      texts = []
      for d in (a, b):
        with open(os.path.join(d, f'{name}.{level}')) as f:
          texts.append(normalize_hlo(f.read()) if level == 'hlo' else f.read())
      same = texts[0] == texts[1]
      renamed = level == 'hlo' and canonical_names(texts[0]) == canonical_names(texts[1])
      marks += '=' if same else '~' if renamed else 'X'
    rows.append((name, marks))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m benchmarks.programs',
                              description=__doc__.split('\n')[0])
  p.add_argument('--out', help='directory for the programs and summary.json')
  p.add_argument('--tree', help='the repository tree whose nnx_recurrent to import')
  p.add_argument('--shapes', help='BxTxIxH,... (default: the benchmark\'s four)')
  p.add_argument('--match', help='only the programs whose name this regex searches')
  p.add_argument('--compare', nargs=2, metavar=('A', 'B'), help='compare two --out directories')
  args = p.parse_args(argv)
  if args.compare:
    rows = compare(*args.compare)
    for name, marks in rows:
      print(f'{marks}  {name}')
    differ = [name for name, marks in rows if marks[-1] == 'X']
    print(f'{len(rows)} programs: {len(rows) - len(differ)} with the same optimised HLO '
          f'(but for names), {len(differ)} different')
    return 1 if differ else 0
  if not args.out:
    p.error('--out (or --compare) is required')
  if args.tree:
    sys.path.insert(0, os.path.abspath(args.tree))
  import nnx_recurrent
  print(f'nnx_recurrent from {os.path.dirname(nnx_recurrent.__file__)}')
  if args.tree and not os.path.abspath(nnx_recurrent.__file__).startswith(
      os.path.abspath(args.tree) + os.sep):
    p.error(f'--tree {args.tree}: nnx_recurrent was imported from elsewhere')
  from benchmarks.run import _parse_shapes
  dump(args.out, _parse_shapes(args.shapes) if args.shapes else PROGRAM_SHAPES, args.match)
  return 0


if __name__ == '__main__':
  sys.exit(main())
