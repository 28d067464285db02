"""Every sequence layer under a mesh of Explicit axes (JAX's "sharding in types",
docs/checkpoints_and_sharding.md), against the same layer on the same
parameters without a mesh.

Drawn: the layer (``nr.RNN`` over one of this package's vector cells,
``Bidirectional``, ``StackedRNN``, the fused ``LSTM`` (with a projection at
times) and ``GRU`` of one or two layers and one or two directions,
``compat.RNN`` over a compat cell; ``unroll`` for these two), lengths or
packed segment ids or neither, ``reverse`` with or without ``keep_order``,
dropout in training mode, a given
initial carry or the default, one or two batch axes; and where each argument
lives: the inputs, the lengths (or ids) and a given carry each replicated or
split over the mesh's ``data`` axis (on the first batch axis or the second), the
parameters replicated or split over ``model`` on their hidden
(gate columns) axis (a given carry then split over ``model`` too at times).

Compared: outputs, the carry returned, and the gradients of a loss of both
with respect to the parameters, the inputs and the given carry, each equal to
the run without a mesh (float rounding: a sum split over ``model`` adds in
another order); and each gradient typed as its argument is, which JAX requires
of a hand-written backward (the fused layers' custom VJP): the gradient of
replicated inputs beside a carry split over the batch is replicated.

The mesh is of this process's devices: ``(1, 1)`` in one process, where the
sharding types are checked all the same (that is where the fused layers'
inputs' gradient, typed as the batch, was found), and ``(data, model)`` shapes
of up to eight devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The no-mesh run is the
reference because sharding must not change a value; the other families check
that run against flax and PyTorch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_recurrent as nr
from fuzz._common import draw_segments
from fuzz._core import Case, Mismatch
from nnx_recurrent import compat
from nnx_recurrent._scan._masking import full_spec

CELLS = ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell')
KINDS = ('rnn', 'bidirectional', 'stack', 'lstm', 'gru', 'compat')
# The cells' metadata splitting every kernel's (gates * hidden) columns and every
# bias over 'model' (docs/checkpoints_and_sharding.md).
SPLIT = dict(kernel_metadata={'out_sharding': (None, 'model')},
             recurrent_kernel_metadata={'out_sharding': (None, 'model')},
             bias_metadata={'out_sharding': ('model',)})


def _mesh(case: Case) -> jax.sharding.Mesh:
  n = jax.device_count()
  shapes = [(d, m) for d in (1, 2, 4, 8) for m in (1, 2, 4) if d * m <= n and n % (d * m) == 0]
  data, model = case.pick('mesh', shapes)
  return jax.make_mesh((data, model), ('data', 'model'), devices=jax.devices()[:data * model],
                       axis_types=(AxisType.Explicit, AxisType.Explicit))


def _build(case: Case, kind: str, features: int, hidden: int, split: bool) -> nnx.Module:
  """The layer drawn, built from ``nnx.Rngs(0, dropout=1)`` (the same values with
  or without ``split``'s metadata)."""
  rngs = nnx.Rngs(0, dropout=1)
  meta = SPLIT if split else {}
  rate = case.config['dropout']

  def cell(name, in_features):
    drop = dict(dropout_rate=rate, recurrent_dropout_rate=rate) if rate else {}
    return getattr(nr, name)(in_features, hidden, rngs=rngs, **drop, **meta)

  reverse = dict(reverse=case.config['reverse'], keep_order=case.config['keep_order'])
  names = case.config['cells']
  if kind == 'rnn':
    return nr.RNN(cell(names[0], features), unroll=case.config['unroll'], **reverse)
  if kind == 'bidirectional':
    return nr.Bidirectional(nr.RNN(cell(names[0], features)), nr.RNN(cell(names[1], features)))
  if kind == 'stack':
    return nr.StackedRNN(nr.RNN(cell(names[0], features), **reverse),
                         nr.RNN(cell(names[1], hidden)), dropout_rate=rate, rngs=rngs)
  fused = dict(num_layers=case.config['layers'], bidirectional=case.config['bidirectional'],
               dropout_rate=rate, implementation='xla', rngs=rngs, **meta)
  if not fused['bidirectional']:
    fused.update(reverse)
  if kind == 'lstm':
    return nr.LSTM(features, hidden, proj_features=case.config['proj'], **fused)
  return nr.GRU(features, hidden, **fused)


def _types(tree: Any) -> list[tuple | None]:
  return [full_spec(a) for a in jax.tree.leaves(tree)]


def run(case: Case) -> None:
  mesh = _mesh(case)
  data, model = mesh.shape['data'], mesh.shape['model']
  kind = case.pick('layer', KINDS)
  batch = data * case.integer('rows_per_device', 1, 2)
  time = case.integer('time', 1, 5)
  features = case.integer('features', 1, 4)
  hidden = model * case.integer('hidden_per_device', 1, 3)
  case.config['cells'] = [case.pick(f'cell{i}', CELLS) for i in range(2)]
  case.pick('layers', [1, 2])
  case.pick('bidirectional', [False, True])
  case.pick('proj', [None, None, 2])
  case.pick('dropout', [0.0, 0.0, 0.3])
  case.pick('unroll', [1, 1, 2, 3])  # nr.RNN's and compat.RNN's
  reverse = case.pick('reverse', [False, True]) and kind != 'bidirectional'
  case.config['reverse'] = reverse
  case.pick('keep_order', [False, True])
  split = case.pick('split_parameters', [False, True]) and kind != 'compat'
  masks = case.pick('masks', ['none', 'seq_lengths', 'segment_ids'])
  given = case.pick('initial_carry', ['default', 'replicated', 'rows', 'rows and hidden'])
  if given == 'rows and hidden' and not split:
    given = case.config['initial_carry'] = 'rows'
  x_rows = case.pick('inputs', ['replicated', 'rows'])
  mask_rows = case.pick('masks_placed', ['replicated', 'rows'])

  # A second batch axis at times, the rows split over 'data' on either of the two.
  rows_axis = case.pick('split_batch_axis', [0, 0, 0, 1])
  batch_shape = (batch,) if rows_axis == 0 else (case.integer('first_batch_axis', 1, 2), batch)
  if rows_axis == 0 and case.pick('second_batch_axis', [None, None, 1, 2]):
    batch_shape = (batch, case.config['second_batch_axis'])
  rows = P(*[None] * rows_axis, 'data')

  x = case.normal((*batch_shape, time, features))
  kw: dict[str, Any] = {}
  if masks == 'seq_lengths':
    kw['seq_lengths'] = case.rng.integers(0, time + 1, size=batch_shape).astype(np.int32)
  elif masks == 'segment_ids':
    ids, _ = draw_segments(case, int(np.prod(batch_shape)), time)
    kw['segment_ids'] = ids.reshape(*batch_shape, time)

  if kind == 'compat':
    cell = {'LSTMCell': compat.LSTMCell, 'OptimizedLSTMCell': compat.OptimizedLSTMCell,
            'GRUCell': compat.GRUCell, 'SimpleCell': compat.SimpleCell,
            'MGUCell': compat.MGUCell}[case.config['cells'][0]](hidden)
    module = compat.RNN(cell, reverse=reverse, keep_order=case.config['keep_order'],
                        unroll=case.config['unroll'])
    params = jax.tree.map(lambda a: np.asarray(a) + case.normal(a.shape, 0.1),
                          module.init(jax.random.key(0), x))

    def program_for(graphdef):
      del graphdef
      return _program(lambda params, rest: params, lambda m, x, carry, kw: module.apply(
        m, x, initial_carry=carry, return_carry=True, **kw))
    graphdef = rest = None
  else:
    graphdef, state, rest = nnx.split(_build(case, kind, features, hidden, split=False),
                                      nnx.Param, ...)
    params = jax.tree.map(lambda a: np.asarray(a) + case.normal(a.shape, 0.1), state)

    def program_for(graphdef):
      return _program(lambda params, rest: nnx.merge(graphdef, params, rest),
                      lambda m, x, carry, kw: m(x, initial_carry=carry, return_carry=True, **kw))

  # A given carry: random, of the structure and shapes of the layer's default.
  program = program_for(graphdef)
  default = jax.eval_shape(lambda p, r, x: program.call(program.merge(p, r), x, None, kw),
                           params, rest, x)[0]
  carry = (None if given == 'default' else
           jax.tree.map(lambda s: case.normal(s.shape), default))
  want = jax.tree.map(np.asarray, program_for(graphdef)(params, rest, x, carry, kw))

  with jax.set_mesh(mesh):
    if kind == 'compat':
      placed, placed_rest, mesh_graphdef = jax.device_put(params, P()), None, None
    else:
      # The same values, placed as the split layer's metadata places them.
      mesh_graphdef, split_state, placed_rest = nnx.split(
        _build(case, kind, features, hidden, split=split), nnx.Param, ...)
      leaves, treedef = jax.tree.flatten(split_state)
      placed = jax.tree.unflatten(treedef, [
        jax.device_put(v, s.sharding)
        for v, s in zip(jax.tree.leaves(params), leaves, strict=True)])
    xs = jax.device_put(x, rows if x_rows == 'rows' else P())
    placed_kw = {k: jax.device_put(v, rows if mask_rows == 'rows' else P())
                 for k, v in kw.items()}

    def place(a):  # a carry leaf: (*batch_shape, ..., hidden)
      if given == 'rows and hidden' and a.shape[-1] % model == 0:
        return jax.device_put(a, P(*rows, *([None] * (a.ndim - len(rows) - 1)), 'model'))
      return jax.device_put(a, P() if given == 'replicated' else rows)

    placed_carry = None if carry is None else jax.tree.map(place, carry)
    out, grads = program_for(mesh_graphdef)(placed, placed_rest, xs, placed_carry, placed_kw)
    args = (placed, xs) if carry is None else (placed, xs, placed_carry)
    types, want_types = _types(grads), _types(args)
  if types != want_types:
    raise Mismatch(f"gradient shardings {types} != the arguments' {want_types}")
  # (leaves: the parameters' metadata, the split's names, differ)
  case.close('outputs and carry', out, want[0], atol=1e-5, rtol=1e-5)
  case.close('gradients', jax.tree.leaves(grads), jax.tree.leaves(want[1]), atol=1e-4,
             rtol=1e-4)


class _program:
  """``call(module, x, carry, kw) -> (carry, outputs)`` of the module that
  ``merge(params, rest)`` makes and, jitted, the gradients of the sum of their
  squares with respect to the parameters, the inputs and a given carry
  (``nnx.grad``: the module's RNG streams advance inside it, as in training)."""

  def __init__(self, merge, call):
    self.merge, self.call = merge, call

  def __call__(self, params, rest, x, carry, kw):
    def both(params, rest, x, carry, kw):
      def loss(module, x, carry):
        out = self.call(module, x, carry, kw)
        return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(out)), out

      argnums = (0, 1) if carry is None else (0, 1, 2)
      grads, out = nnx.grad(loss, argnums=argnums, has_aux=True)(
        self.merge(params, rest), x, carry)
      return out, grads
    return jax.jit(both)(params, rest, x, carry, kw)
