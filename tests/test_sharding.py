"""Every module under ``jax.jit`` on a mesh of 8 simulated CPU devices.

``--xla_force_host_platform_device_count=8`` must be set before JAX starts, so
the tests run this file as a script in a fresh interpreter, naming the checks
to run. With ``jit``, the script builds one of every module, runs it unsharded
on one device (the reference), then

* data parallel: inputs sharded over the batch on the ``data`` axis of a
  ``(data, model) = (4, 2)`` mesh, parameters replicated;
* data + model parallel: the same parameters created *sharded* over the hidden
  axis on ``model`` (the cells' ``kernel_metadata`` / ``recurrent_kernel_metadata``
  / ``bias_metadata``; the fused layers' cells resharded with ``jax.device_put``),

and checks that the outputs and carries equal the reference and that every
output leaf is still split over the batch: each device holds ``batch / 4`` rows.
Then the sequence layers under ``jax.shard_map`` over the batch (one row per
device, ``check_vma`` on), forward and parameter gradients, and ``compat.RNN``
against flax.linen. Last, ``examples/multihost.py``'s ``shard_rows`` with 8 devices in one
process: the global batch is the process's rows, one eighth on each device.
With ``explicit``, every sequence layer under ``jax.set_mesh`` with
Explicit axes (JAX's explicit sharding mode): data parallel with replicated
parameters, then parameters split over an Explicit ``model`` axis, on a
``(data, model)`` mesh and on ``model`` alone; with ``compat-explicit``,
``compat.RNN`` with its Linen parameters split so; with ``uneven``, hidden sizes
and batches a mesh axis does not divide.
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_recurrent as nr
from nnx_recurrent import compat
from tests.random_params import random_linen_variables, random_module

B, T, IN, H = 8, 5, 4, 8
DATA, MODEL = 4, 2
ATOL = 1e-5


def _run_script(*checks: str) -> str:
  """This file as a script on 8 simulated CPU devices, in a fresh interpreter, running
  ``checks`` (names of ``__main__``'s table) in turn: its stdout and stderr."""
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = str(root) + os.pathsep + env.get('PYTHONPATH', '')
  result = subprocess.run([sys.executable, __file__, *checks], env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout + result.stderr


def test_modules_under_jit_compat_and_uneven_sizes_on_a_mesh_of_8_devices():
  # Three children's checks in one interpreter (each a fresh one costs 2.5 s):
  # every module under jax.jit (see _main); compat.RNN settles its carry under
  # an Explicit model axis as nr.RNN does, whatever flax.linen.scan's options
  # (_main_compat_explicit); a hidden size the model axis does not divide, where
  # the gates' columns split evenly: a ValueError naming it (JAX's error came
  # from deep in the step), and the batches and hidden sizes JAX lets through
  # run to the values of no mesh (_main_uneven).
  output = _run_script('jit', 'compat-explicit', 'uneven')
  for line in ('sharding checks passed: data parallel 11, model parallel 11, shard_map 3, '
               'fused gradients 2', 'compat explicit checks passed: layers 12',
               'uneven explicit checks passed: refused 12, ran 20'):
    assert line in output, output


def test_explicit_sharding_mode_on_a_mesh_of_8_devices():
  # jax.set_mesh over a mesh of Explicit axes ("sharding in types", flax's sharding
  # guides): the default carry takes the inputs' batch sharding (flax.nnx's RNN fails
  # there: a replicated zero carry, batch-sharded step outputs), and with parameters
  # split over a 'model' axis the sharding of each step's carry; see _main_explicit.
  output = _run_script('explicit')
  assert ('explicit sharding checks passed: modules 10, flax.nnx 1, pallas 3, '
          'model parallel 11, stateful 3, shared leaves 4') in output, output


def _explicit_mesh_here():
  """An Explicit mesh of this process's devices (one, in the suite's process)."""
  from jax.sharding import AxisType

  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Explicit,))


def test_explicit_mesh_of_one_device_fused_gradients_equal_no_mesh():
  # A mesh axis of size 1 is in the types too: the fused layers' weight gradients
  # contract (time, batch) in place there (JAX refuses to reshape the split axes).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 0, 2, 4, 5], np.int32)
  for make in (lambda: nr.GRU(IN, H, bidirectional=True, rngs=nnx.Rngs(0)),
               lambda: nr.LSTM(IN, H, proj_features=3, rngs=nnx.Rngs(0))):
    graphdef, state = nnx.split(random_module(make))

    @jax.jit
    def grads(state, x, lengths, graphdef=graphdef):
      def loss(layer):
        carry, y = layer(x, seq_lengths=lengths, return_carry=True)
        return (y ** 2).sum() + sum((c ** 2).sum() for c in jax.tree_util.tree_leaves(carry))
      return nnx.grad(loss)(nnx.merge(graphdef, state))

    want = grads(state, x, lengths)
    with jax.set_mesh(_explicit_mesh_here()):
      got = grads(state, *(jax.device_put(a, P('data')) for a in (x, lengths)))
    assert len(jax.tree_util.tree_leaves(got)) >= 3
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5), got, want)


def test_explicit_mesh_replicated_inputs_and_a_split_carry_differentiate_as_nr_rnn():
  # Inputs replicated and the initial carry split over the batch: the fused
  # layers' hand-written backward gave the inputs' gradient the batch's split,
  # and JAX refused it ("Custom VJP bwd rule must produce an output with the same
  # type"), where nr.RNN over the same cell, differentiated by JAX, ran. Each
  # gradient is typed as nr.RNN's (the inputs' replicated, the carry's split), and
  # equals it.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, 2, IN)).astype(np.float32)
  carry0 = rng.normal(size=(B, H)).astype(np.float32)
  graphdef, state = nnx.split(random_module(lambda: nr.GRU(IN, H, rngs=nnx.Rngs(0))))

  @jax.jit
  def grads(state, x, carry0):
    def loss(state, x, c, generic):  # (nr.RNN's nnx.scan: the parameters traced here too)
      layer = nnx.merge(graphdef, state)
      return ((nr.RNN(layer.forward[0]) if generic else layer)(x, initial_carry=c) ** 2).sum()
    return [jax.grad(loss, argnums=(0, 1, 2))(state, x, carry0, generic)
            for generic in (False, True)]

  with jax.set_mesh(_explicit_mesh_here()):
    fused, generic = grads(state, jax.device_put(x, P()),
                           jax.device_put(carry0, P('data')))
    specs = [[tuple(jax.typeof(a).sharding.spec) for a in jax.tree_util.tree_leaves(g)]
             for g in (fused, generic)]  # the parameters', the inputs', the carry's
  assert specs[0] == specs[1] and specs[0][-2:] == [(None,) * 3, ('data', None)]
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
    np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5), fused, generic)


def test_explicit_model_axis_splitting_the_projection_differentiates_as_nr_rnn():
  # The LSTM's projection split over an Explicit model axis on its output (proj)
  # axis, as its other kernels are on theirs (a (1, 1) mesh: the split is in the
  # types): the backward's dh W_hr^T contracts that axis in both, and JAX asks
  # where the sum goes (the step's `like`). The main script's zoo keeps W_hr
  # replicated. Gradients typed as and equal to nr.RNN's over the cell.
  from jax.sharding import AxisType

  split = {'out_sharding': (None, 'model')}
  mesh = jax.make_mesh((1, 1), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  x = np.random.default_rng(2).normal(size=(2, 2, IN)).astype(np.float32)
  with jax.set_mesh(mesh):
    graphdef, state = nnx.split(random_module(lambda: nr.LSTM(
      IN, H, proj_features=4, kernel_metadata=split, recurrent_kernel_metadata=split,
      bias_metadata={'out_sharding': ('model',)}, proj_kernel_metadata=split,
      rngs=nnx.Rngs(0)), sharding=_placed(mesh)))

    @jax.jit
    def grads(state, x):
      def loss(state, x, generic):
        layer = nnx.merge(graphdef, state)
        return ((nr.RNN(layer.forward[0]) if generic else layer)(x) ** 2).sum()
      return [jax.grad(loss, argnums=(0, 1))(state, x, generic) for generic in (False, True)]

    fused, generic = grads(state, jax.device_put(x, P('data')))
    specs = [[jax.typeof(a).sharding.spec for a in jax.tree_util.tree_leaves(g)]
             for g in (fused, generic)]
  assert specs[0] == specs[1] and specs[0].count(P(None, 'model')) == 3, specs
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
    np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5), fused, generic)


def _data_model_mesh_here():
  """A ``(data, model)`` mesh of Explicit axes on one of this process's devices."""
  from jax.sharding import AxisType

  return jax.make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1],
                       axis_types=(AxisType.Explicit, AxisType.Explicit))


def _flax_nnx_run(cell_type, hidden, params, x, **kw):
  """flax.nnx's RNN over ``cell_type`` given ``params`` (nr's cell's), on one
  device without a mesh: ``(carry, outputs)`` zeroed at padding (ours are zeros
  there, flax.nnx's the cell's) and the gradients of the sum of their squares
  with respect to the cell's parameters and ``x``."""
  theirs = cell_type(x.shape[-1], hidden, rngs=nnx.Rngs(0))
  nnx.update(theirs, params)
  lengths = kw.get('seq_lengths')
  valid = np.ones(x.shape[:2], bool) if lengths is None else (
    np.arange(x.shape[1]) < np.asarray(lengths)[:, None])

  def loss(cell, x):
    carry, y = nnx.RNN(cell)(x, return_carry=True, **kw)
    y = y * valid[..., None]
    return sum((a ** 2).sum() for a in jax.tree_util.tree_leaves((carry, y))), (carry, y)
  grads, out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(theirs, x)
  return out, grads


def _explicit_run(layer, x, placement, **kw):
  """``layer``'s ``(carry, outputs)`` and the gradients of the sum of their squares
  with respect to its parameters and ``x``, on :func:`_data_model_mesh_here` with
  ``x`` and each of ``kw`` placed by ``placement`` (name -> spec); and the
  gradients' specs with their arguments' (which must match)."""
  graphdef, state = nnx.split(layer)

  @jax.jit
  def run(state, x, kw):
    def loss(layer, x):
      out = layer(x, return_carry=True, **kw)
      return sum((a ** 2).sum() for a in jax.tree_util.tree_leaves(out)), out
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(nnx.merge(graphdef, state), x)

  with jax.set_mesh(_data_model_mesh_here()):
    x = jax.device_put(x, placement['x'])
    kw = {k: jax.device_put(v, placement[k]) for k, v in kw.items()}
    grads, out = run(state, x, kw)
    specs = [[tuple(jax.typeof(a).sharding.spec) for a in jax.tree_util.tree_leaves(t)]
             for t in (grads[1], x)]
  return out, grads, specs


def _close(got, want, atol=1e-5):
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5)


@pytest.mark.parametrize('case', ['hidden 1', 'one row, unroll 2',
                                  'lengths split, inputs replicated'])
def test_explicit_mesh_corners_of_nr_rnn_run_as_flax_nnx_without_a_mesh(case):
  # Each of these failed inside JAX before (a ShardingTypeError or a cotangent's
  # type): a mask of a carry's shape (a feature axis of size 1) split otherwise
  # than the carry; the two loops JAX runs for an unroll that leaves a remainder,
  # whose outputs it types apart where an axis of size 1 is split; the rows
  # reversed by lengths split over the batch beside inputs replicated.
  rng = np.random.default_rng(3)
  batch, hidden, features, time, unroll = 2, 4, 3, 3, 1
  split = {'x': P('data'), 'seq_lengths': P('data')}
  if case == 'hidden 1':
    hidden, split['seq_lengths'] = 1, P()
  elif case == 'one row, unroll 2':
    batch, unroll = 1, 2
  else:
    split['x'] = P()
  x = rng.normal(size=(batch, time, features)).astype(np.float32)
  lengths = np.array([3, 1][:batch], np.int32)
  cell = random_module(lambda: nr.LSTMCell(features, hidden, rngs=nnx.Rngs(0)))
  reverse = case == 'lengths split, inputs replicated'
  params = jax.tree_util.tree_map(np.asarray, nnx.state(cell, nnx.Param))
  if reverse:  # flax.nnx reverses each row within its length as we do
    want, want_grads = _flax_nnx_run(nnx.LSTMCell, hidden, params, x, seq_lengths=lengths,
                                     reverse=True, keep_order=True)
  else:
    want, want_grads = _flax_nnx_run(nnx.LSTMCell, hidden, params, x, seq_lengths=lengths)
  layer = nr.RNN(cell, unroll=unroll, reverse=reverse, keep_order=reverse)
  out, grads, (got_specs, x_specs) = _explicit_run(layer, x, split, seq_lengths=lengths)
  _close(out, want)
  _close(grads[0]['cell'], want_grads[0], atol=1e-4)
  _close(grads[1], want_grads[1], atol=1e-4)
  assert got_specs == x_specs  # the inputs' gradient typed as the inputs


