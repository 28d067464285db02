"""nr.RNN, nr.Bidirectional, nr.StackedRNN of them and the fused nr.LSTM /
nr.GRU under flax.nnx's transforms, against flax.nnx's RNN and Bidirectional
(called in turn for a stack) under the same transforms: drop-in where users
put recurrent layers (ensembles, layers scanned over, decoders looped).

A case builds both layers from the same ``nnx.Rngs`` (the same parameters:
this package's cells initialise as flax.nnx's; a fused layer of one layer is
given its flax.nnx RNN's), over this package's cells against flax.nnx's, over
a user's stateful cell written in flax.nnx's style (a step counter, its own
``nnx.Dropout`` stream, a running mean of its inputs), or a fused layer (the
XLA scans or the Pallas kernels, interpreted) against flax.nnx's RNN over
``OptimizedLSTMCell`` / ``GRUCell``, and calls them twice through one of:

* ``nnx.jit``;
* an ensemble: members built under ``nnx.split_rngs`` + ``nnx.vmap``, called
  under ``nnx.vmap`` with the inputs shared or one batch per member;
* ``nnx.vmap`` over a leading axis of the inputs, the layer broadcast;
* layers built as an ensemble and called one after the other by ``nnx.scan``
  (the output of one the input of the next);
* ``nnx.remat``; ``nnx.cond`` between two calls; ``nnx.fori_loop`` feeding
  the outputs back as inputs, then one more call;

each also inside ``nnx.grad`` or not, ``nnx.jit`` around it or not, in flax's
graph mode, tree mode or graph mode without updates. After each call
the outputs, the carries, the parameter gradients and *every Variable* the
layers have in common (the cells' parameters, counters, running means, RNG
keys and counts, and the layers' own RNG stream where both keep one) must be
flax.nnx's.

Where nr differs on purpose (docs/migrating_from_nnx.md): zeros at padding
(padding holds NaN, inf or 1e30 for nr, clean numbers for flax.nnx), the
initial carry for a row of length 0, and the cell sees zeros at padding (a
running mean of the inputs differs there: cells with one get full lengths).
nr.GRUCell's ``bias_hn`` (zero at the start) is not flax.nnx's: the cells'
other parameters are compared.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._common import STREAM, UserCell, by_path, garbage, on_paths_of
from fuzz._core import Case

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'user', 'LSTM', 'GRU']
# The fused layers (one layer, one or both directions) and the flax.nnx cell
# whose RNN they are, given its parameters.
FUSED = {'LSTM': 'OptimizedLSTMCell', 'GRU': 'GRUCell'}
TRANSFORMS = ['jit', 'ensemble', 'vmap_inputs', 'scan_layers', 'remat', 'cond', 'fori_loop']
# flax.nnx's modes, each the function that sets it off: graph mode (the default),
# tree mode, graph mode without graph updates.
MODES = {'graph': None, 'tree': 'set_graph_mode', 'no_graph_updates': 'set_graph_updates'}


class Stack(nnx.Module):
  """flax.nnx's RNNs (or Bidirectionals) called in turn, each on the outputs of
  the last: what ``nr.StackedRNN`` of them computes, its carries a tuple."""

  def __init__(self, *layers: Any):
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array, **kw: Any) -> tuple[tuple[Any, ...], jax.Array]:
    carries = []
    for layer in self.layers:
      carry, x = layer(x, **kw)
      carries.append(carry)
    return tuple(carries), x


def _as_flax(tree: dict, bidirectional: bool) -> dict:
  """A fused layer's (one layer) state or gradients at flax.nnx's RNN's paths."""
  if not bidirectional:
    return {'cell': tree['forward'][0]}
  return {'forward_rnn': {'cell': tree['forward'][0]},
          'backward_rnn': {'cell': tree['backward'][0]}}


def _flat_state(module: Any, fused: bool, bidirectional: bool) -> dict[str, np.ndarray]:
  """Every Variable of ``module`` by path, a fused layer's at flax.nnx's paths."""
  state = nnx.to_pure_dict(nnx.state(module))
  return by_path(_as_flax(state, bidirectional) if fused else state)


