"""Bad arguments get a ValueError or TypeError that names the argument.

Each case builds a layer (nr.RNN over a cell, the fused nr.LSTM / nr.GRU, or
compat.RNN) and calls it, or builds one, with one argument drawn bad, or
composes layers that do not fit (a StackedRNN's layer reading another size or
number of feature axes than the one before gives; a Bidirectional's
directions reading different inputs, or giving outputs the default merge
cannot concatenate). The error must be a ``ValueError`` or ``TypeError``
whose message names the argument in backquotes; jax's own errors (a shape
mismatch deep in a scan), another exception, or a call that runs, are
findings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._core import Case, Mismatch
from nnx_recurrent import compat

B, T, IN, H = 2, 4, 3, 5


def _bad_lengths(case: Case) -> Any:
  return case.pick('bad', [
    np.array([1, 2, 3]), np.array([[1], [2]]), np.array([[1, 2], [3, 4]]), np.array([1.5, 2.0]),
    np.array([True, False]), np.array([-1, 2]), 'ab', [[1], [2, 3]], np.array(['a', 'b']),
    jax.random.key(0), np.array([1 + 1j, 2]), np.array([np.nan, 1.0]), None.__class__,
  ])


def _bad_carry(case: Case, lstm: bool) -> Any:
  good = jnp.zeros((B, H))
  options = [good[:, :-1] if H > 1 else good[:1], jnp.zeros((B + 1, H)), jnp.zeros((1, H)),
             jnp.zeros((H,)), 1.0, 'carry', jnp.zeros((B, H), jnp.int32),
             (good, good, good), [good] * 3, {'h': good}]
  options += [(good, jnp.zeros((B, H + 1))), (1.0, good), good] if lstm else [(good, good)]
  return case.pick('bad', options)


def _bad_inputs(case: Case) -> Any:
  return case.pick('bad', [
    np.ones((B, T, IN + 1), np.float32), np.ones((IN,), np.float32), np.array([['a']]),
    'inputs', np.ones((B, T, IN), object), jax.random.key(0), [[1, 2], [3]],
  ])


def _bad_ids(case: Case) -> Any:
  return case.pick('bad', [
    np.ones((B, T + 1), np.int32), np.ones((B,), np.int32), np.ones((T, B), np.int32),
    np.full((B, T), 1.5), np.array([[1, 1, -1, 2]] * B), 'ids', np.ones((B, T), bool),
    np.array([['a'] * T] * B), np.ones((B, T, 1), np.int32), [[1, 1], [2]],
  ])


def _bad_order(case: Case) -> tuple[str, dict[str, Any]]:
  """A call's ``reverse`` or ``keep_order`` drawn bad."""
  arg = case.pick('order', ['reverse', 'keep_order'])
  return arg, {arg: case.pick('bad', [2, 'yes', np.array([True, False]), 1.0])}