def _scan_unrolls(f, state, x, mesh=None):
  """The ``unroll`` of every scan in ``f(state, x)``'s program, traced (nothing
  runs) with ``x`` split over ``mesh``'s first axis (an abstract mesh: no devices)."""
  from tests.jaxprs import equations

  if mesh is None:
    jaxpr = jax.make_jaxpr(f)(state, x)
  else:
    with jax.sharding.use_abstract_mesh(mesh):
      rows = NamedSharding(mesh, P(None, mesh.axis_names[0]))
      jaxpr = jax.make_jaxpr(f)(state, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows))
  return [e.params['unroll'] for e in equations(jaxpr.jaxpr) if e.primitive.name == 'scan']


def test_an_unroll_leaving_a_remainder_is_cut_only_on_meshes_with_an_explicit_axis_of_size_1():
  # JAX types its remainder loop's outputs apart only where an array axis of
  # size 1 is split, which only a mesh axis of size 1 can split: elsewhere the
  # scans keep the unroll asked for (3 steps, unroll 2), as without a mesh.
  from jax.sharding import AbstractMesh, AxisType

  x = np.ones((3, 4, IN), np.float32)  # time-major: the rows split
  rnn = nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)), unroll=2, time_major=True)
  linen = compat.RNN(compat.GRUCell(H), unroll=2, time_major=True)
  variables = linen.init(jax.random.key(0), x)
  fused = nr.GRU(IN, H, rngs=nnx.Rngs(0))
  (g_rnn, s_rnn), (g_fused, s_fused) = nnx.split(rnn), nnx.split(fused)
  layers = {'nr.RNN': (lambda s, x: nnx.merge(g_rnn, s)(x), s_rnn),
            'compat.RNN': (lambda s, x: linen.apply(s, x), variables),
            'nr.GRU': (lambda s, x: nnx.merge(g_fused, s)(x, time_major=True), s_fused)}
  explicit, auto = AxisType.Explicit, AxisType.Auto
  for name, (f, state) in layers.items():
    plain = _scan_unrolls(f, state, x)
    for shape, names, kinds, cut in (((4,), ('data',), (explicit,), False),
                                     ((2, 2), ('data', 'model'), (explicit,) * 2, False),
                                     ((4, 1), ('data', 'model'), (auto,) * 2, False),
                                     ((4, 1), ('data', 'model'), (explicit,) * 2, True),
                                     ((1,), ('data',), (explicit,), True)):
      got = _scan_unrolls(f, state, x, AbstractMesh(shape, names, axis_types=kinds))
      if cut:
        assert all(u == 1 or 3 % u == 0 for u in got), (name, shape, got)
      else:
        assert got == plain, (name, shape, kinds, got, plain)
  assert all(2 in _scan_unrolls(*layers[name], x) for name in ('nr.RNN', 'compat.RNN'))


def test_explicit_mesh_one_row_through_the_fused_lstm_runs_as_flax_nnx_without_a_mesh():
  # The fused scan plan's unroll leaves a remainder at one row over three steps:
  # JAX's two loops typed the row axis apart (a ShardingTypeError before).
  x = np.random.default_rng(4).normal(size=(1, 3, IN)).astype(np.float32)
  layer = random_module(lambda: nr.LSTM(IN, H, rngs=nnx.Rngs(0)))
  params = jax.tree_util.tree_map(np.asarray, nnx.state(layer.forward[0], nnx.Param))
  want, want_grads = _flax_nnx_run(nnx.OptimizedLSTMCell, H, params, x)
  out, grads, (got_specs, x_specs) = _explicit_run(layer, x, {'x': P('data')})
  _close(out, want)
  _close(grads[0]['forward'][0], want_grads[0], atol=1e-4)
  _close(grads[1], want_grads[1], atol=1e-4)
  assert got_specs == x_specs


@pytest.mark.parametrize('placed', ['mask split, operands replicated',
                                    'mask replicated, operand split over model',
                                    'mask split, x over model, y replicated'])
def test_explicit_mesh_masked_where_splits_a_mask_and_operands_of_its_shape_alike(placed):
  # _scan.masked_where directly: where() under Explicit axes takes one sharding for a
  # mask of the operand's shape (a feature axis of size 1) beside a second operand of
  # that shape: each axis split as whichever of the mask and x splits it, y resharded
  # to it. Through the layers the mask's rows already follow the inputs' (rows_typed_as)
  # and only a hidden axis of size 1 split over model differs; a mask split where x is
  # not, and y resharded, no layer reaches today. np.where's values.
  from nnx_recurrent._scan import masked_where

  mask_spec, x_spec, y_spec, want_spec = {
    'mask split, operands replicated': (P('data'), P(), P(), ('data', None)),
    'mask replicated, operand split over model': (P(), P('data', 'model'), P(),
                                                  ('data', 'model')),
    'mask split, x over model, y replicated': (P('data'), P(None, 'model'), P(),
                                               ('data', 'model')),
  }[placed]
  rng = np.random.default_rng(5)
  mask = np.array([True, False, True])
  x, y = (rng.normal(size=(3, 1)).astype(np.float32) for _ in range(2))
  with jax.set_mesh(_data_model_mesh_here()):
    got = jax.jit(masked_where)(*(jax.device_put(a, s) for a, s in
                                  ((mask, mask_spec), (x, x_spec), (y, y_spec))))
    assert tuple(jax.typeof(got).sharding.spec) == want_spec
  np.testing.assert_array_equal(np.asarray(got), np.where(mask[:, None], x, y))


def test_explicit_mesh_segment_ids_split_beside_replicated_inputs_run_as_without_a_mesh():
  # Packed segment ids split over the batch beside replicated inputs (the lengths'
  # corner above, for segment_ids): the ids take the inputs' rows, so the masks and
  # the carry do (the scan's carry changed its type at the first step before). The
  # same layer without a mesh.
  x = np.random.default_rng(6).normal(size=(2, 4, 3)).astype(np.float32)
  ids = np.array([[1, 1, 2, 0], [1, 2, 2, 3]], np.int32)
  layer = random_module(lambda: nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))))
  run = nnx.jit(lambda layer, x, ids: layer(x, segment_ids=ids, return_carry=True))
  want = run(layer, x, ids)
  with jax.set_mesh(_data_model_mesh_here()):
    got = run(layer, jax.device_put(x, P()), jax.device_put(ids, P('data')))
    specs = [tuple(jax.typeof(a).sharding.spec) for a in jax.tree_util.tree_leaves(got)]
  assert specs == [(None, None), (None, None, None)]  # the carry and outputs: the inputs' rows
  _close(got, want, atol=1e-6)


def test_explicit_mesh_packed_lstm_of_hidden_1_split_over_model_differentiates_as_without():
  # The fused LSTM's backward rebuilds the h entering each step from packed rows: its
  # masks (the segments' resets, the rows' earlier valid steps) have h's shape at a
  # hidden size of 1, which the model axis splits (where() took them unsplit: a
  # ShardingTypeError before _scan.masked_where there). One step, so that h0 itself
  # is of that shape too. The same layer without a mesh, gradients included.
  x = np.random.default_rng(7).normal(size=(2, 1, IN)).astype(np.float32)
  ids = np.array([[1], [0]], np.int32)
  split = {'out_sharding': (None, 'model')}
  mesh = _data_model_mesh_here()
  with jax.set_mesh(mesh):
    layer = random_module(lambda: nr.LSTM(
      IN, 1, kernel_metadata=split, recurrent_kernel_metadata=split,
      bias_metadata={'out_sharding': ('model',)}, rngs=nnx.Rngs(0)), sharding=_placed(mesh))
  plain = nr.LSTM(IN, 1, rngs=nnx.Rngs(0))
  nnx.update(plain, jax.tree_util.tree_map(np.asarray, nnx.state(layer, nnx.Param)))

  @nnx.jit
  def run(layer, x, ids):
    def loss(layer, x):
      out = layer(x, segment_ids=ids, return_carry=True)
      return sum((a ** 2).sum() for a in jax.tree_util.tree_leaves(out)), out
    return nnx.grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

  want = run(plain, x, ids)
  with jax.set_mesh(mesh):
    got = run(layer, *(jax.device_put(a, P('data')) for a in (x, ids)))
  _close(got, want, atol=1e-5)


@pytest.mark.parametrize('split', ['inputs', 'lengths'])
def test_arrays_on_an_explicit_mesh_without_set_mesh_lengths_placed_apart_from_inputs(split):
  # No jax.set_mesh: only one of the inputs and the lengths carries the Explicit mesh in
  # its type, the other (a NumPy array) none. The lengths take the inputs' rows on the
  # mesh of whichever has one (a mesh-less sharding named 'data': JAX's error). The
  # same layer without a mesh.
  from jax.sharding import AxisType

  mesh = jax.make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1],
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(8).normal(size=(2, 3, IN)).astype(np.float32)
  lengths = np.array([3, 1], np.int32)
  layer = random_module(lambda: nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0))))
  run = nnx.jit(lambda layer, x, lengths: layer(x, seq_lengths=lengths, return_carry=True))
  want = run(layer, x, lengths)
  args = ((jax.device_put(x, NamedSharding(mesh, P('data'))), lengths) if split == 'inputs' else
          (x, jax.device_put(lengths, NamedSharding(mesh, P('data')))))
  _close(run(layer, *args), want, atol=1e-6)


def test_compat_rnn_one_row_with_an_unroll_leaving_a_remainder_runs_as_flax_linen():
  # compat.RNN's flax.linen.scan with unroll 2 over 3 steps of one row under an Explicit
  # mesh: JAX's remainder loop typed the row axis apart (a ShardingTypeError), as nr.RNN's
  # did; the unroll takes the largest divisor of the length (of the time axis: 4 features
  # would keep unroll 2). flax.linen's RNN without a mesh.
  x = np.random.default_rng(9).normal(size=(1, 3, IN)).astype(np.float32)
  variables = random_linen_variables(nn.RNN(nn.LSTMCell(H)), x, seed=1)
  want = jax.jit(nn.RNN(nn.LSTMCell(H), return_carry=True).apply)(variables, x)
  with jax.set_mesh(_data_model_mesh_here()):
    got = jax.jit(compat.RNN(compat.LSTMCell(H), return_carry=True, unroll=2).apply)(
      variables, jax.device_put(x, P('data')))
  _close(got, want, atol=1e-6)


def test_explicit_mesh_an_unroll_leaving_a_remainder_takes_the_largest_divisor():
  # nr.RNN's scan over 6 steps given unroll 4: under an Explicit mesh the largest
  # divisor of 6 not above 4 (3, not 1: the loop stays unrolled), without one 4 itself.
  def unrolls(x):
    jaxpr = jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x).jaxpr
    return [e.params['unroll'] for e in _equations(jaxpr) if e.primitive.name == 'scan']

  x = np.zeros((1, 6, IN), np.float32)
  graphdef, state = nnx.split(nr.RNN(nr.SimpleCell(IN, H, rngs=nnx.Rngs(0)), unroll=4))
  assert unrolls(x) == [4]
  with jax.set_mesh(_data_model_mesh_here()):
    assert unrolls(jax.device_put(x, P('data'))) == [3]


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


def test_pallas_under_an_explicit_mesh_names_the_remedies():
  layer = nr.GRU(IN, H, implementation='pallas', rngs=nnx.Rngs(0))
  x = np.ones((B, T, IN), np.float32)
  with jax.set_mesh(_explicit_mesh_here()):
    xs = jax.device_put(x, P('data'))
    with pytest.raises(ValueError, match=r"GRU: `implementation` expected 'auto' or 'xla' under "
                       r'a mesh of Explicit axes \(jax\.set_mesh with AxisType\.Explicit.*'
                       r'inside jax\.shard_map over the batch, with check_vma=False, got '
                       r"'pallas'\."):
      layer(xs)
    with pytest.raises(ValueError, match='under a mesh of Explicit axes'):
      nnx.jit(lambda layer, x: layer(x))(layer, x)  # replicated inputs too


def _split_columns(variables):
  """Linen variables with every leaf's last axis split over ``model`` (flax.linen's
  ``nn.with_partitioning`` fails at init under Explicit axes: placed after init)."""
  return jax.tree.map(lambda a: jax.device_put(a, P(*(None,) * (a.ndim - 1), 'model')),
                      variables)


