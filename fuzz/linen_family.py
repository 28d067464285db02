"""nnx_recurrent.compat against flax.linen: RNN, Bidirectional, the cells
(``ConvLSTMCell`` too, over one or two spatial axes, with the paddings
flax.linen's cell runs), flip_sequences; one variables dict into both.
Packed ``segment_ids`` (an extension) against flax.linen's cell looped over
each segment alone.

compat gives flax.linen's values everywhere, padded outputs included, except
where compat/README.md ("Deliberate differences") says otherwise; there the
case checks what it promises instead: the initial carry for a row of length
0, each row's own carry with two or more batch axes (flax.linen's gains an
axis: the reference runs on the flattened batch), and a length above the time
axis acting as the time axis (flax.linen gets the clipped lengths: reversed,
it wraps such a row around, and its gradient through such a row's carry is
lost). A third of the cells, RNN and packed cases run in reduced precision,
as in the ``nnx`` family; where flax.linen's scan refuses a cell whose step changes
the carry's dtype, compat casts it back (compat/README.md), and the reference
is flax.linen's RNN over the cell wrapped in ``CastBack``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import recurrent as linen_recurrent

from fuzz._common import (
  Precision,
  as_rows,
  draw_conv_lstm,
  draw_lengths,
  draw_precision,
  draw_segments,
  garbage,
  reference_inputs,
  tree_rows,
  unflat,
  unwrap_cells,
  valid_steps,
  wrap_cells,
)
from fuzz._core import Case
from nnx_recurrent import compat

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell']


def _random_carry(case: Case, cell: Any, shape: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape), a.dtype),
                      cell.initialize_carry(jax.random.key(0), shape))


class CastBack(nn.RNNCellBase):
  """flax.linen's cell with its new carry cast to the dtype of the carry it
  was given: what compat's RNN does with a cell whose step changes the
  carry's dtype (compat/README.md), which flax.linen's RNN refuses."""

  cell: Any

  def __call__(self, carry: Any, x: Any) -> tuple[Any, Any]:
    new_carry, y = self.cell(carry, x)
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new_carry, carry), y

  def initialize_carry(self, rng: Any, input_shape: tuple[int, ...]) -> Any:
    return self.cell.initialize_carry(rng, input_shape)

  @property
  def num_feature_axes(self) -> int:
    return self.cell.num_feature_axes


def _model(lib: Any, kind: str, hidden: int, bidirectional: bool, kw: dict[str, Any],
           rnn_kw: dict[str, Any], wrap: Any = None, cell_kw: dict[str, Any] | None = None,
           **dtypes: Any) -> Any:
  """An ``RNN`` (``rnn_kw``), or a ``Bidirectional`` of two, of ``lib``'s
  (flax.linen's or compat's) cells ``kind`` built with ``cell_kw`` and
  ``dtypes``, each wrapped by ``wrap``; ``kw``: the outer layer's options."""
  def cell() -> Any:
    made = getattr(lib, kind)(hidden, **(cell_kw or {}), **dtypes)
    return made if wrap is None else wrap(made)
  if bidirectional:
    return lib.Bidirectional(lib.RNN(cell()), lib.RNN(cell()), **kw)
  return lib.RNN(cell(), **kw, **rnn_kw)


def _draw_cell(case: Case) -> tuple[str, dict[str, Any], tuple[int, ...]]:
  """A cell kind, its keyword arguments past the size, and the spatial shape
  of its steps: ``()`` for the vector cells; for ``ConvLSTMCell``,
  ``draw_conv_lstm``'s."""
  kind = case.pick('cell', [*CELLS, 'ConvLSTMCell'])
  if kind != 'ConvLSTMCell':
    return kind, {}, ()
  return (kind, *draw_conv_lstm(case))


def _dtypes(precision: Precision) -> dict[str, Any]:
  """The cells' dtype arguments for ``precision``."""
  return {} if precision.plain else dict(dtype=precision.dtype,
                                         param_dtype=precision.param_dtype)


def _cast(variables: Any, precision: Precision) -> Any:
  """float32 variables in ``precision``'s ``param_dtype``: flax.linen cannot
  initialize an orthogonal kernel in bfloat16 or float16 on the CPU (no QR);
  compat's initialization in a low dtype is tested elsewhere (test_compat)."""
  return jax.tree.map(lambda a: a.astype(precision.param_dtype), variables)


