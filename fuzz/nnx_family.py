"""nr.RNN, nr.Bidirectional and the cells against flax.nnx's, and the fused
nr.LSTM / nr.GRU (every implementation) against flax.nnx's RNNs stacked by hand.

Where nr differs on purpose (docs/migrating_from_nnx.md, "Three behaviours
differ"), the case checks what the docs promise: zero outputs at padding
(flax.nnx returns what the cell computed on the padding), the initial carry
for a row of length 0 (flax.nnx: the carry of its last computed step), and
with two or more batch axes each row's own carry (flax.nnx's carry then gains
an axis: the reference runs on the flattened batch). Padding holds NaN, inf
or 1e30 for nr and clean numbers for flax.nnx: nr's valid values must not
change.

A third of the cells and RNN cases run in reduced precision: the cells'
``dtype`` (or ``None``) and ``param_dtype`` and the inputs' dtype drawn from
float32, bfloat16 and float16 (the same float32 parameters, cast). The
dtypes of outputs, carries and gradients must be flax.nnx's, and so must the
values (within 2 epsilons of the dtype; gradients, summed in that dtype in
another order, within 8 epsilons of the largest gradient). Where flax.nnx's
scan refuses a cell whose step changes the carry's dtype, nr.RNN casts it
back (docs/migrating_from_nnx.md): the reference is then flax.nnx's RNN over
the cell wrapped in ``CastBack``, which does that cast.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._common import (
  Precision,
  draw_lengths,
  draw_pallas_settings,
  draw_precision,
  garbage,
  on_paths_of,
  params,
  reference_inputs,
  scan_plan,
  tree_rows,
  unflat,
  unwrap_cells,
  valid_steps,
)
from fuzz._core import Case
from nnx_recurrent._fused import internal

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell']


def _cells(case: Case, in_features: int, hidden: int, seed: int,
           precision: Precision | None = None) -> tuple[Any, Any]:
  """flax.nnx's cell and ours from the same ``nnx.Rngs``: the same parameters,
  then both cast to ``precision``'s ``param_dtype`` and computing in its ``dtype``."""
  kind = case.config['cell']
  theirs = getattr(nnx, kind)(in_features, hidden, rngs=nnx.Rngs(seed))
  # nr.GRUCell's one more parameter, bias_hn, starts at zero and so gives
  # flax.nnx's numbers; use_bias_hn=False is flax.nnx's cell exactly
  # (docs/migrating_from_nnx.md, "GRUCell has one more parameter").
  kw = {'use_bias_hn': case.pick('use_bias_hn', [False, True])} if kind == 'GRUCell' else {}
  ours = getattr(nr, kind)(in_features, hidden, **kw, rngs=nnx.Rngs(seed))
  mine, reference = params(ours), params(theirs)
  if kw.get('use_bias_hn'):
    case.close('init bias_hn (zeros)', mine.pop('bias_hn'), np.zeros(hidden))
  case.close(f'init {kind}', mine, reference, atol=1e-7, rtol=1e-6)
  if precision is None or precision.plain:
    return ours, theirs
  # The same float32 parameters, cast: flax.nnx cannot initialize an orthogonal
  # kernel in bfloat16 or float16 on the CPU (no QR), and its initialization
  # in a low dtype is tested elsewhere (test_dropin). Both are built with the
  # dtypes, so that everything else reads them as a user's cell would.
  dtypes = dict(dtype=precision.dtype, param_dtype=precision.param_dtype)
  try:
    low_theirs = getattr(nnx, kind)(in_features, hidden, **dtypes, rngs=nnx.Rngs(seed))
  except NotImplementedError:  # the QR: built in float32, then told its param_dtype
    low_theirs = getattr(nnx, kind)(in_features, hidden, dtype=precision.dtype,
                                    rngs=nnx.Rngs(seed))
    low_theirs.param_dtype = precision.param_dtype
  low_ours = getattr(nr, kind)(in_features, hidden, **kw, **dtypes, rngs=nnx.Rngs(seed))
  for low, high in ((low_theirs, theirs), (low_ours, ours)):
    nnx.update(low, jax.tree.map(lambda a: a.astype(precision.param_dtype),
                                 nnx.state(high, nnx.Param)))
  reference = nnx.to_pure_dict(nnx.state(low_theirs, nnx.Param))
  mine = on_paths_of(nnx.to_pure_dict(nnx.state(low_ours, nnx.Param)), reference)
  case.same_dtypes(f'{kind} parameters', mine, reference)
  return low_ours, low_theirs


