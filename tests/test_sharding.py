"""Every module under ``jax.jit`` on a mesh of 8 simulated CPU devices.

``--xla_force_host_platform_device_count=8`` must be set before JAX starts, so
the test runs this file as a script in a fresh interpreter. The script builds
one of every module, runs it unsharded on one device (the reference), then

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
"""

import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_recurrent as nr
from nnx_recurrent import compat
from tests.random_params import random_linen_variables, random_module

B, T, IN, H = 8, 5, 4, 8
DATA, MODEL = 4, 2
ATOL = 1e-5


def test_modules_under_jit_on_a_mesh_of_8_devices():
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = str(root) + os.pathsep + env.get('PYTHONPATH', '')
  result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert ('sharding checks passed: data parallel 11, model parallel 11, shard_map 3, '
          'fused gradients 2') in (
    result.stdout), (
    result.stdout + result.stderr)


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


if __name__ == '__main__':
  _main()
