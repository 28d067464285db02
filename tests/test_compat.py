"""nnx_recurrent.compat against flax.linen itself.

Every numerical check compares with the genuine ``flax.linen`` module of the
same name (or with an ``nnx_recurrent`` module whose parameters went through
the converter, against flax.linen's output).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import inspect
import itertools
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import meta
from flax.linen.recurrent import DenseParams

import nnx_recurrent as nr
from nnx_recurrent import compat
from tests.fresh_import import fresh_package
from tests.jaxprs import equations
from tests.random_params import random_linen_variables, random_module
from tests.reference import normal
from tests.user_cells import lora_swapped

NORMAL = nn.initializers.normal(1.0)


def _assert_same_tree(a, b):
  """Same names, shapes, dtypes and exactly the same values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_close(a, b, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _paths(tree) -> list[str]:
  """The leaves' paths in the mappings' own order (jax.tree sorts keys)."""
  if isinstance(tree, Mapping):
    return [f'{k}/{p}' for k, v in tree.items() for p in _paths(v)]
  return [''] if not isinstance(tree, tuple) else [f'{i}/{p}' for i, v in enumerate(tree)
                                                   for p in _paths(v)]


def _numpy(tree):
  """``tree`` with NumPy leaves: indexing them compiles nothing (eager jax indexing
  compiles a program per shape)."""
  return jax.tree.map(np.asarray, tree)


def _valid(y, seq_lengths):
  """Zeroes batch-major outputs ``(batch, time, ...)`` at padding positions."""
  mask = np.arange(y.shape[1])[None] < np.asarray(seq_lengths)[:, None]
  return np.where(mask.reshape(mask.shape + (1,) * (y.ndim - 2)), np.asarray(y), 0.0)


# -- the dataclass contract ---------------------------------------------------------
def _fields(cls):
  out = []
  for f in dataclasses.fields(cls):
    if f.name in ('parent', 'name'):
      continue
    d = f.default
    out.append((f.name, getattr(d, '__qualname__', d) if callable(d) else d))
  return out


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell',
                                  'SimpleCell', 'ConvLSTMCell', 'RNN', 'Bidirectional'])
def test_fields_and_defaults_are_linens(name):
  ours, theirs = _fields(getattr(compat, name)), _fields(getattr(nn, name))
  if name == 'RNN':  # `cell_size` is kept, last (to reject it clearly)
    assert ours.pop()[0] == 'cell_size'
  assert ours == theirs
  assert issubclass(getattr(compat, name), nn.Module)
  if name.endswith('Cell'):
    assert issubclass(getattr(compat, name), nn.RNNCellBase)


def test_every_public_name_of_flax_linens_recurrent_module_imports_from_compat():
  # `from flax.linen.recurrent import X` becomes `from nnx_recurrent.compat import X`;
  # DenseParams and RNNBase (flax.linen exports neither) are that module's own.
  import flax.linen.recurrent as linen_recurrent
  names = [n for n, v in vars(linen_recurrent).items()
           if not n.startswith('_') and (inspect.isclass(v) or inspect.isfunction(v))
           and v.__module__ == linen_recurrent.__name__]
  assert {'DenseParams', 'RNNBase', 'RNN'} <= set(names)
  from nnx_recurrent.compat import DenseParams, RNNBase  # noqa: F401 (as users import them)
  assert [n for n in names if not hasattr(compat, n)] == []
  assert compat.DenseParams is linen_recurrent.DenseParams
  assert compat.RNNBase is linen_recurrent.RNNBase


def test_the_typed_linen_user_file_runs_as_with_flax_linen():
  """tests/typed_linen_user.py, which `make test`'s mypy checks (flax.linen's names
  were `Any` to type checkers through compat), gives flax.linen's variables and
  outputs: the same source with `import flax.linen as nn` is the reference."""
  from tests import typed_linen_user
  source = inspect.getsource(typed_linen_user)
  swapped = source.replace('from nnx_recurrent import compat as nn', 'import flax.linen as nn')
  assert swapped != source
  reference = types.ModuleType('typed_linen_user_flax')  # dataclasses look it up
  sys.modules[reference.__name__] = reference
  try:
    exec(compile(swapped, 'typed_linen_user_flax.py', 'exec'), reference.__dict__)
  finally:
    del sys.modules[reference.__name__]
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 10, size=(2, 5)))
  lengths = jnp.array([5, 2])
  variables, out = typed_linen_user.run(tokens, lengths)
  want_variables, want = reference.run(tokens, lengths)
  assert jax.tree.structure(variables) == jax.tree.structure(want_variables)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), variables, want_variables)
  np.testing.assert_allclose(out, want, atol=1e-6, rtol=0)


def test_copies_of_compat_layers_run_as_flax_linens_do():
  # copy.deepcopy and (cloud)pickle copy a Linen module's fields; the copy of
  # cell_size's "not given" default must still read as not given.
  import copy
  import pickle

  from nnx_recurrent.compat import _rnn

  assert pickle.loads(pickle.dumps(_rnn._NEVER)) is _rnn._NEVER
  assert copy.deepcopy(compat.RNN(compat.GRUCell(4))).cell_size is _rnn._NEVER
  x = np.ones((2, 5, 3), np.float32)
  key = jax.random.key(0)
  ours = copy.deepcopy(compat.Bidirectional(compat.RNN(compat.GRUCell(4)),
                                            compat.RNN(compat.LSTMCell(4))))
  theirs = nn.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.LSTMCell(4)))
  variables = theirs.init(key, x)
  _assert_close(ours.apply(variables, x), theirs.apply(variables, x), atol=1e-6)


def test_cell_size_gives_a_clear_error():
  with pytest.raises(TypeError, match=r'RNN: `cell_size` is no longer an argument.*'
                     r'RNN\(LSTMCell\(features=\.\.\.\)\)'):
    compat.RNN(compat.LSTMCell(4), cell_size=4)
  # positional, as in the old signature; or a bad time_major; a NumPy int (a size
  # read from a config array) too
  for size in (2, 64, np.int64(64)):
    for args, kw in [((size,), {}), ((), {'time_major': size})]:
      with pytest.raises(TypeError, match=rf'RNN: `time_major` expected a bool, got '
                         rf'{re.escape(repr(size))} \(RNN\(cell, {re.escape(repr(size))}\), '
                         r'the old call with a cell size, sets time_major: `cell_size` is no '
                         r'longer an argument\); the cell holds'):
        compat.RNN(compat.LSTMCell(4), *args, **kw)
  # flax.linen's own positional fields: RNN(cell, time_major, return_carry).
  x = np.ones((5, 2, 3), np.float32)
  rnn = compat.RNN(compat.LSTMCell(4), 1, True)  # 0 and 1 are flags (no cell_size)
  (c, h), y = rnn.init_with_output(jax.random.key(0), x)[0]
  (c_ref, h_ref), y_ref = nn.RNN(nn.LSTMCell(4), True, True).init_with_output(
    jax.random.key(0), x)[0]
  _assert_close(((c, h), y), ((c_ref, h_ref), y_ref), atol=1e-6)
  assert y.shape == (5, 2, 4)  # time-major


# -- cells --------------------------------------------------------------------------
# Inputs come from NumPy (jax.random compiles per shape). Inits of the gated cells
# run eagerly, so that XLA compiles each initializer once per shape for the whole
# file (threefry compiles are the slowest part here: an LSTM's initializers inside
# a jit cost about a second to compile); the applies, which hold the scans, run in
# one jit per test, and so do the RNN inits of cells with few initializers
# (SimpleCell, a strided ConvLSTMCell, user cells): one program costs less there.
B, T, IN, H = 3, 5, 3, 4
LENGTHS = jnp.array([5, 2, 1])


@dataclasses.dataclass
class _ScaledTanh:
  """A user's activation that is a dataclass instance: it defines equality, so
  it has no hash. compat caches the NNX cell it builds per configuration and
  must build this one uncached (``_convert.build_nnx``)."""

  scale: float

  def __call__(self, x):
    return jnp.tanh(self.scale * x)


# Other nonlinearities than the defaults (every cell must use the ones it is
# given, as flax.linen's do): the LSTM cells pass them to the NNX cell, GRUCell
# and MGUCell to their update on the per-gate layers.
OTHER_FNS = {'gate_fn': nn.hard_sigmoid, 'activation_fn': nn.soft_sign}
CELLS = [
  ('LSTMCell', {}, (B, IN)),
  ('OptimizedLSTMCell', {'bias_init': NORMAL, **OTHER_FNS}, (B, IN)),
  ('GRUCell', OTHER_FNS, (B, IN)),
  ('MGUCell', {}, (B, IN)),
  ('MGUCell', {'reset_gate': False, 'dtype': jnp.bfloat16, **OTHER_FNS}, (B, IN)),
  ('SimpleCell', {'residual': True, 'activation_fn': _ScaledTanh(0.5)}, (B, IN)),
  ('SimpleCell', {'param_dtype': jnp.bfloat16, 'recurrent_kernel_init': NORMAL}, (B, IN)),
  ('ConvLSTMCell', {'kernel_size': (3, 3)}, (B, 5, 5, IN)),
  # 'SAME_LOWER' keeps the shape: flax.linen pads the hidden convolution so too
  ('ConvLSTMCell', {'kernel_size': (2,), 'use_bias': False, 'padding': 'SAME_LOWER'},
   (B, 6, IN)),
  # flax.linen pads the hidden convolution like the input one
  ('ConvLSTMCell', {'kernel_size': (3,), 'padding': 'CIRCULAR'}, (B, 6, IN)),
  ('ConvLSTMCell', {'kernel_size': (2, 3), 'padding': ((1, 0), (0, 2))}, (B, 4, 5, IN)),
  ('ConvLSTMCell', {'kernel_size': (3, 3), 'padding': 1}, (B, 5, 5, IN)),  # an int, as Conv
]


def _det_init(key, shape, dtype=jnp.float32):
  """A deterministic, non-constant initializer (NumPy: nothing to compile)."""
  n = int(np.prod(shape))
  return jnp.asarray((0.5 * np.sin(0.7 * np.arange(n) + n)).reshape(shape).astype(dtype))


# flax.linen's tabulate warns so for its own cells too (jnp.shape of a module field).
@pytest.mark.filterwarnings('ignore:shape requires ndarray:DeprecationWarning')
@pytest.mark.parametrize('name,kwargs,shape', CELLS)
def test_cell_init_and_apply_match_linen(name, kwargs, shape):
  theirs = getattr(nn, name)(features=H, carry_init=NORMAL, **kwargs)
  ours = getattr(compat, name)(features=H, carry_init=NORMAL, **kwargs)
  assert ours.num_feature_axes == theirs.num_feature_axes
  x = normal(shape)
  carry_t = theirs.initialize_carry(jax.random.key(1), x.shape)
  carry_o = ours.initialize_carry(jax.random.key(1), x.shape)
  _assert_same_tree(carry_o, carry_t)  # same carry_init keys
  v_t, v_o = theirs.init(jax.random.key(2), carry_t, x), ours.init(jax.random.key(2), carry_t, x)
  _assert_same_tree(v_o, v_t)  # same parameter names, shapes, dtypes and values
  assert _paths(v_o) == _paths(v_t)  # created in flax.linen's order (what print shows)
  intermediates = []  # their paths as created (jit's outputs have their keys sorted)

  def run(cell, v):
    # Every method's output, as flax's docs filter them: helpers a compat cell
    # calls must not be recorded (they return modules, which jit refuses).
    out = cell.apply(v, carry_t, x, capture_intermediates=lambda module, method: True,
                     mutable=['intermediates'])
    intermediates.append(_paths(out[1]))
    return out

  out_t, out_o = jax.jit(lambda v: (run(theirs, v), run(ours, v)))(v_t)
  # The outputs, and the intermediates: each Dense's (Conv's; OptimizedLSTMCell's
  # DenseParams') output under flax.linen's names, besides the cell's own.
  assert intermediates[1] == intermediates[0]
  # flax.linen's values bit for bit: GRUCell and MGUCell combine flax.linen's
  # own per-gate layer outputs (the nnx cell joins the gates' matmuls, which
  # XLA rounds differently).
  _assert_same_tree(out_o, out_t)
  assert nn.tabulate(ours, jax.random.key(2))(carry_t, x) == \
    nn.tabulate(theirs, jax.random.key(2))(carry_t, x)


def _orthogonal_in_float32(key, shape, dtype):
  """flax's orthogonal matrix, in float32, cast: flax.linen's default recurrent
  init, which fails in half precision (below)."""
  return nn.initializers.orthogonal()(key, shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize('param_dtype', [jnp.float16, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell',
                                  'SimpleCell'])
def test_cell_init_in_every_param_dtype(name, param_dtype):
  # flax.linen's orthogonal init fails in half precision (QR has none: jax 0.10's
  # NotImplementedError "Unsupported dtype", jax 0.12's TypeError "qr does not accept
  # dtype"); compat's gives flax.linen's float32 values cast. Other dtypes: flax's own.
  x = normal((B, IN))
  carry = nn.LSTMCell(H).initialize_carry(jax.random.key(1), x.shape)
  if name in ('GRUCell', 'MGUCell', 'SimpleCell'):
    carry = carry[1]
  half = jnp.dtype(param_dtype).itemsize == 2
  theirs = getattr(nn, name)(features=H, param_dtype=param_dtype,
                             **dict(recurrent_kernel_init=_orthogonal_in_float32) if half else {})
  ours = getattr(compat, name)(features=H, param_dtype=param_dtype)
  _assert_same_tree(ours.init(jax.random.key(2), carry, x),
                    theirs.init(jax.random.key(2), carry, x))
  if half:
    with pytest.raises((NotImplementedError, TypeError),
                       match='Unsupported dtype|qr does not accept dtype'):
      getattr(nn, name)(features=H, param_dtype=param_dtype).init(jax.random.key(2), carry, x)


def _patch_inner_layers(next_fun, args, kwargs, context):
  """An interceptor as LoRA patches and fake quantization are: it changes what a
  cell's inner layers return (Dense and Conv outputs; DenseParams' kernels)."""
  out = next_fun(*args, **kwargs)
  if context.method_name != '__call__':
    return out
  if isinstance(context.module, (nn.Dense, nn.Conv)):
    return 0.5 * out
  if isinstance(context.module, DenseParams):
    kernel, bias = out
    return jnp.round(kernel * 4) / 4, bias
  return out


@pytest.mark.parametrize('name,kwargs,shape', CELLS)
def test_interceptors_on_the_inner_layers_reach_the_step_as_in_linen(name, kwargs, shape):
  theirs = getattr(nn, name)(features=H, **kwargs)
  ours = getattr(compat, name)(features=H, **kwargs)
  x, xs = normal(shape), normal((B, T) + shape[1:], seed=3)
  # Over time for the first configuration of each class only: the patched step is
  # compared in every configuration (below), and the scan only calls it.
  over_time = kwargs == next(kw for n, kw, _ in CELLS if n == name)
  # flax.linen's RNN refuses the bfloat16 carry turning float32 (compat's does not)
  over_time = over_time and 'param_dtype' not in kwargs
  carry = jax.tree.map(lambda a: a + 0.3, theirs.initialize_carry(jax.random.key(1), x.shape))
  variables = theirs.init(jax.random.key(2), carry, x)

  @jax.jit
  def run():
    rnn_vars = {'params': {'cell': variables['params']}}
    lengths = jnp.array([5, 2, 0])
    with nn.intercept_methods(_patch_inner_layers):
      patched = [cell.apply(variables, carry, x) for cell in (theirs, ours)]
      rnns = [rnn.apply(rnn_vars, xs, seq_lengths=lengths)
              for rnn in (nn.RNN(theirs), compat.RNN(ours))] if over_time else None
    return theirs.apply(variables, carry, x), patched, rnns

  unpatched, (patched_t, patched_o), rnns = run()
  _assert_close(patched_o, patched_t, atol=1e-6)
  assert not np.allclose(patched_t[1], unpatched[1])  # it did patch
  if over_time:
    _assert_close(rnns[1], rnns[0], atol=1e-5)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell',
                                  'SimpleCell'])