def test_compat_rnn_under_an_explicit_model_axis_settles_the_carry():
  """Linen parameters split over an Explicit ``model`` axis split each step's
  carry over it: flax.linen's RNN fails with JAX's scan TypeError (unless given
  a carry split as its steps split it); compat's
  carry, the default or one given replicated, takes the step's sharding, to
  the values of no mesh."""
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(0).normal(size=(B, T, IN)).astype(np.float32)
  variables = random_linen_variables(nn.RNN(nn.LSTMCell(H)), x, seed=1)
  h0 = np.random.default_rng(1).normal(size=(B, H)).astype(np.float32)

  def run(v, x, h0):
    layer = compat.RNN(compat.LSTMCell(H), return_carry=True)
    return layer.apply(v, x), layer.apply(v, x, initial_carry=(h0, h0))

  want = jax.jit(run)(variables, x, h0)
  with jax.set_mesh(mesh):
    xs, split = jax.device_put(x, P('data')), _split_columns(variables)
    with pytest.raises(TypeError, match='carry input and carry output must have equal types'):
      jax.jit(nn.RNN(nn.LSTMCell(H)).apply)(split, xs)  # flax.linen's
    # flax.linen runs given a carry split exactly as its steps split it (the docs say so).
    linen_given = jax.jit(nn.RNN(nn.LSTMCell(H), return_carry=True).apply)(
        split, xs, initial_carry=(jax.device_put(h0, P('data', 'model')),) * 2)
    got = jax.jit(run)(split, xs, h0)
  for a, b in zip(jax.tree_util.tree_leaves(linen_given), jax.tree_util.tree_leaves(want[1]),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    spec = jax.typeof(a).sharding.spec
    assert (spec[0], spec[-1]) == ('data', 'model'), spec  # rows and the hidden axis
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


class _OneArrayCell(nn.RNNCellBase):
  """A Linen test cell's carry: one ``(*batch, features)`` array of zeros."""

  features: int

  def initialize_carry(self, rng, input_shape):
    return jax.numpy.zeros(input_shape[:-1] + (self.features,))

  @property
  def num_feature_axes(self):
    return 1


class _Totalling(_OneArrayCell):
  """A Linen cell that adds each step's ``h`` summed over the batch to a carried
  variable: split over ``model`` with ``h``, where it is given replicated."""

  @nn.compact
  def __call__(self, h, x):
    h = jax.numpy.tanh(nn.Dense(self.features)(x) + h)
    total = self.variable('totals', 'h', lambda: jax.numpy.zeros((self.features,)))
    total.value = total.value + h.sum(0)
    return h, h


def test_compat_rnn_a_variable_carry_a_step_splits_otherwise_is_a_value_error():
  # The carry settles; a variable_carry collection is flax.linen's scan's, carried as it is.
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.ones((B, T, IN), np.float32)
  variables = {'params': {'cell': {'Dense_0': {'kernel': np.ones((IN, H), np.float32),
                                               'bias': np.ones((H,), np.float32)}}},
               'totals': {'cell': {'h': np.zeros((H,), np.float32)}}}
  with jax.set_mesh(mesh):
    split = {'params': _split_columns(variables['params']),
             'totals': jax.device_put(variables['totals'], P())}
    with pytest.raises(ValueError, match=r"RNN: `variable_carry` expected collections that each "
                       r'step of the cell returns split over the mesh as they were given '
                       r"\(explicit sharding mode.*got 'totals', whose variable a step returns "
                       r"split otherwise \(JAX's scan: .*\['totals'\]\['h'\] has type "
                       r'float32\[8\] but the corresponding output carry component has type '
                       r'float32\[8@model\]'):
      compat.RNN(_Totalling(H), variable_carry='totals').apply(
        split, jax.device_put(x, P('data')), mutable=['totals'])
  # Without a mesh, a collection a step returns of another type (an int total
  # given, a float returned) is JAX's scan TypeError, as in flax.linen.
  ints = {**variables, 'totals': {'cell': {'h': np.zeros((H,), np.int32)}}}
  for lib in (nn, compat):
    with pytest.raises(TypeError, match='scan body function carry input and carry output must '
                       'have equal types'):
      jax.eval_shape(lambda lib=lib: lib.RNN(_Totalling(H), variable_carry='totals').apply(
        ints, x, mutable=['totals']))


class _RowSteps(nn.RNNCellBase):
  """A Linen cell carrying ``h`` and each row's step count, which no step
  mixes with the inputs (it keeps the sharding it is given)."""

  @nn.compact
  def __call__(self, carry, x):
    h, steps = carry
    h = jax.numpy.tanh(nn.Dense(H)(jax.numpy.concatenate([x, h], -1)))
    return (h, steps + 1), h

  def initialize_carry(self, rng, input_shape):
    return jax.numpy.zeros(input_shape[:-1] + (H,)), jax.numpy.zeros(input_shape[:-1], np.int32)

  @property
  def num_feature_axes(self):
    return 1


def test_compat_rnn_explicit_mesh_splits_the_carry_over_every_batch_axis():
  # Two batch axes, the inputs split over the second: the default carry takes their
  # split over both before a step is traced (the step concatenates x and h, which
  # Explicit mode refuses split otherwise), the step count too (a step keeps its
  # split); flax.linen's values on the batch flattened, without a mesh.
  x = np.random.default_rng(0).normal(size=(2, 3, T, IN)).astype(np.float32)
  variables = random_linen_variables(nn.RNN(_RowSteps()), x[0])
  (h_want, _), y_want = nn.RNN(_RowSteps(), return_carry=True).apply(variables,
                                                                     x.reshape(6, T, IN))
  with jax.set_mesh(_explicit_mesh_here()):
    (h, steps), y = jax.jit(compat.RNN(_RowSteps(), return_carry=True).apply)(
      variables, jax.device_put(x, P(None, 'data')))
  for a in (h, steps, y):
    assert tuple(jax.typeof(a).sharding.spec)[:2] == (None, 'data')
  np.testing.assert_array_equal(np.asarray(steps), np.full((2, 3), T))
  np.testing.assert_allclose(np.asarray(h).reshape(6, H), h_want, atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(y).reshape(6, T, H), y_want, atol=1e-6, rtol=0)


class _NnxTotalling(nnx.Module):
  """An nnx cell that adds each step's ``h`` summed over the batch to its own
  Variable: split over ``model`` with ``h`` (the parameters), given replicated."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.dense = nnx.Linear(IN, H, rngs=rngs)
    self.total = nnx.Variable(jax.numpy.zeros((H,)))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,))

  def __call__(self, h, x):
    h = jax.numpy.tanh(self.dense(x) + h)
    self.total[...] = self.total[...] + h.sum(0)
    return h, h


def test_explicit_mesh_a_cells_own_variable_takes_the_sharding_a_step_gives_it():
  # The cell's state is carried through the scan (flax.nnx's RNN): a Variable a step
  # returns split over `model` where it was given replicated is resharded before the
  # scan, as the carry is; flax.nnx's RNN (and ours before) raised JAX's scan TypeError.
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(0).normal(size=(B, T, IN)).astype(np.float32)
  run = nnx.jit(lambda cell, x: nr.RNN(cell)(x))
  plain = _NnxTotalling(nnx.Rngs(0))
  want = [run(plain, x), run(plain, x)]
  # The same sums in NumPy: the total adds every step's h, call after call.
  np.testing.assert_allclose(np.asarray(plain.total[...]),
                             2 * np.asarray(want[0]).sum((0, 1)), rtol=1e-5)
  with jax.set_mesh(mesh):
    def split():
      cell = _NnxTotalling(nnx.Rngs(0))
      cell.dense.kernel.set_value(jax.device_put(cell.dense.kernel[...], P(None, 'model')))
      cell.dense.bias.set_value(jax.device_put(cell.dense.bias[...], P('model')))
      cell.total.set_value(jax.device_put(cell.total[...], P()))
      return cell
    xs = jax.device_put(x, P('data'))
    theirs = split()
    with pytest.raises(TypeError, match='carry input and carry output must have equal types'):
      nnx.jit(lambda cell, x: nnx.RNN(cell, rngs=False)(x))(theirs, xs)  # flax.nnx's
    cell = split()
    got = [run(cell, xs), run(cell, xs)]
    assert tuple(jax.typeof(cell.total[...]).sharding.spec) == ('model',)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(cell.total[...]), np.asarray(plain.total[...]),
                             rtol=1e-6, atol=1e-5)


def test_arrays_on_an_explicit_mesh_without_set_mesh_settle_the_cells_variable():
  """No jax.set_mesh: the mesh of Explicit axes is known only from the arrays'
  own shardings (their types). The cell's Variable settles as under set_mesh
  (flax.nnx's RNN: JAX's scan TypeError); the outputs and the total are those
  of no mesh, the total every step's h summed (NumPy)."""
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(0).normal(size=(B, T, IN)).astype(np.float32)
  run = nnx.jit(lambda cell, x: nr.RNN(cell)(x))
  plain = _NnxTotalling(nnx.Rngs(0))
  want = run(plain, x)
  np.testing.assert_allclose(np.asarray(plain.total[...]), np.asarray(want).sum((0, 1)),
                             rtol=1e-5, atol=1e-5)

  def split():
    cell = _NnxTotalling(nnx.Rngs(0))
    for v, spec in ((cell.dense.kernel, P(None, 'model')), (cell.dense.bias, P('model')),
                    (cell.total, P())):
      v.set_value(jax.device_put(v[...], NamedSharding(mesh, spec)))
    return cell

  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  with pytest.raises(TypeError, match='carry input and carry output must have equal types'):
    nnx.jit(lambda cell, x: nnx.RNN(cell, rngs=False)(x))(split(), xs)  # flax.nnx's
  cell = split()
  got = run(cell, xs)
  assert tuple(jax.typeof(cell.total[...]).sharding.spec) == ('model',)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.asarray(cell.total[...]), np.asarray(plain.total[...]),
                             rtol=1e-6, atol=1e-5)


def test_explicit_mesh_a_given_carry_keeps_its_split_of_the_hidden_axis():
  """A carry given split over ``model`` on its hidden axis takes the inputs'
  batch split and keeps its own: the final carry and the outputs split over
  both; the values of flax.nnx's RNN without a mesh."""
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(0).normal(size=(B, T, IN)).astype(np.float32)
  h0 = np.random.default_rng(1).normal(size=(B, H)).astype(np.float32)
  cell = nnx.GRUCell(IN, H, rngs=nnx.Rngs(0))  # h' = (1 - z) n + z h: h's split stays
  want = nnx.RNN(nnx.clone(cell), return_carry=True)(x, initial_carry=h0)
  with jax.set_mesh(mesh):
    got = nnx.jit(lambda layer, x, h0: layer(x, initial_carry=h0, return_carry=True))(
        nr.RNN(cell), jax.device_put(x, P('data')), jax.device_put(h0, P(None, 'model')))
  for a, b, spec in zip(got, want, (('data', 'model'), ('data', None, 'model')), strict=True):
    assert tuple(jax.typeof(a).sharding.spec) == spec
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


class _PerStep(nnx.Variable):
  """A per-step stack, which ``state_axes`` scans over its first axis."""