def _compare_state(case: Case, what: str, ours: Any, theirs: Any, fused: bool,
                   bidirectional: bool, own_cell: bool) -> None:
  """The Variables both modules have, by path; the paths only one has must be
  nr.GRUCell's ``bias_hn`` or flax.nnx's RNN's own ``rngs``, which nr keeps
  only where the carry may draw from it: not for this package's cells (nor the
  fused layers), but for a user's ``own_cell`` (docs/migrating_from_nnx.md)."""
  mine = _flat_state(ours, fused, bidirectional)
  reference = _flat_state(theirs, False, bidirectional)
  extra = [p for p in mine if p not in reference and not p.endswith('bias_hn')]
  missing = [p for p in reference if p not in mine and (own_cell or '/rngs/' not in f'/{p}')]
  if extra or missing:
    raise AssertionError(f'{what}: Variables only in nr {extra}, only in flax.nnx {missing}')
  common = sorted(set(mine) & set(reference))
  case.close(what, [mine[p] for p in common], [reference[p] for p in common])


def _same_error(case: Case, what: str, ours: Any, theirs: Any) -> None:
  """A call that raised (a state the inputs' vmapped axis reaches, broadcast
  by ``nnx.vmap``): flax.nnx's call raised the same error, up to positions in
  flattened trees."""
  if not (isinstance(ours, Exception) and isinstance(theirs, Exception)):
    raised = ours if isinstance(ours, Exception) else theirs
    who = 'nr' if raised is ours else 'flax.nnx'
    raise AssertionError(f'{what}: only {who} raised: {type(raised).__name__}: {raised}') \
        from raised
  # (the same up to positions in flattened trees: `_values[2]` against `_values[1]`
  # without graph updates, where nr's Bidirectional flattens to other positions)
  if (type(ours), _unindexed(ours)) != (type(theirs), _unindexed(theirs)):
    raise AssertionError(f'{what}: nr raised {type(ours).__name__}: {ours}; flax.nnx '
                         f'{type(theirs).__name__}: {theirs}') from ours
  case.config['raised'] = f'{type(ours).__name__} (both)'


def _unindexed(error: Exception) -> str:
  return re.sub(r'\[\d+\]', '[i]', str(error))