def test_half_precision_parameters_initialise_under_an_interceptor_too(name):
  # compat initialises a bfloat16 cell where flax.linen's orthogonal init raises
  # (test_cell_init_in_every_param_dtype), with an interceptor active too: as
  # flax.linen's cell given that init in float32, cast, under the same interceptor.
  x = normal((B, IN))
  carry = nn.LSTMCell(H).initialize_carry(jax.random.key(1), x.shape)
  if name in ('GRUCell', 'MGUCell', 'SimpleCell'):
    carry = carry[1]
  theirs = getattr(nn, name)(features=H, param_dtype=jnp.bfloat16,
                             recurrent_kernel_init=_orthogonal_in_float32)
  ours = getattr(compat, name)(features=H, param_dtype=jnp.bfloat16)
  with nn.intercept_methods(_patch_inner_layers):
    (out_t, v_t), (out_o, v_o) = (cell.init_with_output(jax.random.key(2), carry, x)
                                  for cell in (theirs, ours))
  _assert_same_tree(v_o, v_t)
  _assert_same_tree(out_o, out_t)


def test_conv_lstm_strides_and_valid_padding_run_under_an_interceptor_too():
  # The input convolution strides or pads 'VALID', the hidden one keeps the
  # state's shape (stride 1, 'SAME'), with an interceptor patching both as
  # well: flax.linen's Conv layers and ConvLSTMCell formula, by hand.
  x, xs = normal((B, 7, 7, IN)), normal((B, T, 7, 7, IN), seed=3)
  for geometry, out_shape in (({'strides': (2, 2)}, (4, 4)), ({'padding': 'VALID'}, (5, 5))):
    cell = compat.ConvLSTMCell(H, kernel_size=(3, 3), **geometry)
    carry = jax.tree.map(lambda a: a + 0.3, cell.initialize_carry(jax.random.key(1), x.shape))
    assert carry[0].shape == (B, *out_shape, H)
    with nn.intercept_methods(_patch_inner_layers):
      (new_carry, y), variables = cell.init_with_output(jax.random.key(2), carry, x)
      ys = compat.RNN(cell).apply({'params': {'cell': variables['params']}}, xs)
    params = variables['params']

    def step(carry, x, params=params, geometry=geometry):
      ih = 0.5 * nn.Conv(4 * H, (3, 3), **geometry).apply({'params': params['ih']}, x)
      hh = 0.5 * nn.Conv(4 * H, (3, 3)).apply({'params': params['hh']}, carry[1])
      i, g, f, o = jnp.split(ih + hh, 4, axis=-1)
      c = nn.sigmoid(f + 1) * carry[0] + nn.sigmoid(i) * jnp.tanh(g)
      h = nn.sigmoid(o) * jnp.tanh(c)
      return (c, h), h

    _assert_close((new_carry, y), step(carry, x))
    state, expected = jax.tree.map(jnp.zeros_like, carry), []
    for t in range(T):
      state, h = step(state, xs[:, t])
      expected.append(h)
    _assert_close(ys, jnp.stack(expected, axis=1), atol=1e-5)


# -- RNN ----------------------------------------------------------------------------
def test_rnn_matches_linen_over_layouts_directions_and_unroll():
  x = normal((B, T, IN))
  # Deterministic kernels, so that the inits run in the applies' program at little
  # cost (initializers compile slowly inside a jit). RNN's inits with the default
  # initializers: test_cell_patterns_that_flax_linen_accepts (a GRUCell subclass),
  # test_rnn_multiple_batch_axes_and_conv_cell_match_linen (ConvLSTMCell).
  det = dict(kernel_init=_det_init, recurrent_kernel_init=_det_init)
  theirs, ours = nn.RNN(nn.LSTMCell(H, **det)), compat.RNN(compat.LSTMCell(H, **det))
  # Layout and direction are separate steps (_scan.prepare moves time first,
  # processing_order reverses, output_order restores the order and then the
  # layout): every direction batch-major, keep_order without reverse (which
  # changes nothing) included, and time-major with and without the reorderings.
  configs = [dict(time_major=tm, reverse=rev, keep_order=ko, seq_lengths=True)
             for tm, rev, ko in [(False, False, False), (False, False, True),
                                 (False, True, False), (False, True, True),
                                 (True, False, False), (True, True, True)]]
  configs += [dict(seq_lengths=False), dict(reverse=True, seq_lengths=False),
              dict(reverse=True, keep_order=True, time_major=True, seq_lengths=False),
              # unroll goes to nn.scan as is: one value, which does not divide T
              dict(reverse=True, keep_order=True, seq_lengths=True, unroll=2),
              # without return_carry the scan is flax.linen's own (no last valid carry)
              dict(seq_lengths=True, return_carry=False),
              dict(reverse=True, keep_order=True, seq_lengths=True, return_carry=False)]

  def run(x, lengths):
    v, v_o = theirs.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
    refs, outs = {}, []
    for cfg in configs:
      cfg = dict(cfg)
      tm, unroll = cfg.get('time_major', False), cfg.pop('unroll', 1)
      with_carry = cfg.pop('return_carry', True)
      use_sl = cfg.pop('seq_lengths')
      sl = lengths if use_sl else None
      # flax.linen's values depend neither on the layout (time_major only moves
      # the time axis) nor on unroll, and its keep_order acts with reverse only:
      # one flax.linen reference (batch-major) per distinct computation.
      rev = cfg.get('reverse', False)
      key = (rev, rev and cfg.get('keep_order', False), use_sl)
      if key not in refs:
        refs[key] = theirs.apply(v, x, seq_lengths=sl, return_carry=True, reverse=key[0],
                                 keep_order=key[1])
      xx = x.swapaxes(0, 1) if tm else x
      out = ours.clone(unroll=unroll).apply(v, xx, seq_lengths=sl, return_carry=with_carry,
                                            **cfg)
      carry, y = out if with_carry else (None, out)
      outs.append((refs[key], (carry, y.swapaxes(0, 1) if tm else y)))
    return v, v_o, outs

  v_t, v_o, outs = jax.jit(run)(x, LENGTHS)
  _assert_same_tree(v_o, v_t)
  for (c_t, y_t), (c_o, y_o) in outs:
    if c_o is not None:
      _assert_close(c_o, c_t)  # the last valid carry, by carry selection
    np.testing.assert_allclose(y_o, y_t, atol=1e-6)  # padded steps included
  # The values cannot tell unroll: it reaches the scan as flax.linen's does (traced only).
  assert _scan_unrolls(ours.clone(unroll=2), v_t, x, LENGTHS) == [2]
  assert _scan_unrolls(theirs.clone(unroll=2), v_t, x, LENGTHS) == [2]


def _scan_unrolls(module, variables, x, seq_lengths):
  """The ``unroll`` of every scan in the program of ``module.apply``."""
  jaxpr = jax.make_jaxpr(lambda v, x: module.apply(
    v, x, seq_lengths=seq_lengths, return_carry=True))(variables, x).jaxpr
  return [e.params['unroll'] for e in equations(jaxpr) if e.primitive.name == 'scan']


def test_rnn_runs_the_scan_with_the_unroll_flax_linen_gives_it():
  """The values of every unroll are the same, so the program says it: the time
  loop of compat.RNN(unroll=u) is a scan of unroll u, as flax.linen's."""
  x = jnp.ones((B, T, IN))
  v = jax.eval_shape(lambda: nn.RNN(nn.GRUCell(H)).init(jax.random.key(0), x))  # traced only

  def unrolls(rnn):
    jaxpr = jax.make_jaxpr(lambda v: rnn.apply(v, x))(v).jaxpr
    return [e.params['unroll'] for e in equations(jaxpr) if e.primitive.name == 'scan']

  assert unrolls(compat.RNN(compat.GRUCell(H), unroll=2)) == [2]
  assert unrolls(nn.RNN(nn.GRUCell(H), unroll=2)) == [2]
  # A NumPy bool is the bool it holds, as in nr.RNN (flax.linen passes np.True_ on
  # and jax's scan reads it as the int 1; no number changes).
  assert unrolls(compat.RNN(compat.GRUCell(H), unroll=np.bool_(True))) == [T]


@pytest.mark.parametrize('name', ['GRUCell', 'MGUCell'])
def test_gru_and_mgu_rnns_train_on_linens_values_bit_for_bit(name):
  """The nnx cells join the gates' matmuls, which XLA rounds unlike flax.linen's
  per-gate ``Dense`` layers (outputs off by up to 2e-7 and gradients by 4e-6
  at hidden size 16 on a CPU): compat's cells step on flax.linen's own layer
  outputs, so a training step's loss and gradients are flax.linen's exactly."""
  x = normal((B, T, IN))
  theirs, ours = nn.RNN(getattr(nn, name)(16)), compat.RNN(getattr(compat, name)(16))
  variables = theirs.init(jax.random.key(1), x)

  def loss(module, v, x):
    return jnp.sum(module.apply(v, x, seq_lengths=LENGTHS) ** 2)

  both = jax.jit(lambda v, x: [jax.value_and_grad(functools.partial(loss, m), (0, 1))(v, x)
                               for m in (ours, theirs)])
  got, want = both(variables, x)
  _assert_same_tree(got, want)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell',
                                  'SimpleCell'])
def test_gradients_through_the_returned_carry_and_the_outputs_are_linens_bit_for_bit(name):
  """With ``seq_lengths`` and ``return_carry`` flax.linen gathers the last valid
  carry from every step's, compat selects it step by step. At a row's last
  valid step the backward pass sums three cotangents of the step's new carry
  (the next step's, the returned carry's and the output's), and in another
  order the sum rounds apart: with both the carry and the outputs feeding the
  loss through further layers, gradients were 4e-8 to 2.4e-7 off (a helper's
  persona probe, session 61). The carry alone or the outputs alone: equal."""
  x = normal((B, T, IN))

  def make(ns):
    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        carry, y = ns.RNN(getattr(ns, name)(H), return_carry=True)(x, seq_lengths=LENGTHS)
        return sum(jnp.sum(jnp.sin(nn.Dense(2)(leaf))) for leaf in (y, *jax.tree.leaves(carry)))

    return Model()

  theirs, ours = make(nn), make(compat)
  variables = theirs.init(jax.random.key(1), x)
  both = jax.jit(lambda v, x: [jax.value_and_grad(m.apply, (0, 1))(v, x) for m in (ours, theirs)])
  got, want = both(variables, x)
  _assert_same_tree(got, want)


def test_mgu_second_order_is_linens_bit_for_bit():
  # flax.linen's MGUCell writes ``hn * f``; ``f * hn`` has the same values and
  # gradients, but a Hessian sums the product rule's terms in the operands' order
  # (1.2e-7 apart over three steps: a helper's probe, session 61).
  x = normal((B, 3, IN))
  theirs, ours = nn.RNN(nn.MGUCell(H)), compat.RNN(compat.MGUCell(H))
  variables = theirs.init(jax.random.key(1), x)

  def loss(module, kernel):
    cell = variables['params']['cell']
    params = {**cell, 'in': {**cell['in'], 'kernel': kernel}}
    return jnp.sum(jnp.sin(module.apply({'params': {'cell': params}}, x)))

  # Eager: under the suite's XLA flags the jitted Hessians agree either way.
  kernel = variables['params']['cell']['in']['kernel']
  got, want = [jax.hessian(functools.partial(loss, m))(kernel) for m in (ours, theirs)]
  np.testing.assert_array_equal(got, want)


@pytest.mark.filterwarnings('ignore:shape requires ndarray:DeprecationWarning')  # as above
@pytest.mark.parametrize('name', ['SimpleCell', 'GRUCell', 'MGUCell'])
def test_rnn_tabulate_and_every_methods_intermediates_match_linen(name):
  # Both see the scan body (flax.linen's scan_fn(cell, carry, x)) and every
  # method the cell runs; a compat cell's helpers are none of them.
  x = normal((B, T, IN))
  det = dict(kernel_init=_det_init, recurrent_kernel_init=_det_init)
  tables, outs, flops = [], [], []
  for lib in (nn, compat):
    rnn = lib.RNN(getattr(lib, name)(H, **det), variable_axes={'intermediates': 0})
    v = rnn.init(jax.random.key(1), x)
    for kwargs in ({}, {'seq_lengths': LENGTHS}):
      tables.append(rnn.tabulate(jax.random.key(1), x, show_repeated=True, **kwargs,
                                 console_kwargs={'width': 200, 'force_terminal': False}))
      apply = functools.partial(rnn.apply, capture_intermediates=lambda module, method: True,
                                mutable=['intermediates'], **kwargs)
      outs.append(jax.jit(apply)(v, x))
    # The FLOP columns too, backward included, where the programs are flax.linen's
    # (with lengths ours select the last valid carry instead of flax.linen's).
    # (flax.linen's FLOP counts fail under variable_axes, for its own cells too.)
    flops.append(lib.RNN(getattr(lib, name)(H, **det)).tabulate(
      jax.random.key(1), x, compute_flops=True, compute_vjp_flops=True,
      console_kwargs={'width': 200, 'force_terminal': False}))
  assert tables[2:] == tables[:2]
  assert flops[1] == flops[0] and 'vjp_flops' in flops[0]
  assert f'{name} (scan_fn)' in tables[0]
  for ours, theirs in zip(outs[2:], outs[:2]):
    # (outputs, {'intermediates': {'cell': {'__call__', 'scan_fn', the Dense layers}}})
    _assert_same_tree(ours, theirs)


def test_rnn_multiple_batch_axes_and_conv_cell_match_linen():
  x = normal((2, B, T, 6, IN))  # (b1, b2, time, width, ch)
  lengths = np.array([[5, 3, 0], [1, 2, 4]])
  theirs = nn.RNN(nn.ConvLSTMCell(H, kernel_size=(3,)), return_carry=True)
  ours = compat.RNN(compat.ConvLSTMCell(H, kernel_size=(3,)), return_carry=True)
  v_t, v_o = theirs.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
  _assert_same_tree(v_o, v_t)

  def run(v):
    # flax.linen's seq_lengths carry gather handles one batch axis only: compare ours
    # with seq_lengths against flax.linen on each row cut to its length.
    rows = [theirs.apply(v, x[i, j, None, :lengths[i, j]])
            for i, j in np.ndindex(2, B) if lengths[i, j]]
    return (ours.apply(v, x, reverse=True), theirs.apply(v, x, reverse=True),
            ours.apply(v, x, seq_lengths=jnp.asarray(lengths)), rows)

  (c_o, y_o), (c_t, y_t), (c_m, y_m), rows = _numpy(jax.jit(run)(v_t))
  _assert_close(c_o, c_t)
  _assert_close(y_o, y_t)
  for (i, j), (c_ref, y_ref) in zip([ij for ij in np.ndindex(2, B) if lengths[ij]], rows):
    n = int(lengths[i, j])
    np.testing.assert_allclose(y_m[i, j, :n], y_ref[0], atol=1e-6)
    _assert_close(jax.tree.map(lambda c, i=i, j=j: c[i, j], c_m),
                  jax.tree.map(lambda c: c[0], c_ref))


class _CountingCell(nn.RNNCellBase):
  """A user cell with a carried collection, a dropout RNG and its own params."""

  features: int

  @nn.compact
  def __call__(self, carry, x):
    count = self.variable('counter', 'n', lambda: jnp.zeros((), jnp.int32))
    count.value += 1
    h = nn.tanh(nn.Dense(self.features)(x) + carry)
    h = nn.Dropout(0.5, deterministic=False)(h)
    return h, h * count.value

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return jnp.zeros((*input_shape[:-1], self.features))

  @property
  def num_feature_axes(self):
    return 1


def test_rnn_per_step_params_match_linen():
  x = normal((B, T, IN))
  options = dict(variable_axes={'params': 0}, variable_broadcast=False,
                 split_rngs={'params': True})
  theirs = nn.RNN(nn.SimpleCell(H, kernel_init=_det_init), **options)
  ours = compat.RNN(compat.SimpleCell(H, kernel_init=_det_init), **options)

  @jax.jit
  def run():
    v_t, v_o = theirs.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
    return v_t, v_o, theirs.apply(v_t, x), ours.apply(v_t, x)

  v_t, v_o, out_t, out_o = run()
  _assert_same_tree(v_o, v_t)  # per-step recurrent kernels from split keys
  assert v_o['params']['cell']['h']['kernel'].shape == (T, H, H)
  _assert_close(out_o, out_t)


