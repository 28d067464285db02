"""Writes the checkpoints of an older flax.nnx release that tests/test_old_nnx_checkpoints.py loads.

Run by hand (the tests never run it), once per release, with that release
installed in a scratch environment outside the repository, for example::

  python3.11 -m venv /tmp/oldnnx-0.10.0
  /tmp/oldnnx-0.10.0/bin/pip install flax==0.10.0 jax==0.4.34 jaxlib==0.4.34 'numpy<2.2'
  /tmp/oldnnx-0.10.0/bin/python tests/data/old_nnx/make_nnx_fixtures.py

flax.nnx has had recurrent layers (``nnx.LSTMCell``, ``OptimizedLSTMCell``,
``GRUCell``, ``SimpleCell``, ``nnx.RNN``, ``nnx.Bidirectional``) since flax
0.10.0 (0.9.0 has none). The fixtures in this folder were written by (Python
3.11.7, CPU):

  flax 0.10.0  jax/jaxlib 0.4.34  numpy 2.1.3  (a Linear without bias holds
               ``bias = Param(None)``; cells and RNNs keep the whole ``Rngs``)
  flax 0.10.7  jax/jaxlib 0.6.2   numpy 2.2.6  (no ``bias`` entry; ``Rngs`` kept as in 0.10.0)
  flax 0.11.2  jax/jaxlib 0.7.1   numpy 2.3.5  (cells keep no RNG unless ``keep_rngs=True``;
               RNN and Bidirectional keep one ``RngStream``)
  flax 0.12.0  jax/jaxlib 0.7.2   numpy 2.3.5  (the same layout as 0.11.2)

Each writes ``flax-<version>.msgpack`` beside this file, with
``flax.serialization.msgpack_serialize``: ``{'versions': {...}, 'pure_dict':
how, 'cases': {name: case}}``, where ``how`` says how the release's state was
made a plain nested dict (``State.to_pure_dict()`` before 0.10.4's
``nnx.to_pure_dict``) and a case holds what that release computed, in its own API:

* ``kind``: ``'rnn'`` (``nnx.RNN(cell, return_carry=True)``) or
  ``'bidirectional'`` (``nnx.Bidirectional`` of two such RNNs,
  ``return_carry=True``), for every cell; and ``'rnn'`` of
  ``SimpleCell(residual=True)`` and, from flax 0.11 on, of
  ``GRUCell(keep_rngs=True)`` (whose cell keeps RNG state);
* ``cell``, ``cell_kwargs``, ``in_features`` and ``hidden``: the cell class
  name and its constructor arguments, every cell built with ``rngs=nnx.Rngs(0)``
  (the forward direction) or ``nnx.Rngs(1)`` (the backward one), each layer
  with its default ``rngs``;
* ``state``: the whole ``nnx.state(model)``, as a plain nested dict, after the
  calls below: every ``nnx.Param`` redrawn from a normal distribution (a
  trained checkpoint's biases are not zeros), and the RNG state the release
  keeps in the modules, with its keys as ``jax.random.key_data`` (msgpack
  stores no typed keys; ``rng_key_impls`` names their implementation, as
  ``jax.random.wrap_key_data`` takes it);
  a flax 0.10.0-0.10.2 ``Param(None)`` is ``None``;
* ``types``: the Variable type of each entry of ``state`` (``'Param'``,
  ``'RngKey'``, ``'RngCount'``), by its path joined with ``/``;
* ``inputs``, ``seq_lengths`` (one full row, one of 3 steps),
  ``initial_carry``, and the release's ``outputs`` and final ``carry`` of the
  call ``model(inputs, initial_carry=..., seq_lengths=...)``; a tuple carry is
  stored as ``{'0': c, '1': h}`` (a Bidirectional's as ``{'0': fwd, '1': bwd}``);
* ``default_carry``: ``{'outputs', 'carry'}`` of ``model(inputs)``, the
  default carry (zeros, drawn through the layer's own RNG) and no padding.

Sizes are tiny (batch 2, time 5, 3 input features, hidden 4): the four files
are about 93 KB in all.

(Not named make_fixtures.py like tests/data/old_flax's: the suite's
``--doctest-modules`` imports both by their file name, which must differ.)
"""

from __future__ import annotations

import os
import platform
import sys

BATCH, TIME, IN_FEATURES, HIDDEN = 2, 5, 3, 4
SEQ_LENGTHS = (5, 3)  # one full row and one padded row


def _pack(carry):
  """A tuple carry as a dict of its positions (msgpack keeps dicts, not tuples)."""
  if isinstance(carry, tuple):
    return {str(i): _pack(c) for i, c in enumerate(carry)}
  return carry


