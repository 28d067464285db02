"""A fresh import of the package inside the test process.

What the package's import loads (lazily loaded submodules, optional
dependencies that must stay unloaded) is checked on a fresh import here rather
than in a new interpreter, which costs seconds of start-up (jax, flax) per
check. The package's modules, and those of the packages named ``blocked``, are
taken out of ``sys.modules`` for the duration and put back afterwards; an
attempt to import a blocked package is recorded and fails.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from collections.abc import Iterator

PACKAGE = 'nnx_recurrent'


def _top(name: str) -> str:
  return name.partition('.')[0]


class _Blocker(importlib.abc.MetaPathFinder):
  def __init__(self, blocked: frozenset[str], attempts: list[str]):
    self.blocked, self.attempts = blocked, attempts

  def find_spec(self, name, path=None, target=None):
    if _top(name) in self.blocked:
      self.attempts.append(name)
      raise ImportError(f'{name} is blocked by the test')
    return None


@contextlib.contextmanager
def fresh_package(blocked: tuple[str, ...] = ()) -> Iterator[list[str]]:
  """Within the block ``import nnx_recurrent`` imports it afresh; yields the
  list of attempted imports of the ``blocked`` top-level packages."""
  hidden = frozenset({PACKAGE, *blocked})
  saved = {name: module for name, module in sys.modules.items() if _top(name) in hidden}
  for name in saved:
    del sys.modules[name]
  attempts: list[str] = []
  blocker = _Blocker(frozenset(blocked), attempts)
  sys.meta_path.insert(0, blocker)
  try:
    yield attempts
  finally:
    sys.meta_path.remove(blocker)
    for name in [name for name in sys.modules if _top(name) in hidden]:
      del sys.modules[name]
    sys.modules.update(saved)