def test_rnn_variable_carry_and_split_rngs_match_linen():
  x = normal((B, T, IN))

  def run():
    # A carried collection must exist before the scan: build the variables by hand.
    cell_vars = _CountingCell(H).init({'params': jax.random.key(1),
                                       'dropout': jax.random.key(2)}, jnp.zeros((B, H)), x[:, 0])
    v = {'params': {'cell': cell_vars['params']}, 'counter': {'cell': {'n': 0}}}
    kw = {'rngs': {'dropout': jax.random.key(3)}, 'mutable': ['counter']}
    outs = []
    for split in (True, False):
      options = dict(variable_carry='counter', split_rngs={'params': False, 'dropout': split})
      for ns in (nn, compat):
        outs.append(ns.RNN(_CountingCell(H), **options).apply(v, x, **kw))
    return outs

  (t_split, o_split, t_same, o_same) = jax.jit(run)()
  for ours, theirs in ((o_split, t_split), (o_same, t_same)):
    assert int(ours[1]['counter']['cell']['n']) == T
    _assert_close(ours, theirs)
  zero_t = np.asarray(o_same[0] == 0)  # one dropout mask for every step
  assert (zero_t == zero_t[:, :1]).all() and not (np.asarray(o_split[0] == 0) == zero_t).all()


def _noisy_cell(base):
  """A user cell in flax's examples' style: no initialize_carry, a per-step RNG
  (``make_rng``), a carried collection and its own parameters."""

  class NoisyCell(base):
    features: int

    @nn.compact
    def __call__(self, carry, x):
      total = self.variable('stats', 'total', lambda: jnp.zeros((), jnp.float32))
      total.value += jnp.sum(x)
      noise = jax.random.normal(self.make_rng('noise'), carry.shape)
      h = nn.tanh(nn.Dense(self.features)(x) + carry + 0.1 * noise)
      return h, h

    @property
    def num_feature_axes(self):
      return 1

  return NoisyCell


def _shared_counter_cell(nn):
  """A cell carrying a step counter shared by every row (shape ``()``)."""

  class SharedCounterCell(nn.RNNCellBase):
    @nn.compact
    def __call__(self, carry, x):
      h, t = carry
      h = nn.tanh(nn.Dense(5)(jnp.concatenate([x, h], -1))) + 0.1 * t
      return (h, t + 1), h

    def initialize_carry(self, rng, input_shape):
      return jnp.zeros(input_shape[:-1] + (5,)), jnp.zeros((), jnp.int32)

    @property
    def num_feature_axes(self):
      return 1

  return nn.RNN(SharedCounterCell())


def test_a_carry_leaf_shared_by_the_rows_runs_with_seq_lengths_as_linen():
  """flax.linen masks nothing inside its scan: a carry leaf without the batch
  axes goes on through every step (the last-valid carry selection failed on it
  with a scan carry-type error)."""
  x, seq_lengths = normal((3, 6, 4)), jnp.array([6, 4, 0])
  v = random_linen_variables(_shared_counter_cell(nn), x)
  y_t = _shared_counter_cell(nn).apply(v, x, seq_lengths=seq_lengths)
  y, ((h, t), _) = jax.jit(lambda v: (
    _shared_counter_cell(compat).apply(v, x, seq_lengths=seq_lengths),
    _shared_counter_cell(compat).clone(return_carry=True).apply(v, x, seq_lengths=seq_lengths)))(v)
  _assert_close(y, y_t)  # padding included, as flax.linen's
  assert t.shape == () and int(t) == 6
  _assert_close(h[:2], np.asarray(y_t)[[0, 1], [5, 3]])


class _SharedStepsCell(nn.RNNCellBase):
  """A per-row ``h`` and a carry leaf shared by the rows, ``steps``, of shape
  ``(shared,)``: a per-feature step count that every row's ``h`` reads. Its
  size may be the batch's by chance."""

  shared: int

  @nn.compact
  def __call__(self, carry, x):
    h, steps = carry
    steps = steps + 1
    h = nn.tanh(nn.Dense(5)(jnp.concatenate([x, h], -1)) + 0.1 * steps.mean())
    return (h, steps), h

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape[:-1] + (5,)), jnp.zeros((self.shared,))

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.parametrize('shared', [3, 4])
def test_a_shared_carry_leaf_of_the_batchs_size_steps_through_padding_as_linen(shared):
  """Of the batch's size (3), the leaf was taken for one per row and each of its
  entries frozen at that row's padding in the last valid carry (flax.linen's
  gather takes entry i at row i's last step); the cell's ``initialize_carry``,
  traced at two batch sizes, tells it apart. (4: told apart by its shape.)"""
  x, seq_lengths = normal((3, 6, 4)), jnp.array([6, 4, 0])
  v = random_linen_variables(nn.RNN(_SharedStepsCell(shared)), x)
  y_t = nn.RNN(_SharedStepsCell(shared)).apply(v, x, seq_lengths=seq_lengths)
  seg = jnp.array([[1, 1, 2, 2, 2, 2], [1, 2, 2, 0, 0, 0], [0] * 6])
  ours = compat.RNN(_SharedStepsCell(shared), return_carry=True)
  ((h, steps), y), ((_, steps_packed), _) = jax.jit(lambda v: (
    ours.apply(v, x, seq_lengths=seq_lengths), ours.apply(v, x, segment_ids=seg)))(v)
  _assert_close(y, y_t)  # padding included, as flax.linen's
  np.testing.assert_array_equal(steps, np.full(shared, 6))
  _assert_close(h[:2], np.asarray(y_t)[[0, 1], [5, 3]])
  np.testing.assert_array_equal(steps_packed, np.full(shared, 6))  # never reset, never frozen


class _FixedBatchCell(nn.RNNCellBase):
  """A carry built at a batch size fixed in the cell (``initialize_carry``
  ignores the batch it is given): its step runs at that size only."""

  batch: int

  @nn.compact
  def __call__(self, h, x):
    h = nn.tanh(nn.Dense(5)(jnp.concatenate([x, h], -1)))
    return h, h

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros((self.batch, 5))

  @property
  def num_feature_axes(self):
    return 1


def test_a_carry_of_a_batch_size_fixed_in_the_cell_is_the_rows_as_linen():
  """Its ``initialize_carry`` does not grow with the batch, as a shared leaf's
  does not: it was taken for one, and the last valid carry went on through
  each row's padding. The step fails at a larger batch: the rows' carry."""
  x, seq_lengths = normal((3, 6, 4)), jnp.array([6, 4, 0])
  v = random_linen_variables(nn.RNN(_FixedBatchCell(3)), x)
  theirs, ours = (lib.RNN(_FixedBatchCell(3), return_carry=True) for lib in (nn, compat))
  (c_t, y_t), (c_o, y_o) = jax.jit(lambda v: (theirs.apply(v, x, seq_lengths=seq_lengths),
                                              ours.apply(v, x, seq_lengths=seq_lengths)))(v)
  _assert_close(y_o, y_t)
  _assert_close(c_o[:2], np.asarray(y_t)[[0, 1], [5, 3]])
  _assert_close(c_o[:2], c_t[:2])  # (flax.linen's length-0 row gathers index -1)


class _EmittedStepsCell(_SharedStepsCell):
  """:class:`_SharedStepsCell` that also outputs its shared ``steps``."""

  @nn.compact
  def __call__(self, carry, x):
    (h, steps), y = super().__call__(carry, x)
    return (h, steps), (y, steps)


class _TokenCell(nn.RNNCellBase):
  """Token ids in (integer inputs, exactly two batch axes, as its einsum
  reads them); out a per-row ``h`` and a parameter of the batch's shape
  ``(2, 3)``, shared by the rows (a per-position bias). Its carry, ``h``
  alone, has no shared leaf."""

  @nn.compact
  def __call__(self, h, x):
    e = nn.Embed(7, 5)(x[..., 0])
    h = jnp.tanh(jnp.einsum('abe,ef->abf', e, self.param('w', NORMAL, (5, 5))) + h)
    return h, (h, self.param('bias', NORMAL, (2, 3)))

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape[:-1] + (5,))

  @property
  def num_feature_axes(self):
    return 1


def test_a_shared_output_of_the_batchs_size_is_not_zeroed_in_packed_rows():
  """Packed sequences zero the rows' outputs at padding; a shared output leaf
  of the batch's size (3) was zeroed as if per row: the probe of one step
  tells it apart, as nr.RNN's does: a probe of the cell's own inputs' dtype
  and feature axes, whatever its carry (the token cell's has no shared leaf)."""
  x = normal((3, 6, 4))
  seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 0, 0, 0], [0] * 6])
  layer = compat.RNN(_EmittedStepsCell(3))
  v = random_linen_variables(layer, x)
  tokens = np.random.default_rng(0).integers(0, 7, (2, 3, 6, 1))
  lengths = np.array([[6, 4, 0], [1, 5, 3]])
  tok_seg = (np.arange(6) < lengths[..., None]).astype(np.int32)  # one segment a row
  v_tok = random_linen_variables(nn.RNN(_TokenCell()), tokens)
  (y, steps), (y_tok, bias), (y_ref, bias_ref) = _numpy(jax.jit(lambda v, v_tok: (
    layer.apply(v, x, segment_ids=seg), compat.RNN(_TokenCell()).apply(
      v_tok, tokens, segment_ids=tok_seg), nn.RNN(_TokenCell()).apply(v_tok, tokens)))(v, v_tok))
  np.testing.assert_array_equal(steps, np.broadcast_to(np.arange(1, 7), (3, 6)))  # (3, T)
  assert not y[np.asarray(seg) == 0].any()  # the rows' outputs: zeros
  assert y[np.asarray(seg) != 0].all()
  # flax.linen's (it masks nothing): the shared leaf at every step, the rows' valid steps
  _assert_same_tree(bias, bias_ref)
  np.testing.assert_allclose(y_tok[tok_seg == 1], y_ref[tok_seg == 1], atol=1e-6)
  assert not y_tok[tok_seg == 0].any()


@pytest.mark.parametrize('time_major', [False, True])
@pytest.mark.parametrize('return_carry', [False, True])
def test_a_shared_output_of_the_batchs_size_is_reordered_by_shape_as_linen(time_major,
                                                                          return_carry):
  """reverse=True, keep_order=True with per-row lengths: a shared output leaf
  (``steps``, ``(3,)`` for a batch of 3) has no one input order; flax.linen's
  ``flip_sequences`` reorders it by its shape, entry ``i`` by row ``i``'s
  length, and compat gives its values and gradients (nr.RNN raises instead).
  Of another size, flax.linen fails in a broadcast; compat's ValueError names
  the cell."""
  x, seq_lengths = normal((3, 6, 4)), jnp.array([6, 3, 1])
  x = x.swapaxes(0, 1) if time_major else x
  options = dict(reverse=True, keep_order=True, return_carry=return_carry,
                 time_major=time_major)
  theirs, ours = (lib.RNN(_EmittedStepsCell(3), **options) for lib in (nn, compat))
  v = random_linen_variables(theirs, x, seq_lengths=seq_lengths)

  def outputs(layer, v):
    out = layer.apply(v, x, seq_lengths=seq_lengths)
    return out[1] if return_carry else out  # the carry of a shared leaf differs (above)

  def loss(layer, v):
    y, steps = outputs(layer, v)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.sin(steps))

  (y_t, steps_t), (y_o, steps_o), g_t, g_o = jax.jit(lambda v: (
    outputs(theirs, v), outputs(ours, v), jax.grad(functools.partial(loss, theirs))(v),
    jax.grad(functools.partial(loss, ours))(v)))(v)
  _assert_same_tree((y_o, steps_o), (y_t, steps_t))
  assert steps_o.shape == ((6, 3) if time_major else (3, 6))
  # entry i of the step count put back in row i's order: not one order for all
  by_entry = np.asarray(steps_o if time_major else steps_o.T)  # (time, 3)
  np.testing.assert_array_equal(by_entry[:, 1], [3, 2, 1, 6, 5, 4])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_o, g_t)
  ours_4 = compat.RNN(_EmittedStepsCell(4), **options)
  with pytest.raises(ValueError, match=r'RNN: `cell` expected per-step outputs that lead '
                     r'with the batch axes \(3,\).*per-step shape \(4,\)'):
    ours_4.apply(random_linen_variables(ours_4, x), x, seq_lengths=seq_lengths)
  with pytest.raises(ValueError):  # flax.linen: "Incompatible shapes for broadcasting"
    nn.RNN(_EmittedStepsCell(4), **options).apply(
      random_linen_variables(ours_4, x), x, seq_lengths=seq_lengths)


# Two modes, with every option and (the linen base) with none: the other directions
# and layouts are the cell-agnostic scan's (each of them:
# test_rnn_matches_linen_over_layouts_directions_and_unroll). compat.RNNCellBase is
# flax.linen's, subclassed with nothing added: the first mode only.
@pytest.mark.parametrize('base', ['linen', 'compat'])
def test_user_cell_without_initialize_carry_matches_linen(base):
  cell_type = _noisy_cell(nn.RNNCellBase if base == 'linen' else compat.RNNCellBase)
  x, h0 = normal((B, T, IN)), normal((B, H), seed=5)
  options = dict(variable_broadcast='params', variable_carry='stats',
                 split_rngs={'params': False, 'noise': True})
  theirs, ours = nn.RNN(cell_type(H), **options), compat.RNN(cell_type(H), **options)
  rngs = {'params': jax.random.key(1), 'noise': jax.random.key(2)}
  modes = [dict(seq_lengths=LENGTHS, reverse=True, keep_order=True, time_major=True)]
  if base == 'linen':
    modes.append(dict())

  def run():
    cell_vars = cell_type(H).init(rngs, h0, x[:, 0])
    v = {'params': {'cell': cell_vars['params']}, 'stats': {'cell': {'total': 0.0}}}
    outs = [v]
    for m in modes:
      xx = x.swapaxes(0, 1) if m.get('time_major') else x
      for layer in (theirs, ours):
        outs.append(layer.apply(v, xx, initial_carry=h0, return_carry=True,
                                rngs={'noise': jax.random.key(3)}, mutable=['stats'], **m))
    return outs

  variables, *outs = jax.jit(run)()
  for k in range(len(modes)):
    ((c_t, y_t), v_t), ((c_o, y_o), v_o) = outs[2 * k], outs[2 * k + 1]
    np.testing.assert_allclose(y_o, y_t, atol=1e-6)
    np.testing.assert_allclose(c_o, c_t, atol=1e-6)
    np.testing.assert_allclose(v_o['stats']['cell']['total'], v_t['stats']['cell']['total'],
                               rtol=1e-6)
  with pytest.raises(NotImplementedError):  # no initial_carry: initialize_carry is needed
    ours.apply(variables, x, rngs={'noise': jax.random.key(3)}, mutable=['stats'])


def test_padding_values_are_linens_and_length_zero_keeps_the_initial_carry():
  """flax.linen's outputs at padding; the one difference: a length-0 row's carry.
  A length past the time axis acts as the time axis, in both."""
  x = normal((B, T, IN))
  lengths = jnp.array([T + 4, 0, 2])
  theirs = nn.RNN(nn.GRUCell(H, carry_init=NORMAL), return_carry=True)
  ours = compat.RNN(compat.GRUCell(H, carry_init=NORMAL), return_carry=True)
  v = random_linen_variables(theirs, x)
  (c_t, y_t), (c_o, y_o), (c_full, _) = _numpy(jax.jit(lambda v: (
    theirs.apply(v, x, seq_lengths=lengths), ours.apply(v, x, seq_lengths=lengths),
    theirs.apply(v, x)))(v))
  h0 = compat.GRUCell(H, carry_init=NORMAL).initialize_carry(jax.random.key(0), (B, IN))
  pad = ~(np.arange(T)[None] < np.asarray(lengths)[:, None])
  assert np.all(np.abs(y_o[pad]) > 0)  # the cell's values, as flax.linen's
  np.testing.assert_allclose(y_o, y_t, atol=1e-6)
  np.testing.assert_array_equal(c_o[1], h0[1])  # ours: the initial carry
  np.testing.assert_allclose(c_t[1], c_full[1], atol=1e-6)  # flax.linen: after step -1
  np.testing.assert_allclose(np.asarray(c_o)[::2], np.asarray(c_t)[::2], atol=1e-6)