def main() -> None:
  import warnings

  import flax
  import jax
  import jaxlib
  import numpy as np
  from flax import nnx, serialization

  warnings.simplefilter('ignore')  # keep_rngs and .value deprecations of later releases
  rng = np.random.default_rng(int(flax.__version__.replace('.', '')))

  def normal(shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  cells = [n for n in ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell')
           if hasattr(nnx, n)]
  has_keep_rngs = 'keep_rngs' in nnx.GRUCell.__init__.__code__.co_varnames

  def random_carry(name):
    if name in ('LSTMCell', 'OptimizedLSTMCell'):
      return (normal((BATCH, HIDDEN)), normal((BATCH, HIDDEN)))
    return normal((BATCH, HIDDEN))

  def make_rnn(name, kwargs, seed):
    cell = getattr(nnx, name)(IN_FEATURES, HIDDEN, **kwargs, rngs=nnx.Rngs(seed))
    return nnx.RNN(cell, return_carry=True)

  def flat_state(state):
    """(path, Variable or VariableState) pairs, in the release's own API."""
    if hasattr(nnx, 'to_flat_state'):  # flax 0.10.4 on
      return list(nnx.to_flat_state(state))
    return list(state.flat_state().items())

  if hasattr(nnx, 'to_pure_dict'):
    how = 'nnx.to_pure_dict(nnx.state(model))'
    to_pure_dict = nnx.to_pure_dict
  else:
    how = 'nnx.state(model).to_pure_dict()'
    to_pure_dict = nnx.State.to_pure_dict

  key_impls = set()

  def plain(leaf):
    """A leaf of the pure dict as msgpack stores it (typed keys as their data)."""
    if leaf is None:  # flax 0.10.0-0.10.2: Param(None) of a Linear without bias
      return None
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(leaf)  # jax 0.4's PRNGSpec prints its short tag, 'fry'
      key_impls.add(getattr(getattr(impl, '_impl', None), 'name', None) or str(impl))
      return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)

  def pure_state(model):
    state = nnx.state(model)
    pure = to_pure_dict(state)
    flat = jax.tree_util.tree_flatten_with_path(pure, is_leaf=lambda x: x is None)
    pure = jax.tree_util.tree_unflatten(flat[1], [plain(v) for _, v in flat[0]])
    types = {'/'.join(map(str, path)): getattr(v, 'type', type(v)).__name__
             for path, v in flat_state(state)}
    return pure, types

  def redraw(model):
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda p: normal(np.shape(p), 0.5), params))

  cases = {}

  def add(case_name, kind, name, kwargs):
    x = normal((BATCH, TIME, IN_FEATURES))
    seq_lengths = np.asarray(SEQ_LENGTHS, np.int32)
    if kind == 'rnn':
      model = make_rnn(name, kwargs, 0)
      carry0 = random_carry(name)
    else:
      model = nnx.Bidirectional(make_rnn(name, kwargs, 0), make_rnn(name, kwargs, 1),
                                return_carry=True)
      carry0 = (random_carry(name), random_carry(name))
    redraw(model)
    carry, y = model(x, initial_carry=carry0, seq_lengths=seq_lengths)
    default_carry, default_y = model(x)
    state, types = pure_state(model)
    cases[case_name] = {
      'kind': kind, 'cell': name, 'cell_kwargs': kwargs, 'in_features': IN_FEATURES,
      'hidden': HIDDEN, 'state': state, 'types': types, 'inputs': x,
      'seq_lengths': seq_lengths, 'initial_carry': _pack(carry0), 'outputs': np.asarray(y),
      'carry': _pack(jax.tree_util.tree_map(np.asarray, carry)),
      'default_carry': {'outputs': np.asarray(default_y),
                        'carry': _pack(jax.tree_util.tree_map(np.asarray, default_carry))},
    }

  for name in cells:
    add(f'rnn/{name}', 'rnn', name, {})
    add(f'bidirectional/{name}', 'bidirectional', name, {})
  add('rnn/SimpleCell-residual=True', 'rnn', 'SimpleCell', {'residual': True})
  if has_keep_rngs:  # flax 0.11 on: the cell keeps a fork of the `carry` stream
    add('rnn/GRUCell-keep_rngs=True', 'rnn', 'GRUCell', {'keep_rngs': True})

  versions = {'flax': flax.__version__, 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
              'numpy': np.__version__, 'python': platform.python_version(),
              'backend': jax.default_backend()}
  data = serialization.msgpack_serialize({
    'versions': versions, 'pure_dict': how, 'rng_key_impls': sorted(key_impls), 'cases': cases})
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      f'flax-{flax.__version__}.msgpack')
  with open(path, 'wb') as f:
    f.write(data)
  print(f'{path}: {len(cases)} cases, {len(data)} bytes, {versions}, {how}', file=sys.stderr)


if __name__ == '__main__':
  main()