class _PerStepGain(nnx.Module):
  """flax.nnx's SimpleCell whose output a per-step gain scales (one slice of
  ``gain`` a step, as ``nnx.scan`` gives it)."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.cell = nnx.SimpleCell(IN, H, rngs=rngs)
    self.gain = _PerStep(jax.numpy.arange(1.0, T + 1)[:, None] * jax.numpy.ones((T, H)))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,))

  def __call__(self, h, x):
    h, y = self.cell(h, x)
    return h, y * self.gain[...][None]  # (H,): this step's slice


def test_explicit_mesh_a_variable_scanned_per_step_runs_as_without_a_mesh():
  """``state_axes`` giving a Variable type an int axis under an Explicit mesh:
  the step traced to settle the carry's sharding sees one slice of it, as the
  scan's steps do (it saw the whole stack: a broadcasting TypeError from the
  step, where no mesh ran); flax.nnx's RNN's outputs without a mesh."""
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.random.default_rng(0).normal(size=(B, T, IN)).astype(np.float32)
  axes = nnx.StateAxes({_PerStep: 0, ...: nnx.Carry})
  want = nnx.RNN(_PerStepGain(nnx.Rngs(0)), state_axes=axes)(x)
  with jax.set_mesh(mesh):
    got = nr.RNN(_PerStepGain(nnx.Rngs(0)), state_axes=axes)(jax.device_put(x, P('data')))
  assert tuple(jax.typeof(got).sharding.spec)[0] == 'data'
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


def test_explicit_mesh_packed_rows_with_a_shared_carry_leaf_of_the_batchs_size():
  """Packed segments from a carry given, under an Explicit mesh, with a carry
  leaf the rows share whose size is the batch's (tests/test_dropin.py's
  _SharedStepsCell): the reset carry's shared leaf is not split over the
  batch. A Python loop of the cell: at a row's later segment's start ``h``
  restarts from zeros, ``steps`` goes on; at padding ``h`` is kept, ``y`` zero."""
  from tests.test_dropin import _SharedStepsCell

  batch, ids = 3, np.array([[1, 1, 2, 2, 2], [1, 2, 2, 2, 0], [1, 1, 1, 1, 1]], np.int32)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, T, 4)).astype(np.float32)  # the cell's IN and H: 4, 6
  carry = {'h': rng.normal(size=(batch, 6)).astype(np.float32),
           'steps': np.arange(batch, dtype=np.float32)}
  cell = _SharedStepsCell(nnx.Rngs(0), batch)
  h, steps, ys = jax.numpy.asarray(carry['h']), jax.numpy.asarray(carry['steps']), []
  for t in range(T):
    valid = (ids[:, t] > 0)[:, None]
    reset = (t > 0) & (ids[:, t] > 0) & (ids[:, t] != ids[:, t - 1])
    h = jax.numpy.where(reset[:, None], 0.0, h)
    new, y = cell({'h': h, 'steps': steps}, jax.numpy.where(valid, x[:, t], 0.0))
    h, steps = jax.numpy.where(valid, new['h'], h), new['steps']
    ys.append(jax.numpy.where(valid, y['y'], 0.0))
  with jax.set_mesh(_explicit_mesh_here()):
    got = nnx.jit(lambda m, x, ids: m(x, segment_ids=ids, initial_carry=carry, return_carry=True))(
        nr.RNN(cell), *(jax.device_put(a, P('data')) for a in (x, ids)))
  (c, y) = got
  np.testing.assert_allclose(np.asarray(c['h']), np.asarray(h), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(c['steps']), np.asarray(steps), atol=0, rtol=0)
  np.testing.assert_allclose(np.asarray(y['y']), np.stack(ys, 1), atol=1e-5, rtol=0)


class _Fickle(_NnxTotalling):
  """:class:`_NnxTotalling` whose step moves its total to the other sharding each time."""

  def __call__(self, h, x):
    replicated = all(s is None for s in jax.typeof(self.total[...]).sharding.spec)
    h, y = super().__call__(h, x)
    self.total[...] = jax.sharding.reshard(self.total[...], P('model') if replicated else P())
    return h, y


def test_explicit_mesh_a_cells_own_variable_is_settled_only_where_the_scan_carries_it():
  # A Variable whose sharding a step never keeps: a ValueError naming it (JAX's scan
  # TypeError before). One the scan broadcasts (state_axes None: its changes are
  # dropped) keeps its sharding: nothing to settle.
  from jax.sharding import AxisType

  mesh = jax.make_mesh((jax.device_count(), 1), ('data', 'model'),
                       axis_types=(AxisType.Explicit, AxisType.Explicit))
  x = np.ones((B, T, IN), np.float32)
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P('data'))
    with pytest.raises(ValueError, match=r"RNN: `cell` expected a step that returns its carry, "
                       r'and the Variables of the cell that the scan carries \(state_axes\), '
                       r'split over the mesh as they were given .*AxisType\.Auto\), got '
                       r"cell\.total partitions \(None,\) -> \('model',\)\.$"):
      nr.RNN(_Fickle(nnx.Rngs(0)))(xs)
    cell = _NnxTotalling(nnx.Rngs(0))
    cell.dense.kernel.set_value(jax.device_put(cell.dense.kernel[...], P(None, 'model')))
    cell.total.set_value(jax.device_put(cell.total[...], P()))
    nr.RNN(cell, state_axes={nnx.Param: None, ...: nnx.Carry})(xs)  # settled
    assert tuple(jax.typeof(cell.total[...]).sharding.spec) == ('model',)
    cell.total.set_value(jax.device_put(cell.total[...], P()))
    nr.RNN(cell, state_axes={nnx.Variable: None})(xs)  # broadcast: left as it is
    assert tuple(jax.typeof(cell.total[...]).sharding.spec) == (None,)


class _Restless(nnx.Module):
  """A cell whose step moves its carry to the other axis of the mesh each time."""

  num_feature_axes = 1

  def __init__(self):
    self.w = nnx.Param(np.eye(H, dtype=np.float32))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,))

  def __call__(self, h, x):
    moved = P(None, 'data') if tuple(jax.typeof(h).sharding.spec)[:1] == ('data',) else P('data')
    h = jax.sharding.reshard(jax.numpy.tanh(h @ self.w[...] + x.sum()), moved)
    return h, h


def test_explicit_mesh_a_step_that_never_keeps_its_carrys_sharding_is_a_value_error():
  # Model-split parameters settle the carry in one more step (the 8-device script); a
  # step that moves it every time gets the rule, not JAX's scan TypeError.
  x = np.ones((B, T, IN), np.float32)
  with jax.set_mesh(_explicit_mesh_here()):
    with pytest.raises(ValueError, match=r"RNN: `cell` expected a step that returns its carry "
                       r"split over the mesh as it was given.*AxisType\.Auto.*, got carry "
                       r"partitions \[\('data', None\)\] -> \[\(None, 'data'\)\]"):
      nr.RNN(_Restless())(jax.device_put(x, P('data')))


class _Growing(nnx.Module):
  """A cell whose own Variable grows at each step (a count kept as a log)."""

  num_feature_axes = 1

  def __init__(self):
    self.seen = nnx.Variable(jax.numpy.zeros((0,)))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,))

  def __call__(self, h, x):
    self.seen.set_value(jax.numpy.concatenate([self.seen.get_value(), jax.numpy.ones((1,))]))
    return h, h


def test_explicit_mesh_a_variable_changing_its_shape_is_jaxs_error_as_without():
  # Settling the sharding of the cell's Variables leaves one of other shapes to the
  # scan, whose TypeError (flax.nnx's RNN's too) says the carried state changed.
  x = np.ones((B, T, IN), np.float32)
  for run in (lambda: nr.RNN(_Growing())(x), lambda: nnx.RNN(_Growing())(x)):
    with pytest.raises(TypeError, match=r'carry input and carry output must have equal types'):
      run()
  with jax.set_mesh(_explicit_mesh_here()):
    with pytest.raises(TypeError, match=r'carry input and carry output must have equal types'):
      nr.RNN(_Growing())(jax.device_put(x, P('data')))


class _Broadening(nnx.Module):
  """A cell whose own total, a scalar, becomes a ``(features,)`` vector at the
  first step (``h`` summed over the rows, broadcast into it): a state of another
  shape each step, split over ``model`` with ``h``."""

  num_feature_axes = 1

  def __init__(self):
    self.w = nnx.Param(np.ones((IN, H), np.float32))
    self.total = nnx.Variable(jax.numpy.zeros(()))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,))

  def __call__(self, h, x):
    h = jax.numpy.tanh(x @ self.w[...] + h)
    self.total.set_value(self.total.get_value() + h.sum(0))
    return h, h


def test_explicit_mesh_a_variable_changing_its_rank_and_split_is_jaxs_error_as_without():
  # A Variable whose shape and sharding a step both change (a scalar made a vector split
  # over `model`) is left to the scan, as one of other shapes alone is (above): its
  # TypeError, as flax.nnx's and as without a mesh, not a reshard to the step's rank.
  x = np.ones((B, T, IN), np.float32)
  for run in (lambda: nr.RNN(_Broadening())(x), lambda: nnx.RNN(_Broadening())(x)):
    with pytest.raises(TypeError, match=r'carry input and carry output must have equal types'):
      run()
  with jax.set_mesh(_data_model_mesh_here()):
    cell = _Broadening()
    cell.w.set_value(jax.device_put(cell.w[...], P(None, 'model')))
    with pytest.raises(TypeError, match=r'carry input and carry output must have equal types'):
      nr.RNN(cell)(jax.device_put(x, P('data')))


class _Delayed(nnx.Module):
  """A carry of ``h`` and the ``h`` before it: ``h`` takes the split of the
  parameters at the first step, the ``h`` before it only at the second."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (IN, H)) / 2)
    self.u = nnx.Param(jax.random.normal(rngs.params(), (H, H)) / 2)

  def initialize_carry(self, input_shape, rngs=None):
    return (jax.numpy.zeros(input_shape[:-1] + (H,)),) * 2

  def __call__(self, carry, x):
    h, _ = carry
    new = jax.numpy.tanh(x @ self.w[...] + h @ self.u[...])
    return (new, h), new + h


class _LinenDelayed(nn.RNNCellBase):
  """:class:`_Delayed` in flax.linen."""

  @nn.compact
  def __call__(self, carry, x):
    h, _ = carry
    new = jax.numpy.tanh(nn.Dense(H, use_bias=False)(x) + nn.Dense(H, use_bias=False)(h))
    return (new, h), new + h

  def initialize_carry(self, rng, input_shape):
    return (jax.numpy.zeros(input_shape[:-1] + (H,)),) * 2

  @property
  def num_feature_axes(self):
    return 1


def test_explicit_mesh_a_carry_that_settles_in_two_steps_runs_as_without_a_mesh():
  # Parameters split over `model`: the carry's h takes that split at one step, the h
  # before it at the next (the package's cells settle in one). nr.RNN and compat.RNN
  # settle both (flax.nnx's RNN: JAX's scan TypeError); flax.nnx's and flax.linen's
  # RNN without a mesh give the values.
  x = np.random.default_rng(10).normal(size=(B, T, IN)).astype(np.float32)
  cell = _Delayed(nnx.Rngs(0))
  want = nnx.RNN(nnx.clone(cell), return_carry=True)(x)
  variables = random_linen_variables(nn.RNN(_LinenDelayed()), x)
  linen_want = nn.RNN(_LinenDelayed(), return_carry=True).apply(variables, x)
  with jax.set_mesh(_data_model_mesh_here()):
    xs = jax.device_put(x, P('data'))
    for v in (cell.w, cell.u):
      v.set_value(jax.device_put(v[...], P(None, 'model')))
    with pytest.raises(TypeError, match='carry input and carry output must have equal types'):
      nnx.jit(lambda cell, x: nnx.RNN(cell, rngs=False)(x))(nnx.clone(cell), xs)  # flax.nnx's
    got = nnx.jit(lambda cell, x: nr.RNN(cell, return_carry=True)(x))(cell, xs)
    linen_got = jax.jit(compat.RNN(_LinenDelayed(), return_carry=True).apply)(
      _split_columns(variables), xs)
  for out, ref in ((got, want), (linen_got, linen_want)):
    assert [tuple(jax.typeof(a).sharding.spec) for a in jax.tree_util.tree_leaves(out)] == [
      ('data', 'model'), ('data', 'model'), ('data', None, 'model')]
    _close(out, ref, atol=1e-6)


class _Scaled(nnx.Module):
  """A per-row ``h``, a per-feature scale the rows share, ``(H,)``, of the
  batch's size here (``B == H``), which every row's ``h`` is multiplied by,
  and a step count (a scalar)."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (IN, H)) / 2)

  def initialize_carry(self, input_shape, rngs=None):
    return {'h': jax.numpy.zeros(input_shape[:-1] + (H,)), 'scale': jax.numpy.ones((H,)),
            'steps': jax.numpy.zeros(())}

  def __call__(self, c, x):
    h = jax.numpy.tanh(x @ self.w[...] + c['h'] * c['scale'][None])
    return {'h': h, 'scale': c['scale'] * 0.9, 'steps': c['steps'] + 1}, h


class _LinenScaled(nn.RNNCellBase):
  """:class:`_Scaled` in flax.linen."""

  @nn.compact
  def __call__(self, c, x):
    h = jax.numpy.tanh(nn.Dense(H)(x) + c['h'] * c['scale'][None])
    return {'h': h, 'scale': c['scale'] * 0.9, 'steps': c['steps'] + 1}, h

  def initialize_carry(self, rng, input_shape):
    return {'h': jax.numpy.zeros(input_shape[:-1] + (H,)), 'scale': jax.numpy.ones((H,)),
            'steps': jax.numpy.zeros(())}

  @property
  def num_feature_axes(self):
    return 1


class _CountingGiven(nnx.Module):
  """A cell without ``initialize_carry`` (its carry is given): ``h`` and a step
  count, a scalar."""

  num_feature_axes = 1

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (IN, H)) / 2)

  def __call__(self, c, x):
    h = jax.numpy.tanh(x @ self.w[...] + c['h'])
    return {'h': h, 'steps': c['steps'] + 1}, h * c['steps']


def test_explicit_mesh_carry_leaves_the_rows_share_stay_whole_with_or_without_padding():
  # The default carry is split over the batch as the inputs are, but not a leaf the rows
  # share: a per-feature scale of the batch's size by chance, split over `data` too,
  # met each row's h split over `data` on its feature axis (JAX's ShardingTypeError
  # "illegally sharded result" without seq_lengths; with them the cell's rows were
  # known); a scalar step count. The same layers without a mesh, flax.nnx's and
  # flax.linen's RNN; the shared leaves replicated, h and the outputs split.
  assert B == H
  x = np.random.default_rng(11).normal(size=(B, T, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 0, 2, 4, 5], np.int32)
  ids = np.array([[1, 1, 2, 2, 2], [1, 2, 3, 0, 0]] * 4, np.int32)
  layer = nr.RNN(_Scaled(nnx.Rngs(0)), return_carry=True)
  variables = random_linen_variables(nn.RNN(_LinenScaled()), x)
  linen = compat.RNN(_LinenScaled(), return_carry=True)
  run = nnx.jit(lambda layer, x, kw: layer(x, **kw))
  linen_run = jax.jit(lambda v, x, kw: linen.apply(v, x, **kw))
  cases = [{}, {'seq_lengths': lengths}, {'segment_ids': ids}]
  want = [run(layer, x, kw) for kw in cases]
  linen_want = [linen_run(variables, x, kw) for kw in cases]
  _close(want[0], nnx.RNN(nnx.clone(layer.cell), return_carry=True)(x), atol=1e-6)
  _close(linen_want[0], nn.RNN(_LinenScaled(), return_carry=True).apply(variables, x), atol=1e-6)
  with jax.set_mesh(_explicit_mesh_here()):
    got = [run(layer, *jax.device_put((x, kw), P('data'))) for kw in cases]
    linen_got = [linen_run(variables, *jax.device_put((x, kw), P('data'))) for kw in cases]
  for out, ref in zip(got + linen_got, want + linen_want, strict=True):
    carry, y = out
    assert {k: tuple(jax.typeof(a).sharding.spec) for k, a in carry.items()} == {
      'h': ('data', None), 'scale': (None,), 'steps': ()}
    assert tuple(jax.typeof(y).sharding.spec) == ('data', None, None)
    _close(out, ref, atol=1e-6)
  # No initialize_carry to probe: the shapes decide, and a scalar has no rows.
  cell = _CountingGiven(nnx.Rngs(0))
  carry = {'h': np.zeros((B, H), np.float32), 'steps': np.float32(0)}
  want = nnx.RNN(nnx.clone(cell), return_carry=True)(x, initial_carry=carry)
  with jax.set_mesh(_explicit_mesh_here()):
    got = nnx.jit(lambda layer, x: layer(x, initial_carry=carry))(
      nr.RNN(cell, return_carry=True), jax.device_put(x, P('data')))
    assert tuple(jax.typeof(got[0]['steps']).sharding.spec) == ()
  _close(got, want, atol=1e-6)


def _traced_on(mesh, make, spec_of, x_spec):
  """``make()``'s layer called on ``(B, T, IN)`` inputs placed by ``x_spec``, traced
  (nothing runs) on the abstract ``mesh`` with each of its variables placed by
  ``spec_of(array)``: the outputs' abstract value."""
  graphdef, state = nnx.split(make())
  with jax.sharding.use_abstract_mesh(mesh):
    state = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=NamedSharding(mesh, spec_of(a))), state)
    x = jax.ShapeDtypeStruct((B, T, IN), np.float32, sharding=NamedSharding(mesh, x_spec))
    return jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x).out_avals