def test_a_length_past_the_time_axis_keeps_the_gradient_through_its_carry():
  """flax.linen gathers such a row's carry at an index out of bounds, whose
  gradient is dropped: the reference is flax.linen with the lengths cut to the
  time axis, which gives the same values."""
  x = normal((B, T, IN))
  lengths = jnp.array([T + 4, T, 2])
  theirs, ours = nn.RNN(nn.GRUCell(H), return_carry=True), compat.RNN(compat.GRUCell(H),
                                                                      return_carry=True)
  v = random_linen_variables(theirs, x)

  def grad(module, lengths):
    return jax.grad(lambda v, x: module.apply(v, x, seq_lengths=lengths)[0].sum(),
                    argnums=(0, 1))(v, x)

  # The three gradients in one program; the lengths closed over (concrete, as given eagerly).
  (gv_t, dx_t), (gv_o, dx_o), dx_lost = jax.jit(lambda: (
    grad(theirs, jnp.minimum(lengths, T)), grad(ours, lengths), grad(theirs, lengths)[1]))()
  assert not np.allclose(dx_lost[0], dx_t[0])  # flax.linen's loss
  np.testing.assert_allclose(dx_o, dx_t, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), gv_o, gv_t)


# The step that runs on at padding is cell-agnostic: one cell per kind of carry here,
# an array (MGUCell) and a tuple with feature axes of its own (ConvLSTMCell; LSTMCell,
# GRUCell and SimpleCell in every mode: the tests above and below; OptimizedLSTMCell
# over time: the interceptor test and test_to_nnx_and_from_nnx_rnn_and_bidirectional).
@pytest.mark.parametrize('cell', ['MGUCell', 'ConvLSTMCell'])
def test_padding_values_match_linen_with_several_batch_axes(cell):
  """Two batch axes, every direction mode: flax.linen's values on the flattened batch."""
  conv = cell == 'ConvLSTMCell'
  features = (6, IN) if conv else (IN,)  # a 1-D signal of width 6 for the conv cell
  x = normal((2, B, T, *features))
  lengths = jnp.array([[5, 3, 0], [1, 2, 4]])
  kw = dict(kernel_size=(3,)) if conv else {}
  theirs = nn.RNN(getattr(nn, cell)(H, **kw), return_carry=True)
  ours = compat.RNN(getattr(compat, cell)(H, **kw), return_carry=True)
  v = random_linen_variables(theirs, x[0])
  modes = [dict(), dict(reverse=True), dict(reverse=True, keep_order=True)]

  def run(v):
    flat_x, flat_l = x.reshape(2 * B, T, *features), lengths.reshape(-1)
    return [(ours.apply(v, x, seq_lengths=lengths, **m),
             theirs.apply(v, flat_x, seq_lengths=flat_l, **m)) for m in modes]

  keep = np.asarray(lengths).reshape(-1) > 0  # flax.linen indexes step -1 at length 0
  for (c_o, y_o), (c_t, y_t) in _numpy(jax.jit(run)(v)):
    np.testing.assert_allclose(y_o.reshape(y_t.shape), y_t, atol=1e-6)
    flat = jax.tree.map(lambda c: c.reshape((2 * B,) + c.shape[2:]), c_o)
    _assert_close(jax.tree.map(lambda c: c[keep], flat), jax.tree.map(lambda c: c[keep], c_t))


def test_conv_lstm_strides_work_where_linen_fails():
  """Deliberate difference: the hidden convolution keeps stride 1 and 'SAME'."""
  x = normal((B, 8, IN))
  ours = compat.ConvLSTMCell(H, kernel_size=(3,), strides=(2,), carry_init=NORMAL)

  @jax.jit
  def run():
    carry = ours.initialize_carry(jax.random.key(1), x.shape)
    v = ours.init(jax.random.key(2), carry, x)
    ((c, _), y), state = ours.apply(v, carry, x, capture_intermediates=True,
                                    mutable=['intermediates'])
    # Reference from flax.linen's Conv and the cell's formula.
    p = v['params']
    hh = nn.Conv(4 * H, (3,)).apply({'params': p['hh']}, carry[1])
    gates = nn.Conv(4 * H, (3,), strides=(2,)).apply({'params': p['ih']}, x) + hh
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    c_ref = jax.nn.sigmoid(f + 1) * carry[0] + jax.nn.sigmoid(i) * jnp.tanh(g)
    # capture_intermediates shows the hidden convolution the step runs (stride 1)
    return carry, (c, y, state['intermediates']['hh']['__call__'][0]), (
      c_ref, jax.nn.sigmoid(o) * jnp.tanh(c_ref), hh)

  carry, got, want = run()
  assert jax.tree.map(jnp.shape, carry) == ((B, 4, H), (B, 4, H))
  _assert_close(got, want)
  theirs = nn.ConvLSTMCell(H, kernel_size=(3,), strides=(2,))
  with pytest.raises((TypeError, ValueError)):  # flax.linen's carry has the input's width
    jax.eval_shape(lambda: theirs.init(
      jax.random.key(2), theirs.initialize_carry(jax.random.key(1), x.shape), x))


def test_rnn_segment_ids_extension_matches_linen_per_segment():
  x = normal((1, 6, IN))
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 0]])
  theirs, ours = nn.RNN(nn.SimpleCell(H)), compat.RNN(compat.SimpleCell(H))
  v = random_linen_variables(theirs, x)
  # Bidirectional passes segment_ids on to both RNNs.
  bi_t, bi_o = (ns.Bidirectional(ns.RNN(ns.SimpleCell(H)), ns.RNN(ns.SimpleCell(H)))
                for ns in (nn, compat))
  v_bi = {'params': {'forward_rnn': v['params'],
                     'backward_rnn': random_linen_variables(theirs, x, seed=1)['params']}}

  def run(segment_ids):
    out = []
    for reverse in (False, True):
      kw = dict(reverse=reverse, keep_order=True)
      out.append((ours.apply(v, x, segment_ids=segment_ids, **kw),
                  [theirs.apply(v, x[:, lo:hi], **kw) for lo, hi in ((0, 3), (3, 5))]))
    out.append((bi_o.apply(v_bi, x, segment_ids=segment_ids),
                [bi_t.apply(v_bi, x[:, lo:hi]) for lo, hi in ((0, 3), (3, 5))]))
    return out

  for y, refs in _numpy(jax.jit(run)(segment_ids)):
    np.testing.assert_allclose(y[:, 0:3], refs[0], atol=1e-6)
    np.testing.assert_allclose(y[:, 3:5], refs[1], atol=1e-6)
    assert float(np.abs(y[:, 5]).max()) == 0.0


def test_rnn_segment_ids_initial_carry_starts_each_rows_first_segment_only():
  # As nr.RNN: the first segment of a row goes on from initial_carry (a chunk's
  # carry passed on), the later ones start from initialize_carry, with init_key
  # (flax.linen's cell's own carry for that key, row by row).
  x = normal((2, 6, IN))
  ids = jnp.array([[1, 1, 1, 2, 2, 0], [0, 3, 3, 3, 4, 4]])
  c0 = np.asarray(normal((2, H), seed=2))
  theirs = nn.RNN(nn.GRUCell(H), return_carry=True)
  ours = compat.RNN(compat.GRUCell(H, carry_init=NORMAL))
  v = random_linen_variables(theirs, x)
  segments = {0: ((0, 3), (3, 5)), 1: ((1, 4), (4, 6))}  # each row's first and second

  @jax.jit
  def run(v, x, c0):
    fresh = nn.GRUCell(H, carry_init=NORMAL).initialize_carry(jax.random.key(7), (2, IN))
    return ours.apply(v, x, segment_ids=ids, initial_carry=c0, return_carry=True,
                      init_key=jax.random.key(7)), {
      row: [theirs.apply(v, x[row:row + 1, lo:hi], initial_carry=start[row:row + 1])
            for (lo, hi), start in zip(segs, (c0, fresh))] for row, segs in segments.items()}

  (carry, y), refs = _numpy(run(v, x, c0))
  for row, segs in segments.items():
    for (lo, hi), (_, want) in zip(segs, refs[row]):
      np.testing.assert_allclose(y[row, lo:hi], want[0], atol=1e-6)
    np.testing.assert_allclose(carry[row], refs[row][-1][0][0], atol=1e-6)  # the last segment's
  assert float(np.abs(y[0, 5]).max()) == 0.0 and float(np.abs(y[1, 0]).max()) == 0.0


def test_rnn_segment_ids_garbage_at_padding_reaches_no_gradient():
  """Packed sequences are masked as in nr.RNN: NaN at padding (id 0) changes no
  output and no gradient, which equal flax.linen's on the valid steps alone."""
  x = np.asarray(normal((1, 5, IN)))
  segment_ids = jnp.array([[1, 1, 2, 0, 0]])
  garbage = x.copy()
  garbage[:, 3:] = np.nan
  theirs, ours = nn.RNN(nn.GRUCell(H)), compat.RNN(compat.GRUCell(H))

  def loss_ours(v, x):
    return jnp.sum(ours.apply(v, x, segment_ids=segment_ids) ** 2)

  def loss_linen(v, x):
    return sum(jnp.sum(theirs.apply(v, x[:, lo:hi]) ** 2) for lo, hi in ((0, 2), (2, 3)))

  v = random_linen_variables(theirs, x)
  (value, grads), (want_value, want) = _numpy(jax.jit(lambda v: (
    jax.value_and_grad(loss_ours, argnums=(0, 1))(v, garbage),
    jax.value_and_grad(loss_linen, argnums=(0, 1))(v, x)))(v))
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  for g, w in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(want[0])):
    np.testing.assert_allclose(g, w, atol=1e-6)
  np.testing.assert_allclose(grads[1][:, :3], want[1][:, :3], atol=1e-6)
  np.testing.assert_array_equal(grads[1][:, 3:], 0)


def test_flip_sequences_matches_linen():
  from flax.linen.recurrent import flip_sequences as linen_flip

  x = np.arange(2 * 4 * 3, dtype=np.int32).reshape(4, 2, 3)
  lengths = jnp.array([4, 1])
  cases = list(itertools.product([False, True], [lengths, None]))
  flips = jax.jit(lambda: [(compat.flip_sequences(xx, sl, 1, tm), linen_flip(xx, sl, 1, tm))
                           for tm, sl in cases for xx in [x if tm else x.swapaxes(0, 1)]])()
  for ours, theirs in flips:
    np.testing.assert_array_equal(ours, theirs)


def test_seq_lengths_of_shape_one_broadcast_as_in_linen():
  # flax.linen broadcasts lengths of shape (1,) over the batch (carry gather and flips).
  x = normal((B, T, IN))
  kw = dict(return_carry=True, reverse=True, keep_order=True)
  variables = random_linen_variables(nn.RNN(nn.GRUCell(H), **kw), x)  # nothing to compile
  one = jnp.array([3])
  ours, theirs = jax.jit(lambda v: [ns.RNN(ns.GRUCell(H), **kw).apply(v, x, seq_lengths=one)
                                    for ns in (compat, nn)])(variables)
  _assert_close(ours, theirs)


def test_lengths_not_of_the_batch_shape_are_refused_where_linen_ignores_them():
  # Forwards without return_carry flax.linen reads no lengths, so it runs on lengths of
  # any shape; compat checks them (docs/migrating_from_linen.md, "on purpose").
  x = normal((2, T, IN))
  variables = random_linen_variables(nn.RNN(nn.GRUCell(H)), x)
  lengths = jnp.array([1, 2, 3])
  assert nn.RNN(nn.GRUCell(H)).apply(variables, x, seq_lengths=lengths).shape == (2, T, H)
  with pytest.raises(ValueError, match=re.escape('RNN: `seq_lengths` expected shape batch shape '
                                                 '= (2,), got shape (3,)')):
    compat.RNN(compat.GRUCell(H)).apply(variables, x, seq_lengths=lengths)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell'])
def test_an_lstm_carry_of_zeros_takes_no_key_where_linen_fails(name):
  # flax.linen's LSTM cells split the key before calling carry_init, so None fails
  # there even for zeros (its one-array cells take None:
  # test_cell_patterns_that_flax_linen_accepts).
  with pytest.raises(TypeError, match='unexpected PRNG key type'):
    getattr(nn, name)(H).initialize_carry(None, (B, IN))
  c, h = getattr(compat, name)(H).initialize_carry(None, (B, IN))
  for leaf in (c, h):
    np.testing.assert_array_equal(leaf, np.zeros((B, H), np.float32))
    assert leaf.dtype == jnp.float32


def test_a_scalar_length_runs_reversed_where_linen_fails():
  """One length for every row as a scalar: flax.linen takes it where it gathers
  the carry, but its ``flip_sequences`` raises (``axis 1 is out of bounds``)
  with ``reverse``; compat gives flax.linen's values for that length in every row."""
  x = normal((B, T, IN))
  kw = dict(return_carry=True, reverse=True, keep_order=True)
  variables = random_linen_variables(nn.RNN(nn.GRUCell(H), **kw), x)  # nothing to compile
  # Both applies in one program, the lengths closed over (concrete, as given eagerly).
  ours, theirs = jax.jit(lambda v: (
    compat.RNN(compat.GRUCell(H), **kw).apply(v, x, seq_lengths=jnp.array(3)),
    nn.RNN(nn.GRUCell(H), **kw).apply(v, x, seq_lengths=jnp.full((B,), 3))))(variables)
  _assert_close(ours, theirs)
  with pytest.raises(ValueError, match='out of bounds'):
    nn.RNN(nn.GRUCell(H), **kw).apply(variables, x, seq_lengths=jnp.array(3))


class _CastCarryCell(nn.RNNCellBase):
  """flax.linen's ``LSTMCell`` whose new carry is cast to the given carry's dtype."""

  features: int

  @nn.compact
  def __call__(self, carry, x):
    new, y = nn.LSTMCell(self.features, name='cell')(carry, x)
    return jax.tree.map(lambda n, c: n.astype(c.dtype), new, carry), y

  @property
  def num_feature_axes(self):
    return 1


@pytest.mark.parametrize('name', ['SimpleCell', 'LSTMCell'])
def test_a_cell_step_promotes_a_bfloat16_carry_as_linen(name):
  """One step of a cell (outside RNN) on a bfloat16 carry with float32 parameters
  returns flax.linen's carry: promoted to float32, of its values."""
  x = normal((B, IN))
  h = normal((B, H)).astype(jnp.bfloat16)
  carry = (h, h) if name == 'LSTMCell' else h
  theirs, ours = getattr(nn, name)(H), getattr(compat, name)(H)
  v = theirs.init(jax.random.key(0), carry, x)
  (c_t, y_t), (c_o, y_o) = theirs.apply(v, carry, x), ours.apply(v, carry, x)
  assert {a.dtype for a in jax.tree.leaves((c_t, y_t, c_o, y_o))} == {jnp.dtype('float32')}
  _assert_close((c_o, y_o), (c_t, y_t))


def test_an_initial_carry_of_another_float_dtype_runs_in_it_where_linen_fails():
  """A bfloat16 ``initial_carry`` for a float32 cell: flax.linen's scan raises a
  TypeError (the carry comes back float32); compat casts each step's carry to
  the dtype given, as a flax.linen cell that casts it does."""
  x = normal((B, T, IN))
  h0 = (normal((B, H), seed=3).astype(jnp.bfloat16), normal((B, H), seed=4).astype(jnp.bfloat16))
  v = random_linen_variables(nn.RNN(nn.LSTMCell(H)), x)
  ours = compat.RNN(compat.LSTMCell(H), return_carry=True).apply(
    v, x, initial_carry=h0, seq_lengths=LENGTHS)
  nested = {'params': {'cell': {'cell': v['params']['cell']}}}
  theirs = nn.RNN(_CastCarryCell(H), return_carry=True).apply(
    nested, x, initial_carry=h0, seq_lengths=LENGTHS)
  _assert_same_tree(ours[0], theirs[0])
  _assert_close(ours[1], theirs[1])
  with pytest.raises(TypeError, match='must have equal types'):
    nn.RNN(nn.LSTMCell(H), return_carry=True).apply(v, x, initial_carry=h0)


def test_call_flags_given_as_concrete_arrays_run_as_in_linen():
  """flax.linen reads a call's flags with ``if``: a concrete boolean array (a
  flag computed with jnp, a ``np.bool_``) runs there; compat raised a TypeError."""
  x = normal((B, T, IN))
  flags = dict(reverse=jnp.array(True), keep_order=jnp.array(True),
               return_carry=jnp.asarray(True), time_major=jnp.array(False))
  variables = random_linen_variables(nn.RNN(nn.GRUCell(H)), x)  # nothing to compile
  bi = {'params': {'forward_rnn': variables['params'], 'backward_rnn': variables['params']}}
  bi_flags = dict(return_carry=jnp.array(True), time_major=jnp.array(False))

  @jax.jit  # every apply in one program; the flags closed over: concrete, as given eagerly
  def applies(variables, bi):
    return [[lib.RNN(lib.GRUCell(H)).apply(variables, x, seq_lengths=LENGTHS, **flags)
             for lib in (compat, nn)],
            [lib.Bidirectional(lib.RNN(lib.GRUCell(H)), lib.RNN(lib.GRUCell(H))).apply(
              bi, x, seq_lengths=LENGTHS, **bi_flags) for lib in (compat, nn)]]

  for ours, theirs in applies(variables, bi):
    _assert_close(ours, theirs)
  with pytest.raises(TypeError, match=r'RNN: `reverse` expected a bool, got ArrayImpl'):
    compat.RNN(compat.GRUCell(H)).apply(variables, x, reverse=jnp.array([True, False]))


