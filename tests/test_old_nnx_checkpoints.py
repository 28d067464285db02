"""Checkpoints written by older flax.nnx releases restore into nnx_recurrent unchanged.

The fixtures in tests/data/old_nnx (written by hand with flax 0.10.0, 0.10.7,
0.11.2 and 0.12.0 themselves: tests/data/old_nnx/make_nnx_fixtures.py) hold, for
every cell those releases have, an ``nnx.RNN`` and an ``nnx.Bidirectional``
with random parameters: the whole ``nnx.state`` as a plain nested dict (what
``nnx.to_pure_dict`` gives, the form flax's checkpointing guide saves with
orbax), the inputs, ``seq_lengths``, initial carry, and the release's outputs
and final carry; and its outputs and carry with the default carry. No old flax
is needed here.

The parameters go in as a user restores a pure dict:
``nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), pure)`` then
``nnx.update``, which raises on any name the module does not have; the test
also checks that every parameter of the module was in the checkpoint, with
its shape and dtype. What does not restore unchanged, into nnx_recurrent and
today's flax.nnx alike:

* flax 0.10.0-0.10.2 (tested: 0.10.0): a ``Linear`` without bias held
  ``bias = nnx.Param(None)``, so the state has a ``None`` entry for each
  bias-less projection (``cell/ii/bias`` ... of LSTMCell, ``dense_i/bias`` of
  OptimizedLSTMCell, ``dense_h/bias`` of GRUCell and SimpleCell), which
  ``replace_by_pure_dict`` refuses (flax 0.10.3 leaves the entry out).
  Dropped, the rest is today's tree, names, shapes and dtypes.
* flax 0.10.x (tested: 0.10.0, 0.10.7): a cell keeps the whole ``nnx.Rngs``
  it was given and a layer its own (``nnx.Rngs(0)`` by default), so the state
  has ``cell/rngs/default/{key,count}`` and ``rngs/default/{key,count}``,
  which today's flax.nnx refuses too; since 0.11 the cells keep none
  (unless ``keep_rngs=True``) and the layers keep one ``RngStream``,
  ``rngs/{key,count}``. nnx_recurrent's layers keep no RNG state for its
  cells (docs/migrating_from_nnx.md), so from every release the RNG state is
  left out; a 0.11/0.12 ``keep_rngs=True`` cell's whole state, RNG included,
  restores into ``nr.GRUCell(..., keep_rngs=True)`` unchanged.

Tolerance: ``ATOL`` = 1e-5, absolute, on float32 values of order 1, on the
steps within ``seq_lengths`` and the final carry: at padded steps
``nr.RNN`` returns zeros where flax.nnx computes on the padding (the
documented difference), which is checked too. The old releases ran older XLA
(jaxlib 0.4.34 to 0.7.2), whose float32 ``tanh``, ``logistic`` and small
matmuls may round a few ulp apart from today's; 5 recurrent steps carry that
on. Measured: at most 2.7e-7 over all fixtures under this suite's XLA flags
(1.6e-7 under XLA's default flags), and today's flax.nnx differs from them by
as much (``test_todays_flax_nnx_loads_the_same_checkpoint``; under the suite's
flags nr computes today's flax.nnx's bits on the valid steps, under the
default flags up to 1.2e-7 apart).
1e-5 leaves room for other XLA versions and CPUs and is far below what a
changed parameter does: any one element of any parameter changed by 1e-3
fails the check (all 270, tried by hand), and
``test_a_perturbed_parameter_is_noticed`` checks that any one leaf changed by
1e-2 moves the outputs on the valid steps by more than 10x ``ATOL``.
"""

from __future__ import annotations

import functools
import os
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

import nnx_recurrent as nr
from tests import _old_fixtures as old

ATOL = old.ATOL
OLD = old.Fixtures('old_nnx')
CASES = OLD.cases
# The releases whose checkpoints hold `Param(None)` biases / the 0.10 `Rngs`
# layout (module docstring).
_NONE_BIASES = {'0.10.0'}
_RNGS_LAYOUT_0_10 = {'0.10.0', '0.10.7'}


def _flat(pure: dict) -> dict:
  """{path: leaf} of a pure dict (a ``None`` leaf included)."""
  return traversals.flatten_mapping(pure)


def _typed(version: str, name: str, *types: str) -> dict:
  """The checkpoint's entries of the given Variable types, as a pure dict of
  jax arrays (as orbax restores them), the RNG keys as typed keys again
  (make_nnx_fixtures stored their data). Not msgpack's NumPy arrays: they are
  read-only, and flax's ``RngStream`` (nr's with ``keep_rngs=True`` too)
  advances its count in place, which fails on one."""
  fixture = OLD.fixture(version)
  case = fixture['cases'][name]
  (impl,) = fixture['rng_key_impls']
  flat = {}
  for path, leaf in _flat(case['state']).items():
    kind = case['types']['/'.join(path)]
    if kind in types:
      flat[path] = (jax.random.wrap_key_data(leaf, impl=impl) if kind == 'RngKey'
                    else None if leaf is None else jnp.asarray(leaf))
  return traversals.unflatten_mapping(flat)


