"""compat.RNN and compat.Bidirectional under flax.linen's lifted transforms,
against flax.linen's RNN and Bidirectional under the same transforms: a
Linen code base's layers where it puts them, with one import swapped.

A case writes one Linen model around the layer, once over flax.linen's names
and once over compat's, and lifts it with one of:

* ``nn.jit``;
* an ensemble: ``nn.vmap`` with ``variable_axes={'params': 0}`` and the
  ``params`` RNG split, the inputs shared or one batch per member;
* ``nn.vmap`` over a leading axis of the inputs, the parameters broadcast;
* ``nn.scan`` over layers (``variable_axes={'params': 0}``), each layer's
  outputs the next one's inputs, the carries stacked;
* ``nn.remat``;

then initialises both from one key, and applies them (eagerly, under
``jax.jit``, or inside ``jax.grad`` under ``jax.jit``). The variables (structure and values),
the outputs, the carries and the parameter gradients must be flax.linen's.

compat gives flax.linen's values everywhere, padded outputs included; where
it differs on purpose (compat/README.md), the case checks what it promises
instead: the initial carry for a row of length 0 (the rows of length 0 are
left out of the carries compared).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fuzz._core import Case
from nnx_recurrent import compat

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell']
TRANSFORMS = ['jit', 'ensemble', 'vmap_inputs', 'scan_layers', 'remat']


def run(case: Case) -> None:
  kind = case.pick('cell', CELLS)
  how = case.pick('transform', TRANSFORMS)
  bidirectional = bool(case.pick('bidirectional', [False, False, True]))
  hidden = case.integer('hidden', 1, 4)
  d = 1 + bidirectional
  in_f = d * hidden if how == 'scan_layers' else case.integer('in_features', 1, 4)
  batch = case.integer('batch', 1, 3)
  time = case.integer('time', 1, 5)
  time_major = bool(case.pick('time_major', [False, True]))
  members = case.integer('members', 1, 3) if how in ('ensemble', 'scan_layers', 'vmap_inputs') \
      else 0
  order: dict[str, Any] = {}
  if not bidirectional:
    order = dict(reverse=bool(case.pick('reverse', [False, True])),
                 keep_order=bool(case.pick('keep_order', [False, True])),
                 unroll=case.pick('unroll', [1, 1, 2]))
  lengths = None
  if case.pick('seq_lengths', [False, True]):
    lengths = case.rng.choice([0, 1, time, *range(1, time + 1)], size=(batch,)).astype(np.int32)
    case.config['lengths'] = lengths.tolist()
  shared = bool(case.pick('shared_inputs', [False, True])) if how == 'ensemble' else True

  def model(lib: Any) -> Any:
    """flax.linen's or compat's model: the layer, lifted."""

    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x: jax.Array, seq_lengths: Any) -> tuple[Any, jax.Array]:
        def rnn() -> Any:
          return lib.RNN(getattr(lib, kind)(hidden), **({} if bidirectional else order))
        layer = lib.Bidirectional(rnn(), rnn()) if bidirectional else rnn()
        return layer(x, seq_lengths=seq_lengths, time_major=time_major, return_carry=True)

    class ScannedLayer(nn.Module):
      @nn.compact
      def __call__(self, x: jax.Array, seq_lengths: Any) -> tuple[jax.Array, Any]:
        carry, y = Layer()(x, seq_lengths)
        return y, carry

    if how == 'jit':
      return nn.jit(Layer)()
    if how == 'ensemble':
      return nn.vmap(Layer, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(None if shared else 0, None), out_axes=0, axis_size=members)()
    if how == 'vmap_inputs':
      return nn.vmap(Layer, variable_axes={'params': None}, split_rngs={'params': False},
                     in_axes=(0, None), out_axes=0)()
    if how == 'scan_layers':
      return nn.scan(ScannedLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=nn.broadcast, length=members)()
    assert how == 'remat'
    return nn.remat(Layer)()

  lead = (members,) if how == 'vmap_inputs' or (how == 'ensemble' and not shared) else ()
  x = case.normal((*lead, *((time, batch, in_f) if time_major else (batch, time, in_f))))
  lens = None if lengths is None else jnp.asarray(lengths)
  theirs, ours = model(nn), model(compat)
  key = jax.random.key(case.integer('init_seed', 0, 9))
  variables = theirs.init(key, x, lens)
  case.close('init', ours.init(key, x, lens), variables)

  def apply(m: Any, params: Any) -> tuple[Any, jax.Array]:
    out = m.apply({'params': params}, x, lens)
    return (out[1], out[0]) if how == 'scan_layers' else out  # (carry, outputs)

  rows = np.ones(batch, bool) if lengths is None else lengths > 0
  call = case.pick('call', ['eager', 'jit', 'grad'])
  if call == 'grad':  # the loss's weights, of the outputs' shape
    w = case.normal(jax.eval_shape(lambda p: apply(theirs, p)[1], variables['params']).shape)

  def loss(m: Any, params: Any) -> tuple[jax.Array, tuple[Any, jax.Array]]:
    carry, y = apply(m, params)
    total = jnp.sum(y * w)
    for c in jax.tree.leaves(carry):
      total += jnp.sum(jnp.where(rows[:, None], c, 0))  # rows of length 0 aside
    return total, (carry, y)

  results = []
  for m in (ours, theirs):
    if call == 'grad':
      grads, out = jax.jit(jax.grad(lambda p, m=m: loss(m, p), has_aux=True))(
        variables['params'])
      results.append((grads, out))
    else:
      run_apply = (lambda p, m=m: apply(m, p))
      results.append((None, (jax.jit(run_apply) if call == 'jit' else run_apply)(
        variables['params'])))
  (g_ours, (c_ours, y_ours)), (g_theirs, (c_theirs, y_theirs)) = results
  # compat's outputs are flax.linen's everywhere, padding included
  case.close('outputs', y_ours, y_theirs)
  rows_of = lambda a: np.asarray(a)[..., rows, :]  # noqa: E731
  case.close('carry (rows of length > 0)', jax.tree.map(rows_of, c_ours),
             jax.tree.map(rows_of, c_theirs))
  if call == 'grad':
    case.close('parameter gradients', g_ours, g_theirs, atol=1e-4, rtol=1e-4)