# -- Bidirectional -----------------------------------------------------------------
def test_bidirectional_same_rnn_twice_logs_linens_warning(caplog):
  x = np.ones((B, T, IN), np.float32)
  for ns in (nn, compat):
    rnn = ns.RNN(ns.GRUCell(H))
    caplog.clear()
    jax.eval_shape(lambda rnn=rnn, ns=ns: ns.Bidirectional(rnn, rnn).init(jax.random.key(0), x))
    assert [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'] == [
      'forward_rnn and backward_rnn is the same object, so they will share parameters.'], ns
    # two equal RNNs that are two objects: no warning (flax.linen compares with `is`)
    caplog.clear()
    jax.eval_shape(lambda ns=ns: ns.Bidirectional(ns.RNN(ns.GRUCell(H)), ns.RNN(ns.GRUCell(H)))
                   .init(jax.random.key(0), x))
    assert not [r for r in caplog.records if r.levelname == 'WARNING'], ns


def test_bidirectional_matches_linen():
  x = normal((B, T, IN))
  merge = lambda a, b: jnp.concatenate([a, 2 * b], axis=-1)  # noqa: E731

  # Deterministic kernels, so that the inits run in the applies' program at little
  # cost (initializers compile slowly inside a jit; their values under RNN:
  # test_rnn_multiple_batch_axes_and_conv_cell_match_linen).
  cell_kw = dict(carry_init=NORMAL, kernel_init=_det_init, recurrent_kernel_init=_det_init)

  # The forward RNN's own reverse=True: flax.linen's Bidirectional runs it forwards.
  def make(ns, rnn):
    return ns.Bidirectional(rnn(ns.LSTMCell(H, **cell_kw), reverse=True),
                            rnn(ns.GRUCell(H, **cell_kw)), merge_fn=merge)

  theirs, ours = make(nn, nn.RNN), make(compat, compat.RNN)
  # compat's Bidirectional over flax.linen RNNs, too: with every option and with
  # none (it forwards time_major and seq_lengths as they come, whatever they are).
  # Those two configurations only: Bidirectional passes both options on without
  # reading them, and RNN's own time_major x seq_lengths combinations are checked
  # in test_rnn_matches_linen_over_layouts_directions_and_unroll (batch-major with
  # seq_lengths, through Bidirectional: test_to_nnx_and_from_nnx_rnn_and_bidirectional).
  mixed = compat.Bidirectional(nn.RNN(nn.LSTMCell(H, **cell_kw), reverse=True),
                               nn.RNN(nn.GRUCell(H, **cell_kw)), merge_fn=merge)
  configs = [(False, False), (True, True)]  # time_major, seq_lengths (and initial_carry)
  carries = ((normal((B, H), seed=1), normal((B, H), seed=2)), normal((B, H), seed=3))

  def run(lengths):
    v, v_o = theirs.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
    outs = [v_o, v]
    for tm, use_sl in configs:
      xx = x.swapaxes(0, 1) if tm else x
      kw = dict(seq_lengths=lengths if use_sl else None, time_major=tm, return_carry=True,
                init_key=jax.random.key(4), initial_carry=carries if use_sl else None)
      outs.append([])
      for m in (theirs, ours, mixed):
        c, y = m.apply(v, xx, **kw)
        outs[-1].append((c, y.swapaxes(0, 1) if tm else y))
    return outs

  v_o, v_t, *outs = jax.jit(run)(LENGTHS)
  _assert_same_tree(v_o, v_t)
  for (c_t, y_t), *rest in outs:
    for c_o, y_o in rest:
      _assert_close(c_o, c_t)
      np.testing.assert_allclose(y_o, y_t, atol=1e-6)  # padded steps included


# -- inside user modules and lifted transforms -------------------------------------
def _user_model(ns):
  class Model(nn.Module):
    @nn.compact
    def __call__(self, carry, xs):
      # Deterministic kernels under nn.jit: initializers compile slowly inside a jit
      # (the default ones' values: the other transforms, test_cell_init_and_apply_match_linen).
      jitted = nn.jit(ns.GRUCell)(H, name='jitted', kernel_init=_det_init,
                                  recurrent_kernel_init=_det_init)
      carry, y1 = jitted(carry, xs[:, 0])
      carry, y2 = nn.remat(ns.GRUCell)(H, name='remat')(carry, xs[:, 1])
      vmapped = nn.vmap(ns.GRUCell, in_axes=0, out_axes=0, variable_axes={'params': 0},
                        split_rngs={'params': True})(H, name='vmap')
      _, y3 = vmapped(jnp.stack([carry, carry]), jnp.stack([xs[:, 2], xs[:, 3]]))
      scanned = nn.scan(ns.OptimizedLSTMCell, variable_broadcast='params', in_axes=1,
                        out_axes=1, split_rngs={'params': False})(H, name='scan')
      lstm_carry = ns.OptimizedLSTMCell(H, parent=None).initialize_carry(
        jax.random.key(0), xs[:, 0].shape)
      _, y4 = scanned(lstm_carry, xs)
      return y1, y2, y3, y4

  return Model()


def test_compat_cells_under_linen_transforms_match_linen():
  xs, carry = normal((B, T, IN)), normal((B, H), seed=1)
  theirs, ours = _user_model(nn), _user_model(compat)
  v_t, v_o = theirs.init(jax.random.key(2), carry, xs), ours.init(jax.random.key(2), carry, xs)
  # Under nn.jit the initializers compile into two different programs: equal up to
  # float rounding (exactly equal with XLA's default optimisation level).
  _assert_close(v_o, v_t, atol=1e-6)
  assert v_o['params']['vmap']['hn']['kernel'].shape == (2, H, H)
  out_t, out_o = jax.jit(lambda v: (theirs.apply(v, carry, xs), ours.apply(v, carry, xs)))(v_t)
  _assert_close(out_o, out_t, atol=1e-6)


def test_rnn_initial_carries_that_broadcast_match_linen():
  """``RNN`` checked a given carry against the inputs' batch exactly, and
  refused what flax.linen runs: an ``nn.vmap``'d ensemble of cells (a carry per
  member over shared inputs), beams over shared inputs, one input row shared
  by every carry row."""
  x, x1 = normal((B, T, IN)), normal((1, T, IN))

  det = dict(kernel_init=_det_init, recurrent_kernel_init=_det_init)

  def ensemble(ns):
    cells = ns.vmap(ns.LSTMCell, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=(0, None), out_axes=0, axis_size=3)
    return ns.RNN(cells(H, **det))

  def beams(n):
    return tuple(normal((n, B, H), seed=k) for k in (1, 2))

  cases = [(ensemble, x, beams(3)), (lambda ns: ns.RNN(ns.LSTMCell(H, **det)), x, beams(2)),
           (lambda ns: ns.RNN(ns.GRUCell(H, **det)), x1, normal((B, H), seed=3))]
  layers = [(build(nn), build(compat)) for build, _, _ in cases]

  # Deterministic kernels, so that the inits run in the applies' program at little
  # cost (initializers compile slowly inside a jit). The default initializers' values:
  # test_cell_init_and_apply_match_linen; under nn.vmap with split rngs:
  # test_compat_cells_under_linen_transforms_match_linen.
  @jax.jit
  def run():
    outs = []
    for pair, (_, inputs, carry) in zip(layers, cases):
      inits = [m.init(jax.random.key(4), inputs, initial_carry=carry) for m in pair]
      outs.append((inits, [m.apply(inits[0], inputs, initial_carry=carry, return_carry=True)
                           for m in pair]))
    return outs

  with jax.numpy_rank_promotion('allow'):  # beams: (B, 4H) + (beams, B, 4H) in both
    outs = run()
  for (v_t, v_o), (out_t, out_o) in outs:
    _assert_same_tree(v_o, v_t)
    _assert_close(out_o, out_t, atol=1e-5)


@pytest.mark.parametrize('name', ['GRUCell', 'SimpleCell', 'MGUCell'])
def test_a_one_array_carry_takes_a_seed_as_linen(name):
  """flax.linen hands a one-array carry's ``carry_init`` the rng as given, so
  a seed suits the default zeros there (the LSTM cells split it, and refuse
  one: ``tests/test_errors.py``)."""
  x = normal((B, T, IN))
  _assert_same_tree(getattr(compat, name)(H).initialize_carry(0, (B, IN)),
                    getattr(nn, name)(H).initialize_carry(0, (B, IN)))
  # a seed or None goes to a carry_init that takes no key, as in flax.linen
  ones = nn.initializers.ones_init()
  for rng in (0, None):
    _assert_same_tree(getattr(compat, name)(H, carry_init=ones).initialize_carry(rng, (B, IN)),
                      getattr(nn, name)(H, carry_init=ones).initialize_carry(rng, (B, IN)))
    # ...and a random one fails on it with jax's error, as flax.linen's does
    # (no key of compat's own stands in for it)
    with pytest.raises(TypeError) as theirs:
      getattr(nn, name)(H, carry_init=NORMAL).initialize_carry(rng, (B, IN))
    with pytest.raises(TypeError, match=re.escape(str(theirs.value))):
      getattr(compat, name)(H, carry_init=NORMAL).initialize_carry(rng, (B, IN))
  theirs, ours = nn.RNN(getattr(nn, name)(H)), compat.RNN(getattr(compat, name)(H))
  v = random_linen_variables(theirs, x, init_key=0)
  _assert_close(*jax.jit(lambda v: (ours.apply(v, x, init_key=0),
                                    theirs.apply(v, x, init_key=0)))(v))


@pytest.mark.parametrize('name', ['LSTMCell', 'GRUCell'])
def test_initialize_carry_reads_the_batch_axes_only_as_linen(name):
  # flax.linen takes the carry's shape from input_shape[:-1]: `()` and
  # `(IN,)` both give one unbatched carry, and the feature axis's size is unread.
  init = jax.nn.initializers.normal(1.0)
  ours = getattr(compat, name)(H, carry_init=init)
  theirs = getattr(nn, name)(H, carry_init=init)
  for shape in ((), (IN,), (B, H + 3)):
    _assert_same_tree(ours.initialize_carry(jax.random.key(1), shape),
                      theirs.initialize_carry(jax.random.key(1), shape))
  # and an unbatched step (one feature axis, no batch axis) runs as flax.linen's
  x = normal((IN,))
  carry = theirs.initialize_carry(jax.random.key(1), x.shape)
  v = random_linen_variables(theirs, carry, x)
  _assert_close(*jax.jit(lambda v: (ours.apply(v, carry, x), theirs.apply(v, carry, x)))(v))


def test_conv_initialize_carry_refuses_too_few_feature_axes():
  # flax.linen returns a carry of the wrong rank for it, which fails at the call.
  with pytest.raises(ValueError, match=re.escape(
      'ConvLSTMCell.initialize_carry: `input_shape` expected at least 3 feature axes, '
      'got shape (5, 3).')):
    compat.ConvLSTMCell(H, kernel_size=(3, 3)).initialize_carry(jax.random.key(0), (5, 3))


def _scanned_rnn(ns):
  # The RL pattern (purejaxrl, JaxMARL, Stoix's ScannedRNN): nn.scan over a
  # compact step that builds the cell, resetting the carry where an episode ends.
  class ScannedRNN(nn.Module):
    @functools.partial(nn.scan, variable_broadcast='params', in_axes=0, out_axes=0,
                       split_rngs={'params': False})
    @nn.compact
    def __call__(self, carry, x):
      ins, resets = x
      fresh = ns.GRUCell(H, parent=None).initialize_carry(jax.random.key(0), ins.shape)
      carry = jnp.where(resets[:, None], fresh, carry)
      return ns.GRUCell(features=H)(carry, ins)

  return ScannedRNN()


def test_scanned_rnn_rl_pattern_matches_linen():
  xs = normal((T, B, IN))  # time first, as in RL rollouts
  resets = np.random.default_rng(1).random((T, B)) < 0.3
  carry = normal((B, H), seed=2)
  theirs, ours = _scanned_rnn(nn), _scanned_rnn(compat)

  def loss(model, v):
    new_carry, ys = model.apply(v, carry, (xs, resets))
    return jnp.sum(ys ** 2) + jnp.sum(new_carry)

  v = theirs.init(jax.random.key(3), carry, (xs, resets))
  _assert_same_tree(ours.init(jax.random.key(3), carry, (xs, resets)), v)
  assert resets.any() and not resets.all()
  got, want = jax.jit(lambda v: [jax.value_and_grad(lambda v, m=m: loss(m, v))(v)
                                 for m in (ours, theirs)])(v)
  _assert_close(got, want, atol=1e-5)


# -- migration ---------------------------------------------------------------------
@pytest.mark.parametrize('name,kwargs,shape', CELLS)
def test_to_nnx_from_linen_cell(name, kwargs, shape):
  linen_cell = getattr(nn, name)(features=H, **kwargs)
  x = normal(shape)
  zeros = linen_cell.initialize_carry(jax.random.key(1), x.shape)
  carry = jax.tree.map(lambda c: c + 0.5, zeros)  # a non-zero state
  variables = linen_cell.init(jax.random.key(2), carry, x)
  cell = compat.to_nnx(linen_cell, variables)
  assert type(cell) is getattr(nr, name)
  assert (cell.in_features, cell.hidden_features) == (IN, H)
  # flax.linen's zero carry, which needs no RNG in NNX either
  _assert_same_tree(cell.initialize_carry(x.shape), zeros)
  new_carry, y = linen_cell.apply(variables, carry, x)
  # nr's cells keep the carry's dtype (flax.linen's returns it as computed:
  # float32 for bfloat16 parameters).
  new_carry = jax.tree.map(lambda n, c: n.astype(c.dtype), new_carry, carry)
  _assert_close(cell(carry, x), (new_carry, y), atol=1e-6)
  # ...and back: the same variables, which load into flax.linen's own class.
  layer, back = compat.from_nnx(cell)
  assert type(layer) is getattr(compat, name)
  _assert_same_tree(back, variables)


NNX_CELLS = [('LSTMCell', ()), ('OptimizedLSTMCell', ()), ('GRUCell', ()), ('MGUCell', ()),
             ('SimpleCell', ()), ('ConvLSTMCell', ((3,),))]


@pytest.mark.parametrize('name,args', NNX_CELLS)
def test_from_nnx_cell_loads_into_linen(name, args):
  # Random parameters from NumPy, biases included (no initializer to compile).
  cell = random_module(lambda: getattr(nr, name)(IN, H, *args, rngs=nnx.Rngs(0)))
  layer, variables = compat.from_nnx(cell)
  x = normal((B, 6, IN) if args else (B, IN))

  @nnx.jit
  def run(cell):
    carry = jax.tree.map(lambda c: c + 0.5, cell.initialize_carry(x.shape))
    return (carry, cell(carry, x), getattr(nn, name)(H, *args).apply(variables, carry, x),
            layer.apply(variables, carry, x))

  carry, expected, linen_out, layer_out = run(cell)
  _assert_close(linen_out, expected, atol=1e-6)
  _assert_close(layer_out, expected, atol=1e-6)
  # The groups and leaves in the order flax.linen's init creates them (read as it
  # traces: eval_shape's output has its keys sorted).
  linen_paths = []
  jax.eval_shape(lambda: linen_paths.extend(_paths(getattr(nn, name)(H, *args).init(
    jax.random.key(0), carry, x))))
  assert _paths(variables) == linen_paths


