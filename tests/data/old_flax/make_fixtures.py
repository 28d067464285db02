"""Writes the checkpoints of an older flax release that tests/test_old_flax_checkpoints.py loads.

Run by hand (the tests never run it), once per release, with that release
installed in a scratch environment outside the repository, for example::

  python3.11 -m venv /tmp/oldflax-0.6
  /tmp/oldflax-0.6/bin/pip install flax==0.6.11 jax==0.4.13 jaxlib==0.4.13 \
      'numpy<1.26' 'ml_dtypes<0.3'
  /tmp/oldflax-0.6/bin/python tests/data/old_flax/make_fixtures.py

The fixtures in this folder were written by (Python 3.11, CPU):

  flax 0.6.11  jax/jaxlib 0.4.13  numpy 1.25.2  (cells without `features`, RNN(cell, cell_size))
  flax 0.7.5   jax/jaxlib 0.4.20  numpy 1.26.4  (the RNNCellBase upgrade, MGUCell)
  flax 0.8.5   jax/jaxlib 0.4.30  numpy 1.26.4  (SimpleCell, MGUCell(reset_gate))
  flax 0.10.7  jax/jaxlib 0.6.2   numpy 2.4.6

Each writes ``flax-<version>.msgpack`` beside this file, with
``flax.serialization.msgpack_serialize``: ``{'versions': {...}, 'cases': {name:
case}}``, where a case holds what that release computed, in its own API:

* ``kind``: ``'scan'`` (the pre-``nn.RNN`` idiom, ``nn.scan`` of the cell class
  inside ``@nn.compact``, its parameters under the scanned module's automatic
  name), ``'rnn'`` (``nn.RNN(cell)``, ``return_carry=True``, ``seq_lengths``)
  or ``'bidirectional'`` (``nn.Bidirectional`` of two such RNNs);
* ``cell`` and ``cell_kwargs``: the cell class name and its fields (besides
  ``features``; ``features`` is ``hidden``, also for releases whose cells took
  no ``features``);
* ``variables``: ``{'params': ...}`` as that release's ``init`` created them,
  then every leaf redrawn from a normal distribution (a trained checkpoint's
  biases are not zeros);
* ``inputs``, ``seq_lengths`` (absent for ``'scan'``), ``initial_carry``, and
  the release's ``outputs`` and final ``carry``; a tuple carry is stored as
  ``{'0': c, '1': h}`` (a Bidirectional's as ``{'0': fwd, '1': bwd}``).

Sizes are tiny (batch 2, time 5, 3 input features, hidden 4; ConvLSTMCell on
3x3 images of 2 channels with 2 features): the four files are about 110 KB in all.
"""

from __future__ import annotations

import os
import platform
import sys

BATCH, TIME, IN_FEATURES, HIDDEN = 2, 5, 3, 4
CONV_SPATIAL, CONV_IN, CONV_FEATURES = (3, 3), 2, 2
SEQ_LENGTHS = (5, 3)  # one full row and one padded row


def _pack(carry):
  """A tuple carry as a dict of its positions (msgpack keeps dicts, not tuples)."""
  if isinstance(carry, tuple):
    return {str(i): _pack(c) for i, c in enumerate(carry)}
  return carry