class _Summing(nnx.Module):
  """A cell of yours whose parameter's last axis is four times its hidden size,
  which its step sums away: the carry it returns lost its hidden axis."""

  num_feature_axes = 1

  def __init__(self, hidden):
    self.hidden_features = hidden
    self.w = nnx.Param(np.ones((IN, 4 * hidden), np.float32))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (self.hidden_features,))

  def __call__(self, h, x):
    h = (x @ self.w[...]).sum(-1)
    return h, h


def test_explicit_gates_split_over_two_mesh_axes_name_both_traced_on_an_abstract_mesh():
  # The gates' columns split over two mesh axes at once, (m1, m2): 4 devices, which
  # do not divide a hidden size of 6, where 24 columns split evenly: the ValueError
  # counts the devices of both axes, for nr.RNN's cell and the fused layer (JAX's
  # error came from deep in the step); a hidden size of 8 runs. A cell of yours whose
  # step fails with this package's own error (a carry that lost its axis) keeps it:
  # the gates are named only where JAX's error is all there is. Traced only.
  from jax.sharding import AbstractMesh, AxisType

  mesh = AbstractMesh((2, 2, 2), ('data', 'm1', 'm2'), axis_types=(AxisType.Explicit,) * 3)

  def gates(hidden):  # every array whose last axis stacks the 4 gates split over (m1, m2)
    return lambda a: (P(*(None,) * (a.ndim - 1), ('m1', 'm2')) if a.ndim and
                      a.shape[-1] == 4 * hidden else P())

  for hidden in (6, 8):
    for name, make in (('RNN', lambda hidden=hidden: nr.RNN(nr.OptimizedLSTMCell(
                          IN, hidden, rngs=nnx.Rngs(0)))),
                       ('LSTM', lambda hidden=hidden: nr.LSTM(IN, hidden, rngs=nnx.Rngs(0)))):
      if hidden == 8:
        out, = _traced_on(mesh, make, gates(hidden), P('data'))
        assert tuple(out.sharding.spec) == ('data', None, ('m1', 'm2')), (name, out)
        continue
      arg = 'cell' if name == 'RNN' else 'hidden_features'
      with pytest.raises(ValueError, match=rf"{name}: `{arg}` expected a hidden size that is a "
                         r"multiple of 4 \(.*split over mesh axes \('m1', 'm2'\) \(4 devices\) "
                         r'on its last axis, which holds the gates, 6 wide each'):
        _traced_on(mesh, make, gates(hidden), P('data'))
  with pytest.raises(TypeError, match=r"RNN: `cell` expected a step that returns a carry of its "
                     r"carry's shapes \[\(8, 6\)\], got \[\(8,\)\]"):
    _traced_on(mesh, lambda: nr.RNN(_Summing(6)), gates(6), P('data'))


@pytest.mark.parametrize('given', [True, False])
def test_shard_map_a_carry_that_varies_or_not_over_the_batch_as_flax(given):
  # Inside jax.shard_map (check_vma), over one device's mesh (still in the types):
  # a carry computed from the rows already varies over the mesh axis the inputs
  # vary over; without one, inputs replicated and lengths split over the mesh,
  # each step's carry varies with the lengths, where the default one did not.
  mesh = Mesh(np.array(jax.devices()[:1]), ('data',))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 4, 2, 4, 5], np.int32)
  cell = nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(nr.RNN(cell, return_carry=True))

  def run(layer, x, lengths):
    h0 = jnp.tanh(x[:, 0, :1]) * jnp.ones((1, H))
    return layer(x, initial_carry=(h0, h0) if given else None, seq_lengths=lengths)

  (carry, y) = jax.jit(jax.shard_map(
    lambda s, x, lengths: run(nnx.merge(graphdef, s), x, lengths), mesh=mesh,
    in_specs=(P(), P('data') if given else P(), P('data')), out_specs=P('data')))(
      state, x, lengths)
  carry_t, y_t = run(nnx.RNN(cell, return_carry=True), x, lengths)
  valid = (np.arange(T)[None] < lengths[:, None])[..., None]
  np.testing.assert_allclose(y, np.where(valid, y_t, 0), atol=ATOL, rtol=0)
  for a, b in zip(carry, carry_t, strict=True):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


# -- the script (runs in the child process) -----------------------------------------
_SHARDED = {'out_sharding': (None, 'model')}  # kernels: split the (gates * hidden) columns


def _metadata():
  return dict(kernel_metadata=_SHARDED, recurrent_kernel_metadata=_SHARDED,
              bias_metadata={'out_sharding': ('model',)})


def _zoo(meta):
  """One of every module; ``meta`` annotates the cells' parameters with sharding names."""
  rngs = nnx.Rngs(0)
  return nnx.Dict(
    simple=nr.SimpleCell(IN, H, rngs=rngs, **meta),
    lstm_cell=nr.LSTMCell(IN, H, rngs=rngs, **meta),
    optimized_lstm=nr.OptimizedLSTMCell(IN, H, rngs=rngs, **meta),
    gru_cell=nr.GRUCell(IN, H, rngs=rngs, **meta),
    mgu=nr.MGUCell(IN, H, rngs=rngs, **meta),
    conv_lstm=nr.ConvLSTMCell(IN, H, (3,), rngs=rngs),  # no metadata arguments
    rnn=nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=rngs, **meta)),
    bidirectional=nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=rngs, **meta)),
                                   nr.RNN(nr.GRUCell(IN, H, rngs=rngs, **meta))),
    stack=nr.StackedRNN(nr.RNN(nr.SimpleCell(IN, H, rngs=rngs, **meta)),
                        nr.RNN(nr.LSTMCell(H, H, rngs=rngs, **meta))),
    lstm=nr.LSTM(IN, H, num_layers=2, bidirectional=True, rngs=rngs),
    gru=nr.GRU(IN, H, num_layers=2, rngs=rngs),
  )


def _apply(zoo, x, conv_x, lengths):
  out = {}
  for name, module in zoo.items():
    if isinstance(module, nr.RNNCellBase):
      inp = conv_x if name == 'conv_lstm' else x[:, 0]
      out[name] = module(module.initialize_carry(inp.shape), inp)
    else:
      out[name] = module(x, seq_lengths=lengths, return_carry=True)
  return out


# The masked scan (StackedRNN's layers are RNNs: 'rnn' itself adds nothing here) and the
# fused layers' custom VJP.
SHARD_MAP = ('stack', 'lstm')


def _forward(graphdef):
  def forward(state, x, lengths):
    return nnx.merge(graphdef, state)(x, seq_lengths=lengths, return_carry=True)

  return forward


def _grad(run, state, x, lengths):
  """The gradient of ``sum(outputs ** 2)`` with respect to ``state``."""
  return jax.grad(lambda state: jax.numpy.sum(run(state, x, lengths)[1] ** 2))(state)


def _linen_rnn():
  return nn.RNN(nn.GRUCell(H))


def reference(zoo, x, conv_x, lengths):
  """ONE single-device program, nothing sharded: every module's outputs, the
  parameter gradients of the ``SHARD_MAP`` layers and flax.linen's RNN; and
  the variables of the latter. Apart, each would be one compilation."""
  graphdef, state = nnx.split(zoo)
  layers = {name: nnx.split(zoo[name]) for name in SHARD_MAP}

  variables = random_linen_variables(_linen_rnn(), x, seed=1)  # flax.linen's, from NumPy

  @jax.jit
  def run(state, layer_states, x, conv_x, lengths, variables):
    out = _apply(nnx.merge(graphdef, state), x, conv_x, lengths)
    grads = {name: _grad(_forward(layers[name][0]), layer_states[name], x, lengths)
             for name in SHARD_MAP}
    return out, grads, _linen_rnn().apply(variables, x, seq_lengths=lengths)

  return (*run(state, {name: s for name, (_, s) in layers.items()}, x, conv_x, lengths,
               variables), variables)


def check_shard_map(zoo, x, lengths, ref, ref_grads, variables, linen):
  """The sequence layers under ``jax.shard_map`` over the batch, with its default
  ``check_vma=True``: outputs, carries and parameter gradients (summed over the
  mesh by JAX) equal the single-device run's (:func:`reference`). All of them
  in one program."""
  mesh = Mesh(np.array(jax.devices()), ('data',))  # one row per device
  layers = {name: nnx.split(zoo[name]) for name in SHARD_MAP}
  specs = dict(mesh=mesh, in_specs=(P(), P('data'), P('data')), out_specs=P('data'))

  @jax.jit
  def sharded(layer_states, x, lengths, variables):
    out, grads = {}, {}
    for name, (graphdef, _) in layers.items():
      forward = jax.shard_map(_forward(graphdef), **specs)
      out[name] = forward(layer_states[name], x, lengths)
      grads[name] = _grad(forward, layer_states[name], x, lengths)
    # compat.RNN too (flax.linen's own RNN fails there), against flax.linen unsharded.
    out['compat'] = jax.shard_map(
      lambda v, x, lengths: compat.RNN(compat.GRUCell(H)).apply(v, x, seq_lengths=lengths),
      **specs)(variables, x, lengths)
    return out, grads

  out, grads = sharded({name: s for name, (_, s) in layers.items()}, x, lengths, variables)
  for name in SHARD_MAP:
    got_leaves = jax.tree_util.tree_leaves(out[name])
    want_leaves = jax.tree_util.tree_leaves(ref[name])
    assert len(got_leaves) == len(want_leaves) > 1, name  # the carry and the outputs
    for got, want in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(got, want, atol=ATOL, rtol=0, err_msg=f'shard_map {name}')
    got_leaves = jax.tree_util.tree_leaves(grads[name])
    want_leaves = jax.tree_util.tree_leaves(ref_grads[name])
    assert len(got_leaves) == len(want_leaves) > 0, name
    for got, want in zip(got_leaves, want_leaves):
      np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5,
                                 err_msg=f'shard_map gradient {name}')
  np.testing.assert_allclose(out['compat'], linen, atol=ATOL, rtol=0,
                             err_msg='shard_map compat.RNN')
  return len(SHARD_MAP) + 1


def check_shard_rows(x, lengths):
  """examples/multihost.py's batch sharding with several devices in one process: the global
  batch is this process's rows (not one copy per device), split evenly over the devices."""
  from examples import multihost

  mesh = multihost.data_mesh()
  gx, glengths = multihost.shard_rows(mesh, x, lengths)
  assert gx.shape == x.shape and glengths.shape == lengths.shape, (gx.shape, glengths.shape)
  np.testing.assert_array_equal(np.asarray(gx), x)
  np.testing.assert_array_equal(np.asarray(glengths), lengths)
  rows = [(shard.device, shard.data.shape[0]) for shard in gx.addressable_shards]
  assert {n for _, n in rows} == {B // 8} and len(rows) == 8, rows


def check_fused_gradients_reduce(x, lengths):
  """The fused layers' data-parallel gradient: each device contracts its rows and one
  all-reduce sums the weight gradients, as nr.RNN's scan does; reshaping (time, batch)
  into one axis gathered every row onto every device (8x the weight-gradient work)."""
  mesh = Mesh(np.array(jax.devices()), ('data',))
  batch = NamedSharding(mesh, P('data'))
  checked = 0
  for make in (lambda: nr.LSTM(IN, H, rngs=nnx.Rngs(0)),
               lambda: nr.GRU(IN, H, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))):
    layer = random_module(make)
    graphdef, state = nnx.split(layer)

    def grads(state, x, lengths, graphdef=graphdef):
      loss = lambda m: (m(x, seq_lengths=lengths) ** 2).sum()  # noqa: E731
      return nnx.state(nnx.grad(loss)(nnx.merge(graphdef, state)), nnx.Param)

    step = jax.jit(grads)
    sharded = [jax.device_put(a, batch) for a in (x, lengths)]
    program = step.lower(state, *sharded).compile().as_text()
    assert 'all-gather' not in program and 'all-reduce' in program, program
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0),
      step(state, *sharded), step(state, x, lengths))  # and the one-device values
    checked += 1
  return checked