def _params(version: str, name: str) -> dict:
  return _typed(version, name, 'Param')


def _whole(version: str, name: str) -> dict:
  return _typed(version, name, 'Param', 'RngKey', 'RngCount')


def _without_none_and_rng_state(pure: dict) -> dict:
  """The route for the layouts today's modules lack (module docstring)."""
  return traversals.unflatten_mapping({
    path: leaf for path, leaf in _flat(pure).items() if leaf is not None and 'rngs' not in path})


def _cell(case: dict, seed: int, nn=nr, **overrides):
  kwargs = dict(case['cell_kwargs'])
  if nn is nr and case['cell'] == 'GRUCell':
    kwargs['use_bias_hn'] = False  # flax.nnx's GRU exactly (docs/migrating_from_nnx.md)
  kwargs.update(overrides)
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', 'keep_rngs argument is deprecated')
    return getattr(nn, case['cell'])(int(case['in_features']), int(case['hidden']), **kwargs,
                                     rngs=nnx.Rngs(seed + 10))  # values to be overwritten


def _model(case: dict, nn=nr, **overrides):
  """The case's layer as written today with ``nn`` (nnx_recurrent, or flax.nnx)."""
  if case['kind'] == 'rnn':
    return nn.RNN(_cell(case, 0, nn, **overrides), return_carry=True)
  return nn.Bidirectional(nn.RNN(_cell(case, 0, nn, **overrides)),
                          nn.RNN(_cell(case, 1, nn, **overrides)), return_carry=True)


def _restore(model, pure: dict, what=nnx.Param) -> None:
  """A pure-dict checkpoint into ``model``, as a user restores one; every
  Variable of ``what`` must be in it, with its shape and dtype."""
  state = nnx.state(model, what)
  before = {p: (np.shape(v.get_value()), v.get_value().dtype) for p, v in nnx.to_flat_state(state)}
  assert set(before) == set(_flat(pure)), sorted(set(before) ^ set(_flat(pure)))
  nnx.replace_by_pure_dict(state, pure)  # raises on a name the module does not have
  after = {p: (np.shape(v.get_value()), v.get_value().dtype) for p, v in nnx.to_flat_state(state)}
  assert after == before
  nnx.update(model, state)


def _call(model, case: dict):
  x, lengths = case['inputs'], case['seq_lengths']
  return _jitted(model, x, initial_carry=old.unpack(case['initial_carry']), seq_lengths=lengths)


def _jitted(model, *args, **kwargs):
  """``model(*args, **kwargs)`` under ``jit`` (its state written back, as an eager
  call's): eager, each call's scan compiles a program of its own; jitted, one
  compiles per graph and inputs' shapes, which every release's checkpoint of a
  cell and kind shares."""
  graphdef, *states = nnx.split(model, nnx.Param, ...)
  outputs, state = _run(graphdef, tuple(states), args, kwargs)
  nnx.update(model, state)
  return outputs


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, states: tuple, args: tuple, kwargs: dict):
  """The call of :func:`_jitted`: ``states`` is ``(params, the rest)``."""
  model = nnx.merge(graphdef, *states)
  return model(*args, **kwargs), nnx.state(model)








def _param_specs(pure: dict) -> dict:
  return {p: (np.shape(v), np.dtype(v.dtype)) for p, v in _flat(pure).items() if v is not None}


def test_fixtures_are_there():
  assert [old.version(p) for p in OLD.files] == ['0.10.0', '0.10.7', '0.11.2', '0.12.0']
  for path in OLD.files:
    fixture = old.load(path)
    assert fixture['versions']['flax'] == old.version(path)
    assert fixture['versions']['flax'] != flax.__version__  # written by an older release
    assert fixture['rng_key_impls'] == ['threefry2x32']
  cells = {name.split('/')[1].split('-')[0] for _, name in CASES}
  assert cells == {'LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell'}
  assert sum(os.path.getsize(p) for p in OLD.files) < 200_000


@pytest.mark.parametrize('version,name', CASES)
def test_param_tree_is_nnx_recurrents_unchanged(version, name):
  """The checkpoint's parameters are nr's: the same paths (no renaming), shapes
  and dtypes, and today's flax.nnx's; flax 0.10.0's ``Param(None)`` biases
  aside, which neither module has."""
  case = OLD.case(version, name)
  params = _params(version, name)
  ours = nnx.to_pure_dict(nnx.state(_model(case), nnx.Param))
  theirs = nnx.to_pure_dict(nnx.state(_model(case, nnx), nnx.Param))
  assert _param_specs(params) == _param_specs(ours) == _param_specs(theirs)
  nones = sorted(p for p, v in _flat(params).items() if v is None)
  if version not in _NONE_BIASES:
    assert not nones
    return
  # Exactly one `bias: None` beside each kernel whose Linear has no bias.
  ours_flat = _flat(ours)
  assert nones and all(p[-1] == 'bias' and p not in ours_flat and (*p[:-1], 'kernel') in ours_flat
                       for p in nones)
  kernels = sorted(p for p in ours_flat if p[-1] == 'kernel')
  assert len(nones) == len(kernels) - sum((*p[:-1], 'bias') in ours_flat for p in kernels)
  for model in (_model(case), _model(case, nnx)):  # neither takes them
    with pytest.raises(ValueError, match='not available in state'):
      nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params)