def main() -> None:
  import flax
  import flax.linen as nn
  import jax
  import jaxlib
  import numpy as np
  from flax import serialization
  from flax.core import unfreeze

  rng = np.random.default_rng(int(flax.__version__.replace('.', '')))

  def normal(shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  # Before the RNNCellBase upgrade (flax 0.7.0) the Dense cells took no
  # `features` and nn.RNN took the hidden size as `cell_size`.
  new_api = 'features' in nn.LSTMCell.__dataclass_fields__
  cells = [n for n in ('LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'MGUCell', 'SimpleCell',
                       'ConvLSTMCell') if hasattr(nn, n)]

  def cell_kwargs(name, variant=None):
    kwargs = dict(variant or {})
    if name == 'ConvLSTMCell':
      kwargs['kernel_size'] = [2, 2]
    return kwargs

  def make_cell(name, kwargs):
    cls = getattr(nn, name)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    if name == 'ConvLSTMCell':
      return cls(features=CONV_FEATURES, **kwargs)
    return cls(features=HIDDEN, **kwargs) if new_api else cls(**kwargs)

  def shapes(name):
    if name == 'ConvLSTMCell':
      return (BATCH, TIME, *CONV_SPATIAL, CONV_IN), (BATCH, *CONV_SPATIAL, CONV_FEATURES)
    return (BATCH, TIME, IN_FEATURES), (BATCH, HIDDEN)

  def random_carry(name, carry_shape):
    if name in ('LSTMCell', 'OptimizedLSTMCell', 'ConvLSTMCell'):
      return (normal(carry_shape), normal(carry_shape))
    return normal(carry_shape)

  def make_rnn(name, kwargs):
    if new_api:
      return nn.RNN(make_cell(name, kwargs), return_carry=True)
    size = (*CONV_SPATIAL, CONV_FEATURES) if name == 'ConvLSTMCell' else HIDDEN
    return nn.RNN(make_cell(name, kwargs), cell_size=size, return_carry=True)

  def scan_model(name, kwargs):
    cls = getattr(nn, name)
    fields = dict(kwargs)
    if name == 'ConvLSTMCell':
      fields['features'] = CONV_FEATURES
    elif new_api:
      fields['features'] = HIDDEN
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}

    class Encoder(nn.Module):  # as written before nn.RNN
      @nn.compact
      def __call__(self, carry, x):
        scanned = nn.scan(cls, variable_broadcast='params', split_rngs={'params': False},
                          in_axes=1, out_axes=1)
        return scanned(**fields)(carry, x)

    return Encoder()

  def redraw(variables):
    variables = unfreeze(variables)
    return jax.tree_util.tree_map(lambda p: normal(np.shape(p), 0.5), variables)

  def numpy_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)

  key = jax.random.PRNGKey(0)
  cases = {}

  def add(case_name, kind, name, kwargs):
    x_shape, carry_shape = shapes(name)
    x = normal(x_shape)
    case = {'kind': kind, 'cell': name, 'cell_kwargs': kwargs, 'hidden': carry_shape[-1],
            'inputs': x}
    if kind == 'scan':
      model = scan_model(name, kwargs)
      carry0 = random_carry(name, carry_shape)
      variables = redraw(model.init(key, carry0, x))
      carry, y = model.apply(variables, carry0, x)
    else:
      seq_lengths = np.asarray(SEQ_LENGTHS, np.int32)
      case['seq_lengths'] = seq_lengths
      if kind == 'rnn':
        model = make_rnn(name, kwargs)
        carry0 = random_carry(name, carry_shape)
      else:
        model = nn.Bidirectional(make_rnn(name, kwargs), make_rnn(name, kwargs),
                                 return_carry=True)
        carry0 = (random_carry(name, carry_shape), random_carry(name, carry_shape))
      variables = redraw(model.init(key, x, initial_carry=carry0, seq_lengths=seq_lengths))
      carry, y = model.apply(variables, x, initial_carry=carry0, seq_lengths=seq_lengths)
    case.update(variables=numpy_tree(variables), initial_carry=_pack(carry0),
                outputs=np.asarray(y), carry=_pack(numpy_tree(carry)))
    cases[case_name] = case

  for name in cells:
    add(f'scan/{name}', 'scan', name, cell_kwargs(name))
    add(f'rnn/{name}', 'rnn', name, cell_kwargs(name))
    if name != 'ConvLSTMCell':
      add(f'bidirectional/{name}', 'bidirectional', name, cell_kwargs(name))
  if hasattr(nn, 'MGUCell') and 'reset_gate' in nn.MGUCell.__dataclass_fields__:
    add('rnn/MGUCell-reset_gate=False', 'rnn', 'MGUCell', {'reset_gate': False})
  if hasattr(nn, 'SimpleCell'):
    add('rnn/SimpleCell-residual=True', 'rnn', 'SimpleCell', {'residual': True})

  versions = {'flax': flax.__version__, 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
              'numpy': np.__version__, 'python': platform.python_version(),
              'backend': jax.default_backend()}
  data = serialization.msgpack_serialize({'versions': versions, 'cases': cases})
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      f'flax-{flax.__version__}.msgpack')
  with open(path, 'wb') as f:
    f.write(data)
  print(f'{path}: {len(cases)} cases, {len(data)} bytes, {versions}', file=sys.stderr)


if __name__ == '__main__':
  main()
