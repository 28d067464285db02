"""Checkpoints written by older flax releases load into compat and to_nnx unchanged.

The fixtures in tests/data/old_flax (written by hand with flax 0.6.11, 0.7.5,
0.8.5 and 0.10.7 themselves: tests/data/old_flax/make_fixtures.py) hold each
release's parameters, inputs, initial carry, outputs and final carry for every
cell that release has: scanned with the pre-``nn.RNN`` idiom ``nn.scan(Cell,
variable_broadcast='params', split_rngs={'params': False}, in_axes=1,
out_axes=1)``, in ``nn.RNN`` with ``seq_lengths``, and in ``nn.Bidirectional``.
No old flax is needed here.

The parameters are restored with ``flax.serialization.from_state_dict`` into
the variables that compat's ``init`` creates (which raises on any renamed,
missing or extra name) and must hold the same shapes and dtypes.

Tolerance: ``ATOL`` = 1e-5, absolute, on float32 values of order 1. The old
releases ran older XLA (jaxlib 0.4.13 to 0.6.2), whose float32 kernels for
``tanh``, ``logistic`` and the small matmuls may round a few ulp (6e-8 each
near 1) apart from today's; 5 recurrent steps carry that on. Measured: at most
2.6e-7 over all fixtures, for compat and to_nnx alike, and today's flax.linen
itself differs from the fixtures by as much (under XLA's default flags by
exactly as much: there compat computes flax.linen's bits). 1e-5 leaves room
for other XLA versions and CPUs and is far below what a changed parameter
does: one element of one parameter changed by 1e-3 moves the outputs by
1e-4 or more, and ``test_a_perturbed_parameter_is_noticed`` checks that any
one leaf changed by 1e-2 moves them by more than 10x ``ATOL``.
"""

from __future__ import annotations

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

import nnx_recurrent as nr
from nnx_recurrent import compat
from tests import _old_fixtures as old

ATOL = old.ATOL
OLD = old.Fixtures('old_flax')
CASES = OLD.cases


def _config(case: dict) -> tuple:
  """What a case's modules are built from (hashable): the fixtures of different
  releases share it where they hold the same cell and kind."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in case['cell_kwargs'].items()}
  return case['kind'], case['cell'], int(case['hidden']), tuple(sorted(kwargs.items()))


def _make_cell(config: tuple, nn=compat) -> functools.partial:
  """The cell class of ``nn`` (compat, or flax.linen) of a configuration
  (:func:`_config`) with its fields (``features`` is the one a pre-0.7 cell did
  not take)."""
  _, cell, hidden, kwargs = config
  return functools.partial(getattr(nn, cell), features=hidden, **dict(kwargs))


def _cell(case: dict):
  return _make_cell(_config(case))()


def _scan_name(cell: str) -> str:
  """The automatic name flax.linen gives ``nn.scan(Cell)(...)`` inside ``@nn.compact``
  (``cell``: the cell class's name)."""
  return f"Scan{cell}_0"


class _ScanEncoder(compat.Module):
  """The pre-nn.RNN idiom of the fixtures with compat's cell (``compat.scan`` is
  flax.linen's)."""

  make_cell: functools.partial

  @compat.compact
  def __call__(self, carry, x):
    scanned = compat.scan(self.make_cell.func, variable_broadcast='params',
                          split_rngs={'params': False}, in_axes=1, out_axes=1)
    return scanned(**self.make_cell.keywords)(carry, x)


class _RNNEncoder(compat.Module):
  """The same checkpoint under ``compat.RNN``: a cell built in ``@nn.compact``
  belongs to the enclosing module, so naming it as the old scanned module was
  keeps every parameter where the old checkpoint has it."""

  make_cell: functools.partial
  cell_name: str

  @compat.compact
  def __call__(self, carry, x):
    cell = self.make_cell(name=self.cell_name)
    return compat.RNN(cell, return_carry=True)(x, initial_carry=carry)


def _compat_module(case: dict, nn=compat):
  """The case's module as written today with ``nn`` (compat, or flax.linen); one
  object per configuration (:func:`_module`), so that :func:`_apply` compiles
  it once for every release's fixture of that cell and kind."""
  return _module(_config(case), nn, 'case')


@functools.cache
def _module(config: tuple, nn, role: str):
  """The module of ``role`` for a configuration: ``'case'``, the case's module;
  ``'rnn_encoder'``, the scan case's checkpoint under ``_RNNEncoder``;
  ``'rnn'``, its cell standalone in ``compat.RNN``."""
  kind, cell = config[:2]
  make_cell = _make_cell(config, nn)
  if role == 'rnn_encoder':
    return _RNNEncoder(make_cell, _scan_name(cell))
  if role == 'rnn':
    return compat.RNN(make_cell(), return_carry=True)
  if kind == 'scan':
    return _ScanEncoder(make_cell)
  if kind == 'rnn':
    return nn.RNN(make_cell(), return_carry=True)
  return nn.Bidirectional(nn.RNN(make_cell()), nn.RNN(make_cell()), return_carry=True)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, args, kwargs):
  """``module.apply`` under ``jit``: eager, each call's ``scan`` compiles a program
  of its own; jitted, a module (:func:`_module`) compiles once for its inputs'
  shapes, which every release's fixture of a cell and kind shares."""
  return module.apply(variables, *args, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _nnx_call(graphdef, state, args, kwargs):
  """An NNX layer's call under ``jit``, compiled once per graph and shapes (as
  :func:`_apply`)."""
  return nnx.merge(graphdef, state)(*args, **kwargs)


def _args(case: dict):
  """(args, kwargs) of the case's call."""
  x, carry0 = jnp.asarray(case['inputs']), old.unpack(case['initial_carry'])
  if case['kind'] == 'scan':
    return (carry0, x), {}
  return (x,), {'initial_carry': carry0, 'seq_lengths': jnp.asarray(case['seq_lengths'])}








def _restored(module, case: dict) -> dict:
  """The fixture's variables, restored into the tree compat's ``init`` creates."""
  args, kwargs = _args(case)
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                        _init_shapes(module, _spec((args, kwargs))))
  restored = serialization.from_state_dict(target, case['variables'])  # raises on a new name
  for t, r in zip(jax.tree.leaves(target), jax.tree.leaves(restored)):
    assert t.shape == r.shape and t.dtype == r.dtype
  return restored