class CastBack(nnx.Module):
  """flax.nnx's cell with its new carry cast to the dtype of the carry it was
  given: what nr.RNN does with a cell whose step changes the carry's dtype
  (docs/migrating_from_nnx.md), which flax.nnx's RNN refuses."""

  def __init__(self, cell: Any):
    self.cell = cell

  @property
  def num_feature_axes(self) -> int:
    return self.cell.num_feature_axes

  def initialize_carry(self, *args: Any, **kwargs: Any) -> Any:
    return self.cell.initialize_carry(*args, **kwargs)

  def __call__(self, carry: Any, x: Any) -> tuple[Any, Any]:
    new_carry, y = self.cell(carry, x)
    return jax.tree.map(lambda n, o: n.astype(o.dtype), new_carry, carry), y


def _random_carry(case: Case, cell: Any, shape: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape), a.dtype),
                      cell.initialize_carry(shape, rngs=nnx.Rngs(0)))


def cell_case(case: Case) -> None:
  kind = case.pick('cell', CELLS)
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.integer('batch_axes', 0, 2)))
  precision = draw_precision(case)
  ours, theirs = _cells(case, in_f, hidden, case.integer('init_seed', 0, 9), precision)
  shape = (*batch, in_f)
  precision.close(case, 'initialize_carry', ours.initialize_carry(shape),
                  theirs.initialize_carry(shape, rngs=nnx.Rngs(0)))
  carry = _random_carry(case, theirs, shape)
  x = jnp.asarray(case.normal(shape), precision.inputs)
  # docs/migrating_from_nnx.md: our step returns its carry in the given
  # carry's dtype, where flax.nnx's returns the dtype it computed in.
  new_carry, y = theirs(carry, x)
  new_carry = jax.tree.map(lambda n, o: n.astype(o.dtype), new_carry, carry)
  precision.close(case, f'{kind} step', ours(carry, x), (new_carry, y))


def _call(model: Any, x: Any, carry: Any, lengths: Any) -> Any:
  kw = {} if lengths is None else {'seq_lengths': jnp.asarray(lengths)}
  return model(x, initial_carry=carry, **kw)


def _loss_weights(case: Case, out: Any) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape)), out)


def _ends(valid: np.ndarray) -> np.ndarray:
  """The rows with at least one valid step (``valid``: ``(*batch, time)``)."""
  return valid[..., 0] if valid.size else np.zeros(valid.shape[:-1], bool)


def _masked_loss(new_carry: Any, y: Any, weights: Any, valid: np.ndarray, time_axis: int) -> Any:
  """A weighted sum of the outputs at valid steps and of the carries of the
  rows of length > 0: what flax.nnx and nr must agree on, and its gradient."""
  w_carry, w_y = weights
  y = jnp.moveaxis(y, time_axis, valid.ndim - 1)
  ends = jnp.asarray(_ends(valid))
  loss = jnp.sum(jnp.where(jnp.asarray(valid)[..., None], y * w_y, 0))
  for c, w in zip(jax.tree.leaves(new_carry), jax.tree.leaves(w_carry)):
    loss += jnp.sum(jnp.where(ends[..., None], c * w, 0))  # rows of length 0 aside
  return loss


def _compare(case: Case, ours: Any, theirs: Any, given: Any, valid: np.ndarray,
             lengths: np.ndarray | None, time_axis: int,
             precision: Precision = Precision()) -> None:
  """Outputs and carries, ``(carry, outputs)`` each, as the docs promise:
  flax.nnx's at valid steps and rows (and dtypes), zeros at padding, the
  initial carry for a row of length 0."""
  (c_ours, y_ours), (c_theirs, y_theirs) = ours, theirs
  y_ours, y_theirs = (np.moveaxis(np.asarray(y), time_axis, valid.ndim - 1)
                      for y in (y_ours, y_theirs))
  precision.close(case, 'outputs at valid steps', y_ours[valid], y_theirs[valid])
  case.close('outputs at padding (zeros)', y_ours[~valid], np.zeros_like(y_ours[~valid]))
  ends = _ends(valid)
  precision.close(case, 'carry (rows of length > 0)', tree_rows(c_ours, ends),
                  tree_rows(c_theirs, ends))
  if lengths is not None:
    case.close('carry (rows of length 0: the initial carry)', tree_rows(c_ours, ~ends),
               tree_rows(given, ~ends))


