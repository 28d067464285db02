"""The state layout users' checkpoints are saved in stays what it was.

A checkpoint (orbax, or any ``nnx.state`` serialisation) stores each variable under its path
in the module tree. Renaming a parameter, regrouping a cell's gates, changing a shape or a
variable type makes every saved checkpoint of that module fail to restore, so the layout is
frozen in ``tests/data/state_layout.txt``: path, variable type, shape and dtype of every variable of
every public module, with the options that add or remove state. A deliberate change updates that
file (``python -m tests.test_state_layout`` rewrites it) and says in
docs/checkpoints_and_sharding.md how to load the old checkpoints.

compat's modules are not listed: their parameter trees are flax.linen's, which
tests/test_compat.py checks against flax.linen itself.
"""

import difflib
import pathlib
import warnings

import jax
from flax import nnx

import nnx_recurrent as nr

LAYOUT = pathlib.Path(__file__).parent / 'data' / 'state_layout.txt'
IN, H = 3, 4


def _zoo():
  """Every public module, default and with the options that change its state."""
  r = lambda: nnx.Rngs(0)
  conv = dict(kernel_size=(3,))
  return {
    'SimpleCell': lambda: nr.SimpleCell(IN, H, rngs=r()),
    'SimpleCell(residual)': lambda: nr.SimpleCell(IN, IN, residual=True, rngs=r()),
    'LSTMCell': lambda: nr.LSTMCell(IN, H, rngs=r()),
    'LSTMCell(proj_features)': lambda: nr.LSTMCell(IN, H, proj_features=2, rngs=r()),
    'OptimizedLSTMCell': lambda: nr.OptimizedLSTMCell(IN, H, rngs=r()),
    'OptimizedLSTMCell(proj_features)':
      lambda: nr.OptimizedLSTMCell(IN, H, proj_features=2, rngs=r()),
    'GRUCell': lambda: nr.GRUCell(IN, H, rngs=r()),
    'GRUCell(use_bias_hn=False)': lambda: nr.GRUCell(IN, H, use_bias_hn=False, rngs=r()),
    'MGUCell': lambda: nr.MGUCell(IN, H, rngs=r()),
    'MGUCell(reset_gate=False)': lambda: nr.MGUCell(IN, H, reset_gate=False, rngs=r()),
    'ConvLSTMCell': lambda: nr.ConvLSTMCell(IN, H, **conv, rngs=r()),
    'ConvLSTMCell(use_bias=False)':
      lambda: nr.ConvLSTMCell(IN, H, **conv, use_bias=False, rngs=r()),
    'ConvGRUCell': lambda: nr.ConvGRUCell(IN, H, **conv, rngs=r()),
    'LayerNormLSTMCell': lambda: nr.LayerNormLSTMCell(IN, H, rngs=r()),
    'LayerNormLSTMCell(use_scale=False, use_bias=False)':
      lambda: nr.LayerNormLSTMCell(IN, H, use_scale=False, use_bias=False, rngs=r()),
    'LayerNormGRUCell': lambda: nr.LayerNormGRUCell(IN, H, rngs=r()),
    'GRUCell(dropout_rate)': lambda: nr.GRUCell(IN, H, dropout_rate=0.5, rngs=r()),
    'LSTMCell(keep_rngs)': lambda: nr.LSTMCell(IN, H, keep_rngs=True, rngs=r()),
    'RNN(LSTMCell)': lambda: nr.RNN(nr.LSTMCell(IN, H, rngs=r())),
    'RNN(GRUCell, learn_initial_carry)':
      lambda: nr.RNN(nr.GRUCell(IN, H, rngs=r()), learn_initial_carry=True),
    'RNN(OptimizedLSTMCell, learn_initial_carry)':
      lambda: nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=r()), learn_initial_carry=True),
    'Bidirectional': lambda: nr.Bidirectional(nr.RNN(nr.GRUCell(IN, H, rngs=r())),
                                              nr.RNN(nr.LSTMCell(IN, H, rngs=r()))),
    'StackedRNN(dropout_rate)': lambda: nr.StackedRNN(
      nr.RNN(nr.SimpleCell(IN, H, rngs=r())), nr.RNN(nr.MGUCell(H, H, rngs=r())),
      dropout_rate=0.5, rngs=r()),
    'LSTM': lambda: nr.LSTM(IN, H, rngs=r()),
    'LSTM(num_layers=2, bidirectional, dropout_rate, proj_features)':
      lambda: nr.LSTM(IN, H, num_layers=2, bidirectional=True, dropout_rate=0.5,
                      proj_features=2, rngs=r()),
    'GRU': lambda: nr.GRU(IN, H, rngs=r()),
    'GRU(num_layers=2, bidirectional)':
      lambda: nr.GRU(IN, H, num_layers=2, bidirectional=True, rngs=r()),
  }


def _describe(name, module):
  lines = []
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    value = variable.get_value()
    dtype = value.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      dtype = 'prng_key'  # the implementation (threefry, rbg) is a jax setting
    path = '/'.join(str(p) for p in path)
    lines.append(f'{name} | {path} | {type(variable).__name__} | {value.shape} | {dtype}')
  return lines


def layout():
  lines = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', UserWarning)  # keep_rngs' deprecation, as flax.nnx's
    for name, make in _zoo().items():
      lines.extend(_describe(name, nnx.eval_shape(make)))
  return '\n'.join(lines) + '\n'


def test_state_layout_is_unchanged():
  expected, got = LAYOUT.read_text(), layout()
  diff = ''.join(difflib.unified_diff(expected.splitlines(True), got.splitlines(True),
                                      'tests/data/state_layout.txt', 'this checkout'))
  assert got == expected, (
    'The state layout changed, so checkpoints saved before this change will not restore. '
    'If that is intended, rewrite the file with `python -m tests.test_state_layout` and '
    'document how to load old checkpoints in docs/checkpoints_and_sharding.md.\n' + diff)


def test_layout_file_lists_every_public_module():
  """A new public module gets a row too (else its layout is not frozen)."""
  listed = {line.split(' | ')[0].split('(')[0] for line in LAYOUT.read_text().splitlines()}
  modules = {name for name in nr.__all__ if isinstance(getattr(nr, name), type)
             and issubclass(getattr(nr, name), nnx.Module)
             and name not in ('RNNCellBase', 'DropoutMasks')}
  assert modules <= listed, sorted(modules - listed)


if __name__ == '__main__':
  LAYOUT.parent.mkdir(exist_ok=True)
  LAYOUT.write_text(layout())
  print(f'wrote {LAYOUT}')