def _main():
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  conv_x = rng.normal(size=(B, 7, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 0, 2, 4, 5], np.int32)
  apply = nnx.jit(_apply)

  # Reference: one device, nothing sharded.
  zoo = random_module(lambda: _zoo({}))
  ref, ref_grads, linen, variables = jax.tree_util.tree_map(
    np.asarray, reference(zoo, x, conv_x, lengths))

  mesh = Mesh(np.array(jax.devices()).reshape(DATA, MODEL), ('data', 'model'))
  batch = NamedSharding(mesh, P('data'))
  args = [jax.device_put(a, batch) for a in (x, conv_x, lengths)]

  def check(out, what):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), b, atol=ATOL, rtol=0, err_msg=what), out, ref)
    for path, leaf in jax.tree_util.tree_leaves_with_path(out):
      rows = {shard.data.shape[0] for shard in leaf.addressable_shards}
      assert rows == {B // DATA}, f'{what} {jax.tree_util.keystr(path)}: {leaf.sharding}'
    return len(out)

  # Data parallel: batch over 'data', parameters replicated.
  n_data = check(apply(zoo, *args), 'data parallel')
  n_shard_map = check_shard_map(zoo, x, lengths, ref, ref_grads, variables, linen)

  # Data + model parallel: the same parameter values, placed as the cells'
  # sharding metadata says (the usual abstract-model recipe); the fused layers'
  # kernels and biases are split by hand here (their metadata arguments are
  # checked in test_fused).
  def shardings(abstract_state):
    specs = nnx.get_partition_spec(abstract_state)
    for name in ('lstm', 'gru'):
      specs[name] = jax.tree_util.tree_map(
        lambda v: P(*([None] * (v.ndim - 1)), 'model'), abstract_state[name])
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs)

  with jax.set_mesh(mesh):
    zoo = random_module(lambda: _zoo(_metadata()), sharding=shardings)
  kernel = zoo['rnn'].cell.dense_h.kernel[...]
  assert kernel.sharding.spec == P(None, 'model'), kernel.sharding
  assert zoo['lstm'].forward[0].dense_h.kernel[...].sharding.spec == P(None, 'model')
  n_model = check(apply(zoo, *args), 'model parallel')
  check_shard_rows(x, lengths)
  n_reduce = check_fused_gradients_reduce(x, lengths)
  print(f'sharding checks passed: data parallel {n_data}, model parallel {n_model}, '
        f'shard_map {n_shard_map}, fused gradients {n_reduce}')


# -- explicit sharding mode ----------------------------------------------------------
def _explicit_zoo(meta=None):
  """The sequence layers, each called with other options in :func:`_explicit_apply`;
  ``meta`` annotates every parameter but the projection's and the learned carry's
  with sharding names (:func:`_metadata`: model parallel over the hidden axis)."""
  rngs = nnx.Rngs(0, dropout=1)
  dropout = dict(dropout_rate=0.3, recurrent_dropout_rate=0.3)
  meta = meta or {}
  return nnx.Dict(
    rnn=nr.RNN(nr.LSTMCell(IN, H, rngs=rngs, **meta)),
    packed=nr.RNN(nr.GRUCell(IN, H, rngs=rngs, **meta), reverse=True, keep_order=True),
    dropout=nr.RNN(nr.OptimizedLSTMCell(IN, H, **dropout, rngs=rngs, **meta), remat=True),
    learned=nr.RNN(nr.SimpleCell(IN, H, zoneout_rate=0.3, rngs=rngs, **meta),
                   learn_initial_carry=True),
    bidirectional=nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=rngs, **meta)),
                                   nr.RNN(nr.LSTMCell(IN, H, rngs=rngs, **meta))),
    stack=nr.StackedRNN(nr.RNN(nr.LSTMCell(IN, H, **dropout, rngs=rngs, **meta)),
                        nr.RNN(nr.GRUCell(H, H, rngs=rngs, **meta)), dropout_rate=0.3,
                        rngs=rngs),
    lstm=nr.LSTM(IN, H, num_layers=2, bidirectional=True, dropout_rate=0.3,
                 implementation='xla', rngs=rngs, **meta),
    # W_hr (H, 3) replicated: h is not split over 'model' where c is
    lstm_proj=nr.LSTM(IN, H, proj_features=3, reverse=True, rngs=rngs, **meta),
    gru=nr.GRU(IN, H, num_layers=2, rngs=rngs, **meta),  # implementation='auto'
  )


def _explicit_apply(zoo, variables, x, lengths, segment_ids, h0):
  """``(carry, outputs)`` of every layer, compat.RNN's (flax.linen's) included, with
  the default carry unless said: padded, packed with a given carry and reversed,
  dropout in training mode (the modules' own streams), zoneout and a learned
  carry, both directions, a stack with dropout between layers, the fused layers
  with padding or packed sequences. Layers missing from ``zoo`` are left out."""
  calls = {name: dict(seq_lengths=lengths)
           for name in ('rnn', 'dropout', 'learned', 'bidirectional', 'stack', 'lstm', 'lstm_proj')}
  calls['packed'] = dict(segment_ids=segment_ids, initial_carry=h0)
  calls['gru'] = dict(segment_ids=segment_ids, initial_carry=(h0, None))
  out = {name: zoo[name](x, return_carry=True, **kw) for name, kw in calls.items() if name in zoo}
  out['compat'] = compat.RNN(compat.GRUCell(H)).apply(variables, x, seq_lengths=lengths,
                                                     return_carry=True)
  return out


def _explicit_program():
  """The outputs and carries of :func:`_explicit_apply`, and the gradients of the sum
  of the squared outputs with respect to every parameter, compat's variables included."""
  def run(state, graphdef, variables, x, lengths, segment_ids, h0):
    def loss(zoo, variables):
      out = _explicit_apply(zoo, variables, x, lengths, segment_ids, h0)
      return sum(jax.numpy.sum(y ** 2) for _, y in out.values()), out
    grads, out = nnx.grad(loss, argnums=(0, 1), has_aux=True)(nnx.merge(graphdef, state),
                                                               variables)
    return out, grads
  return jax.jit(run, static_argnums=1)


def _flax_nnx_lstm(cell, x, lengths):
  """flax.nnx's RNN over an ``nnx.LSTMCell`` with ``cell``'s parameters, on one
  device: ``(carry, outputs)`` and the gradient of the sum of the squared outputs,
  both zero at padding."""
  # (built abstractly: its initializers, run eagerly, compile one program per
  # parameter shape, and every parameter is overwritten by ``cell``'s)
  theirs = random_module(lambda: nnx.LSTMCell(IN, H, rngs=nnx.Rngs(0)))
  nnx.update(theirs, nnx.state(cell, nnx.Param))
  graphdef, state = nnx.split(nnx.RNN(theirs))
  valid = (np.arange(x.shape[1]) < lengths[:, None])[..., None]

  @jax.jit
  def run(state):
    def loss(rnn):
      carry, y = rnn(x, seq_lengths=lengths, return_carry=True)
      y = y * valid  # flax.nnx's outputs at padding are the cell's, ours zeros
      return jax.numpy.sum(y ** 2), (carry, y)
    return nnx.grad(loss, has_aux=True)(nnx.merge(graphdef, state))
  grads, out = run(state)
  return out, grads['cell']


def _specs(tree):
  return [jax.typeof(a).sharding.spec for a in jax.tree_util.tree_leaves(tree)]


def check_pallas_explicit(mesh, x):
  """``implementation='pallas'`` under the Explicit mesh: a ValueError saying what to
  use instead; its remedy, ``jax.shard_map`` over the batch with ``check_vma=False``,
  equals one device; and ``'auto'`` never picks the kernels there, even where they
  measured faster."""
  import re

  from nnx_recurrent._fused import _plans

  layer = random_module(lambda: nr.LSTM(IN, H, implementation='pallas', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(layer)
  # Each call under nnx.jit: one program, where the eager calls compiled one per
  # operation (the interpreted kernels' many); the layer's implementation is
  # chosen (or refused) as it is traced, as it was when called eagerly.
  call = nnx.jit(lambda layer, x: layer(x))
  want = np.asarray(call(layer, x))
  checked = 0
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, P('data'))
    try:
      call(layer, xs)
    except ValueError as e:
      assert re.search(r"LSTM: `implementation` expected 'auto' or 'xla' under a mesh of "
                       r'Explicit axes .*jax\.shard_map over the batch, with check_vma=False, '
                       r"got 'pallas'", str(e)), str(e)
      checked += 1
    else:
      raise AssertionError('pallas ran under an Explicit mesh')
    run = jax.shard_map(lambda s, x: nnx.merge(graphdef, s)(x), in_specs=(P(), P('data')),
                        out_specs=P('data'), check_vma=False)
    np.testing.assert_allclose(np.asarray(jax.jit(run)(state, xs)), want, atol=ATOL, rtol=0,
                               err_msg='pallas under shard_map')
    checked += 1
    faster, _plans.pallas_measured_faster = _plans.pallas_measured_faster, lambda *a: True
    try:
      layer.implementation = 'auto'  # the kernels would fail here (sharded refs)
      np.testing.assert_allclose(np.asarray(call(layer, xs)), want, atol=ATOL, rtol=0,
                                 err_msg="'auto' under the Explicit mesh")
      checked += 1
    finally:
      _plans.pallas_measured_faster = faster
  return checked


def _placed(mesh):
  """``random_module``'s ``sharding``: every variable placed as its metadata says."""
  return lambda abstract: jax.tree_util.tree_map(
    lambda spec: NamedSharding(mesh, spec), nnx.get_partition_spec(abstract))


def check_model_parallel_explicit(mesh, names, program, args, variables, ref_out, ref_grads,
                                  ref_state):
  """Parameters split over an Explicit ``model`` axis on their hidden (gate
  columns) axis: every layer's carry takes the step's sharding, so outputs and
  carries come out split over ``model`` too; values and gradients equal one
  device's (the same parameter values, ``ref_state``); every gradient is split
  as its parameter is. Inputs split over ``data`` where the mesh has it. The
  layers ``names`` of :func:`_explicit_zoo`, in one program."""
  rows = 'data' if 'data' in mesh.axis_names else None
  with jax.set_mesh(mesh):
    zoo = random_module(lambda: _explicit_zoo(_metadata()), sharding=_placed(mesh))
    params = nnx.state(zoo, nnx.Param)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_state),
                    strict=True):  # the same parameter values
      np.testing.assert_array_equal(np.asarray(a), b)
    assert _specs(params['rnn']['cell']['hi']['kernel']) == [P(None, 'model')]
    assert _specs(params['lstm']['forward'][1]['dense_h']['bias']) == [P('model')]
    graphdef, state = nnx.split(nnx.Dict({name: zoo[name] for name in names}))
    sharded = [jax.device_put(a, P(rows)) for a in args]
    variables = jax.device_put(variables, P())
    out, grads = program(state, graphdef, variables, *sharded)
  assert set(out) == {*names, 'compat'}, set(out)
  for name in out:
    got, want = jax.tree_util.tree_leaves(out[name]), jax.tree_util.tree_leaves(ref_out[name])
    assert len(got) == len(want) > 0, name
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0,
                                 err_msg=f'{mesh.axis_names} {name}')
    # The outputs and carries: rows as the inputs are, features over 'model'
    # (but compat's, replicated parameters, and lstm_proj's: h projected by a replicated W_hr).
    if name not in ('compat', 'lstm_proj'):
      for spec in _specs(out[name]):
        assert spec[0] == rows and spec[-1] == 'model', (name, spec)
  pairs = [(grads[0][name], ref_grads[0][name]) for name in names] + [(grads[1], ref_grads[1])]
  for got, want in pairs:
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=1e-5,
                                 err_msg=f'{mesh.axis_names} gradients')
  # Every parameter's gradient split over the mesh as the parameter is.
  for name in names:
    got = [(jax.tree_util.keystr(k), jax.typeof(g).sharding.spec)
           for k, g in jax.tree_util.tree_leaves_with_path(grads[0][name])]
    want = [(jax.tree_util.keystr(k), jax.typeof(p).sharding.spec)
            for k, p in jax.tree_util.tree_leaves_with_path(params[name])]
    assert got == want and any('model' in s for _, s in want), (name, got, want)
  return out, grads


class _RunningMean(nr.RNNCellBase):
  """A cell of yours that counts its steps and keeps a running mean of ``h`` over
  the batch and the steps, two ``nnx.BatchStat`` carried through the scan
  (flax.nnx's ``state_axes``): under an Explicit ``model`` axis each step splits
  the mean over it as ``h`` is, where it was made replicated."""

  def __init__(self, in_features, hidden_features, *, rngs, kernel_metadata=None,
               recurrent_kernel_metadata=None, bias_metadata=None):
    super().__init__(in_features, hidden_features, rngs=rngs)
    self.dense_i = nnx.Linear(in_features, hidden_features, kernel_metadata=kernel_metadata or {},
                              bias_metadata=bias_metadata or {}, rngs=rngs)
    self.dense_h = nnx.Linear(hidden_features, hidden_features, use_bias=False,
                              kernel_metadata=recurrent_kernel_metadata or {}, rngs=rngs)
    self.steps = nnx.BatchStat(jax.numpy.zeros((), jax.numpy.int32))
    self.mean = nnx.BatchStat(jax.numpy.zeros((hidden_features,)))

  def step(self, carry, inputs, recurrent_mask):
    h = jax.numpy.tanh(self.dense_i(inputs) + self.dense_h(carry))
    self.steps[...] += 1
    self.mean[...] += (h.mean(0) - self.mean[...]) / self.steps[...]
    return h, h


