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

import jax
import numpy as np
from flax import serialization

_DATA = os.path.join(os.path.dirname(__file__), 'data')
ATOL = 1e-5  # absolute, on float32 values of order 1 (the test files' docstrings)


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


def valid(case: dict) -> np.ndarray:
  """(batch, time) True at the steps within the case's ``seq_lengths`` (all
  steps for a case without them: the ``nn.scan`` ones)."""
  batch, time = case['inputs'].shape[:2]
  lengths = case.get('seq_lengths', np.full(batch, time))
  return np.arange(time)[None, :] < np.asarray(lengths)[:, None]


def max_diff(got, want, valid=None) -> float:
  """The largest ``|got - want|`` (same shape and dtype asserted), at the
  ``valid`` ``(batch, time)`` steps only where given."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
  if valid is not None:  # (batch, time) against (batch, time, ...)
    mask = valid.reshape(valid.shape + (1,) * (got.ndim - 2))
    got, want = np.where(mask, got, 0), np.where(mask, want, 0)
  return float(np.max(np.abs(got - want)))


def check(case: dict, carry, outputs, valid=None, want=None) -> float:
  """The largest difference from the old release's outputs and carry (``want``'s,
  default ``case``'s); asserts :data:`ATOL`."""
  want = want or case
  want_carry = unpack(want['carry'])
  assert jax.tree.structure(carry) == jax.tree.structure(want_carry)
  diff = max([max_diff(outputs, want['outputs'], valid)]
             + [max_diff(g, w) for g, w in zip(jax.tree.leaves(carry),
                                                jax.tree.leaves(want_carry))])
  assert diff <= ATOL, f"{case['kind']}/{case['cell']}: {diff:.3g} from the old release's values"
  return diff