def _calls(case: Case) -> tuple[str, Callable[[], Any]]:
  """The argument drawn bad and the call that must refuse it."""
  front = case.pick('front', ['nr.RNN', 'nr.LSTM', 'nr.GRU', 'compat.RNN', 'nr.StackedRNN',
                             'nr.Bidirectional'])
  arg = case.pick('argument', ['seq_lengths', 'initial_carry', 'inputs', 'segment_ids',
                               'order'])
  x = np.ones((B, T, IN), np.float32)
  kind = case.pick('cell', ['LSTMCell', 'GRUCell'])
  lstm = front == 'nr.LSTM' if front in ('nr.LSTM', 'nr.GRU') else kind == 'LSTMCell'
  if front == 'nr.RNN':
    model = nr.RNN(getattr(nr, kind)(IN, H, rngs=nnx.Rngs(0)))
  elif front in ('nr.StackedRNN', 'nr.Bidirectional'):
    first = nr.RNN(getattr(nr, kind)(IN, H, rngs=nnx.Rngs(0)))
    good = jnp.zeros((B, H))
    carry = (good, good) if lstm else good
    if front == 'nr.StackedRNN':
      model = nr.StackedRNN(first, nr.GRU(H, H, rngs=nnx.Rngs(1)))
      options = [(carry,), (carry, good, good), good, (carry, good[:, :-1]), (None, 1.0),
                 [carry, jnp.zeros((B + 1, H))]]
    else:
      model = nr.Bidirectional(first, nr.RNN(getattr(nr, kind)(IN, H, rngs=nnx.Rngs(1))))
      options = [(carry,), (carry, carry, carry), good[None], {'f': carry, 'b': carry}]
      if arg == 'order':  # accepted and ignored, as flax.nnx's Bidirectional does
        arg = 'inputs'
    if arg == 'initial_carry':
      if case.pick('inner', [False, True]):  # one layer's or direction's carry bad
        bad = (_bad_carry(case, lstm), None)
      else:
        bad = case.pick('bad', options)
      return arg, lambda: model(x, initial_carry=bad)
  elif front == 'compat.RNN':
    linen = compat.RNN(getattr(compat, kind)(H))
    variables = linen.init(jax.random.key(0), x)
    model = lambda *a, **k: linen.apply(variables, *a, **k)  # noqa: E731
  else:
    bidirectional = bool(case.pick('bidirectional', [False, True]))
    model = getattr(nr, front.split('.')[1])(IN, H, bidirectional=bidirectional,
                                             rngs=nnx.Rngs(0))
    if arg == 'order' and bidirectional and case.pick('reverse_both', [False, True]):
      return 'reverse', lambda: model(x, reverse=True)  # both directions run already
    if arg == 'initial_carry' and not bidirectional:  # the fused layers' carry: one per layer
      good = jnp.zeros((B, H))
      bad = case.pick('bad', [(jnp.zeros((B, H + 1)),) * (1 + lstm), (good, good, good),
                              ((good, good[:1]),) if lstm else (good[:1],), 1.0])
      return arg, lambda: model(x, initial_carry=bad)
  if arg == 'seq_lengths':
    bad = _bad_lengths(case)
    return arg, lambda: model(x, seq_lengths=bad)
  if arg == 'initial_carry':
    bad = _bad_carry(case, lstm)
    return arg, lambda: model(x, initial_carry=bad)
  if arg == 'segment_ids':
    ids = _bad_ids(case)
    if case.pick('with_lengths', [False, False, True]):  # both: refused, naming segment_ids
      ids = np.ones((B, T), np.int32)
      return arg, lambda: model(x, segment_ids=ids, seq_lengths=np.array([T, T]))
    return arg, lambda: model(x, segment_ids=ids)
  if arg == 'order':
    arg, kw = _bad_order(case)
    return arg, lambda: model(x, **kw)
  return arg, lambda: model(_bad_inputs(case))


def _constructors(case: Case) -> tuple[str, Callable[[], Any]]:
  """A constructor given one bad size or option."""
  target = case.pick('constructor', ['cell', 'LSTM', 'RNN', 'compat', 'composition'])
  if target == 'composition':
    return _composition(case)
  if target == 'cell':
    arg = case.pick('argument', ['in_features', 'hidden_features'])
    bad = case.pick('bad', [0, -1, 2.5, '4', None, True, np.zeros(2)])
    sizes = {'in_features': IN, 'hidden_features': H, arg: bad}
    kind = case.pick('cell', ['LSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell'])
    return arg, lambda: getattr(nr, kind)(sizes['in_features'], sizes['hidden_features'],
                                          rngs=nnx.Rngs(0))
  if target == 'LSTM':
    arg = case.pick('argument', ['num_layers', 'dropout_rate', 'implementation',
                                 'hidden_features'])
    bad = {'num_layers': case.pick('bad', [0, -2, 1.5, '2']),
           'dropout_rate': case.pick('bad', [-0.1, 1.0, 1.5, 'x']),
           'implementation': case.pick('bad', ['fast', 3, None]),
           'hidden_features': case.pick('bad', [0, -3, 2.0])}[arg]
    kw = {'num_layers': 1, 'hidden_features': H, arg: bad}
    return arg, lambda: nr.LSTM(IN, kw.pop('hidden_features'), **kw, rngs=nnx.Rngs(0))
  if target == 'RNN':
    arg = case.pick('argument', ['unroll', 'time_major', 'cell'])
    bad = {'unroll': case.pick('bad', [-1, 1.5, '2']),
           'time_major': case.pick('bad', [2, 'yes', None]),
           'cell': case.pick('bad', [None, 3, nnx.Linear(2, 3, rngs=nnx.Rngs(0))])}[arg]
    cell = nr.GRUCell(IN, H, rngs=nnx.Rngs(0))
    if arg == 'cell':
      return arg, lambda: nr.RNN(bad)(np.ones((B, T, IN), np.float32))
    return arg, lambda: nr.RNN(cell, **{arg: bad})
  arg = case.pick('argument', ['features', 'time_major'])
  bad = case.pick('bad', [0, -1, 2.5]) if arg == 'features' else case.pick('bad', [2, 'yes'])
  x = np.ones((B, T, IN), np.float32)
  if arg == 'features':
    return arg, lambda: compat.RNN(compat.GRUCell(bad)).init(jax.random.key(0), x)
  return arg, lambda: compat.RNN(compat.GRUCell(H), time_major=bad).init(jax.random.key(0), x)


