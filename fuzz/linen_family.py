"""nnx_recurrent.compat against flax.linen: RNN, Bidirectional, the cells,
flip_sequences; one variables dict into both.

compat gives flax.linen's values everywhere, padded outputs included, except
where compat/README.md ("Deliberate differences") says otherwise; there the
case checks what it promises instead: the initial carry for a row of length
0, each row's own carry with two or more batch axes (flax.linen's gains an
axis: the reference runs on the flattened batch), and a length above the time
axis acting as the time axis (flax.linen gets the clipped lengths: reversed,
it wraps such a row around, and its gradient through such a row's carry is
lost).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import recurrent as linen_recurrent

from fuzz._common import draw_lengths, reference_inputs, tree_rows, unflat, valid_steps
from fuzz._core import Case
from nnx_recurrent import compat

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell']


def _random_carry(case: Case, cell: Any, shape: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape)),
                      cell.initialize_carry(jax.random.key(0), shape))


def cell_case(case: Case) -> None:
  kind = case.pick('cell', CELLS)
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  batch = tuple(case.integer(f'batch{i}', 1, 3) for i in range(case.integer('batch_axes', 0, 2)))
  theirs, ours = getattr(nn, kind)(hidden), getattr(compat, kind)(hidden)
  shape, key = (*batch, in_f), jax.random.key(case.integer('init_seed', 0, 9))
  case.close('initialize_carry', ours.initialize_carry(key, shape),
             theirs.initialize_carry(key, shape))
  carry, x = _random_carry(case, theirs, shape), jnp.asarray(case.normal(shape))
  variables = theirs.init(key, carry, x)
  case.close(f'init {kind}', ours.init(key, carry, x), variables, atol=1e-7, rtol=1e-6)
  case.close(f'{kind} step', ours.apply(variables, carry, x), theirs.apply(variables, carry, x))


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
  kind = case.pick('cell', CELLS)
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
  if bidirectional:
    theirs = nn.Bidirectional(nn.RNN(getattr(nn, kind)(hidden)),
                              nn.RNN(getattr(nn, kind)(hidden)), **kw)
    ours = compat.Bidirectional(compat.RNN(getattr(compat, kind)(hidden)),
                                compat.RNN(getattr(compat, kind)(hidden)), **kw)
  else:
    theirs = nn.RNN(getattr(nn, kind)(hidden), **kw, **rnn_kw)
    ours = compat.RNN(getattr(compat, kind)(hidden), **kw, **rnn_kw)
  time_axis, lead = (0, 1) if time_major else (len(batch), 0)
  x = case.normal((time, *batch, in_f) if time_major else (*batch, time, in_f))
  key = jax.random.key(case.integer('init_seed', 0, 9))
  variables = theirs.init(key, x)
  case.close('init', ours.init(key, x), variables, atol=1e-7, rtol=1e-6)
  cell = getattr(nn, kind)(hidden)
  carries = [_random_carry(case, cell, (*batch, in_f)) for _ in range(1 + bidirectional)]
  carry = (tuple(carries) if bidirectional else carries[0]) \
      if case.pick('initial_carry', [0, 1]) else None
  x_t, carry_t, lengths_t, merge = reference_inputs(x, carry, lengths, batch, time, time_major)
  out_features = hidden * (1 + bidirectional)
  w_y = jnp.asarray(case.normal((*batch, time, out_features)))
  w_c = jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape)), carries[0])
  valid = valid_steps(lengths, batch, time)
  ends = valid[..., 0]

  def loss(model, inputs, start, seq_lengths, unmerge):
    def f(v):
      kw = {} if seq_lengths is None else {'seq_lengths': jnp.asarray(seq_lengths)}
      new_carry, y = model.apply(v, jnp.asarray(inputs), initial_carry=start, **kw)
      if unmerge:
        new_carry, y = unflat(new_carry, 0, batch), unflat(y, lead, batch)
      y = jnp.moveaxis(y, time_axis, len(batch))
      first = jax.tree.leaves(new_carry if not bidirectional else new_carry[0])
      total = jnp.sum(y * w_y) + sum(jnp.sum(jnp.where(jnp.asarray(ends)[..., None], c * w, 0))
                                     for c, w in zip(first, jax.tree.leaves(w_c)))
      return total, (new_carry, y)
    return jax.grad(f, has_aux=True)(variables)

  g_ours, (c_ours, y_ours) = loss(ours, x, carry, lengths, False)
  g_theirs, (c_theirs, y_theirs) = loss(theirs, x_t, carry_t, lengths_t, merge)
  case.close('outputs (padding included)', y_ours, y_theirs)
  case.close('carry (rows of length > 0)', tree_rows(c_ours, ends), tree_rows(c_theirs, ends))
  if lengths is not None:
    start = carry if carry is not None else jax.tree.map(jnp.zeros_like, c_ours)
    case.close('carry (rows of length 0: the initial carry)', tree_rows(c_ours, ~ends),
               tree_rows(start, ~ends))
  case.close('gradients', g_ours, g_theirs, atol=1e-4, rtol=1e-4)


def run(case: Case) -> None:
  mode = case.pick('mode', ['rnn', 'rnn', 'rnn', 'bidirectional', 'cell', 'flip_sequences'])
  if mode == 'cell':
    cell_case(case)
  elif mode == 'flip_sequences':
    flip_case(case)
  else:
    rnn_case(case, mode == 'bidirectional')
