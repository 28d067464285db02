"""The distributions `pip wheel .` and `python -m build --sdist` make from the checkout.

Built by setuptools' own PEP 517 hooks in a child process, from a copy of the files the
build reads (the checkout's build/ and egg-info stay untouched), and compared with the
package's files on disk.
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setuptools_version():
  try:
    return tuple(int(p) for p in importlib.metadata.version('setuptools').split('.')[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


@pytest.fixture(scope='module')
def distributions(tmp_path_factory):
  version = _setuptools_version()
  if version is None or version < (77, 0):  # pyproject's build-system: setuptools>=77
    pytest.skip(f'needs setuptools>=77 in this environment, found {version}')
  src = tmp_path_factory.mktemp('src')
  ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
  for name in ('pyproject.toml', 'README.md', 'LICENSE', 'MANIFEST.in'):
    if (ROOT / name).exists():
      shutil.copy(ROOT / name, src / name)
  for name in ('nnx_recurrent', 'tests'):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  out = tmp_path_factory.mktemp('dist')
  names = []
  for hook in ('build_sdist', 'build_wheel'):  # one process each: setuptools keeps state
    code = f'import sys; from setuptools import build_meta; print(build_meta.{hook}(sys.argv[1]))'
    done = subprocess.run([sys.executable, '-c', code, str(out)], cwd=src, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    names.append(done.stdout.splitlines()[-1])  # setuptools logs to stdout before it
  sdist_name, wheel_name = names
  with tarfile.open(out / sdist_name) as tar:
    sdist = {m.name.partition('/')[2] for m in tar.getmembers() if m.isfile()}
  with zipfile.ZipFile(out / wheel_name) as whl:
    wheel = set(whl.namelist())
    metadata = whl.read(next(n for n in wheel if n.endswith('.dist-info/METADATA'))).decode()
  return sdist, wheel, metadata


def _package_files():
  files = set()
  for parent, dirs, names in os.walk(ROOT / 'nnx_recurrent'):
    dirs[:] = [d for d in dirs if d != '__pycache__']
    rel = pathlib.Path(parent).relative_to(ROOT)
    files |= {(rel / n).as_posix() for n in names if n.endswith('.py') or n == 'py.typed'}
  return files


def test_wheel_holds_every_module_and_py_typed(distributions):
  _, wheel, _ = distributions
  package = {n for n in wheel if n.startswith('nnx_recurrent/')}
  assert package == _package_files()
  assert 'nnx_recurrent/py.typed' in package
  assert not {n for n in wheel if n.partition('/')[0] not in ('nnx_recurrent',)
              and '.dist-info/' not in n}


def test_wheel_requires_only_jax_jaxlib_flax_numpy(distributions):
  _, _, metadata = distributions
  required = sorted(line.split(':', 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith('Requires-Dist:') and 'extra ==' not in line)
  names = sorted(re.split(r'[<>=!~;\[ ]', r, maxsplit=1)[0].lower() for r in required)
  assert names == ['flax', 'jax', 'jaxlib', 'numpy'], required
  assert 'Requires-Python: >=3.11' in metadata


def test_sdist_holds_the_library_and_no_partial_test_suite(distributions):
  # setuptools adds tests/test*.py to an sdist by default; without tests/reference.py,
  # conftest.py, the fixtures and examples/ they fail to import (MANIFEST.in prunes them).
  sdist, _, _ = distributions
  assert not {n for n in sdist if n.startswith('tests/')}
  assert {n for n in sdist if n.startswith('nnx_recurrent/')} == _package_files()
  assert {'README.md', 'LICENSE', 'pyproject.toml', 'PKG-INFO'} <= sdist


def _api_page_entries():
  """(module, name) of every autoclass/autofunction entry on docs/api.md, and the names
  an automodule entry's :members: list gives."""
  entries, module, automodule = set(), None, None
  for line in (ROOT / 'docs' / 'api.md').read_text().splitlines():
    if m := re.match(r'\.\. currentmodule:: (\S+)', line):
      module, automodule = m.group(1), None
    elif m := re.match(r'\.\. auto(?:class|function):: (\S+)', line):
      entries.add((module, m.group(1)))
    elif m := re.match(r'\.\. automodule:: (\S+)', line):
      automodule = m.group(1)
    elif (m := re.match(r'\s+:members: (.+)', line)) and automodule:
      entries.update((automodule, n.strip()) for n in m.group(1).split(','))
  return entries


def test_the_api_page_documents_every_public_name():
  # The page lists its entries by name (no automodule :members: sweep, which showed
  # jax's sigmoid docstring as compat.MGUCell.gate_fn): a name added to __all__ must
  # be added there.
  import nnx_recurrent
  import nnx_recurrent.interop
  from nnx_recurrent import compat

  entries = _api_page_entries()
  for module in (nnx_recurrent, compat, nnx_recurrent.interop):
    missing = [n for n in module.__all__ if (module.__name__, n) not in entries]
    assert not missing, f'docs/api.md has no entry for {module.__name__}: {missing}'
  stale = [(m, n) for m, n in entries if not hasattr(sys.modules[m], n)]
  assert not stale, f'docs/api.md documents names that do not exist: {stale}'
