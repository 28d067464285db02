"""A user's stateful flax.nnx cell in nr.RNN / nr.Bidirectional against the
same cell in flax.nnx's, called the same way: drop-in with a cell's own state.

The cell is written in flax.nnx's style (``__call__`` and
``initialize_carry`` of its own) around flax.nnx's ``GRUCell``, with what
users put in cells: a step counter (an ``nnx.Variable``), its own
``nnx.Dropout`` on its own RNG stream, and a running mean of its inputs (an
``nnx.BatchStat``) that feeds back into its outputs. Both layers get two
copies built from the same seeds and the same options (``reverse``,
``keep_order``, ``unroll``, ``time_major``, ``broadcast_rngs``,
``state_axes``, ``seq_lengths``; nr's ``remat`` too), and are called twice in a row, eagerly,
under ``nnx.jit`` or inside ``nnx.grad``. After each call the outputs, the
carries, the gradients and *every Variable of the cells* (counter, running
mean, RNG counts and keys) must be flax.nnx's. nr's layers are also called
over flax's array refs (``nnx.with_vars(model, ref=True)``) under plain
``jax.jit``, where flax.nnx's fail, against flax.nnx's under ``nnx.jit``.

Where nr differs on purpose (docs/migrating_from_nnx.md): outputs at padding
are zero and a length-0 row returns its initial carry, and the cell sees
zeros at padding, so a running mean of the inputs differs there: lengths
shorter than the time axis are drawn only for cells without one. flax.nnx
misreads lengths with two batch axes (its carry gains an axis): lengths come
with one batch axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._common import STREAM, UserCell, by_path
from fuzz._core import Case


def run(case: Case) -> None:
  in_f, hidden = case.integer('in_features', 1, 4), case.integer('hidden', 1, 5)
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.pick('batch_axes', [1, 1, 2])))
  time = case.integer('time', 1, 6)
  time_major = bool(case.pick('time_major', [False, True]))
  rate = case.pick('dropout_rate', [0.0, 0.3, 0.5])
  count, track = bool(case.pick('counter', [False, True])), bool(case.pick('running_mean',
                                                                            [False, True]))
  bidirectional = bool(case.pick('bidirectional', [False, False, True]))
  kw: dict[str, Any] = dict(time_major=time_major, return_carry=True)
  rnn_kw: dict[str, Any] = dict(unroll=case.pick('unroll', [1, 1, 2]))
  if rate and case.pick('broadcast_rngs', [False, True]):
    rnn_kw['broadcast_rngs'] = STREAM  # one mask per call: variational dropout, flax.nnx's way
  if case.pick('state_axes', ['default', 'params_broadcast']) == 'params_broadcast':
    rnn_kw['state_axes'] = nnx.StateAxes({nnx.Param: None, ...: nnx.Carry})
  if not bidirectional:
    rnn_kw.update(reverse=bool(case.pick('reverse', [False, True])),
                  keep_order=bool(case.pick('keep_order', [False, True])))
  seed = case.integer('init_seed', 0, 9)
  # nr's own option: each step recomputed in the backward pass must not step
  # the cell's state twice.
  remat = {'remat': True} if case.pick('remat', [False, True]) else {}

  def build(library: Any) -> Any:
    cells = [UserCell(in_f, hidden, rngs=nnx.Rngs(10 * seed + d, **{STREAM: 10 * seed + d + 1}),
                      rate=rate, count=count, track=track)
             for d in range(1 + bidirectional)]
    extra = remat if library is nr else {}
    rnns = [library.RNN(cell, **({} if bidirectional else kw), **rnn_kw, **extra)
            for cell in cells]
    return library.Bidirectional(*rnns, **kw) if bidirectional else rnns[0]

  ours, theirs = build(nr), build(nnx)
  lengths = None
  # flax.nnx misreads lengths with two batch axes (its carry gains an axis; the
  # nnx family checks nr's own reading of them): one batch axis with lengths.
  if len(batch) == 1 and case.pick('seq_lengths', [False, True]):
    lengths = (np.full(batch, time) if track else
               case.rng.choice([0, 1, time, *range(time + 1)], size=batch)).astype(np.int32)
    case.config['lengths'] = lengths.tolist()
  valid = (np.ones((*batch, time), bool) if lengths is None
           else np.arange(time) < lengths[..., None])
  rows = valid[..., 0]
  time_axis = 0 if time_major else len(batch)
  call_kw = {} if lengths is None else {'seq_lengths': jnp.asarray(lengths)}
  w = case.normal((*batch, time, hidden * (1 + bidirectional)))

  def loss(model, x):
    carry, y = model(x, **call_kw)
    y = jnp.moveaxis(y, time_axis, len(batch))
    return jnp.sum(jnp.where(valid[..., None], y * w, 0)), (carry, y)

  how = case.pick('call', ['eager', 'jit', 'grad', 'refs'])
  step_ours = None
  if how == 'grad':
    step = nnx.grad(loss, has_aux=True)
  elif how in ('jit', 'refs'):
    step = nnx.jit(lambda model, x: loss(model, x)[1])
    if how == 'refs':  # flax's array refs under plain jax.jit (flax.nnx's RNN fails there)
      ours = (getattr(nnx, 'with_vars', None) or nnx.vars_as)(ours, ref=True)  # 0.12.7: vars_as
      step_ours = jax.jit(lambda model, x: loss(model, x)[1])
  else:
    step = lambda model, x: loss(model, x)[1]  # noqa: E731
  directions = lambda model: ([model.forward_rnn.cell, model.backward_rnn.cell]  # noqa: E731
                              if bidirectional else [model.cell])
  for call in range(2):
    x = jnp.asarray(case.normal((time, *batch, in_f) if time_major else (*batch, time, in_f)))
    out_ours, out_theirs = (step_ours or step)(ours, x), step(theirs, x)
    if how == 'grad':
      case.close(f'call {call}: parameter gradients', nnx.to_pure_dict(out_ours[0]),
                 nnx.to_pure_dict(out_theirs[0]), atol=1e-4, rtol=1e-4)
      out_ours, out_theirs = out_ours[1], out_theirs[1]
    (c_ours, y_ours), (c_theirs, y_theirs) = out_ours, out_theirs
    y_ours, y_theirs = np.asarray(y_ours), np.asarray(y_theirs)
    case.close(f'call {call}: outputs at valid steps', y_ours[valid], y_theirs[valid])
    case.close(f'call {call}: outputs at padding (zeros)', y_ours[~valid],
               np.zeros_like(y_ours[~valid]))
    case.close(f'call {call}: carry (rows of length > 0)',
               jax.tree.map(lambda a: np.asarray(a)[rows], c_ours),
               jax.tree.map(lambda a: np.asarray(a)[rows], c_theirs))
    for d, (mine, reference) in enumerate(zip(directions(ours), directions(theirs))):
      states = [by_path(nnx.to_pure_dict(nnx.state(m))) for m in (mine, reference)]
      case.close(f'call {call}: cell {d} state', *states)