def run(case: Case) -> None:
  kind = case.pick('cell', CELLS)
  fused = kind in FUSED
  implementation = case.pick('implementation', ['xla', 'xla', 'pallas']) if fused else None
  how = case.pick('transform', TRANSFORMS)
  bidirectional = bool(case.pick('bidirectional', [False, False, True]))
  hidden = case.integer('hidden', 1, 4)
  d = 1 + bidirectional
  chained = how in ('scan_layers', 'fori_loop')  # the outputs are inputs again
  in_f = d * hidden if chained else case.integer('in_features', 1, 4)
  batch = case.integer('batch', 1, 3)
  time = case.integer('time', 1, 3 if implementation == 'pallas' else 5)
  time_major = bool(case.pick('time_major', [False, True]))
  members = case.integer('members', 1, 3) if how in ('ensemble', 'scan_layers', 'vmap_inputs') \
      else 0
  rate, count, track = 0.0, False, False
  if kind == 'user':
    rate = case.pick('dropout_rate', [0.0, 0.3])
    count, track = bool(case.pick('counter', [False, True])), bool(case.pick('running_mean',
                                                                              [False, True]))
  use_bias_hn = bool(case.pick('use_bias_hn', [False, True])) if kind == 'GRUCell' else False
  # two layers in nr.StackedRNN, against flax.nnx's called in turn (Stack)
  stacked = not fused and bool(case.pick('stacked', [False, False, True]))
  order: dict[str, Any] = {}
  if not bidirectional and not stacked:
    order = dict(reverse=bool(case.pick('reverse', [False, True])),
                 keep_order=bool(case.pick('keep_order', [False, True])))
  kw: dict[str, Any] = dict(time_major=time_major, return_carry=True)
  rnn_kw: dict[str, Any] = dict(order)
  if not fused:
    rnn_kw['unroll'] = case.pick('unroll', [1, 1, 2])
  if rate and case.pick('broadcast_rngs', [False, True]):
    rnn_kw['broadcast_rngs'] = STREAM
  layer_rngs = 'default' if fused else case.pick('layer_rngs', ['default', 'Rngs'])
  remat = {'remat': True} if not fused and case.pick('nr_remat', [False, True]) else {}
  seed = case.integer('init_seed', 0, 9)

  def build(library: Any, rngs: nnx.Rngs) -> Any:
    if fused and library is nr:  # given flax.nnx's parameters below
      return getattr(nr, kind)(in_f, hidden, bidirectional=bidirectional, **kw, **order,
                               implementation=implementation, rngs=rngs)

    def cell(features: int) -> Any:
      if fused:
        return getattr(nnx, FUSED[kind])(features, hidden, rngs=rngs)
      if kind == 'user':
        return UserCell(features, hidden, rngs=rngs, rate=rate, count=count, track=track)
      extra = {'use_bias_hn': use_bias_hn} if library is nr and kind == 'GRUCell' else {}
      return getattr(library, kind)(features, hidden, **extra, rngs=rngs)

    def layer(features: int) -> Any:
      own = {'rngs': rngs} if layer_rngs == 'Rngs' else {}
      extra = remat if library is nr else {}
      rnns = [library.RNN(cell(features), **({} if bidirectional else kw), **rnn_kw, **extra,
                          **own) for _ in range(d)]
      return library.Bidirectional(*rnns, **kw, **own) if bidirectional else rnns[0]

    if not stacked:
      return layer(in_f)
    layers = layer(in_f), layer(d * hidden)
    return nr.StackedRNN(*layers, **kw) if library is nr else Stack(*layers)

  def make(library: Any) -> Any:
    rngs = nnx.Rngs(seed, **{STREAM: seed + 1})
    if not members or how == 'vmap_inputs':
      return build(library, rngs)
    return nnx.split_rngs(splits=members)(
      nnx.vmap(lambda r: build(library, r), in_axes=0, out_axes=0))(rngs)

  ours, theirs = make(nr), make(nnx)
  if fused:  # flax.nnx's parameters (each member's) into ours; bias_hn stays 0
    rnns = [theirs.forward_rnn, theirs.backward_rnn] if bidirectional else [theirs]
    for direction, rnn in zip([ours.forward, ours.backward], rnns):
      nnx.update(direction[0], nnx.state(rnn.cell, nnx.Param))
  _compare_state(case, 'built', ours, theirs, fused, bidirectional, kind == 'user')

  lengths = None
  if case.pick('seq_lengths', [False, True]):
    lengths = (np.full((batch,), time) if track else
               case.rng.choice([0, 1, time, *range(time + 1)], size=(batch,))).astype(np.int32)
    case.config['lengths'] = lengths.tolist()
  valid = np.ones((batch, time), bool) if lengths is None else np.arange(time) < lengths[:, None]
  rows = valid[:, 0]  # the rows of length > 0
  call_kw = {} if lengths is None else {'seq_lengths': jnp.asarray(lengths)}

  def apply(model: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    return model(x, **call_kw)

  shared = bool(case.pick('shared_inputs', [False, True])) if how == 'ensemble' else True
  pred = bool(case.pick('branch', [False, True])) if how == 'cond' else False
  loops = case.integer('loops', 1, 2) if how == 'fori_loop' else 0

  def forward(model: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    if how == 'jit':
      return nnx.jit(apply)(model, x)
    if how == 'ensemble':
      return nnx.vmap(apply, in_axes=(0, None if shared else 0))(model, x)
    if how == 'vmap_inputs':
      return nnx.vmap(apply, in_axes=(None, 0))(model, x)
    if how == 'scan_layers':
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
      def through(h: jax.Array, layer: Any) -> tuple[jax.Array, Any]:
        carry, y = apply(layer, h)
        return y, carry

      y, carries = through(x, model)
      return carries, y
    if how == 'remat':
      return nnx.remat(apply)(model, x)
    if how == 'cond':
      return nnx.cond(jnp.asarray(pred), apply, lambda m, h: apply(m, 0.5 * h), model, x)
    assert how == 'fori_loop'

    def body(_: jax.Array, state: tuple[Any, jax.Array]) -> tuple[Any, jax.Array]:
      m, h = state
      return m, apply(m, h)[1]

    model, x = nnx.fori_loop(0, loops, body, (model, x))
    return apply(model, x)

  # The inputs' shape: a leading axis for the members (not shared) or the vmapped axis.
  lead = (members,) if how == 'vmap_inputs' or (how == 'ensemble' and not shared) else ()
  layout = (time, batch, in_f) if time_major else (batch, time, in_f)
  out_lead = (members,) if how in ('ensemble', 'vmap_inputs') else ()
  y_shape = (*out_lead, batch, time, d * hidden)  # batch before time
  w = case.normal(y_shape)
  valid_y = np.broadcast_to(valid[..., None], y_shape)
  rows_of = lambda a: np.asarray(a)[..., rows, :]  # noqa: E731

  def outputs(carry: Any, y: jax.Array) -> tuple[Any, jax.Array]:
    return carry, jnp.moveaxis(y, len(out_lead) + (0 if time_major else 1), len(out_lead) + 1)

  def loss(model: Any, x: jax.Array) -> tuple[jax.Array, tuple[Any, jax.Array]]:
    carry, y = outputs(*forward(model, x))
    if fused and bidirectional and len(carry) == 1:  # ours: a tuple of the layers' carries
      carry = carry[0]
    total = jnp.sum(jnp.where(valid_y, y * w, 0))
    for c in jax.tree.leaves(carry):
      total += jnp.sum(jnp.where(rows[:, None], c, 0))  # rows of length 0 aside
    return total, (carry, y)

  # flax's modes (0.12): tree mode (Modules as pytrees) and graph mode without
  # updates; the calls are made in the mode, the layers built in graph mode.
  mode = case.pick('mode', [m for m in ['graph', 'graph', 'tree', 'no_graph_updates']
                           if MODES[m] is None or hasattr(nnx, MODES[m])])
  grad = bool(case.pick('grad', [False, True]))
  outer_jit = bool(case.pick('outer_jit', [False, True]))
  step = nnx.grad(loss, has_aux=True) if grad else (lambda m, x: (None, loss(m, x)[1]))
  step = nnx.jit(step) if outer_jit else step
  for call in range(2):
    x = case.normal((*lead, *layout))
    # NaN, inf or 1e30 at nr's padding (broadcast over the leading axis)
    x_ours = x if lengths is None else garbage(case, x, valid, 0 if time_major else 1)
    results = []
    for model, inputs in ((ours, x_ours), (theirs, x)):
      try:
        setter = MODES[mode]
        with getattr(nnx, setter)(False) if setter else contextlib.nullcontext():
          results.append(step(model, jnp.asarray(inputs)))
      except Exception as e:  # noqa: BLE001 -- a user's error: flax.nnx's must be the same
        results.append(e)
    if any(isinstance(r, Exception) for r in results):
      _same_error(case, f'call {call}', *results)
      return
    (g_ours, (c_ours, y_ours)), (g_theirs, (c_theirs, y_theirs)) = results
    y_ours, y_theirs = np.asarray(y_ours), np.asarray(y_theirs)
    case.close(f'call {call}: outputs at valid steps', y_ours[valid_y], y_theirs[valid_y])
    case.close(f'call {call}: outputs at padding (zeros)', y_ours[~valid_y],
               np.zeros_like(y_ours[~valid_y]))
    case.close(f'call {call}: carry (rows of length > 0)', jax.tree.map(rows_of, c_ours),
               jax.tree.map(rows_of, c_theirs))
    if grad:
      # (in tree mode the gradients come as a module: its parameters)
      g_ours, g_theirs = (nnx.to_pure_dict(g if isinstance(g, nnx.State) else
                                           nnx.state(g, nnx.Param)) for g in (g_ours, g_theirs))
      g_ours = _as_flax(g_ours, bidirectional) if fused else g_ours
      case.close(f'call {call}: parameter gradients', on_paths_of(g_ours, g_theirs), g_theirs,
                 atol=1e-4, rtol=1e-4)
    _compare_state(case, f'call {call}: Variables', ours, theirs, fused, bidirectional,
                   kind == 'user')