def rnn_case(case: Case, bidirectional: bool) -> None:
  case.pick('cell', CELLS)
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  batch = tuple(case.integer(f'batch{i}', 1, 3)
                for i in range(case.pick('batch_axes', [0, 1, 1, 1, 2, 2])))
  time = case.integer('time', 1, 6)
  time_major = bool(case.pick('time_major', [False, True]))
  lengths = draw_lengths(case, batch, time)
  kw: dict[str, Any] = dict(time_major=time_major, return_carry=True)
  if not bidirectional:
    kw['reverse'] = case.pick('reverse', [False, True])
    kw['keep_order'] = case.pick('keep_order', [False, True])
    kw['unroll'] = case.pick('unroll', [1, 1, 2, 0])
  seed = case.integer('init_seed', 0, 9)
  precision = draw_precision(case)
  pairs = [_cells(case, in_f, hidden, seed + i, precision) for i in range(1 + bidirectional)]

  def build(library: Any, cells: list[Any]) -> Any:
    if bidirectional:
      return library.Bidirectional(*(library.RNN(c) for c in cells), **kw)
    return library.RNN(cells[0], **kw)

  ours, theirs = build(nr, [o for o, _ in pairs]), build(nnx, [t for _, t in pairs])
  time_axis = 0 if time_major else len(batch)
  x = case.normal((time, *batch, in_f) if time_major else (*batch, time, in_f))
  x = x.astype(precision.inputs)
  carries = [_random_carry(case, t, (*batch, in_f)) if case.pick('initial_carry', [0, 1])
             else None for _, t in pairs]
  carry = (tuple(carries) if None not in carries else None) if bidirectional else carries[0]
  # flax.nnx draws its default carry from its stream, which it cannot do
  # inside nnx.grad (a TraceContextError): it gets the zeros explicitly.
  zeros = [jax.tree.map(jnp.zeros_like, t.initialize_carry((*batch, in_f), rngs=nnx.Rngs(0)))
           for _, t in pairs]
  given = carry if carry is not None else (tuple(zeros) if bidirectional else zeros[0])
  valid = valid_steps(lengths, batch, time)
  x_ours = garbage(case, x, valid, time_axis) if lengths is not None else x
  lead = 1 if time_major else 0
  x_t, carry_t, lengths_t, merge = reference_inputs(x, given, lengths, batch, time, time_major)

  def ours_loss(model, weights):
    new_carry, y = _call(model, jnp.asarray(x_ours), carry, lengths)
    return _masked_loss(new_carry, y, weights, valid, time_axis), (new_carry, y)

  def theirs_loss(model, weights):
    new_carry, y = _call(model, jnp.asarray(x_t), carry_t, lengths_t)
    if merge:
      new_carry, y = unflat(new_carry, 0, batch), unflat(y, lead, batch)
    return _masked_loss(new_carry, y, weights, valid, time_axis), (new_carry, y)

  weights = _loss_weights(case, (given, np.zeros((*batch, time, hidden * (1 + bidirectional)))))
  grad_ours, (c_ours, y_ours) = nnx.grad(ours_loss, has_aux=True)(ours, weights)
  wrapped = False
  try:
    grad_theirs, (c_theirs, y_theirs) = nnx.grad(theirs_loss, has_aux=True)(theirs, weights)
  except TypeError as e:
    # A cell whose step returns a carry in another dtype than it was given
    # (flax.nnx's SimpleCell with a lower ``dtype``): flax.nnx's scan refuses
    # it; nr.RNN casts the carry back, as flax.nnx's RNN over CastBack cells.
    if precision.plain or 'carry input and carry output must have equal types' not in str(e):
      raise
    case.config['flax.nnx'] = 'refuses the carry dtype: CastBack'
    theirs, wrapped = build(nnx, [CastBack(t) for _, t in pairs]), True
    grad_theirs, (c_theirs, y_theirs) = nnx.grad(theirs_loss, has_aux=True)(theirs, weights)

  _compare(case, (c_ours, y_ours), (c_theirs, y_theirs), given, valid, lengths, time_axis,
           precision)
  reference = nnx.to_pure_dict(grad_theirs)
  reference = unwrap_cells(reference) if wrapped else reference
  precision.close(case, 'parameter gradients', on_paths_of(nnx.to_pure_dict(grad_ours), reference),
                  reference, atol=1e-4, rtol=1e-4, sums=True)


FUSED = {'LSTM': 'OptimizedLSTMCell', 'GRU': 'GRUCell'}


