"""What several families draw: batch shapes, lengths, valid-step masks."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from fuzz._core import Case


def params(module: nnx.Module) -> dict[str, np.ndarray]:
  """A module's parameters by path, as NumPy arrays."""
  return {'/'.join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def draw_lengths(case: Case, batch: tuple[int, ...], time: int) -> np.ndarray | None:
  """``None``, or lengths in ``[0, time + 2]`` of the batch shape or of shape
  ``(1,)`` (broadcast to the batch, as flax broadcasts it); lengths of 0, 1
  and above ``time`` come up often."""
  if not batch or not case.pick('seq_lengths', [False, True]):
    return None
  shape = (1,) if case.pick('lengths_shape', ['batch', 'batch', 'batch', '(1,)']) == '(1,)' \
      else batch
  lengths = case.rng.choice([0, 1, time, time + 2, *range(time + 1)], size=shape)
  case.config['lengths'] = lengths.tolist()
  return lengths.astype(np.int32)


def valid_steps(lengths: np.ndarray | None, batch: tuple[int, ...], time: int) -> np.ndarray:
  """``(*batch, time)`` bools: the steps before each row's length (clipped to
  ``time``; all of them without lengths)."""
  if lengths is None:
    return np.ones((*batch, time), bool)
  full = np.broadcast_to(lengths, batch)
  return np.arange(time) < np.minimum(full, time)[..., None]


def garbage(case: Case, x: np.ndarray, valid: np.ndarray, time_axis: int) -> np.ndarray:
  """``x`` with NaN, inf or 1e30 at the padding steps."""
  pad = ~np.moveaxis(valid, -1, time_axis)[..., None]
  value = case.pick('garbage', [np.nan, np.inf, -np.inf, 1e30])
  return np.where(pad, np.float32(value), x)


def tree_rows(tree: Any, keep: np.ndarray) -> Any:
  """Each leaf's rows where ``keep`` (a boolean batch mask) holds."""
  return jax.tree.map(lambda a: np.asarray(a)[keep], tree)


def flat(tree: Any, lead: int, n: int) -> Any:
  """Leaves with their ``n`` batch axes from axis ``lead`` merged into one
  (flax's reference run with several batch axes and lengths)."""
  return jax.tree.map(lambda a: a.reshape(a.shape[:lead] + (-1,) + a.shape[lead + n:]), tree)


def unflat(tree: Any, lead: int, batch: tuple[int, ...]) -> Any:
  """``flat``'s inverse: the merged axis at ``lead`` back to ``batch``."""
  return jax.tree.map(lambda a: a.reshape(a.shape[:lead] + batch + a.shape[lead + 1:]), tree)


def reference_inputs(x: np.ndarray, carry: Any, lengths: np.ndarray | None,
                     batch: tuple[int, ...], time: int, time_major: bool
                     ) -> tuple[np.ndarray, Any, np.ndarray | None, bool]:
  """flax's inputs, initial carry and lengths, and whether its batch axes are
  merged. Its lengths are cut to the time axis, which is what a longer length
  means to both (flax's own reading of one: reversed, it wraps the row around,
  and the gradient through the row's carry is lost, docs/migrating_from_nnx.md).
  With two batch axes and lengths its carry gains an axis: it runs on the
  batch flattened (``unflat`` restores its results)."""
  clipped = None if lengths is None else np.minimum(np.broadcast_to(lengths, batch), time)
  if len(batch) != 2 or clipped is None:
    return x, carry, clipped, False
  return flat(x, int(time_major), 2), flat(carry, 0, 2), clipped.reshape(-1), True
