"""``python -m fuzz``: see the package docstring."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import shlex
import sys

from fuzz._core import case_seed, run_cases

FAMILIES = ['nnx', 'layers', 'streaming', 'state', 'linen', 'torch', 'errors', 'carry',
            'explicit', 'transforms', 'linen_transforms', 'migrate']


def family(name: str):
  return importlib.import_module(f'fuzz.{name}_family').run


def _shell_word(item: str) -> str:
  """``item`` as one word of a shell command: bare, else in double quotes
  (``"mode='rnn'"``, as the help shows), else in shlex's quoting."""
  if shlex.quote(item) == item:
    return item
  return f'"{item}"' if not set('"$`\\!') & set(item) else shlex.quote(item)


def _devices_prefix() -> str:
  """The ``XLA_FLAGS`` that give a replay this process's simulated CPU devices: the
  ``explicit`` family draws its mesh from the devices there are."""
  import jax

  n = jax.device_count()
  if n == 1 or jax.devices()[0].platform != 'cpu':
    return ''
  return f'XLA_FLAGS=--xla_force_host_platform_device_count={n} '


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m fuzz', description=__doc__)
  parser.add_argument('--family', choices=[*FAMILIES, 'all'], default='all')
  parser.add_argument('--cases', type=int, default=100, help='cases per family')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--replay', type=int, help='run the one case of this case seed')
  parser.add_argument('--out', help='write the report as JSON here')
  parser.add_argument('--force', action='append', default=[], metavar='NAME=VALUE',
                      help="make a choice instead of drawing it, e.g. --force low_precision=True "
                           "--force mode=\"'rnn'\" (VALUE: a Python literal; repeatable)")
  args = parser.parse_args(argv)
  force = {}
  for item in args.force:
    name, sep, value = item.partition('=')
    if not sep:
      parser.error(f'--force expected NAME=VALUE, got {item!r}')
    try:
      force[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parser.error(f'--force expected NAME=VALUE with a Python literal VALUE, got {item!r}')
  names = FAMILIES if args.family == 'all' else [args.family]
  if args.replay is not None and len(names) != 1:
    parser.error('--replay needs one --family')
  reports = []
  for name in names:
    try:
      run = family(name)
    except ModuleNotFoundError as e:  # torch is an extra; any other import error is a bug
      if (e.name or '').split('.')[0] != 'torch':
        raise
      print(f'{name}: skipped ({e})')
      continue
    seeds = ([args.replay] if args.replay is not None
             else [case_seed(args.seed, i) for i in range(args.cases)])
    report = run_cases(name, run, seeds, progress=lambda line: print(line, flush=True),
                       force=force)
    reports.append(report)
    # The share of the tolerance (atol + rtol * |theirs|) reads the same for values of
    # any size: gradients over long streams reach 1e5, and their differences 10 or more.
    shares = report['largest_tolerance_share']
    errors = ', '.join(f'{k} {v:.2g} ({shares[k]:.2g} of the tolerance)'
                       for k, v in report['largest_abs_error'].items())
    errors = f'; largest |ours - theirs|: {errors}' if errors else ''
    print(f"{name}: {report['cases']} cases, {len(report['failures'])} failures, "
          f"{report['seconds']} s{errors}", flush=True)
    # The forced choices are part of the case: the replay forces them too.
    forced = ''.join(f' --force {_shell_word(item)}' for item in args.force)
    devices = _devices_prefix() if name == 'explicit' else ''
    for failure in report['failures']:
      print(f"  replay: {devices}python -m fuzz --family {name} --replay {failure['seed']}"
            f"{forced}\n"
            f"    {failure['error']}\n    config: {failure['config']}")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(reports, f, indent=1)
  return 1 if any(r['failures'] for r in reports) else 0


if __name__ == '__main__':
  sys.exit(main())