def _stateful_zoo(meta=None):
  """nr.RNN (with remat), Bidirectional and StackedRNN over :class:`_RunningMean`."""
  rngs, meta = nnx.Rngs(0), meta or {}
  cell = functools.partial(_RunningMean, hidden_features=H, rngs=rngs, **meta)
  return nnx.Dict(rnn=nr.RNN(cell(IN), remat=True),
                  bidirectional=nr.Bidirectional(nr.RNN(cell(IN)), nr.RNN(cell(IN))),
                  stack=nr.StackedRNN(nr.RNN(cell(IN)), nr.RNN(cell(H))))


def check_stateful_explicit(mesh, x, lengths):
  """A cell's own Variables carried through the scan, which each step splits over
  ``model`` (a running mean of ``h``) where they were made replicated: RNN,
  Bidirectional and StackedRNN reshard them on the cell before the scan (JAX's
  scan TypeError before). Outputs, carries, gradients and the Variables after
  the call (on the modules: ``nnx.jit`` hands them back) equal the same model's
  without a mesh; each mean comes back split over ``model``, the step counts
  replicated, and every gradient split as its parameter is."""
  @nnx.jit
  def run(zoo, x, lengths):
    def loss(zoo):
      out = {name: layer(x, seq_lengths=lengths, return_carry=True) for name, layer in zoo.items()}
      return sum(jax.numpy.sum(y ** 2) for _, y in out.values()), out
    return nnx.grad(loss, has_aux=True)(zoo)

  def called(zoo, x, lengths):  # (gradients, outputs and carries), the Variables after
    grads, out = run(zoo, x, lengths)
    return nnx.to_pure_dict(grads), out, nnx.to_pure_dict(nnx.state(zoo, nnx.BatchStat))

  ref = random_module(_stateful_zoo)
  want = jax.tree_util.tree_map(np.asarray, called(ref, x, lengths))
  with jax.set_mesh(mesh):
    zoo = random_module(lambda: _stateful_zoo(_metadata()), sharding=_placed(mesh))
    stats = nnx.state(zoo, nnx.BatchStat)
    assert all(s is None for spec in _specs(stats) for s in spec), _specs(stats)  # replicated
    got = called(zoo, *(jax.device_put(a, P('data')) for a in (x, lengths)))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=1e-5, err_msg='stateful')
  for path, v in jax.tree_util.tree_leaves_with_path(got[2]):  # the cells' Variables, after
    spec = tuple(jax.typeof(v).sharding.spec)
    assert spec == (('model',) if 'mean' in jax.tree_util.keystr(path) else ()), (path, spec)
  assert len(got[2]) == 3 and _specs(got[0]) == _specs(nnx.state(zoo, nnx.Param)), _specs(got[0])
  return len(zoo)


def _child_inputs():
  """The explicit-mode children's generator (for what they draw next), inputs,
  lengths (0 and 1 among them) and packed segment ids, on 8 devices."""
  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 0, 2, 4, 5], np.int32)
  segment_ids = np.array([[1, 1, 2, 2, 2], [1, 2, 3, 0, 0], [1] * 5, [0] * 5,
                          [1, 1, 1, 2, 0], [3, 3, 1, 1, 1], [1, 2, 2, 2, 2], [2, 2, 2, 2, 0]],
                         np.int32)
  return rng, x, lengths, segment_ids


def _main_explicit():
  from jax.sharding import AxisType

  rng, x, lengths, segment_ids = _child_inputs()
  h0 = rng.normal(size=(B, H)).astype(np.float32)  # a given carry, replicated
  zoo = random_module(_explicit_zoo)
  variables = random_linen_variables(_linen_rnn(), x, seed=1)
  graphdef, state = nnx.split(zoo)
  program = _explicit_program()
  args = (x, lengths, segment_ids, h0)
  # Reference: the same parameters, no mesh.
  ref_out, ref_grads = jax.tree_util.tree_map(
    np.asarray, program(state, graphdef, variables, *args))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, P('data')) for a in args]
    state, variables = jax.device_put((state, variables), P())
    out, grads = program(state, graphdef, variables, *sharded)
  for name in ref_out:
    got, want = jax.tree_util.tree_leaves(out[name]), jax.tree_util.tree_leaves(ref_out[name])
    assert len(got) == len(want) > 0, name
    for a, b in zip(got, want):
      np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0, err_msg=name)
    # Every output and carry leaf is split over the batch, one row per device.
    for spec in _specs(out[name]):
      assert spec[0] == 'data' and all(s is None for s in spec[1:]), (name, spec)
  got, want = jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)
  assert len(got) == len(want) > 40, len(got)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-4, rtol=1e-5, err_msg='gradients')
  for spec in _specs(grads):  # replicated, as the parameters are
    assert all(s is None for s in spec), spec
  # flax.nnx's RNN on one device, same parameters: nr.RNN's carry, outputs and gradients.
  # (The carry of a length-0 row is the initial one here, not in flax.nnx:
  # migrating_from_nnx.md.)
  (flax_carry, flax_y), flax_grads = _flax_nnx_lstm(zoo['rnn'].cell, x, lengths)
  rows = lengths > 0
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
    np.asarray(a)[rows], np.asarray(b)[rows], atol=ATOL, rtol=0, err_msg='flax.nnx'),
    out['rnn'], (flax_carry, flax_y))
  ours = grads[0]['rnn']['cell']
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
    np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5, err_msg='flax.nnx gradients'),
    ours, flax_grads)
  n_pallas = check_pallas_explicit(mesh, x)
  # Model parallel over the hidden axis: a (data, model) mesh, then 'model' alone.
  ref_state = jax.tree_util.tree_map(np.asarray, nnx.state(zoo, nnx.Param))
  n_model = 0
  # All layers on a (data, model) mesh; two on 'model' alone (inputs replicated).
  everything = tuple(name for name in ref_out if name != 'compat')
  for shape, axes, names in (((DATA, MODEL), ('data', 'model'), everything),
                             ((MODEL,), ('model',), ('learned', 'gru'))):
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])
    mp_out, mp_grads = check_model_parallel_explicit(mesh, names, program, args, variables,
                                                     ref_out, ref_grads, ref_state)
    n_model += len(names)
    # flax.nnx's RNN on one device (above), nr.RNN's LSTM with its parameters split.
    if 'rnn' in names:
      n_stateful = check_stateful_explicit(mesh, x, lengths)  # a cell's own Variables
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        np.asarray(a)[rows], np.asarray(b)[rows], atol=ATOL, rtol=0, err_msg='flax.nnx'),
        mp_out['rnn'], (flax_carry, flax_y))
      for a, b in zip(jax.tree_util.tree_leaves(mp_grads[0]['rnn']['cell']),
                      jax.tree_util.tree_leaves(flax_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5,
                                   err_msg='flax.nnx gradients, model parallel')
  n_shared = check_shared_leaf_explicit(x, lengths, segment_ids)
  print(f'explicit sharding checks passed: modules {len(out)}, flax.nnx 1, pallas {n_pallas}, '
        f'model parallel {n_model}, stateful {n_stateful}, shared leaves {n_shared}')


class _SharedSteps(nnx.Module):
  """A per-row ``h`` and a carry leaf shared by the rows: a step count of
  shape ``(B,)``, the batch's size by chance, that every row's ``h`` reads."""

  num_feature_axes = 1

  def __init__(self):
    self.w = nnx.Param(np.full((IN, H), 0.1, np.float32))

  def initialize_carry(self, input_shape, rngs=None):
    return jax.numpy.zeros(input_shape[:-1] + (H,)), jax.numpy.zeros((B,))

  def __call__(self, carry, x):
    h, steps = carry
    h = jax.numpy.tanh(x @ self.w[...] + h + 0.1 * steps.mean())
    return (h, steps + 1), h


class _LinenSharedSteps(nn.RNNCellBase):
  """:class:`_SharedSteps` in Linen."""

  @nn.compact
  def __call__(self, carry, x):
    h, steps = carry
    h = jax.numpy.tanh(nn.Dense(H)(x) + h + 0.1 * steps.mean())
    return (h, steps + 1), h

  def initialize_carry(self, rng, input_shape):
    return jax.numpy.zeros(input_shape[:-1] + (H,)), jax.numpy.zeros((B,))

  @property
  def num_feature_axes(self):
    return 1


def check_shared_leaf_explicit(x, lengths, segment_ids):
  """nr.RNN and compat.RNN over a cell with a carry leaf shared by the rows
  of the batch's size, with lengths and packed, on an Explicit ``data`` axis
  of 8: the values of no mesh, the leaf stepped at every step and replicated
  (not split over the batch as a row's leaf is)."""
  from jax.sharding import AxisType

  rnn = nr.RNN(_SharedSteps())
  linen = compat.RNN(_LinenSharedSteps(), return_carry=True)
  variables = random_linen_variables(linen, x, seed=2)

  @nnx.jit
  def program(rnn, x, lengths, segment_ids):
    return [rnn(x, seq_lengths=lengths, return_carry=True),
            rnn(x, segment_ids=segment_ids, return_carry=True),
            linen.apply(variables, x, seq_lengths=lengths),
            linen.apply(variables, x, segment_ids=segment_ids)]

  want = program(rnn, x, lengths, segment_ids)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    got = program(rnn, *(jax.device_put(a, P('data')) for a in (x, lengths, segment_ids)))
  for (carry, y), (carry_want, y_want) in zip(got, want, strict=True):
    for a, b in zip(jax.tree_util.tree_leaves((carry, y)),
                    jax.tree_util.tree_leaves((carry_want, y_want)), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)
    h, steps = carry
    np.testing.assert_array_equal(np.asarray(steps), np.full(B, T))
    assert tuple(jax.typeof(h).sharding.spec)[:1] == ('data',), jax.typeof(h).sharding
    assert all(s is None for s in jax.typeof(steps).sharding.spec), jax.typeof(steps).sharding
  return len(got)


# -- compat.RNN under an Explicit model axis (the child process) ------------------------
class _Sowing(_OneArrayCell):
  """A Linen cell that records each step's ``h`` (``sow``) and drops some of it,
  drawing a mask per step from the ``dropout`` stream (split over the steps)."""

  @nn.compact
  def __call__(self, h, x):
    h = jax.numpy.tanh(nn.Dense(self.features)(x) + nn.Dense(self.features, use_bias=False)(h))
    keep = jax.random.bernoulli(self.make_rng('dropout'), 0.7, h.shape,
                                out_sharding=jax.typeof(h).sharding)
    h = jax.numpy.where(keep, h / 0.7, 0.0)
    self.sow('intermediates', 'h', h)
    return h, h


class _CompatZoo(nn.Module):
  """compat.RNN over compat's LSTM and GRU cells, flax.linen's OptimizedLSTMCell
  and :class:`_Sowing`, with flax.linen.scan's options, and compat.Bidirectional;
  each layer's ``(carry, outputs)`` with the default carry."""

  @nn.compact
  def __call__(self, x, lengths, segment_ids):
    rnn = functools.partial(compat.RNN, return_carry=True)
    return dict(
      lstm=rnn(compat.LSTMCell(H))(x, seq_lengths=lengths),
      gru=rnn(compat.GRUCell(H), reverse=True, keep_order=True)(x, segment_ids=segment_ids),
      linen=rnn(nn.OptimizedLSTMCell(H))(x, seq_lengths=lengths),
      sowing=rnn(_Sowing(H), variable_axes={'intermediates': 0},
                 split_rngs={'params': False, 'dropout': True})(x, seq_lengths=lengths),
      per_step=rnn(compat.GRUCell(H), variable_axes={'params': 0}, variable_broadcast=False,
                   split_rngs={'params': True})(x),
      bidirectional=compat.Bidirectional(rnn(compat.GRUCell(H)), rnn(compat.LSTMCell(H)),
                                         return_carry=True)(x, seq_lengths=lengths))


def _every_method_of_rnn(module, method):
  """``capture_intermediates``: what every method of compat's RNN returns (its
  helpers are no methods of the module, with or without a mesh)."""
  return isinstance(module, compat.RNN)


def _main_compat_explicit():
  """compat.RNN with its Linen parameters split over an Explicit ``model`` axis
  (on their hidden axis, placed after init), inputs over ``data`` where the mesh
  has it, the default carry: outputs, carries, the intermediates (sown, and
  every RNN method's output) and the parameters' gradients equal the run without a
  mesh on the same values; outputs and carries split over ``model``, as each
  step splits them."""
  from jax.sharding import AxisType

  rng, x, lengths, segment_ids = _child_inputs()
  args = (x, lengths, segment_ids)
  params = random_linen_variables(_CompatZoo(), *args, seed=1)['params']

  @jax.jit
  def run(params, x, lengths, segment_ids):
    def loss(params):
      out, state = _CompatZoo().apply({'params': params}, x, lengths, segment_ids,
                                      rngs={'dropout': jax.random.key(2)},
                                      mutable=['intermediates'],
                                      capture_intermediates=_every_method_of_rnn)
      return sum(jax.numpy.sum(y ** 2) for _, y in out.values()), (out, state)
    return jax.grad(loss, has_aux=True)(params)

  want = jax.tree_util.tree_map(np.asarray, run(params, *args))
  recorded = jax.tree_util.tree_leaves_with_path(want[1][1])  # sown, and every method's output
  assert any("'h'" in jax.tree_util.keystr(path) for path, _ in recorded), recorded
  checked = 0
  for shape, axes in (((2, 4), ('data', 'model')), ((2,), ('model',))):
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(shape),
                         devices=jax.devices()[:int(np.prod(shape))])
    rows = 'data' if 'data' in axes else None
    with jax.set_mesh(mesh):
      split = _split_columns(params)
      got = run(split, *(jax.device_put(a, P(rows)) for a in args))
    assert _specs(got[0]) == _specs(split)  # each gradient split as its parameter is
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1]),
                    strict=True):  # outputs, carries, what was recorded
      np.testing.assert_allclose(np.asarray(a), b, atol=1e-6, rtol=0, err_msg=str(axes))
    for a, b in zip(jax.tree_util.tree_leaves(got[0]), jax.tree_util.tree_leaves(want[0]),
                    strict=True):  # gradients: sums over rows and steps, in another order
      np.testing.assert_allclose(np.asarray(a), b, atol=1e-6 * np.abs(b).max(), rtol=0,
                                 err_msg=f'{axes} gradients')
    for name, out in got[1][0].items():
      for spec in _specs(out):  # (*batch, [time,] hidden): rows as the inputs, hidden over model
        assert spec[0] == rows and spec[-1] == 'model', (axes, name, spec)
    checked += len(got[1][0])
  print(f'compat explicit checks passed: layers {checked}')