def test_to_nnx_unboxes_partitioned_params():
  # A checkpoint of parameters made with nn.with_partitioning: nn.Partitioned boxes.
  cell = nn.GRUCell(H)
  x, h = normal((B, IN)), jnp.full((B, H), 0.5)
  variables = random_linen_variables(cell, h, x)
  boxed = jax.tree.map(lambda a: nn.Partitioned(a, names=(None,) * a.ndim), variables)
  assert isinstance(boxed['params']['hr']['kernel'], nn.Partitioned)
  _assert_close(compat.to_nnx(cell, boxed)(h, x), cell.apply(variables, h, x), atol=1e-6)
  # A compat cell whose initializers box their parameters: flax.linen's boxes
  # (names included) at init, and flax.linen's values from them.
  part = nn.with_partitioning(_det_init, (None, 'model'))
  theirs, ours = (lib.SimpleCell(H, kernel_init=part, recurrent_kernel_init=part)
                  for lib in (nn, compat))
  v_t = theirs.init(jax.random.key(0), h, x)
  assert isinstance(v_t['params']['h']['kernel'], nn.Partitioned)
  _assert_same_tree(ours.init(jax.random.key(0), h, x), v_t)
  _assert_same_tree(ours.apply(v_t, h, x), theirs.apply(v_t, h, x))


def test_to_nnx_carries_partition_names_and_carry_init():
  # nn.with_partitioning's names become the NNX parameters' out_sharding (the
  # groups an NNX kernel joins share them); a carry_init sizes initialize_carry.
  part = lambda init, names: nn.with_partitioning(init, names)  # noqa: E731
  linen = nn.RNN(nn.GRUCell(H, kernel_init=part(nn.initializers.lecun_normal(), (None, 'model')),
                            recurrent_kernel_init=part(nn.initializers.orthogonal(),
                                                       ('model', None)),
                            carry_init=nn.initializers.ones))
  xs = normal((B, T, IN))
  variables = linen.init(jax.random.key(0), xs)
  with warnings.catch_warnings():  # none of flax.nnx's deprecations (sharding_names, ...)
    warnings.simplefilter('error')
    rnn = compat.to_nnx(linen, variables)
  specs = nnx.get_partition_spec(nnx.state(rnn.cell, nnx.Param))
  linen_specs = nn.get_partition_spec(variables)['params']['cell']
  assert specs['dense_i']['kernel'].get_value() == linen_specs['ir']['kernel'] == \
    jax.sharding.PartitionSpec(None, 'model')
  assert specs['dense_h']['kernel'].get_value() == jax.sharding.PartitionSpec('model', None)
  assert specs['dense_i']['bias'].get_value() == jax.sharding.PartitionSpec()  # not boxed
  # Linen's outputs, from its carry of ones (zeros give others).
  want = linen.apply(variables, xs)  # flax.linen's outputs: the reference of both directions
  _assert_close(rnn(xs), want, atol=1e-6)
  np.testing.assert_array_equal(rnn.cell.initialize_carry((B, IN), rngs=nnx.Rngs(0)),
                                np.ones((B, H)))
  layer, back = compat.from_nnx(rnn)  # and back: the carry_init and the boxes, names included
  assert layer.cell.carry_init is nn.initializers.ones
  _assert_same_tree(back, variables)
  assert nn.get_partition_spec(back) == nn.get_partition_spec(variables)
  _assert_close(layer.apply(back, xs), want, atol=1e-6)
  # Groups of other names joined into one NNX kernel: none, and a warning.
  mixed = jax.tree.map(lambda a: a, variables, is_leaf=lambda a: isinstance(a, nn.Partitioned))
  mixed['params']['cell']['iz']['kernel'] = nn.Partitioned(
    nn.unbox(mixed['params']['cell']['iz']['kernel']), names=('data', None))
  with pytest.warns(UserWarning, match=r"to_nnx: the flax.linen parameters \['ir/kernel', "
                    r"'iz/kernel', 'in/kernel'\] have different partitioning \[\"Partitioned\("
                    r"mesh=None, out_sharding=\('data', None\)\)\", \"Partitioned\(mesh=None, "
                    r"out_sharding=\(None, 'model'\)\)\"\]; the NNX parameter dense_i.kernel "
                    r"that joins them is left without out_sharding\."):
    rnn = compat.to_nnx(linen, mixed)
  assert 'out_sharding' not in rnn.cell.dense_i.kernel.get_metadata()


def test_to_nnx_keeps_logical_partitioning_rules_and_the_box_as_flax_bridge_does():
  # nn.with_logical_partitioning's boxes (logical names, the box's own rules):
  # the NNX parameters get what flax's own bridge (nnx.bridge.to_nnx_var) gives
  # them, so nnx.get_partition_spec maps the names through the rules as
  # flax.linen's nn.logical_to_mesh_axes does; from_nnx gives the same boxes back.
  # (flax's LogicallyPartitioned.to_nnx_metadata pops `names` off the box itself:
  # the checkpoint must survive the conversion.)
  from flax.nnx.bridge import variables as bridge
  P = jax.sharding.PartitionSpec
  rules = (('embed', None), ('mlp', 'model'))
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp'),
                                      rules=rules)
  linen = nn.RNN(nn.OptimizedLSTMCell(H, kernel_init=init))
  xs = normal((B, T, IN))
  variables = linen.init(jax.random.key(0), xs)
  box = variables['params']['cell']['ii']['kernel']
  assert isinstance(box, nn.LogicallyPartitioned)
  with nnx.use_eager_sharding(False):  # the bridge shards at once, on a mesh
    theirs = bridge.to_nnx_var('params', copy.copy(box)).get_metadata()
  theirs['eager_sharding'] = True  # ours is made eagerly, outside any mesh
  rnn = compat.to_nnx(linen, variables)
  assert box.names == ('embed', 'mlp')  # the checkpoint's box is untouched
  assert rnn.cell.dense_i.kernel.get_metadata() == theirs
  assert theirs['linen_meta_type'] is nn.LogicallyPartitioned and theirs['sharding_rules'] == rules
  specs = nnx.get_partition_spec(nnx.state(rnn.cell, nnx.Param))
  linen_spec = nn.logical_to_mesh_axes(('embed', 'mlp'), rules)
  assert specs['dense_i']['kernel'].get_value() == linen_spec == P(None, 'model')
  assert specs['dense_h']['kernel'].get_value() == P()  # not boxed
  want = linen.apply(variables, xs)  # flax.linen's outputs: the reference of both directions
  _assert_close(rnn(xs), want, atol=1e-6)
  layer, back = compat.from_nnx(rnn)
  _assert_same_tree(back, variables)
  got = back['params']['cell']['ii']['kernel']
  assert type(got) is nn.LogicallyPartitioned and (got.names, got.rules, got.mesh) == (
    box.names, box.rules, box.mesh)
  _assert_close(layer.apply(back, xs), want, atol=1e-6)




def test_a_users_own_linen_box_survives_the_round_trip():
  # Any meta.AxisMetadata box, not only flax's two partitioning ones: its fields
  # become the NNX parameter's metadata (as in flax's nnx.bridge.to_nnx_var) and
  # from_nnx rebuilds the box from them; flax.linen's values in between.
  from flax import struct

  @struct.dataclass
  class Tagged(meta.AxisMetadata):
    value: Any
    tag: str = struct.field(pytree_node=False, default='')

    def unbox(self):
      return self.value

    def replace_boxed(self, val):
      return self.replace(value=val)

    def add_axis(self, index, params):
      return self

    def remove_axis(self, index, params):
      return self

  linen = nn.RNN(nn.GRUCell(H))
  xs = normal((B, T, IN))
  boxed = jax.tree.map(lambda a: Tagged(a, tag='layer0'), linen.init(jax.random.key(0), xs))
  rnn = compat.to_nnx(linen, boxed)
  metadata = rnn.cell.dense_h.kernel.get_metadata()
  assert (metadata['tag'], metadata['linen_meta_type']) == ('layer0', Tagged)
  assert 'out_sharding' not in metadata
  want = linen.apply(boxed, xs)  # flax.linen's outputs: the reference of both directions
  _assert_close(rnn(xs), want, atol=1e-6)
  layer, back = compat.from_nnx(rnn)
  _assert_same_tree(back, boxed)  # the Tagged boxes, tag included (static: the structure)
  assert back['params']['cell']['hr']['kernel'].tag == 'layer0'
  _assert_close(layer.apply(back, xs), want, atol=1e-6)

def test_from_nnx_gives_sharding_rules_of_nnx_parameters_a_logical_box():
  # An NNX parameter of logical names with its own sharding_rules (built under a
  # mesh: eager sharding) comes back as nn.LogicallyPartitioned with those rules,
  # so flax.linen maps the names to mesh axes as nnx.get_partition_spec does;
  # nn.Partitioned would read the logical names as mesh axes.
  P = jax.sharding.PartitionSpec
  rules = (('embed', None), ('mlp', 'model'))
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ('embed', 'mlp'),
                               sharding_rules=rules)
  with jax.set_mesh(jax.make_mesh((1,), ('model',))):
    cell = nr.GRUCell(IN, H, kernel_init=init, rngs=nnx.Rngs(0))
  spec = nnx.get_partition_spec(nnx.state(cell, nnx.Param))['dense_i']['kernel'].get_value()
  assert spec == P(None, 'model')
  layer, variables = compat.from_nnx(cell)
  for group in ('ir', 'iz', 'in'):
    box = variables['params'][group]['kernel']
    assert type(box) is nn.LogicallyPartitioned and (box.names, box.rules) == (
      ('embed', 'mlp'), rules)
    assert nn.logical_to_mesh_axes(box.names, box.rules) == spec
  assert isinstance(variables['params']['hr']['kernel'], jax.Array)  # not boxed in NNX
  x, h = normal((B, IN)), jnp.full((B, H), 0.5)
  _assert_close(nn.GRUCell(H).apply(variables, h, x), cell(h, x), atol=1e-6)

def test_conversions_of_abstract_parameters_say_how():
  linen = nn.RNN(nn.GRUCell(H))
  xs = np.ones((B, T, IN), np.float32)
  abstract = jax.eval_shape(linen.init, jax.random.key(0), xs)  # an orbax restore target
  with pytest.raises(TypeError, match=r'to_nnx: `variables` expected arrays that hold values, '
                     r'got abstract leaves \(jax.ShapeDtypeStruct.*nnx.eval_shape\(lambda v: '):
    compat.to_nnx(linen, abstract)
  # What the message says to do works.
  converted = nnx.eval_shape(lambda v: compat.to_nnx(linen, v), abstract)
  assert converted.cell.dense_h.kernel.shape == (H, 3 * H)
  with pytest.raises(TypeError, match=r'from_nnx: `module` expected a module whose parameters '
                     r'hold values, got abstract leaves'):
    compat.from_nnx(converted)


def test_from_nnx_gru_without_bias_hn():
  cell = nr.GRUCell(IN, H, use_bias_hn=False, kernel_init=_det_init,
                    recurrent_kernel_init=_det_init, rngs=nnx.Rngs(0))
  layer, variables = compat.from_nnx(cell)
  np.testing.assert_array_equal(variables['params']['hn']['bias'], np.zeros(H))
  x = normal((B, IN))
  h = jnp.full((B, H), 0.5)
  _assert_close(nn.GRUCell(H).apply(variables, h, x), cell(h, x), atol=1e-6)


# The NNX cells' fields that flax.linen's have too, other than the defaults
# (and a GRUCell without bias_hn in bfloat16: flax.linen's bias dtype).
FIELD_CASES = [
  ('LSTMCell', {**OTHER_FNS, 'param_dtype': jnp.bfloat16}, {}, (B, IN)),
  ('GRUCell', {**OTHER_FNS, 'dtype': jnp.bfloat16, 'param_dtype': jnp.bfloat16},
   {'use_bias_hn': False}, (B, IN)),
  ('MGUCell', {'reset_gate': False, **OTHER_FNS}, {}, (B, IN)),
  ('SimpleCell', {'residual': True, 'activation_fn': nn.soft_sign}, {}, (B, IN)),
  ('ConvLSTMCell', {'kernel_size': (3,), 'padding': 'CIRCULAR'}, {}, (B, 6, IN)),
]


@pytest.mark.parametrize('name,fields,nnx_only,shape', FIELD_CASES)
def test_from_nnx_gives_the_cell_flax_linen_builds_with_those_fields(name, fields, nnx_only,
                                                                      shape):
  cell = random_module(lambda: getattr(nr, name)(IN, H, **fields, **nnx_only,
                                                 rngs=nnx.Rngs(0)))
  layer, variables = compat.from_nnx(cell)
  half = jnp.dtype(fields.get('param_dtype', jnp.float32)).itemsize == 2  # (jax 0.12 traces QR)
  theirs = getattr(nn, name)(H, **fields, **dict(recurrent_kernel_init=_orthogonal_in_float32)
                             if half else {})
  x = normal(shape)
  carry = jax.tree.map(lambda c: c + 0.5, theirs.initialize_carry(jax.random.key(0), x.shape))
  # flax.linen's parameter names, shapes and dtypes for those fields, in the
  # variables and in what the layer's init creates.
  spec = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  want = spec(jax.eval_shape(theirs.init, jax.random.key(0), carry, x))
  assert spec(variables) == want
  assert spec(jax.eval_shape(layer.init, jax.random.key(0), carry, x)) == want
  # flax.linen's outputs (dtypes included) on those variables.
  got, expected = jax.jit(lambda v: (layer.apply(v, carry, x), theirs.apply(v, carry, x)))(
    variables)
  assert spec(got) == spec(expected)
  _assert_close(got, expected, atol=1e-6)


def test_from_nnx_refuses_a_cell_subclass_that_computes_otherwise():
  class DampedGRU(nr.GRUCell):
    def step(self, carry, inputs, recurrent_mask):
      new_h, y = super().step(carry, inputs, recurrent_mask)
      return 0.8 * new_h, y

  with pytest.raises(TypeError, match=r'from_nnx: `module` expected nr.GRUCell computing as the '
                                      r'built-in one .*got DampedGRU, a subclass that redefines '
                                      r'step'):
    compat.from_nnx(nnx.eval_shape(lambda: nr.RNN(DampedGRU(IN, H, rngs=nnx.Rngs(0)))))


def test_from_nnx_warns_about_dropout():
  for rates in ({'dropout_rate': 0.1}, {'recurrent_dropout_rate': 0.1}):
    with pytest.warns(UserWarning, match='from_nnx: flax.linen cells have no dropout'):
      compat.from_nnx(nr.GRUCell(IN, H, **rates, kernel_init=_det_init,
                                 recurrent_kernel_init=_det_init, rngs=nnx.Rngs(0)))


@pytest.mark.filterwarnings('ignore:carry_init is provided in __init__')
def test_from_nnx_refuses_what_linen_cannot_compute_and_keeps_carry_init():
  for make, got in [  # abstract modules (nothing to initialize): refused on their settings
    (lambda: nr.GRUCell(IN, H, zoneout_rate=0.3, rngs=nnx.Rngs(0)),
     'a GRUCell with zoneout_rate=0.3'),
    (lambda: nr.LSTMCell(IN, H, proj_features=2, rngs=nnx.Rngs(0)),
     'a LSTMCell with proj_features=2'),
    (lambda: nr.RNN(nr.OptimizedLSTMCell(IN, H, proj_features=2, rngs=nnx.Rngs(0))),
     'a OptimizedLSTMCell with proj_features=2'),
    (lambda: nr.RNN(nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), learn_initial_carry=True),
     'an RNN with learn_initial_carry=True'),
  ]:
    with pytest.raises(ValueError, match=r'from_nnx: `module` expected an? (cell|RNN) without '
                       r'.*, got ' + re.escape(got)):
      compat.from_nnx(nnx.eval_shape(make))
  # A random initial carry, drawn by Linen's own RNN from the carry_init carried over.
  init = jax.nn.initializers.normal(1.0)
  rnn = nr.RNN(nr.LSTMCell(IN, H, carry_init=init, kernel_init=_det_init,
                           recurrent_kernel_init=_det_init, rngs=nnx.Rngs(0)))
  layer, variables = compat.from_nnx(rnn)
  assert layer.cell.carry_init is init
  x = normal((B, T, IN))
  rng = {'params': jax.random.key(1), 'carry': jax.random.key(2)}
  expected, zero_carry, got = _numpy(jax.jit(lambda: (
    nn.RNN(nn.LSTMCell(H, carry_init=init)).apply(variables, x, rngs=rng),
    nn.RNN(nn.LSTMCell(H)).apply(variables, x), layer.apply(variables, x, rngs=rng)))())
  assert float(np.abs(expected - zero_carry).max()) > 1e-2
  _assert_close(got, expected, atol=1e-6)