def cell_case(case: Case) -> None:
  kind, cell_kw, spatial = _draw_cell(case)
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.integer('batch_axes', 0, 2)))
  precision = draw_precision(case)
  theirs, ours = (getattr(lib, kind)(hidden, **cell_kw) for lib in (nn, compat))
  shape, key = (*batch, *spatial, in_f), jax.random.key(case.integer('init_seed', 0, 9))
  carry, x = _random_carry(case, theirs, shape), jnp.asarray(case.normal(shape))
  variables = theirs.init(key, carry, x)
  case.close(f'init {kind}', ours.init(key, carry, x), variables, atol=1e-7, rtol=1e-6)
  if not precision.plain:  # the same parameters, cast, in cells told the dtypes
    theirs, ours = (getattr(lib, kind)(hidden, **cell_kw, **_dtypes(precision))
                    for lib in (nn, compat))
    variables = _cast(variables, precision)
    carry = jax.tree.map(lambda a, b: a.astype(b.dtype), carry,
                         theirs.initialize_carry(key, shape))
    x = x.astype(precision.inputs)
  precision.close(case, 'initialize_carry', ours.initialize_carry(key, shape),
                  theirs.initialize_carry(key, shape))
  # compat's cells return what flax.linen's compute, dtypes included.
  precision.close(case, f'{kind} step', ours.apply(variables, carry, x),
                  theirs.apply(variables, carry, x))


def flip_case(case: Case) -> None:
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.integer('batch_axes', 1, 2)))
  time, time_major = case.integer('time', 1, 6), bool(case.pick('time_major', [False, True]))
  lengths = case.rng.integers(0, time + 1, size=batch)  # within the time axis: see above
  case.config['lengths'] = lengths.tolist()
  x = case.normal((time, *batch, 2) if time_major else (*batch, time, 2))
  case.close('flip_sequences',
             compat.flip_sequences(x, jnp.asarray(lengths), len(batch), time_major),
             linen_recurrent.flip_sequences(x, jnp.asarray(lengths), len(batch), time_major))


def rnn_case(case: Case, bidirectional: bool) -> None:
  kind, cell_kw, spatial = _draw_cell(case)
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  batch = tuple(case.integer(f'batch{i}', 1, 3)
                for i in range(case.pick('batch_axes', [1, 1, 1, 2, 2])))
  time = case.integer('time', 1, 6)
  time_major = bool(case.pick('time_major', [False, True]))
  lengths = draw_lengths(case, batch, time)
  kw: dict[str, Any] = dict(time_major=time_major, return_carry=True)
  rnn_kw: dict[str, Any] = {}
  if not bidirectional:
    rnn_kw = dict(reverse=case.pick('reverse', [False, True]),
                  keep_order=case.pick('keep_order', [False, True]),
                  unroll=case.pick('unroll', [1, 1, 2]))
  precision = draw_precision(case)

  def build(lib: Any, wrap: Any = None, **dtypes: Any) -> Any:
    return _model(lib, kind, hidden, bidirectional, kw, rnn_kw, wrap, cell_kw, **dtypes)

  theirs, ours = build(nn), build(compat)
  time_axis, lead = (0, 1) if time_major else (len(batch), 0)
  step = (*spatial, in_f)
  x = case.normal((time, *batch, *step) if time_major else (*batch, time, *step))
  key = jax.random.key(case.integer('init_seed', 0, 9))
  variables = theirs.init(key, x)
  case.close('init', ours.init(key, x), variables, atol=1e-7, rtol=1e-6)
  if not precision.plain:  # the same parameters, cast, in cells told the dtypes
    theirs, ours = build(nn, **_dtypes(precision)), build(compat, **_dtypes(precision))
    variables, x = _cast(variables, precision), x.astype(precision.inputs)
  cell = getattr(nn, kind)(hidden, **cell_kw, **_dtypes(precision))
  carries = [_random_carry(case, cell, (*batch, *step)) for _ in range(1 + bidirectional)]
  carry = (tuple(carries) if bidirectional else carries[0]) \
      if case.pick('initial_carry', [0, 1]) else None
  x_t, carry_t, lengths_t, merge = reference_inputs(x, carry, lengths, batch, time, time_major)
  out_features = hidden * (1 + bidirectional)
  w_y = jnp.asarray(case.normal((*batch, time, *spatial, out_features)))
  w_c = jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape)), carries[0])
  valid = valid_steps(lengths, batch, time)
  ends = valid[..., 0]

  def loss(model, inputs, start, seq_lengths, unmerge, variables=variables):
    def f(v):
      kw = {} if seq_lengths is None else {'seq_lengths': jnp.asarray(seq_lengths)}
      new_carry, y = model.apply(v, jnp.asarray(inputs), initial_carry=start, **kw)
      if unmerge:
        new_carry, y = unflat(new_carry, 0, batch), unflat(y, lead, batch)
      y = jnp.moveaxis(y, time_axis, len(batch))
      first = jax.tree.leaves(new_carry if not bidirectional else new_carry[0])
      at_ends = jnp.asarray(ends).reshape(ends.shape + (1,) * (1 + len(spatial)))
      total = jnp.sum(y * w_y) + sum(jnp.sum(jnp.where(at_ends, c * w, 0))
                                     for c, w in zip(first, jax.tree.leaves(w_c)))
      return total, (new_carry, y)
    return jax.grad(f, has_aux=True)(variables)

  g_ours, (c_ours, y_ours) = loss(ours, x, carry, lengths, False)
  try:
    g_theirs, (c_theirs, y_theirs) = loss(theirs, x_t, carry_t, lengths_t, merge)
  except TypeError as e:
    # A cell computing in another dtype than its carry's: flax.linen's scan
    # refuses the changed carry; compat's RNN casts it back, as flax.linen's
    # RNN over CastBack cells.
    if precision.plain or 'must have equal types' not in str(e):
      raise
    case.config['flax.linen'] = 'refuses the carry dtype: CastBack'
    theirs = build(nn, CastBack, **_dtypes(precision))
    g_theirs, (c_theirs, y_theirs) = loss(theirs, x_t, carry_t, lengths_t, merge,
                                          wrap_cells(variables))
    g_theirs = unwrap_cells(g_theirs)
  precision.close(case, 'outputs (padding included)', y_ours, y_theirs)
  precision.close(case, 'carry (rows of length > 0)', tree_rows(c_ours, ends),
                  tree_rows(c_theirs, ends))
  if lengths is not None:
    start = carry if carry is not None else jax.tree.map(jnp.zeros_like, c_ours)
    case.close('carry (rows of length 0: the initial carry)', tree_rows(c_ours, ~ends),
               tree_rows(start, ~ends))
  precision.close(case, 'gradients', g_ours, g_theirs, atol=1e-4, rtol=1e-4, sums=True)