# -- sizes a mesh axis does not divide, explicit sharding mode (the child process) -----
class _FusedLinen(nn.RNNCellBase):
  """A Linen LSTM cell whose kernels stack the four gates: ``(in, 4 * features)``."""

  features: int

  @nn.compact
  def __call__(self, carry, x):
    c, h = carry
    z = nn.Dense(4 * self.features)(x) + nn.Dense(4 * self.features, use_bias=False)(h)
    i, f, g, o = jax.numpy.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jax.numpy.tanh(g)
    h = jax.nn.sigmoid(o) * jax.numpy.tanh(c)
    return (c, h), h

  def initialize_carry(self, rng, input_shape):
    zeros = jax.numpy.zeros(input_shape[:-1] + (self.features,))
    return zeros, zeros

  @property
  def num_feature_axes(self):
    return 1


def _uneven_zoo(hidden, meta, lstm=True, gru=True):
  """nr.RNN, Bidirectional and StackedRNN over cells whose kernels stack the gates
  (OptimizedLSTMCell, then GRUCell, of those asked for), and the fused layers
  asked for, 'xla' and 'auto'."""
  rngs = nnx.Rngs(0)
  kinds = [nr.OptimizedLSTMCell] * lstm + [nr.GRUCell] * gru
  first, last = (lambda n_in, kind=kind: kind(n_in, hidden, rngs=rngs, **meta)
                 for kind in (kinds[0], kinds[-1]))
  fused = {f'{name}_{implementation}': layer(IN, hidden, implementation=implementation,
                                            rngs=rngs, **meta)
           for name, layer, wanted in (('lstm', nr.LSTM, lstm), ('gru', nr.GRU, gru)) if wanted
           for implementation in ('xla', 'auto')}
  return nnx.Dict(
    rnn=nr.RNN(first(IN)),
    bidirectional=nr.Bidirectional(nr.RNN(first(IN)), nr.RNN(last(IN))),
    stack=nr.StackedRNN(nr.RNN(first(IN)), nr.RNN(last(hidden))),
    **fused,
  )


def _uneven_apply(zoo, hidden, variables, x, lengths):
  """``(carry, outputs)`` of every layer of ``zoo`` and of compat.RNN / Bidirectional
  over the Linen ``variables`` (``{'lstm': ..., 'bidirectional': ...}``)."""
  out = {name: layer(x, seq_lengths=lengths, return_carry=True) for name, layer in zoo.items()}
  out['compat'] = compat.RNN(compat.LSTMCell(hidden), return_carry=True).apply(
    variables['lstm'], x, seq_lengths=lengths)
  out['compat_bidirectional'] = _compat_pair(hidden).apply(variables['bidirectional'], x,
                                                           seq_lengths=lengths)
  return out


def _uneven_run(graphdef, hidden, state, variables, x, lengths):
  return _uneven_apply(nnx.merge(graphdef, state), hidden, variables, x, lengths)


def _compat_pair(hidden):
  return compat.Bidirectional(compat.RNN(compat.GRUCell(hidden)),
                              compat.RNN(compat.LSTMCell(hidden)), return_carry=True)


class _UserLSTMCell(nr.OptimizedLSTMCell):
  """A user's subclass (not this package's cell): the gate split is named
  only where the step's trace fails, from JAX's error."""


class _Projected(nnx.Module):
  """A tanh cell with an output projection ``(hidden, 2 * hidden)``: a parameter
  whose last axis is a multiple of the hidden size but holds no gates. Split
  over more devices than divide the hidden size, it still runs (the carry
  stays whole)."""

  num_feature_axes = 1

  def __init__(self, hidden, proj_metadata, rngs):
    init = nnx.initializers.normal(0.5)
    self.hidden_features = hidden
    self.w = nnx.Param(init(rngs.params(), (IN, hidden)))
    self.u = nnx.Param(init(rngs.params(), (hidden, hidden)))
    self.proj = nnx.Param(init(rngs.params(), (hidden, 2 * hidden)), **proj_metadata)

  def __call__(self, h, x):
    h = jnp.tanh(x @ self.w[...] + h @ self.u[...])
    return h, h @ self.proj[...]

  def initialize_carry(self, input_shape, rngs=None):
    return jnp.zeros((*input_shape[:-1], self.hidden_features))


def _main_uneven():
  """Explicit sharding mode with a hidden size a mesh axis does not divide, or a
  batch. Parameters stacking the gates on an axis the mesh splits evenly
  (4 x 6 over 4 devices) while the hidden size is not (6) are a ValueError that
  names the hidden size (JAX: a ShardingTypeError from the gates' split deep in
  the step). Runs that JAX allows equal the run without a mesh: a batch of 3
  replicated over ``data`` (JAX refuses to split it over 2 devices) with
  parameters split over ``model``; a hidden size of 6 with parameters
  replicated (JAX refuses to split a per-gate kernel's 6 columns over 4)."""
  import re

  from jax.sharding import AxisType

  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=(AxisType.Explicit,) * 2)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, IN)).astype(np.float32)
  lengths = np.array([5, 1, 3, 5, 0, 2, 4, 5], np.int32)
  refused = 0
  kernels = dict(kernel_metadata=_SHARDED, recurrent_kernel_metadata=_SHARDED)
  for model, hidden, lstm, meta in ((4, 6, True, _metadata()),
                                    (3, 4, False, kernels)):  # a GRU's 3 x 4 columns over 3
    shape, axes = ((2, 4), ('data', 'model')) if model == 4 else ((3,), ('model',))
    split_mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(shape),
                               devices=jax.devices()[:int(np.prod(shape))])
    with jax.set_mesh(split_mesh):
      zoo = random_module(functools.partial(_uneven_zoo, hidden, meta, lstm, not lstm),
                          sharding=_placed(split_mesh))
      rows = jax.device_put(x, P('data' if 'data' in axes else None))
      calls = {name: functools.partial(nnx.jit(lambda layer, x: layer(x)), layer)
               for name, layer in zoo.items()}
      if lstm:  # cells of yours whose kernels stack the gates, nnx and Linen
        user_cell = functools.partial(_UserLSTMCell, IN, hidden, **meta)
        user = random_module(lambda cell=user_cell: nr.RNN(cell(rngs=nnx.Rngs(0))),
                             sharding=_placed(split_mesh))
        calls['user_cell'] = functools.partial(nnx.jit(lambda layer, x: layer(x)), user)
        fused_linen = compat.RNN(_FusedLinen(hidden))
        linen_params = _split_columns(random_linen_variables(fused_linen, x))
        calls['compat'] = functools.partial(jax.jit(fused_linen.apply), linen_params)
      for name, call in calls.items():
        try:
          call(rows)
        except ValueError as e:
          where, arg, got = (('LSTM' if lstm else 'GRU', 'hidden_features', str(hidden))
                             if name.endswith(('_xla', '_auto')) else
                             ('RNN', 'cell', f'_FusedLinen of features {hidden}')
                             if name == 'compat' else
                             ('RNN', 'cell', rf'\w+Cell of hidden_features {hidden}'))
          pattern = (rf'{where}: `{arg}` expected a hidden size that is a multiple of {model} '
                     r'\(explicit sharding mode: a parameter of shape \(.*\) is split over '
                     rf"mesh axis 'model' \({model} devices\) on its last axis, which holds the "
                     rf'gates, {hidden} wide each: .*, got {got}\.$')
          assert re.search(pattern, str(e)), (name, str(e))
          if name in ('user_cell', 'compat'):  # refused only once the step failed:
            assert e.__cause__ is not None, name  # JAX's error, kept as the cause
          else:  # this package's: refused before the step is traced
            assert e.__cause__ is None, name
          refused += 1
        else:
          raise AssertionError(f'{name} ran with hidden {hidden} split over {model} devices')
  # What runs: 3 rows, replicated, with parameters split over 'model'; hidden 6 replicated.
  ran = 0
  for hidden, rows, meta in ((H, 3, _metadata()), (6, B, {})):
    xs, ls = x[:rows], lengths[:rows]
    variables = {'lstm': random_linen_variables(compat.RNN(compat.LSTMCell(hidden)), xs),
                 'bidirectional': random_linen_variables(_compat_pair(hidden), xs)}
    graphdef, state = nnx.split(random_module(functools.partial(_uneven_zoo, hidden, {})))
    run = jax.jit(functools.partial(_uneven_run, graphdef, hidden))
    want = jax.tree_util.tree_map(np.asarray, run(state, variables, xs, ls))
    with jax.set_mesh(mesh):
      zoo = random_module(functools.partial(_uneven_zoo, hidden, meta), sharding=_placed(mesh))
      place = _split_columns if meta else functools.partial(jax.device_put, device=P())
      split = place(variables)
      spec_rows = P('data' if rows % 2 == 0 else None)
      got = run(nnx.state(zoo), split, *(jax.device_put(a, spec_rows) for a in (xs, ls)))
    for name in want:
      for a, b in zip(jax.tree_util.tree_leaves(got[name]), jax.tree_util.tree_leaves(want[name]),
                      strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0,
                                   err_msg=f'{name}, hidden {hidden}, {rows} rows')
        spec = jax.typeof(a).sharding.spec  # rows split or not, the hidden axis as the params
        assert (spec[0], spec[-1]) == (spec_rows[0], 'model' if meta else None), (name, spec)
      ran += 1
  # A parameter of another cell whose last axis is a multiple of the hidden
  # size (6) need not hold gates: split over 4 devices, the cell runs.
  def factory(meta=None):
    return nr.RNN(_Projected(6, meta or {}, nnx.Rngs(0)), return_carry=True)
  graphdef, state = nnx.split(random_module(factory))
  run = jax.jit(lambda state, x, lengths: nnx.merge(graphdef, state)(x, seq_lengths=lengths))
  want = run(state, x, lengths)
  with jax.set_mesh(mesh):
    placed = random_module(functools.partial(factory, {'out_sharding': (None, 'model')}),
                           sharding=_placed(mesh))
    got = run(nnx.state(placed), *(jax.device_put(a, P('data')) for a in (x, lengths)))
  assert jax.typeof(nnx.state(placed)['cell']['proj'][...]).sharding.spec[-1] == 'model'
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=ATOL, rtol=0)
  ran += 1
  # A fused LSTM's projection (hidden, proj_features) holds no gates: its last axis
  # (4) split over 4 devices, which do not divide the hidden size (6), it runs.
  graphdef, state = nnx.split(random_module(
    lambda: nr.LSTM(IN, 6, proj_features=4, rngs=nnx.Rngs(0))))
  run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  want = run(state, x)
  with jax.set_mesh(mesh):
    placed = jax.tree_util.tree_map_with_path(lambda path, a: jax.device_put(
      a, P(None, 'model') if 'proj' in jax.tree_util.keystr(path) else P()), state)
    got = run(placed, jax.device_put(x, P('data')))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)
  ran += 1
  print(f'uneven explicit checks passed: refused {refused}, ran {ran}')


if __name__ == '__main__':
  # One MLIR context for many lowerings, as conftest.py gives the suite's own
  # processes (a fresh one per program and eager operation costs 6 ms each).
  from conftest import _share_mlir_contexts

  _share_mlir_contexts()
  # The checks named on the command line, in order, in this one interpreter.
  mains = {'jit': _main, 'explicit': _main_explicit, 'compat-explicit': _main_compat_explicit,
           'uneven': _main_uneven}
  for name in sys.argv[1:]:
    mains[name]()