def _layer_normed_gru(lib):
  class LayerNormedGRU(lib.GRUCell):  # a user's subclass with a submodule of its own
    @nn.compact
    def __call__(self, carry, inputs):
      return super().__call__(carry, nn.LayerNorm()(inputs))
  return LayerNormedGRU


def test_cell_patterns_that_flax_linen_accepts():
  x = np.asarray(normal((B, T, IN)))
  h0 = np.asarray(normal((H,), seed=2))
  # A subclass adding parameters: init and apply, and Linen's variables load.
  ours, theirs = compat.RNN(_layer_normed_gru(compat)(H)), nn.RNN(_layer_normed_gru(nn)(H))
  variables = theirs.init(jax.random.key(1), x)
  assert 'LayerNorm_0' in variables['params']['cell']
  _assert_same_tree(ours.init(jax.random.key(1), x), variables)
  cell_vars = random_linen_variables(nn.GRUCell(H), h0[None], x[:, 0])
  rnn, rnn_ref = compat.RNN(compat.LSTMCell(H)), nn.RNN(nn.LSTMCell(H))
  v = random_linen_variables(rnn_ref, x)
  float_lengths = np.asarray(LENGTHS, np.float32)

  @jax.jit
  def run(variables, cell_vars, v):
    variables = jax.tree.map(lambda p: p + 0.1, variables)
    subclass = (ours.apply(variables, x), theirs.apply(variables, x))
    # A carry that broadcasts against the batch: a learned (features,) h0, one row.
    with jax.numpy_rank_promotion('allow'):
      broadcast = [(compat.GRUCell(H).apply(cell_vars, carry, x[:, 0]),
                    nn.GRUCell(H).apply(cell_vars, carry, x[:, 0])) for carry in (h0, h0[None])]
    float_out = rnn.apply(v, x, seq_lengths=float_lengths, return_carry=True)
    lengths = [
      # One scalar length for every row (flax.linen broadcasts it).
      (rnn.apply(v, x, seq_lengths=jnp.array(3), return_carry=True),
       rnn_ref.apply(v, x, seq_lengths=jnp.array(3), return_carry=True)),
      # Float lengths (a float mask's sum): flax.linen runs where it ignores them;
      # here they are the lengths, so the outputs are flax.linen's and the carry too.
      (float_out[1], rnn_ref.apply(v, x, seq_lengths=float_lengths)),
      (float_out, rnn_ref.apply(v, x, seq_lengths=LENGTHS, return_carry=True))]
    # initialize_carry(None, shape): the zeros carry_init takes no key.
    zeros = [tuple(getattr(ns, name)(H).initialize_carry(None, (B, IN)) for ns in (compat, nn))
             for name in ('GRUCell', 'MGUCell', 'SimpleCell')]
    return subclass, broadcast, lengths, zeros

  subclass, broadcast, lengths, zeros = run(variables, cell_vars, v)
  for got, want in [subclass] + broadcast + lengths:
    _assert_close(got, want, atol=1e-6)
  for got, want in zeros:
    _assert_close(got, want, atol=0)


@pytest.mark.parametrize('name', ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell',
                                  'SimpleCell'])
def test_dense_cells_take_their_size_from_the_carry_as_linen(name):
  # flax.linen's Dense cells read the hidden size off the carry; `features`
  # only sizes initialize_carry. flax's seq2seq example relies on it (an
  # LSTMCell(vocab_size) stepped on the encoder's wider carry).
  wide = H + 3
  x = np.asarray(normal((B, T, IN)))
  x0 = x[:, 0]
  carry = jax.tree.map(lambda c: c + 0.5,
                       getattr(nn, name)(wide).initialize_carry(jax.random.key(1), (B, IN)))
  theirs, ours = getattr(nn, name)(H), getattr(compat, name)(H)
  variables = theirs.init(jax.random.key(2), carry, x0)
  assert variables['params'][next(iter(variables['params']))]['kernel'].shape == (IN, wide)
  _assert_same_tree(ours.init(jax.random.key(2), carry, x0), variables)
  # to_nnx gives the NNX cell of the size the parameters hold.
  converted = compat.to_nnx(theirs, variables)
  assert converted.hidden_features == wide
  # Over a sequence, with that carry as the initial one: RNN sizes the cell by
  # the carry whatever the cell (_Cell._sized_by, the step above): one cell per
  # kind of carry, a tuple (LSTMCell) and an array (GRUCell).
  # Deterministic kernels there, so that the RNNs' inits run in the applies' program
  # at little cost (initializers compile slowly inside a jit).
  over_time = name in ('LSTMCell', 'GRUCell')
  det = dict(kernel_init=_det_init, recurrent_kernel_init=_det_init)
  rnn_t, rnn_o = (nn.RNN(getattr(nn, name)(H, **det)),
                  compat.RNN(getattr(compat, name)(H, **det)))

  @nnx.jit
  def run(converted):
    seqs = None
    if over_time:
      v_t, v_o = [m.init(jax.random.key(3), x, initial_carry=carry) for m in (rnn_t, rnn_o)]
      seqs = v_t, v_o, [m.apply(v_t, x, initial_carry=carry, seq_lengths=LENGTHS,
                                return_carry=True) for m in (rnn_t, rnn_o)]
    # (c, h) as a list, which flax.linen's cells unpack too
    listed = ours.apply(variables, list(carry), x0) if isinstance(carry, tuple) else None
    return (ours.apply(variables, carry, x0), theirs.apply(variables, carry, x0),
            converted(carry, x0), listed), seqs

  (step_o, step_t, step_nnx, step_listed), seqs = run(converted)
  _assert_close(step_o, step_t, atol=1e-6)
  _assert_close(step_nnx, step_t, atol=1e-6)
  if step_listed is not None:
    _assert_close(step_listed, step_t, atol=1e-6)
  if over_time:
    (v_t, v_o, (seq_t, seq_o)) = seqs
    hidden_kernel = v_t['params']['cell']['hi' if name == 'LSTMCell' else 'hr']['kernel']
    assert hidden_kernel.shape == (wide, wide)
    _assert_same_tree(v_o, v_t)
    _assert_close(seq_o, seq_t, atol=1e-6)


def test_to_nnx_and_from_nnx_rnn_and_bidirectional():
  x = np.asarray(normal((B, T, IN)))
  xt = x.swapaxes(0, 1)
  merge = lambda a, b: jnp.concatenate([a, 2 * b], axis=-1)  # noqa: E731
  linen_bi = nn.Bidirectional(nn.RNN(nn.LSTMCell(H)), nn.RNN(nn.GRUCell(H)), merge_fn=merge,
                              return_carry=True)
  linen_rnn = nn.RNN(nn.OptimizedLSTMCell(H), reverse=True, keep_order=True, time_major=True,
                     return_carry=True, unroll=2)
  variables, v_rnn = random_linen_variables(linen_bi, x), random_linen_variables(linen_rnn, xt)
  bi = compat.to_nnx(linen_bi, variables)
  assert type(bi) is nr.Bidirectional and type(bi.backward_rnn.cell) is nr.GRUCell
  layer, back = compat.from_nnx(bi)
  _assert_same_tree(back, variables)
  # A time-major Bidirectional stays one both ways (the values: test_bidirectional_matches_linen).
  bi_t = compat.to_nnx(linen_bi.clone(time_major=True), variables)
  assert bi_t.time_major and compat.from_nnx(bi_t)[0].time_major
  rnn = compat.to_nnx(linen_rnn, v_rnn)
  options = ('reverse', 'keep_order', 'time_major', 'return_carry', 'unroll')
  assert tuple(getattr(rnn, o) for o in options) == (True, True, True, True, 2)
  rnn_layer, v_back = compat.from_nnx(rnn)
  assert isinstance(rnn_layer, compat.RNN)
  assert tuple(getattr(rnn_layer, o) for o in options) == (True, True, True, True, 2)
  _assert_same_tree(v_back, v_rnn)

  @nnx.jit
  def run(bi, rnn, lengths):
    return (linen_bi.apply(variables, x, seq_lengths=lengths), bi(x, seq_lengths=lengths),
            layer.apply(back, x, seq_lengths=lengths), linen_rnn.apply(v_rnn, xt), rnn(xt),
            rnn_layer.apply(v_back, xt))

  (c_t, y_t), (c_o, y_o), (c_b, y_b), r_t, r_o, r_b = run(bi, rnn, LENGTHS)
  for c in (c_o, c_b):
    _assert_close(c, c_t)
  np.testing.assert_allclose(y_b, y_t, atol=1e-6)  # compat: flax.linen's values at padding
  np.testing.assert_allclose(y_o, _valid(y_t, LENGTHS), atol=1e-6)  # nr: zeros there
  _assert_close(r_o, r_t)
  _assert_close(r_b, r_t)


def test_a_linen_bidirectional_with_its_default_merge_converts_to_the_default_merge():
  # flax.linen's default merge_fn is its own concatenation: converted, it is the
  # package's default, which StackedRNN's size check and to_torch know (to_torch
  # refused it as 'a custom merge_fn', naming _concatenate).
  x = np.asarray(normal((B, T, IN)), np.float32)
  linen_bi = nn.Bidirectional(nn.RNN(nn.GRUCell(H)), nn.RNN(nn.GRUCell(H)))
  variables = random_linen_variables(linen_bi, x)
  bi = compat.to_nnx(linen_bi, variables)
  with pytest.raises(ValueError, match=rf'StackedRNN: `layers\[1\]` expected a layer reading '
                                       rf'{2 * H} features'):
    nr.StackedRNN(bi, nr.RNN(nr.GRUCell(2 * H + 1, H, rngs=nnx.Rngs(0))))
  torch = pytest.importorskip('torch')
  from nnx_recurrent.interop import to_torch

  module = to_torch(bi)
  with torch.no_grad():
    y = module(torch.tensor(x))[0].numpy()
  np.testing.assert_allclose(y, linen_bi.apply(variables, x), atol=1e-5)


