"""What several families draw: batch shapes, lengths, packed segment ids,
valid-step masks, floating-point types."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fuzz._core import Case

FLOATS = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclass(frozen=True)
class Precision:
  """A case's floating-point types: the cell's ``dtype`` (``None``: promoted
  from the inputs and the parameters, as flax does) and ``param_dtype`` (the
  carry's too), and the inputs' dtype."""

  dtype: Any = None
  param_dtype: Any = jnp.float32
  inputs: Any = jnp.float32

  @property
  def plain(self) -> bool:
    """float32 throughout: the families' cases before dtypes were drawn."""
    return (self.dtype in (None, jnp.float32) and self.param_dtype == jnp.float32
            and self.inputs == jnp.float32)

  @property
  def lowest(self) -> Any:
    """The least precise of the dtype computed in and the carry's dtype."""
    compute = self.dtype if self.dtype is not None else jnp.result_type(self.inputs,
                                                                      self.param_dtype)
    return max((jnp.dtype(compute), jnp.dtype(self.param_dtype)),
               key=lambda d: float(jnp.finfo(d).eps))

  def close(self, case: Case, what: str, ours: Any, theirs: Any, atol: float = 1e-5,
            rtol: float = 1e-5, sums: bool = False) -> None:
    """``case.close`` with the same dtypes at every leaf. In a dtype less
    precise than float32 the quantity is reported under the dtype's name,
    within 2 of its epsilons of each value; ``sums`` (gradients, summed over
    steps and rows in that dtype, in another order than flax's): within 8
    epsilons of the largest of all the values compared. (Not of each leaf's
    largest: a leaf of one bias whose terms cancel is far smaller than the
    terms whose rounding it carries.)"""
    if self.plain:
      case.close(what, ours, theirs, atol, rtol)
      return
    case.same_dtypes(what, ours, theirs)
    low = self.lowest
    if low == jnp.float32:
      case.close(f'{what} [float32, low-precision inputs or dtype]', ours, theirs, atol, rtol)
      return
    eps, what = float(jnp.finfo(low).eps), f'{what} [{low.name}]'
    if not sums:
      case.close(what, ours, theirs, 2 * eps, 2 * eps)
      return
    scale = max((float(np.max(np.abs(np.asarray(t, np.float64)), initial=0.0))
                 for t in jax.tree.leaves(theirs)), default=0.0)
    case.close(what, ours, theirs, 8 * eps * scale, 0.0)


STREAM = 'dropout'  # UserCell's own dropout stream


class UserCell(nnx.Module):
  """A stateful cell in flax.nnx's style, as users write them: flax.nnx's
  ``GRUCell`` with, each optional, a step counter (an ``nnx.Variable``), its
  own ``nnx.Dropout`` on the ``STREAM`` stream, and a running mean of its
  inputs (an ``nnx.BatchStat``) fed back into them. Built from an ``nnx.Rngs``
  (``nnx.split_rngs`` gives each member of an ensemble its own)."""

  def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs, rate: float,
               count: bool, track: bool):
    self.in_features, self.hidden = in_features, hidden
    self.core = nnx.GRUCell(in_features, hidden, rngs=rngs)
    self.steps = nnx.Variable(jnp.zeros((), jnp.int32)) if count else None
    self.seen = nnx.BatchStat(jnp.zeros((in_features,))) if track else None
    self.drop = nnx.Dropout(rate, rng_collection=STREAM, rngs=rngs) if rate else None

  @property
  def num_feature_axes(self) -> int:
    return 1

  def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None) -> jax.Array:
    del rngs
    return jnp.zeros((*input_shape[:-1], self.hidden))

  def __call__(self, carry: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.steps is not None:
      self.steps[...] += 1
    if self.seen is not None:
      self.seen[...] = 0.5 * self.seen[...] + 0.5 * x.mean(axis=tuple(range(x.ndim - 1)))
      x = x + jnp.broadcast_to(self.seen[...], x.shape)
    carry, y = self.core(carry, x)
    return carry, (self.drop(y) if self.drop is not None else y)


def on_paths_of(tree: Any, reference: Any) -> Any:
  """``tree`` (a pure dict: parameters, gradients) on the paths ``reference`` has:
  flax.nnx's cells' parameters, leaving out nr.GRUCell's ``bias_hn``."""
  if isinstance(tree, dict):
    return {k: on_paths_of(tree[k], v) for k, v in reference.items()}
  return tree


def by_path(tree: Any, prefix: str = '') -> dict[str, np.ndarray]:
  """A pure dict's leaves (``nnx.to_pure_dict``: a module's Variables) by path,
  ``'a/b/c'``, as NumPy arrays (RNG keys as their data)."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in by_path(sub, f'{prefix}{key}/').items()}
  if jax.dtypes.issubdtype(tree.dtype, jax.dtypes.prng_key):
    tree = jax.random.key_data(tree)
  return {prefix[:-1]: np.asarray(tree)}


def wrap_cells(tree: Any) -> Any:
  """An RNN's (or Bidirectional's) parameters for the same RNN over wrapped
  cells: each ``'cell'`` entry one level deeper (``{'cell': {'cell': ...}}``)."""
  if not isinstance(tree, dict):
    return tree
  return {k: {'cell': v} if k == 'cell' else wrap_cells(v) for k, v in tree.items()}


def unwrap_cells(tree: Any) -> Any:
  """``wrap_cells``'s inverse: an RNN's over wrapped cells at the bare cells' paths."""
  if not isinstance(tree, dict):
    return tree
  return {k: v['cell'] if k == 'cell' else unwrap_cells(v) for k, v in tree.items()}