def _spec(tree) -> tuple:
  """A hashable (structure, leaves' shapes and dtypes) of ``tree``."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((np.shape(x), np.asarray(x).dtype.name) for x in leaves)


@functools.cache
def _init_shapes(module, spec: tuple) -> dict:
  """The shapes and dtypes of the variables compat's ``init`` creates for inputs
  of ``spec`` (:func:`_spec`); traced once per module and inputs' shapes."""
  treedef, leaves = spec
  args, kwargs = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(*x) for x in leaves])
  return flax.core.unfreeze(
    jax.eval_shape(functools.partial(module.init, jax.random.key(0)), *args, **kwargs))


def test_fixtures_are_there():
  assert [old.version(p) for p in OLD.files] == ['0.10.7', '0.6.11', '0.7.5', '0.8.5']
  for path in OLD.files:
    versions = old.load(path)['versions']
    assert versions['flax'] == old.version(path)
    assert versions['flax'] != flax.__version__  # written by an older release
  cells = {name.split('/')[1].split('-')[0] for _, name in CASES}
  assert cells == {'LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell', 'SimpleCell',
                   'ConvLSTMCell'}


@pytest.mark.parametrize('version,name', CASES)
def test_compat_reproduces_old_release(version, name):
  case = OLD.case(version, name)
  module = _compat_module(case)
  variables = _restored(module, case)
  args, kwargs = _args(case)
  carry, outputs = _apply(module, variables, args, kwargs)
  old.check(case, carry, outputs)  # padded steps included: compat computes them as flax.linen
  # What differs from the old release is today's XLA rounding, not compat: today's
  # flax.linen computes what compat does (the same bits under XLA's default flags;
  # under this suite's XLA optimisation level 0, an MGUCell RNN with seq_lengths
  # and return_carry differs from flax.linen's by up to 1.5e-7, jitted as here
  # or eager alike).
  linen = _apply(_compat_module(case, flax.linen), variables, args, kwargs)
  for got, want in zip(jax.tree.leaves((carry, outputs)), jax.tree.leaves(linen)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize('version,name', [c for c in CASES if c[1].startswith('scan/')])
def test_old_scan_checkpoint_under_compat_rnn(version, name):
  """An old ``nn.scan(Cell)`` checkpoint, unchanged, under ``compat.RNN``: the cell
  named as the scanned module was; or, standalone, the cell's params as ``'cell'``."""
  case = OLD.case(version, name)
  args, _ = _args(case)
  module = _module(_config(case), compat, 'rnn_encoder')
  carry, outputs = _apply(module, _restored(module, case), args, {})
  old.check(case, carry, outputs)
  rnn = _module(_config(case), compat, 'rnn')  # compat.RNN(cell, return_carry=True)
  params = {'cell': case['variables']['params'][_scan_name(case['cell'])]}
  carry, outputs = _apply(rnn, {'params': params}, (args[1],), {'initial_carry': args[0]})
  old.check(case, carry, outputs)


@pytest.mark.parametrize('version,name', CASES)
def test_to_nnx_reproduces_old_release(version, name):
  case = OLD.case(version, name)
  args, kwargs = _args(case)
  if case['kind'] == 'scan':  # the scanned cell's own parameters, as a cell
    params = case['variables']['params'][_scan_name(case['cell'])]
    cell = compat.to_nnx(_cell(case), {'params': params})
    assert type(cell) is getattr(nr, case['cell'])
    carry, outputs = _nnx_call(*nnx.split(nr.RNN(cell, return_carry=True)), (args[1],),
                               {'initial_carry': args[0]})
  else:
    layer = compat.to_nnx(_compat_module(case), case['variables'])
    carry, outputs = _nnx_call(*nnx.split(layer), args, kwargs)
  # nr.RNN gives zeros at padded steps (flax.linen computes on): valid steps only.
  old.check(case, carry, outputs, valid=old.valid(case))


@pytest.mark.parametrize('version', sorted(OLD.by_version))
def test_a_perturbed_parameter_is_noticed(version):
  """Each case can fail: any one parameter leaf changed by 1e-2 moves the old
  release's outputs or carry far beyond ATOL (one case per cell and kind is
  enough to show it; the others share the code)."""
  cases = OLD.fixture(version)['cases']
  for name in ('rnn/GRUCell', 'bidirectional/LSTMCell', 'scan/ConvLSTMCell'):
    case = cases[name]
    module = _compat_module(case)
    variables = _restored(module, case)
    args, kwargs = _args(case)
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(variables)]
    for i, path in enumerate(paths):
      leaves = jax.tree.leaves(variables)
      leaves[i] = leaves[i] + 1e-2  # every element of one leaf
      perturbed = jax.tree.unflatten(jax.tree.structure(variables), leaves)
      carry, outputs = _apply(module, perturbed, args, kwargs)
      diff = max(old.max_diff(outputs, case['outputs']),
                 *(old.max_diff(g, w) for g, w in zip(jax.tree.leaves(carry),
                                                    jax.tree.leaves(old.unpack(case['carry'])))))
      assert diff > 10 * ATOL, (name, jax.tree_util.keystr(path), diff)