def run(case: Case) -> None:
  mode = case.pick('mode', ['rnn', 'rnn', 'rnn', 'bidirectional', 'cell', 'flip_sequences',
                           'packed', 'packed'])
  if mode == 'packed':
    packed_case(case)
  elif mode == 'cell':
    cell_case(case)
  elif mode == 'flip_sequences':
    flip_case(case)
  else:
    rnn_case(case, mode == 'bidirectional')


def packed_case(case: Case) -> None:
  """compat.RNN / compat.Bidirectional with packed ``segment_ids`` (an
  extension flax.linen lacks: masked as in nr.RNN, zeros at padding) against
  flax.linen's cell looped over each segment alone, from the row's initial
  carry for its first segment and from zeros for the others. In reduced
  precision the loop's cell is wrapped in ``CastBack``: compat keeps the
  carry's dtype over the steps."""
  kind = case.pick('cell', CELLS)
  in_f, hidden = case.integer('in_features', 1, 4), case.integer('hidden', 1, 5)
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.pick('batch_axes', [1, 2])))
  time = case.integer('time', 1, 6)
  time_major = bool(case.pick('time_major', [False, True]))
  bidirectional = bool(case.pick('bidirectional', [False, True]))
  reverse = keep_order = False
  rnn_kw: dict[str, Any] = {}
  if not bidirectional:
    reverse = bool(case.pick('reverse', [False, True]))
    keep_order = bool(case.pick('keep_order', [False, True]))
    rnn_kw = dict(reverse=reverse, keep_order=keep_order, unroll=case.pick('unroll', [1, 1, 2]))
  precision = draw_precision(case)

  def build(**dtypes: Any) -> Any:
    return _model(compat, kind, hidden, bidirectional, dict(return_carry=True), rnn_kw,
                  **dtypes)

  ours = build(**_dtypes(precision))
  rows = int(np.prod(batch))
  ids, segments = draw_segments(case, rows, time)
  case.config['segment_ids'] = ids.tolist()
  ids_b = ids.reshape((*batch, time))
  valid = ids != 0
  x = case.normal((time, *batch, in_f) if time_major else (*batch, time, in_f))
  time_axis = 0 if time_major else len(batch)
  x_ours = garbage(case, x.astype(precision.inputs), valid.reshape((*batch, time)), time_axis)
  cell = CastBack(getattr(nn, kind)(hidden, **_dtypes(precision)))
  given = [_random_carry(case, cell, (*batch, in_f)) if case.pick('initial_carry', [0, 1])
           else None for _ in range(1 + bidirectional)]
  if bidirectional and None in given:  # a pair or nothing
    given = [None, None]
  carry = tuple(given) if bidirectional and given[0] is not None else given[0]
  # float32 parameters, cast (see _cast)
  variables = _cast(build().init(jax.random.key(case.integer('init_seed', 0, 9)), x), precision)
  x = x.astype(precision.inputs)
  out_f = hidden * (1 + bidirectional)
  w_y = case.normal((rows, time, out_f))
  zero = jax.tree.map(jnp.zeros_like, cell.initialize_carry(jax.random.key(0), (1, in_f)))
  w_c = [[case.normal((rows, *a.shape[1:])) for a in jax.tree.leaves(zero)]
         for _ in range(1 + bidirectional)]

  def carry_loss(carries):
    return sum(jnp.sum(c * w) for carry, ws in zip(carries, w_c)
               for c, w in zip(jax.tree.leaves(carry), ws))

  def ours_loss(v):
    c, y = ours.apply(v, jnp.asarray(x_ours), initial_carry=carry, time_major=time_major,
                      segment_ids=jnp.asarray(np.moveaxis(ids_b, -1, 0) if time_major else ids_b))
    y = jnp.reshape(jnp.moveaxis(y, 0, len(batch)) if time_major else y, (rows, time, out_f))
    c = [jax.tree.map(lambda a: a.reshape((rows, *a.shape[len(batch):])), d)
         for d in (c if bidirectional else [c])]
    return jnp.sum(jnp.where(valid[..., None], y * w_y, 0)) + carry_loss(c), (c, y)

  x_rows = jnp.asarray(as_rows(x, batch, time_major))
  starts = [None if g is None else jax.tree.map(lambda a: a.reshape((rows, *a.shape[-1:])), g)
            for g in given]

  def loop(p, xs, c, backwards):
    ys = []
    for x_t in (xs[::-1] if backwards else xs):
      c, y = cell.apply({'params': {'cell': p}}, c, x_t)
      ys.append(y)
    return c, jnp.stack(ys[::-1] if backwards and (keep_order or bidirectional) else ys)

  def ref_loss(v):
    params = v['params']
    directions = ([(params['forward_rnn']['cell'], False), (params['backward_rnn']['cell'], True)]
                  if bidirectional else [(params['cell'], reverse)])
    _, y_step = jax.eval_shape(lambda: cell.apply({'params': {'cell': directions[0][0]}}, zero,
                                                  x_rows[0, :1]))
    y = jnp.zeros((rows, time, out_f), y_step.dtype)
    carries = [[] for _ in directions]
    for r in range(rows):
      outs = []
      for d, (p, backwards) in enumerate(directions):
        first = zero if starts[d] is None else jax.tree.map(lambda a, r=r: a[r:r + 1], starts[d])
        c, out = first, []
        for k, (s, e) in enumerate(segments[r]):
          c, seg = loop(p, x_rows[r, s:e, None], first if k == 0 else zero, backwards)
          out.append((s, e, seg[:, 0]))
        carries[d].append(c)
        outs.append(out)
      for parts in zip(*outs):
        s, e = parts[0][:2]
        y = y.at[r, s:e].set(jnp.concatenate([seg for _, _, seg in parts], -1))
    c = [jax.tree.map(lambda *a: jnp.concatenate(a), *cs) for cs in carries]
    return jnp.sum(y * w_y) + carry_loss(c), (c, y)

  g_ours, (c_ours, y_ours) = jax.grad(ours_loss, has_aux=True)(variables)
  g_ref, (c_ref, y_ref) = jax.jit(jax.grad(ref_loss, has_aux=True))(variables)
  precision.close(case, 'packed outputs (zeros at padding)', y_ours, y_ref)
  precision.close(case, 'packed carry', c_ours, c_ref)
  precision.close(case, 'packed gradients', g_ours, g_ref, atol=1e-4, rtol=1e-4, sums=True)