def draw_precision(case: Case) -> Precision:
  """float32 throughout in two cases of three; else the cell's ``dtype``,
  ``param_dtype`` and the inputs' dtype each drawn from float32, bfloat16
  and float16 (``dtype`` also ``None``)."""
  if not case.pick('low_precision', [False, False, True]):
    return Precision()
  dtype = case.pick('dtype', [None, 'float32', 'bfloat16', 'float16'])
  param_dtype = case.pick('param_dtype', ['float32', 'float32', 'bfloat16', 'float16'])
  inputs = case.pick('inputs_dtype', ['float32', 'bfloat16', 'float16'])
  return Precision(None if dtype is None else FLOATS[dtype], FLOATS[param_dtype], FLOATS[inputs])


def params(module: nnx.Module) -> dict[str, np.ndarray]:
  """A module's parameters by path, as NumPy arrays."""
  return {'/'.join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# The Pallas kernels' sizes a case runs them with (``internal.pallas_settings``):
# the defaults (each step's loads issued a step ahead); the loads not ahead;
# 16-wide column chunks (so several chunks from hidden 17 on) with two tiles
# held and the rest loaded at each step, ahead or not; a loop over the chunks
# (as from H = 512 on a GPU); the products as multiply-adds (``matmul='fma'``),
# in blocks of up to 64 rows, or of one row with 16-wide chunks; or where they
# fit registers, one row a program (``'auto'``); the backward's residuals rebuilt
# by XLA from the outputs (``residuals='rebuilt'``), also in a loop over chunks.
PALLAS_SETTINGS = ({}, {'prefetch': False},
                   {'chunk': 16, 'hold_bytes': 2 * 16 * 16 * 4, 'prefetch': True},
                   {'chunk': 16, 'hold_bytes': 2 * 16 * 16 * 4, 'prefetch': False},
                   {'chunk': 16, 'unrolled_chunks': 1},
                   {'matmul': 'fma'}, {'matmul': 'fma', 'chunk': 16, 'state_elements': 16},
                   {'matmul': 'auto'}, {'residuals': 'rebuilt'},
                   {'residuals': 'rebuilt', 'chunk': 16, 'unrolled_chunks': 1})


def scan_plan(case: Case, layer_cls: type, rows: int) -> contextlib.AbstractContextManager:
  """The XLA scans' plan of a case run without the Pallas kernels, as a
  context to trace the layer in: this machine's own choice, or a GPU's
  (``internal.gpu_plan``: every scan unrolled, the backward one too; the
  default on every GPU, run here on the CPU)."""
  from nnx_recurrent._fused import internal

  if case.pick('scan_plan', ['default', 'default', 'gpu']) == 'default':
    return contextlib.nullcontext()
  return internal.forced_plan(internal.gpu_plan(layer_cls, rows))


def draw_pallas_settings(case: Case) -> dict[str, Any]:
  """The kernel settings of a case run with ``implementation='pallas'``: one of
  ``PALLAS_SETTINGS``, for ``internal.pallas_settings(**settings)`` while the
  layer is traced."""
  return case.pick('pallas_settings', PALLAS_SETTINGS)


def draw_conv_lstm(case: Case) -> tuple[dict[str, Any], tuple[int, ...]]:
  """A ``ConvLSTMCell``'s ``kernel_size`` and ``padding``, and the spatial
  shape of its steps: 1 or 2 axes of 1-4 points, kernels of 1-3 and a padding
  flax.linen's cell runs (its hidden convolution takes the same padding, so
  one that keeps the shape at stride 1, in each form its ``Conv`` takes)."""
  rank = case.integer('spatial_axes', 1, 2)
  spatial = tuple(case.integer(f'spatial{i}', 1, 4) for i in range(rank))
  kernel = tuple(case.integer(f'kernel{i}', 1, 3) for i in range(rank))
  padding: Any = case.pick('padding', ['SAME', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'int', 'pairs']
                           + (['CAUSAL'] if rank == 1 else []))
  if padding == 'int':  # 2p = k - 1 on every axis, else 'SAME'
    padding = kernel[0] // 2 if len(set(kernel)) == 1 and kernel[0] % 2 else 'SAME'
  elif padding == 'pairs':
    lows = [case.integer(f'padding{i}_low', 0, k - 1) for i, k in enumerate(kernel)]
    padding = tuple((lo, k - 1 - lo) for lo, k in zip(lows, kernel))
  return dict(kernel_size=kernel, padding=padding), spatial


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


def garbage(case: Case, x: np.ndarray, valid: np.ndarray, time_axis: int,
            feature_axes: int = 1) -> np.ndarray:
  """``x`` with NaN, inf or 1e30 (inf in float16) at the padding steps."""
  pad = ~np.moveaxis(valid, -1, time_axis)
  pad = pad.reshape(pad.shape + (1,) * feature_axes)
  value = case.pick('garbage', [np.nan, np.inf, -np.inf, 1e30])
  with np.errstate(over='ignore'):
    return np.where(pad, np.asarray(value, np.float32).astype(x.dtype), x)


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


def draw_segments(case: Case, rows: int, time: int) -> tuple[np.ndarray, list[list[tuple]]]:
  """Packed ids ``(rows, time)`` and each row's segments ``(start, end)``:
  segments of 1-4 steps, padding runs before, between and after them, an id
  sometimes reused after padding (a new segment all the same)."""
  ids = np.zeros((rows, time), np.int32)
  for r in range(rows):
    t, next_id, last = 0, 1, 0
    while t < time:
      if case.rng.random() < 0.25:
        t += int(case.rng.integers(1, 3))
        continue
      n = int(case.rng.integers(1, 5))
      reuse = last and ids[r, t - 1] == 0 and case.rng.random() < 0.5
      ids[r, t:t + n] = last if reuse else next_id
      last, next_id, t = ids[r, t], next_id + 1, t + n
  return ids, [runs(row) for row in ids]


def runs(ids: np.ndarray) -> list[tuple[int, int]]:
  """The maximal runs of one non-zero id: ``(start, end)`` each."""
  found, t = [], 0
  while t < len(ids):
    if ids[t] == 0:
      t += 1
      continue
    start = t
    while t < len(ids) and ids[t] == ids[start]:
      t += 1
    found.append((start, t))
  return found


def as_rows(a: Any, batch: tuple[int, ...], time_major: bool) -> np.ndarray:
  """``(*batch, time, ...)`` or ``(time, *batch, ...)`` as ``(rows, time, ...)``."""
  a = np.asarray(a)
  if time_major:
    a = np.moveaxis(a, 0, len(batch))
  return a.reshape((math.prod(batch), *a.shape[len(batch):]))
