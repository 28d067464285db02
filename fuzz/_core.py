"""The case loop, the comparisons and the report shared by every family."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np


class Mismatch(AssertionError):
  """A difference from the reference beyond the tolerance."""


@dataclass
class Case:
  """One case: its seed, the generator its configuration is drawn from, the
  configuration (for the report), the largest errors it measured, and the
  choices ``force``d (by name, instead of drawn: a test's narrower search)."""

  seed: int
  rng: np.random.Generator
  config: dict[str, Any] = field(default_factory=dict)
  errors: dict[str, float] = field(default_factory=dict)
  shares: dict[str, float] = field(default_factory=dict)
  force: dict[str, Any] = field(default_factory=dict)

  def pick(self, name: str, options: Any) -> Any:
    """One of ``options``, drawn and recorded under ``name``."""
    value = options[int(self.rng.integers(len(options)))]
    self.config[name] = value = self.force.get(name, value)
    return value

  def integer(self, name: str, low: int, high: int) -> int:
    """An int in ``[low, high]``, drawn and recorded under ``name``."""
    value = int(self.rng.integers(low, high + 1))
    self.config[name] = value = self.force.get(name, value)
    return value

  def normal(self, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * self.rng.standard_normal(shape)).astype(np.float32)

  def close(self, what: str, ours: Any, theirs: Any, atol: float = 1e-5,
            rtol: float = 1e-5) -> None:
    """Compares two pytrees leaf by leaf (structure, shapes, values within
    ``atol + rtol * |theirs|``); records the largest absolute difference and
    the largest share of the tolerance used (``|ours - theirs|`` over the
    tolerance: what reads whether a difference is large for values that large)."""
    ours_def, theirs_def = jax.tree.structure(ours), jax.tree.structure(theirs)
    if ours_def != theirs_def:
      raise Mismatch(f'{what}: structure {ours_def} != {theirs_def}')
    for i, (o, t) in enumerate(zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))):
      o, t = np.asarray(o, np.float64), np.asarray(t, np.float64)
      if o.shape != t.shape:
        raise Mismatch(f'{what}[{i}]: shape {o.shape} != {t.shape}')
      if not o.size:
        continue
      if not np.isfinite(o).all():
        raise Mismatch(f'{what}[{i}]: non-finite values {o[~np.isfinite(o)][:3]}')
      gap, tolerance = np.abs(o - t), atol + rtol * np.abs(t)
      diff = float(np.max(gap))
      self.errors[what] = max(self.errors.get(what, 0.0), diff)
      share = float(np.max(np.divide(gap, tolerance, out=np.where(gap > 0, np.inf, 0.0),
                                     where=tolerance > 0)))
      self.shares[what] = max(self.shares.get(what, 0.0), share)
      if not np.all(gap <= tolerance):
        raise Mismatch(f'{what}[{i}]: max |ours - theirs| = {diff:.3g} '
                       f'(atol {atol:g}, rtol {rtol:g})')

  def same_dtypes(self, what: str, ours: Any, theirs: Any) -> None:
    """The same tree structure with the same dtype at every leaf."""
    ours_dtypes = jax.tree.map(lambda a: str(np.asarray(a).dtype), ours)
    theirs_dtypes = jax.tree.map(lambda a: str(np.asarray(a).dtype), theirs)
    if ours_dtypes != theirs_dtypes:
      raise Mismatch(f'{what}: dtypes {ours_dtypes} != {theirs_dtypes}')


Family = Callable[[Case], None]


def case_seed(seed: int, index: int) -> int:
  """The seed of case ``index`` of a run with ``seed``."""
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def run_cases(name: str, family: Family, seeds: list[int],
              progress: Callable[[str], None] | None = None,
              force: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs ``family`` on each seed; returns the family's report: the case
  count, the largest error per compared quantity (absolute, and as a share of
  the tolerance), each failure, the time.
  ``force``: choices made instead of drawn (see :class:`Case`)."""
  start = time.perf_counter()
  largest: dict[str, float] = {}
  shares: dict[str, float] = {}
  failures = []
  for i, seed in enumerate(seeds):
    case = Case(seed, np.random.default_rng(seed), force=dict(force or {}))
    try:
      family(case)
    except Exception as e:  # noqa: BLE001 -- every failure is reported with its seed
      failures.append({'seed': seed, 'config': {k: repr(v) for k, v in case.config.items()},
                       'error': f'{type(e).__name__}: {e}'[:2000],
                       'where': traceback.format_exc(limit=-3)[-1500:]})
    for what, err in case.errors.items():
      largest[what] = max(largest.get(what, 0.0), err)
    for what, share in case.shares.items():
      shares[what] = max(shares.get(what, 0.0), share)
    if progress is not None and (i + 1) % 25 == 0:
      progress(f'{name}: {i + 1}/{len(seeds)} cases, {len(failures)} failures')
    jax.clear_caches() if (i + 1) % 50 == 0 else None  # compiled programs pile up
  return {'family': name, 'cases': len(seeds), 'failures': failures,
          'largest_abs_error': dict(sorted(largest.items())),
          'largest_tolerance_share': dict(sorted(shares.items())),
          'seconds': round(time.perf_counter() - start, 1)}
