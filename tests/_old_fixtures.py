"""The fixture loader of the old-checkpoint tests (test_old_flax_checkpoints.py,
test_old_nnx_checkpoints.py).

A folder of tests/data holds one ``flax-<version>.msgpack`` per old release, as
that folder's generator writes it: ``{'versions': {...}, 'cases': {name: case},
...}``, each case's tuple carries stored as ``{'0': c, '1': h}`` (msgpack keeps
dicts, not tuples).
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np
from flax import serialization

_DATA = os.path.join(os.path.dirname(__file__), 'data')


@functools.cache
def load(path: str) -> dict:
  """A fixture file, read once per test process."""
  with open(path, 'rb') as f:
    return serialization.msgpack_restore(f.read())


def version(path: str) -> str:
  """The flax release that wrote ``path``: ``'0.10.7'`` of ``.../flax-0.10.7.msgpack``."""
  return os.path.basename(path)[len('flax-'):-len('.msgpack')]


class Fixtures:
  """The fixtures in ``tests/data/<folder>``."""

  def __init__(self, folder: str):
    self.files = sorted(glob.glob(os.path.join(_DATA, folder, 'flax-*.msgpack')))
    self.by_version = {version(path): path for path in self.files}
    # (version, case name) of every case: the tests' parameters.
    self.cases = [(version(path), name) for path in self.files
                  for name in sorted(load(path)['cases'])]

  def fixture(self, version: str) -> dict:
    return load(self.by_version[version])

  def case(self, version: str, name: str) -> dict:
    return self.fixture(version)['cases'][name]


def unpack(carry):
  """A stored ``{'0': c, '1': h}`` back to the tuple carry, its arrays as msgpack
  restored them (read-only float32 NumPy arrays, which every layer takes)."""
  if isinstance(carry, dict):
    return tuple(unpack(carry[str(i)]) for i in range(len(carry)))
  return np.asarray(carry)