@pytest.mark.parametrize('version,name', CASES)
def test_nnx_recurrent_reproduces_old_release(version, name):
  case = OLD.case(version, name)
  model = _model(case)
  _restore(model, _without_none_and_rng_state(_params(version, name)))
  carry, outputs = _call(model, case)
  valid = old.valid(case)
  old.check(case, carry, outputs, valid)
  assert (np.asarray(outputs)[~valid] == 0).all()  # nr.RNN: zeros at padded steps
  carry, outputs = _jitted(model, case['inputs'])  # the default carry (zeros), no padding
  old.check(case, carry, outputs, want=case['default_carry'])


@pytest.mark.parametrize('version,name', [c for c in CASES if 'GRUCell' in c[1]])
def test_default_gru_cell_loads_with_bias_hn_at_zero(version, name):
  """nr's default GRUCell has one more parameter, ``bias_hn``; left at its
  initial zero, the old checkpoint's values come out."""
  case = OLD.case(version, name)
  model = _model(case, use_bias_hn=True)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, _without_none_and_rng_state(_params(version, name)))
  nnx.update(model, state)
  assert {p[-1] for p, _ in nnx.to_flat_state(state)} >= {'bias_hn'}
  carry, outputs = _call(model, case)
  old.check(case, carry, outputs, old.valid(case))


@pytest.mark.parametrize('version,name', CASES)
def test_whole_checkpoint_rng_state(version, name):
  """The whole state, RNG included: nr's layers keep no RNG state for nr's
  cells, so its ``rngs`` entries are refused; a ``keep_rngs=True`` cell's
  whole 0.11/0.12 state restores as it is (the layer keeps a stream for it)."""
  case = OLD.case(version, name)
  whole = _whole(version, name)
  rng_paths = {p for p in _flat(whole) if 'rngs' in p}
  assert rng_paths  # every release keeps RNG state in these layers
  model = _model(case)
  if name.endswith('keep_rngs=True'):
    _restore(model, whole, ...)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.RngState)):
      np.testing.assert_array_equal(jax.random.key_data(var.get_value()) if path[-1] == 'key'
                                    else var.get_value(),
                                    _flat(case['state'])[path])
  else:
    with pytest.raises(ValueError, match='not available in state'):
      nnx.replace_by_pure_dict(nnx.state(model), whole)
    _restore(model, _without_none_and_rng_state(whole), ...)
  carry, outputs = _call(model, case)
  old.check(case, carry, outputs, old.valid(case))


@pytest.mark.parametrize('version,name', CASES)
def test_todays_flax_nnx_loads_the_same_checkpoint(version, name):
  """Today's flax.nnx from the same checkpoint: the old release's values on
  every step, padding included. The whole 0.11/0.12 state restores into it; a
  0.10 state's ``Rngs`` layout does not (nor its ``Param(None)``)."""
  case = OLD.case(version, name)
  model = _model(case, nnx)
  whole = _whole(version, name)
  if version in _RNGS_LAYOUT_0_10:
    with pytest.raises(ValueError, match='not available in state'):
      nnx.replace_by_pure_dict(nnx.state(model), whole)
    _restore(model, _without_none_and_rng_state(_params(version, name)))
  else:
    _restore(model, whole, ...)
  carry, outputs = _call(model, case)
  old.check(case, carry, outputs)
  old.check(case, *_jitted(model, case['inputs']), want=case['default_carry'])


@pytest.mark.parametrize('version', sorted(OLD.by_version))
def test_a_perturbed_parameter_is_noticed(version):
  """Each case can fail: any one parameter leaf changed by 1e-2 moves the old
  release's outputs or carry on the valid steps far beyond ATOL (one case per
  cell and kind is enough to show it; the others share the code)."""
  for name in ('rnn/GRUCell', 'bidirectional/LSTMCell', 'rnn/OptimizedLSTMCell',
               'rnn/SimpleCell-residual=True'):
    case = OLD.case(version, name)
    model = _model(case)
    _restore(model, _without_none_and_rng_state(_params(version, name)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = (case['inputs'],)
    kwargs = {'initial_carry': old.unpack(case['initial_carry']),
              'seq_lengths': case['seq_lengths']}  # _call's (the program _call compiles)
    leaves, treedef = jax.tree.flatten(params)
    for i in range(len(leaves)):
      perturbed = list(leaves)
      perturbed[i] = perturbed[i] + 1e-2  # every element of one leaf
      (carry, outputs), _ = _run(graphdef, (jax.tree.unflatten(treedef, perturbed), rest),
                                 args, kwargs)
      diff = max(old.max_diff(outputs, case['outputs'], old.valid(case)),
                 *(old.max_diff(g, w) for g, w in zip(jax.tree.leaves(carry),
                                                    jax.tree.leaves(old.unpack(case['carry'])))))
      assert diff > 10 * ATOL, (name, i, diff)