def _layer(case: Case, name: str, in_features: int, axes: int) -> Any:
  """A sequence layer reading steps of ``axes`` feature axes (a fused or a
  cell's layer for 1, a convolutional cell's for more)."""
  if axes == 1:
    if case.pick(f'{name}.fused', [False, True]):
      return nr.LSTM(in_features, H, rngs=nnx.Rngs(0))
    return nr.RNN(nr.GRUCell(in_features, H, rngs=nnx.Rngs(0)))
  cell = case.pick(f'{name}.cell', [nr.ConvLSTMCell, nr.ConvGRUCell])
  return nr.RNN(cell(in_features, H, (3,) * (axes - 1), rngs=nnx.Rngs(0)))


def _composition(case: Case) -> tuple[str, Callable[[], Any]]:
  """A StackedRNN whose second layer cannot read the first's outputs, or a
  Bidirectional whose directions cannot read the same inputs or give
  outputs the default merge cannot concatenate: other sizes, another number
  of feature axes, or (called) convolutional outputs of other spatial shapes."""
  layer = case.pick('composition', ['StackedRNN', 'Bidirectional'])
  fault = case.pick('fault', ['size', 'axes', 'spatial'] if layer == 'Bidirectional'
                    else ['size', 'axes'])
  axes = case.integer('axes', 1, 3)
  if fault == 'spatial':  # 'VALID' kernels of 3 and 1 over 5 positions: 3 and 5 of them
    x = np.ones((B, T, *(5,) * axes, IN), np.float32)  # ``axes`` spatial axes here
    directions = [nr.RNN(nr.ConvGRUCell(IN, H, (k,) * axes, padding='VALID',
                                        rngs=nnx.Rngs(0))) for k in (3, 1)]
    return 'backward_rnn', lambda: nr.Bidirectional(*directions)(x)
  other = (axes % 3) + 1 if fault == 'axes' else axes  # another count of feature axes
  if layer == 'StackedRNN':
    first = _layer(case, 'first', IN, axes)
    reads = H + 1 if fault == 'size' else H
    return 'layers[1]', lambda: nr.StackedRNN(first, _layer(case, 'second', reads, other))
  reads = IN + 1 if fault == 'size' else IN
  return 'backward_rnn', lambda: nr.Bidirectional(_layer(case, 'forward', IN, axes),
                                                  _layer(case, 'backward', reads, other))


def run(case: Case) -> None:
  arg, call = (_calls if case.pick('kind', ['call', 'call', 'constructor']) == 'call'
               else _constructors)(case)
  try:
    call()
  except (ValueError, TypeError) as e:
    if f'`{arg}`' not in str(e):
      raise Mismatch(f'{type(e).__name__} does not name `{arg}`: {str(e)[:300]}') from None
    return
  raise Mismatch(f'the bad `{arg}` ran')