def fused_case(case: Case) -> None:
  """nr.LSTM / nr.GRU (layers, directions, every implementation; Pallas in
  interpret mode at small shapes) against flax.nnx's RNNs stacked by hand:
  each layer an ``nnx.RNN`` (or ``nnx.Bidirectional``) over the same cell,
  its outputs the next layer's inputs; reversed, every layer runs reversed
  and the inner layers keep their order."""
  kind = case.pick('layer', ['LSTM', 'GRU'])
  implementation = case.pick('implementation', ['xla', 'xla', 'auto', 'pallas'])
  pallas = implementation == 'pallas'
  settings = draw_pallas_settings(case) if pallas else {}
  # With 16-wide chunks, hidden sizes of several chunks (40 is padded to 64: 4 chunks).
  in_f = case.integer('in_features', 1, 5)
  hidden = case.integer('hidden', 1, 40 if settings.get('chunk') else 6)
  layers = case.integer('num_layers', 1, 2)
  bidirectional = bool(case.pick('bidirectional', [False, True]))
  batch = tuple(case.integer(f'batch{i}', 1, 3)
                for i in range(case.pick('batch_axes', [0, 1, 1, 2])))
  time = case.integer('time', 1, 4 if pallas else 6)
  time_major = bool(case.pick('time_major', [False, True]))
  lengths = draw_lengths(case, batch, time)
  order: dict[str, Any] = {}
  if not bidirectional:
    order = dict(reverse=bool(case.pick('reverse', [False, True])),
                 keep_order=bool(case.pick('keep_order', [False, True])))
  seed = case.integer('init_seed', 0, 9)
  ours = getattr(nr, kind)(in_f, hidden, num_layers=layers, bidirectional=bidirectional,
                           time_major=time_major, return_carry=True,
                           implementation=implementation, **order, rngs=nnx.Rngs(seed))
  d = 1 + bidirectional
  cells = [[getattr(nnx, FUSED[kind])(in_f if l == 0 else d * hidden, hidden,
                                      rngs=nnx.Rngs(10 * seed + d * l + k)) for k in range(d)]
           for l in range(layers)]
  for l, pair in enumerate(cells):  # flax.nnx's parameters into ours (bias_hn stays 0)
    for direction, cell in zip([ours.forward, ours.backward], pair):
      nnx.update(direction[l], nnx.state(cell, nnx.Param))
  kw = dict(time_major=time_major, return_carry=True)
  theirs = nnx.List([
    nnx.Bidirectional(nnx.RNN(pair[0]), nnx.RNN(pair[1]), **kw) if bidirectional else
    nnx.RNN(pair[0], **kw, reverse=order['reverse'],
            keep_order=order['keep_order'] if l == layers - 1 else True)
    for l, pair in enumerate(cells)])
  shape = (*batch, in_f)
  zero = [[jax.tree.map(jnp.zeros_like, c.initialize_carry(shape, rngs=nnx.Rngs(0)))
           for c in pair] for pair in cells]
  random = case.pick('initial_carry', [0, 1])
  per_layer = [tuple(_random_carry(case, c, shape) if random else z
                     for c, z in zip(pair, zeros))
               for pair, zeros in zip(cells, zero)]
  given = tuple(p if bidirectional else p[0] for p in per_layer)
  given = given[0] if layers == 1 and not bidirectional else given
  carry = given if random else None

  time_axis = 0 if time_major else len(batch)
  x = case.normal((time, *batch, in_f) if time_major else (*batch, time, in_f))
  valid = valid_steps(lengths, batch, time)
  x_ours = garbage(case, x, valid, time_axis) if lengths is not None else x
  lead = 1 if time_major else 0
  x_t, carries_t, lengths_t, merge = reference_inputs(
    x, [p if bidirectional else p[0] for p in per_layer], lengths, batch, time, time_major)

  def ours_loss(model, weights):
    new_carry, y = _call(model, jnp.asarray(x_ours), carry, lengths)
    return _masked_loss(new_carry, y, weights, valid, time_axis), (new_carry, y)

  def theirs_loss(stack, weights):
    y, new = jnp.asarray(x_t), []
    for layer, c in zip(stack, carries_t):
      c, y = _call(layer, y, c, lengths_t)
      new.append(c)
    new_carry = new[0] if layers == 1 and not bidirectional else tuple(new)
    if merge:
      new_carry, y = unflat(new_carry, 0, batch), unflat(y, lead, batch)
    return _masked_loss(new_carry, y, weights, valid, time_axis), (new_carry, y)

  weights = _loss_weights(case, (given, np.zeros((*batch, time, hidden * d))))
  plan = contextlib.nullcontext() if pallas else scan_plan(case, type(ours), math.prod(batch))
  with internal.pallas_settings(**settings), plan:  # read while the layer is traced
    grad_ours, out_ours = nnx.grad(ours_loss, has_aux=True)(ours, weights)
  grad_theirs, out_theirs = nnx.grad(theirs_loss, has_aux=True)(theirs, weights)
  _compare(case, out_ours, out_theirs, given, valid, lengths, time_axis)
  mine, reference = nnx.to_pure_dict(grad_ours), nnx.to_pure_dict(grad_theirs)
  for l in range(layers):
    rnns = ([reference[l]['forward_rnn'], reference[l]['backward_rnn']] if bidirectional
            else [reference[l]])
    for name, rnn in zip(['forward', 'backward'], rnns):
      case.close(f'{name} layer {l} gradients', on_paths_of(mine[name][l], rnn['cell']),
                 rnn['cell'], atol=1e-4, rtol=1e-4)


def run(case: Case) -> None:
  mode = case.pick('mode', ['rnn', 'rnn', 'rnn', 'bidirectional', 'cell', 'fused', 'fused'])
  if mode == 'cell':
    cell_case(case)
  elif mode == 'fused':
    fused_case(case)
  else:
    rnn_case(case, mode == 'bidirectional')