# -- bad input ---------------------------------------------------------------------
def test_bad_input_errors():
  x, xs = np.ones((B, IN), np.float32), np.ones((B, T, IN), np.float32)
  lstm = compat.LSTMCell(H)
  rnn = compat.RNN(compat.LSTMCell(H))
  bi = compat.Bidirectional(compat.RNN(compat.GRUCell(H)), compat.RNN(compat.GRUCell(H)))
  carry = _numpy(lstm.initialize_carry(jax.random.key(0), x.shape))
  variables = lstm.init(jax.random.key(1), carry, x)
  v_rnn, v_bi = rnn.init(jax.random.key(0), xs), bi.init(jax.random.key(0), xs)
  with pytest.raises(ValueError, match=r'LSTMCell: `carry` expected a pytree with structure'):
    lstm.apply(variables, carry[0], x)  # h only, not (c, h)
  # flax < 0.7.1's class-method call (still in RL code): flax.linen fails obscurely.
  with pytest.raises(TypeError, match=r'initialize_carry: `self` expected a cell instance: the '
                     r'old class-method call .* got \w+\.'):
    compat.GRUCell.initialize_carry(jax.random.key(0), (4,), 8)
  with pytest.raises(ValueError, match=r"LSTMCell: `carry` expected a last axis of size 4 \(the "
                     r"parameter 'hi/kernel' has shape \(4, 4\); flax.linen's cells take their "
                     r'size from the carry\), got size 3'):
    lstm.apply(variables, (carry[0][:, :3], carry[1][:, :3]), x)
  with pytest.raises(ValueError, match=r'LSTMCell: `carry` expected leaf shapes that broadcast '
                     r'with \[\(3, 4\), '):
    lstm.apply(variables, (carry[0][:, :3], carry[1]), x)  # c and h disagree
  # ConvLSTMCell sizes its convolutions by `features`, as flax.linen's, not by
  # the carry (flax.linen's fails in jax: 'mul got incompatible shapes').
  wide = (np.zeros((B, 6, H + 2), np.float32),) * 2
  with pytest.raises(ValueError, match=re.escape(
      f'ConvLSTMCell: `carry` expected leaf shapes that broadcast with [({B}, 6, {H}), '
      f'({B}, 6, {H})], got [({B}, 6, {H + 2}), ({B}, 6, {H + 2})].')):
    jax.eval_shape(lambda: compat.ConvLSTMCell(H, (3,)).init(
      jax.random.key(0), wide, np.ones((B, 6, IN), np.float32)))
  with pytest.raises(ValueError, match=r"LSTMCell: `inputs` expected last axis of size 3 \(the "
                     r"parameter 'ii/kernel' has shape \(3, 4\)\), got shape \(3, 5\)"):
    lstm.apply(variables, carry, np.ones((B, 5), np.float32))
  with pytest.raises(ValueError, match=r"LSTMCell: `params` expected 'ii/kernel' of shape "
                     r'\(3, 8\) \(in_features=3, features=8\), got shape \(3, 4\)'):
    jax.eval_shape(lambda: compat.LSTMCell(8).apply(variables, compat.LSTMCell(8).initialize_carry(
      jax.random.key(0), x.shape), x))
  with pytest.raises(ValueError, match=r'RNN: `initial_carry` expected a pytree'):
    rnn.apply(v_rnn, xs, initial_carry=np.zeros((B, H), np.float32))
  # A carry smaller than the cell's (a scalar, one (H,) row): flax.linen's scan
  # refuses the step's carry of another shape with a TypeError naming nothing.
  for small, got in [(1.0, r'\(\)'), (np.zeros((H,), np.float32), rf'\({H},\)')]:
    with pytest.raises(ValueError, match=r'RNN: `initial_carry` expected leaf shapes '
                       rf'\[\({B}, {H}\), \({B}, {H}\)\] \(or larger shapes they broadcast to\), '
                       rf'got \[\({B}, {H}\), {got}\]'):
      rnn.apply(v_rnn, xs, initial_carry=(carry[0], small))
  # A narrower carry sizes flax.linen's cell (it takes its size from the carry):
  # against the checkpoint's parameters, the error names the RNN's argument.
  narrow = tuple(c[:, :H - 1] for c in carry)
  with pytest.raises(ValueError, match=r'RNN: `initial_carry` expected a last axis of size '
                     rf"{H} \(the parameter 'h\w/kernel' has shape \({H}, {H}\); flax.linen's "
                     rf'cells take their size from the carry\), got size {H - 1}\.'):
    rnn.apply(v_rnn, xs, initial_carry=narrow)
  with pytest.raises(ValueError, match=r'RNN: `seq_lengths` expected shape'):
    rnn.apply(v_rnn, xs, seq_lengths=jnp.array([1, 2]))
  with pytest.raises(TypeError, match=r'RNN: `cell` expected a flax.linen RNNCellBase.*'
                     r'got LSTMCell'):
    compat.RNN(nnx.eval_shape(lambda: nr.LSTMCell(IN, H, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r'Bidirectional: `initial_carry` expected a pair'):
    bi.apply(v_bi, xs, initial_carry=np.zeros((B, H), np.float32))


def test_checkpoints_that_do_not_fit_raise_flax_linens_error_classes():
  # Code that catches flax.linen's ScopeParamShapeError / ScopeParamNotFoundError
  # (to re-initialise on a shape change) keeps catching compat's; they are
  # ValueErrors with compat's message too.
  import pickle

  import flax

  x = np.ones((B, T, IN), np.float32)
  v = random_linen_variables(nn.RNN(nn.LSTMCell(H)), x)  # the shapes matter: nothing to compile

  def without(*path):
    p = flax.core.unfreeze(v)
    group = functools.reduce(lambda d, k: d[k], path[:-1], p['params'])
    del group[path[-1]]
    return p

  carry = (np.zeros((B, H + 2), np.float32),) * 2
  cases = [  # (call, compat's message)
    (lambda lib: lib.RNN(lib.LSTMCell(H + 4)).apply(v, x), r"`params` expected 'ii/kernel'"),
    (lambda lib: lib.RNN(lib.LSTMCell(H)).apply(without('cell', 'ii'), x),
     r"`params` expected the groups .* got missing \['ii'\]"),
    (lambda lib: lib.RNN(lib.LSTMCell(H)).apply(without('cell', 'hi', 'bias'), x),
     r"`params` expected 'hi' with leaves \['bias', 'kernel'\], got \['kernel'\]"),
    (lambda lib: lib.RNN(lib.LSTMCell(H)).apply(v, np.ones((B, T, IN + 1), np.float32)),
     r'`inputs` expected last axis of size 3'),
    (lambda lib: lib.RNN(lib.LSTMCell(H)).apply(v, x, initial_carry=carry),
     r'RNN: `initial_carry` expected a last axis of size 4'),
    (lambda lib: lib.LSTMCell(H).apply({'params': v['params']['cell']}, carry, x[:, 0]),
     r'LSTMCell: `carry` expected a last axis of size 4'),
  ]
  for call, message in cases:
    with pytest.raises(flax.errors.FlaxError) as theirs:
      call(nn)
    with pytest.raises(type(theirs.value), match=message) as ours:
      call(compat)
    assert isinstance(ours.value, ValueError)
    assert 'flax.readthedocs' not in str(ours.value)  # ours, without flax's link
    copied = pickle.loads(pickle.dumps(ours.value))
    assert type(copied) is type(ours.value) and str(copied) == str(ours.value)


def test_params_a_checkpoint_lacks_are_created_where_params_are_mutable_as_in_linen():
  # flax.linen's layers create what a partial checkpoint lacks, a group or a
  # bias, when `params` is mutable (and check the shapes of what is there).
  import flax

  x = np.ones((B, T, IN), np.float32)
  v = random_linen_variables(nn.RNN(nn.LSTMCell(H)), x)
  partial = flax.core.unfreeze(v)
  del partial['params']['cell']['ii'], partial['params']['cell']['hf']['bias']
  mgu = random_linen_variables(nn.RNN(nn.MGUCell(H, reset_gate=False)), x)  # 'hn': no bias

  @jax.jit
  def run():
    kw = dict(mutable=['params'], rngs={'params': jax.random.key(3)})
    return [(lib.RNN(lib.LSTMCell(H), return_carry=True).apply(partial, x, **kw),
             lib.RNN(lib.MGUCell(H)).apply(mgu, x, **kw)) for lib in (nn, compat)]

  theirs, ours = run()
  _assert_same_tree(ours, theirs)
  wrong = flax.core.unfreeze(partial)
  wrong['params']['cell']['hi']['kernel'] = np.ones((H + 1, H), np.float32)
  for lib in (nn, compat):
    with pytest.raises(flax.errors.ScopeParamShapeError, match='hi'):
      lib.RNN(lib.LSTMCell(H)).apply(wrong, x, mutable=['params'],
                                    rngs={'params': jax.random.key(3)})


def test_migration_errors():
  x = np.ones((B, IN), np.float32)
  cell = nn.GRUCell(H)
  per_step = nn.RNN(nn.GRUCell(H, kernel_init=_det_init, recurrent_kernel_init=_det_init),
                    variable_axes={'params': 0}, variable_broadcast=False,
                    split_rngs={'params': True})
  dense_vars = nn.Dense(H).init(jax.random.key(0), x)
  variables = cell.init(jax.random.key(0), cell.initialize_carry(jax.random.key(0), x.shape), x)
  v = per_step.init(jax.random.key(0), np.ones((B, T, IN), np.float32))
  with pytest.raises(TypeError, match=r'to_nnx: `module` expected a flax.linen or compat '
                     r'LSTMCell, .*got flax.linen.linear.Dense'):
    compat.to_nnx(nn.Dense(H), dense_vars)
  with pytest.raises(ValueError, match=r"to_nnx \(LSTMCell\): `params` expected a LSTMCell "
                     r"checkpoint with 'ii/kernel'"):
    compat.to_nnx(nn.LSTMCell(H), variables)  # a GRU checkpoint for an LSTM
  # The size is the parameters' (flax.linen sizes these cells by the carry),
  # and every group must agree with it.
  assert compat.to_nnx(nn.GRUCell(5), variables).hidden_features == H
  bad = jax.tree.map(lambda p: p, variables)
  bad['params']['hr']['kernel'] = np.zeros((5, 5), np.float32)
  with pytest.raises(ValueError, match=r"to_nnx \(GRUCell\): `params` expected 'hr/kernel' of "
                     r'shape \(4, 4\) \(in_features=3, features=4\), got shape \(5, 5\)'):
    compat.to_nnx(nn.GRUCell(5), bad)
  extra = {'params': {**variables['params'], 'Dense_0': dense_vars['params']}}
  with pytest.raises(ValueError, match=r"to_nnx \(GRUCell\): `params` expected the groups "
                     r"\['hn', 'hr', 'hz', 'in', 'ir', 'iz'\] of a GRUCell, got missing \[\], "
                     r"unexpected \['Dense_0'\]"):
    compat.to_nnx(cell, extra)  # a subclass's checkpoint (a group more) for the cell
  with pytest.raises(ValueError, match=r"to_nnx: `variables` expected exactly one collection, "
                     r"'params', got \['batch_stats', 'params'\]"):
    compat.to_nnx(cell, {**variables, 'batch_stats': {}})
  with pytest.raises(ValueError, match=r"to_nnx: `module` expected an RNN whose 'params' are "
                     r'broadcast over time'):
    compat.to_nnx(per_step, v)
  # A plain RNN's checkpoint for an RNN that scans 'params' per step, or broadcasts nothing.
  rnn_vars = {'params': {'cell': variables['params']}}
  for options, got in [({'variable_axes': {'params': 0}}, r"variable_axes=\{'params': 0\}, "
                        r"variable_broadcast='params'"),
                       ({'variable_broadcast': False}, r'variable_axes=\{\}, '
                        r'variable_broadcast=False')]:
    with pytest.raises(ValueError, match=r"to_nnx: `module` expected an RNN whose 'params' are "
                       r'broadcast over time .* got ' + got):
      compat.to_nnx(nn.RNN(cell, **options), rnn_vars)
  with pytest.raises(ValueError, match=r"to_nnx: `variables` expected 'cell' in the parameters "
                     r"of the RNN, got \['hn', 'hr', 'hz', 'in', 'ir', 'iz'\]"):
    compat.to_nnx(nn.RNN(cell), variables)  # the cell's checkpoint for an RNN
  with pytest.raises(ValueError, match=r"to_nnx: `variables` expected 'cell' in the parameters "
                     r'of the RNN, got NoneType\.'):
    compat.to_nnx(nn.RNN(cell), {'params': None})  # a checkpoint with a hole
  with pytest.raises(TypeError, match=r"to_nnx: `variables` expected a dict with a 'params' "
                     r'collection \(what init returns\), got NoneType\.'):
    compat.to_nnx(cell, None)
  with pytest.raises(TypeError, match=r'from_nnx: `module` expected an nnx_recurrent LSTMCell, '
                     r'.*got flax.nnx.nn.linear.Linear'):
    compat.from_nnx(nnx.eval_shape(lambda: nnx.Linear(IN, H, rngs=nnx.Rngs(0))))
  with pytest.raises(TypeError, match=r'got nr.LSTM \(a fused layer: convert its cells, '
                     r'layer.forward\[i\] and layer.backward\[i\]\)'):
    compat.from_nnx(nnx.eval_shape(lambda: nr.LSTM(IN, H, rngs=nnx.Rngs(0))))
  with pytest.raises(TypeError, match=r'got nr.GRU \(a fused layer: convert its cells'):
    compat.from_nnx(nnx.eval_shape(lambda: nr.GRU(IN, H, rngs=nnx.Rngs(0))))


# -- the import surface ------------------------------------------------------------
def test_compat_is_lazy_and_falls_through_to_linen():
  with fresh_package():  # a fresh import in this process (tests/fresh_import.py)
    fresh = importlib.import_module('nnx_recurrent')
    assert fresh is not nr and 'nnx_recurrent.compat' not in sys.modules
    fresh.compat.LSTMCell  # noqa: B018
    assert 'nnx_recurrent.compat' in sys.modules and fresh.compat is not compat
  assert sys.modules['nnx_recurrent'] is nr and sys.modules['nnx_recurrent.compat'] is compat
  assert compat.Module is nn.Module and compat.compact is nn.compact
  assert compat.transforms is nn.transforms and compat.Dense is nn.Dense
  assert compat.RNN is not nn.RNN and set(compat.__all__) >= {'RNN', 'to_nnx', 'from_nnx'}
  with pytest.raises(AttributeError, match='nor has flax.linen'):
    compat.NoSuchThing  # noqa: B018
  # dir() (IPython's and Jupyter's completion) lists what resolves: flax.linen's names too.
  listed = dir(compat)
  assert {'Dense', 'Module', 'compact', 'transforms', 'RNN', 'to_nnx'} <= set(listed)
  assert {n for n in dir(nn) if not n.startswith('__')} <= set(listed)
  assert [n for n in listed if not hasattr(compat, n)] == []


def test_param_dtype_none_runs_as_in_linen():
  x = normal((B, T, IN))
  names = ('LSTMCell', 'GRUCell', 'SimpleCell')
  theirs = [nn.RNN(getattr(nn, name)(H, param_dtype=None)) for name in names]
  ours = [compat.RNN(getattr(compat, name)(H, param_dtype=None)) for name in names]
  # flax.linen's variables (their shapes and dtypes) filled by NumPy: nothing to compile.
  variables = [random_linen_variables(rnn, x) for rnn in theirs]
  # Every apply in one program (eagerly each scan and op compiled its own).
  outs = jax.jit(lambda vs: [(o.apply(v, x), t.apply(v, x))
                             for o, t, v in zip(ours, theirs, vs)])(variables)
  for out_o, out_t in outs:
    _assert_close(out_o, out_t, atol=1e-6)


# -- found by mutation testing (s47) -------------------------------------------------
class _WrappedLSTM(nn.RNNCellBase):
  """A user's cell around a compat ``LSTMCell(H)``, its carry sized by ``features``."""
  features: int

  @nn.compact
  def __call__(self, carry, x):
    return compat.LSTMCell(H, name='lstm')(carry, x)

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return compat.LSTMCell(self.features, parent=None).initialize_carry(rng, input_shape)

  @property
  def num_feature_axes(self):
    return 1


def test_a_carry_size_error_without_a_given_carry_names_the_cell_not_initial_carry():
  xs = np.ones((B, T, IN), np.float32)
  variables = random_linen_variables(compat.RNN(_WrappedLSTM(H)), xs)  # (shapes: no compile)
  with pytest.raises(ValueError, match=r"^LSTMCell: `carry` expected a last axis of size "
                     rf"{H} \(the parameter 'h\w/kernel' has shape \({H}, {H}\);.*got size "
                     rf'{H + 1}\.'):
    compat.RNN(_WrappedLSTM(H + 1)).apply(variables, xs)


def test_initialize_carry_refuses_a_bool_for_a_seed():
  # flax.linen hands a one-array carry's rng to carry_init as given (the zeros
  # ignore it); a seed passes here too, a bool is no seed.
  with pytest.raises(TypeError, match=r'GRUCell.initialize_carry: `rng` expected a PRNG key '
                     r'\(jax.random.key\(seed\)\) or None, got True\.'):
    compat.GRUCell(H).initialize_carry(True, (B, IN))


def test_conv_lstm_valid_padding_keeps_the_state_shape_in_the_hidden_conv():
  # flax.linen pads the hidden convolution as the input one and fails with
  # 'VALID'; compat's pads it to keep the state's shape ('SAME'): flax.linen's
  # Conv layers on the same parameters, and the cell's math in NumPy.
  cell = compat.ConvLSTMCell(2, (3,), padding='VALID')
  x = normal((B, 7, IN))
  c0, h0 = (normal((B, 5, 2), seed=s) for s in (1, 2))
  variables = random_linen_variables(cell, (c0, h0), x)
  (c, h), y = jax.jit(cell.apply)(variables, (c0, h0), x)
  p = variables['params']
  from_h = nn.Conv(8, (3,), padding='SAME').apply({'params': p['hh']}, h0)
  gates = nn.Conv(8, (3,), padding='VALID').apply({'params': p['ih']}, x) + from_h
  # the hidden convolution flax.linen's capture_intermediates records is that one
  _, state = cell.apply(variables, (c0, h0), x, capture_intermediates=True)
  np.testing.assert_allclose(state['intermediates']['hh']['__call__'][0], from_h, atol=1e-6)
  i, g, f, o = np.split(np.asarray(gates, np.float64), 4, axis=-1)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  c_ref = sigmoid(f + 1) * np.asarray(c0) + sigmoid(i) * np.tanh(g)
  h_ref = sigmoid(o) * np.tanh(c_ref)
  for got, want in ((c, c_ref), (h, h_ref), (y, h_ref)):
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_to_nnx_refuses_an_extra_leaf_and_a_kernel_without_two_axes():
  # A conversion drops nothing silently: a leaf the cell does not have is refused.
  import flax

  x = np.ones((B, T, IN), np.float32)
  variables = flax.core.unfreeze(random_linen_variables(nn.RNN(nn.LSTMCell(H)), x))  # shapes
  variables['params']['cell']['ii']['bias'] = np.ones(H, np.float32)
  with pytest.raises(ValueError, match=r"to_nnx \(LSTMCell\): `params` expected 'ii' with "
                     r"leaves \['kernel'\], got \['bias', 'kernel'\]\."):
    compat.to_nnx(nn.RNN(nn.LSTMCell(H)), variables)
  flat = {'params': {'ii': {'kernel': np.ones(H, np.float32)}}}
  with pytest.raises(ValueError, match=r"to_nnx \(LSTMCell\): `params` expected 'ii/kernel' "
                     rf'with at least 2 axes, got shape \({H},\)\.'):
    compat.to_nnx(nn.LSTMCell(H), flat)


def test_to_nnx_gives_no_out_sharding_to_parameters_without_partition_names():
  # As nnx_recurrent's own cells: an empty out_sharding would read as a rank-0 spec.
  x = np.ones((B, IN), np.float32)
  linen = nn.GRUCell(H)
  variables = linen.init(jax.random.key(0), linen.initialize_carry(jax.random.key(1), x.shape), x)
  cell = compat.to_nnx(linen, variables)
  metadata = [v.get_metadata().get('out_sharding')
              for _, v in nnx.iter_graph(cell) if isinstance(v, nnx.Param)]
  assert len(metadata) == 4 and metadata == [None] * 4


# -- found by a mutation audit of compat/_migrate.py (s55) ---------------------------
def test_to_nnx_refuses_a_subclass_that_computes_otherwise():
  # The NNX module computes the built-in class's math: a Linen subclass that
  # redefines a method would convert silently into other numbers.
  x, h = normal((B, IN)), jnp.full((B, H), 0.5)
  for lib in (nn, compat):
    class Damped(lib.GRUCell):
      def __call__(self, carry, inputs):
        new_h, y = super().__call__(carry, inputs)
        return 0.8 * new_h, 0.8 * y

    class Doubled(lib.RNN):
      def __call__(self, inputs, **kwargs):
        return 2 * super().__call__(inputs, **kwargs)

    class Tagged(lib.GRUCell):  # a field more, another default: computes as the built-in
      tag: str = 'encoder'
      activation_fn: Callable[..., Any] = nn.soft_sign

    variables = random_linen_variables(Damped(H), h, x)
    rnn_vars = {'params': {'cell': variables['params']}}
    for module, got, params in [(Damped(H), 'Damped', variables),
                                (lib.RNN(Damped(H)), 'Damped', rnn_vars),
                                (Doubled(lib.GRUCell(H)), 'Doubled', rnn_vars)]:
      builtin = 'RNN' if got == 'Doubled' else 'GRUCell'
      builtin = f'compat.{builtin}' if lib is compat else f'flax.linen.recurrent.{builtin}'
      with pytest.raises(TypeError, match=re.escape(
          f'to_nnx: `module` expected {builtin} computing as the built-in one (a subclass may '
          'add fields or members: the conversion builds the built-in computation), got '
          f'{got}, a subclass that redefines __call__.')):
        compat.to_nnx(module, params)
    tagged = compat.to_nnx(Tagged(H), variables)
    _assert_close(tagged(h, x), nn.GRUCell(H, activation_fn=nn.soft_sign).apply(variables, h, x))


def test_from_nnx_refuses_a_cell_whose_projection_lora_surgery_swapped():
  # from_nnx reads the cell's parameters: an nnx.LoRALinear's adapter would be left
  # out (flax.linen's cell without it: outputs 0.18 off, silently).
  for cell in (nr.GRUCell(IN, H, rngs=nnx.Rngs(0)), nr.MGUCell(IN, H, rngs=nnx.Rngs(0))):
    name = type(cell).__name__
    with pytest.raises(TypeError, match=r'from_nnx: `module` expected cells of the nnx.Linear '
                       rf'projections they build .*, got {name} with dense_h of type LoRALinear\.'):
      compat.from_nnx(nr.RNN(lora_swapped(cell)))
