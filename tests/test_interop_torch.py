"""nr.interop against PyTorch itself: from_torch / to_torch give PyTorch's numbers.

PyTorch is the independent reference: every test runs the torch module and the
converted (or original) nnx module on the same inputs and compares outputs and
final states, plain and packed (``pack_padded_sequence`` / ``pad_packed_sequence``).
"""

import copy
import functools
import importlib
import re
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests.fresh_import import fresh_package
from tests.random_params import random_module
from tests.user_cells import lora_swapped

torch = pytest.importorskip('torch')
from torch.nn.utils import rnn as torch_rnn  # noqa: E402

ATOL = 1e-5
B, T, IN, H = 3, 5, 4, 6
LENGTHS = np.array([5, 2, 4])  # >= 1: PyTorch cannot pack empty rows


def _np(t):
  return t.detach().numpy()


def _inputs(batch_first, seed=0):
  x = np.random.default_rng(seed).normal(size=(B, T, IN)).astype(np.float32)
  return x if batch_first else np.swapaxes(x, 0, 1).copy()


def _torch_run(module, x, lengths=None):
  """PyTorch's output ``(outputs, h_n, c_n or None)``, packed when ``lengths`` is given."""
  xt = torch.from_numpy(x)
  with torch.no_grad():
    if lengths is None:
      out, state = module(xt)
    else:
      packed = torch_rnn.pack_padded_sequence(
        xt, torch.from_numpy(lengths), batch_first=module.batch_first, enforce_sorted=False)
      out, state = module(packed)
      out, _ = torch_rnn.pad_packed_sequence(out, batch_first=module.batch_first,
                                             total_length=T)
  h_n, c_n = state if isinstance(state, tuple) else (state, None)
  return _np(out), _np(h_n), None if c_n is None else _np(c_n)


def _torch_state(carry, lstm):
  """Our carry as PyTorch's ``(h_n, c_n)``: its leaves are already in PyTorch's
  (layer-major, direction-minor) order; an LSTM cell's carry is ``(c, h)``."""
  leaves = jax.tree_util.tree_leaves(carry)
  if lstm:
    return np.stack(leaves[1::2]), np.stack(leaves[0::2])
  return np.stack(leaves), None


def _assert_same(ours, theirs):
  (carry, y), (y_t, h_t, c_t) = ours, theirs
  np.testing.assert_allclose(np.asarray(y), y_t, atol=ATOL, rtol=0)
  h, c = _torch_state(carry, c_t is not None)
  np.testing.assert_allclose(h, h_t, atol=ATOL, rtol=0)
  if c_t is not None:
    np.testing.assert_allclose(c, c_t, atol=ATOL, rtol=0)


def _torch_layer(kind, num_layers, bidirectional, batch_first, bias=True, dropout=0.0):
  torch.manual_seed(num_layers * 10 + bidirectional)
  kw = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first,
            bias=bias, dropout=dropout)
  if kind.startswith('RNN'):
    return torch.nn.RNN(IN, H, nonlinearity=kind.split('_')[1], **kw)
  return getattr(torch.nn, kind)(IN, H, **kw)


@nnx.jit
def _run(model, x, lengths):
  """One compiled call per model, with and without padding (lengths all ``T``)."""
  return model(x, seq_lengths=lengths, return_carry=True)


@nnx.jit
def _call(model, *args):
  """``model(*args)`` compiled once per model and shapes (eagerly, each
  operation compiles once per shape, and a scan at every call)."""
  return model(*args)


def _check_against_torch(model, module):
  """Plain and packed runs of ``module`` equal ``model``'s, padding zero on both sides."""
  x = _inputs(module.batch_first)
  # int32 lengths, as the packed call's: a weak-typed jnp.full((B,), T) would
  # compile the model a second time.
  _assert_same(_run(model, x, jnp.asarray(np.full(B, T, np.int32))), _torch_run(module, x))
  ours = _run(model, x, jnp.asarray(LENGTHS))
  _assert_same(ours, _torch_run(module, x, LENGTHS))
  y = np.asarray(ours[1]) if module.batch_first else np.swapaxes(np.asarray(ours[1]), 0, 1)
  assert (y[1, 2:] == 0).all() and np.abs(y[1, :2]).max() > 0


LAYER_CASES = [
  # kind, num_layers, bidirectional, batch_first, bias, dropout
  ('LSTM', 1, False, True, True, 0.0),
  ('LSTM', 2, True, False, False, 0.5),
  ('GRU', 1, True, False, True, 0.0),
  ('GRU', 3, False, True, False, 0.5),
  ('RNN_tanh', 2, True, True, True, 0.0),
  ('RNN_tanh', 1, True, False, True, 0.0),  # one nr.Bidirectional, time-major
  ('RNN_tanh', 1, False, False, True, 0.0),  # torch.nn.RNN's defaults: one nr.RNN, time-major
  ('RNN_relu', 3, False, False, False, 0.5),
]


@pytest.mark.parametrize('kind,num_layers,bidirectional,batch_first,bias,dropout', LAYER_CASES)
def test_from_torch_layer(kind, num_layers, bidirectional, batch_first, bias, dropout):
  module = _torch_layer(kind, num_layers, bidirectional, batch_first, bias, dropout).eval()
  model = nr.interop.from_torch(module)
  expected_type = {'LSTM': 'LSTM', 'GRU': 'GRU'}.get(
    kind, 'StackedRNN' if num_layers > 1 else 'Bidirectional' if bidirectional else 'RNN')
  assert type(model).__name__ == expected_type
  assert model.time_major == (not batch_first)
  if num_layers > 1:
    assert model.dropout_rate == dropout
  # An eval-mode torch module converts to an eval-mode model: dropout is off.
  _check_against_torch(model, module)


def _rand_carry(seed=1):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, H)).astype(np.float32)
  c = rng.normal(size=(B, H)).astype(np.float32)
  return h, c


@pytest.mark.parametrize('kind,bias', [('LSTMCell', True), ('LSTMCell', False),
                                       ('GRUCell', True), ('GRUCell', False),
                                       ('RNNCell_tanh', True), ('RNNCell_relu', True)])
def test_from_torch_cell(kind, bias):
  torch.manual_seed(0)
  name, _, nonlinearity = kind.partition('_')
  kw = {'nonlinearity': nonlinearity} if nonlinearity else {}
  module = getattr(torch.nn, name)(IN, H, bias=bias, **kw)
  cell = nr.interop.from_torch(module)
  assert type(cell).__name__ == {'LSTMCell': 'OptimizedLSTMCell', 'GRUCell': 'GRUCell',
                                 'RNNCell': 'SimpleCell'}[name]
  h, c = _rand_carry()
  carry = (jnp.asarray(c), jnp.asarray(h)) if name == 'LSTMCell' else jnp.asarray(h)
  state = (torch.from_numpy(h), torch.from_numpy(c)) if name == 'LSTMCell' else \
      torch.from_numpy(h)
  for t, x_t in enumerate(_inputs(True)[:, :3].transpose(1, 0, 2)):  # three steps
    carry, y = _call(cell, carry, jnp.asarray(x_t))
    with torch.no_grad():
      state = module(torch.from_numpy(x_t), state)
    h_t = state[0] if name == 'LSTMCell' else state
    np.testing.assert_allclose(np.asarray(y), _np(h_t), atol=ATOL, rtol=0, err_msg=f'step {t}')
    if name == 'LSTMCell':
      np.testing.assert_allclose(np.asarray(carry[0]), _np(state[1]), atol=ATOL, rtol=0)


@pytest.mark.parametrize('name', ['GRUCell', 'RNNCell', 'LSTMCell'])
def test_a_cell_called_in_torchs_order_says_so(name):
  # PyTorch's h = cell(x, h) here: "expected last axis of size 4 (the cell's
  # in_features), got shape (3, 6)" named no order. The order here gives torch's numbers.
  torch.manual_seed(0)
  module = getattr(torch.nn, name)(IN, H)
  cell = nr.interop.from_torch(module)
  x, (h, c) = _inputs(True)[:, 0], _rand_carry()
  swapped = (x, (h, c)) if name == 'LSTMCell' else (x, h)  # torch's order
  with pytest.raises((ValueError, TypeError), match=r'a cell is called as cell\(carry, inputs\)'):
    cell(*swapped)
  if name != 'LSTMCell':  # an LSTM's tuple as inputs: "expected an array (a cell ...)"
    with pytest.raises(ValueError, match=rf"{type(cell).__name__}: `inputs` expected last axis "
                       rf"of size {IN} \(the cell's in_features; a cell is called as "
                       r"cell\(carry, inputs\), PyTorch's cell\(input, hx\) the other way "
                       rf"round\), got shape \({B}, {H}\), with a carry of shape \({B}, {IN}\), "
                       r"the inputs' size\."):
      cell(*swapped)
  carry = (jnp.asarray(c), jnp.asarray(h)) if name == 'LSTMCell' else jnp.asarray(h)
  _, y = _call(cell, carry, jnp.asarray(x))
  with torch.no_grad():
    state = module(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c))
                   if name == 'LSTMCell' else torch.from_numpy(h))
  np.testing.assert_allclose(y, _np(state[0] if name == 'LSTMCell' else state), atol=ATOL, rtol=0)
  # The LSTM cell with a bare array carry and h as inputs: the swap, named.
  if name == 'LSTMCell':
    with pytest.raises(ValueError, match=r"PyTorch's cell\(input, hx\) the other way round"):
      cell(x, h)


# -- to_torch ---------------------------------------------------------------------
def _cell(kind, n_in, rngs, **kw):
  if kind == 'RNN_relu':
    return nr.SimpleCell(n_in, H, activation_fn=nnx.relu, rngs=rngs, **kw)
  if kind == 'RNN_tanh':
    return nr.SimpleCell(n_in, H, rngs=rngs, **kw)
  return getattr(nr, kind)(n_in, H, rngs=rngs, **kw)


def _bidirectional(kind, n_in, rngs):
  return nr.Bidirectional(nr.RNN(_cell(kind, n_in, rngs)), nr.RNN(_cell(kind, n_in, rngs)))


NNX_MODELS = {  # rngs -> model
  'RNN(LSTMCell) time major': lambda rngs: nr.RNN(_cell('LSTMCell', IN, rngs), time_major=True),
  'Bidirectional(GRUCell)': lambda rngs: _bidirectional('GRUCell', IN, rngs),
  'LSTM 2 layers bidirectional': lambda rngs: nr.LSTM(IN, H, num_layers=2, bidirectional=True,
                                                      rngs=rngs),
  'GRU 2 layers time major': lambda rngs: nr.GRU(IN, H, num_layers=2, time_major=True,
                                                 rngs=rngs),
  'StackedRNN of Bidirectional(SimpleCell relu)': lambda rngs: nr.StackedRNN(
    _bidirectional('RNN_relu', IN, rngs), _bidirectional('RNN_relu', 2 * H, rngs),
    dropout_rate=0.25, rngs=rngs),
  'StackedRNN of RNN(OptimizedLSTMCell) time major': lambda rngs: nr.StackedRNN(
    nr.RNN(_cell('OptimizedLSTMCell', IN, rngs)), nr.RNN(_cell('OptimizedLSTMCell', H, rngs)),
    time_major=True),
}


@pytest.mark.parametrize('name', list(NNX_MODELS))
def test_to_torch_layer(name):
  model = random_module(lambda: NNX_MODELS[name](nnx.Rngs(0)))
  model.eval()
  module = nr.interop.to_torch(model)
  assert module.dropout == getattr(model, 'dropout_rate', 0.0)  # 0.25 for the stack of two
  _check_against_torch(model, module.eval())


@pytest.mark.parametrize('kind', ['OptimizedLSTMCell', 'LSTMCell', 'GRUCell', 'RNN_tanh',
                                  'RNN_relu'])
def test_to_torch_cell(kind):
  cell = random_module(lambda: _cell(kind, IN, nnx.Rngs(0)))
  module = nr.interop.to_torch(cell)
  lstm = 'LSTM' in kind
  assert type(module).__name__ == ('LSTMCell' if lstm else 'GRUCell' if kind == 'GRUCell'
                                   else 'RNNCell')
  h, c = _rand_carry()
  x = _inputs(True)[:, 0]
  carry, y = _call(cell, (jnp.asarray(c), jnp.asarray(h)) if lstm else jnp.asarray(h),
                    jnp.asarray(x))
  with torch.no_grad():
    state = module(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)) if lstm
                   else torch.from_numpy(h))
  np.testing.assert_allclose(np.asarray(y), _np(state[0] if lstm else state), atol=ATOL, rtol=0)
  if lstm:
    np.testing.assert_allclose(np.asarray(carry[0]), _np(state[1]), atol=ATOL, rtol=0)


def test_gru_cell_without_bias_hn_exports_with_zero_b_hn():
  # In the parameters' dtype too: zeros of another dtype for b_hn would make a
  # bfloat16 cell one "of several dtypes", refused.
  h, _ = _rand_carry()
  x = _inputs(True)[:, 0]
  for dtype, atol in ((jnp.float32, ATOL), (jnp.bfloat16, 2e-2)):
    cell = random_module(lambda dtype=dtype: nr.GRUCell(IN, H, use_bias_hn=False,
                                                        param_dtype=dtype, rngs=nnx.Rngs(0)))
    module = nr.interop.to_torch(cell)
    torch_dtype = getattr(torch, jnp.dtype(dtype).name)
    assert {p.dtype for p in module.parameters()} == {torch_dtype}
    np.testing.assert_array_equal(_np(module.bias_hh.float())[2 * H:], 0)
    with torch.no_grad():
      expected = module(torch.from_numpy(x).to(torch_dtype),
                        torch.from_numpy(h).to(torch_dtype)).float().numpy()
    y = _call(cell, jnp.asarray(h, dtype), jnp.asarray(x, dtype))[1]
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=atol, rtol=0)


def test_round_trip_keeps_parameters():
  module = _torch_layer('GRU', 2, True, True)
  back = nr.interop.to_torch(nr.interop.from_torch(module))
  ours, theirs = dict(back.named_parameters()), dict(module.named_parameters())
  assert sorted(ours) == sorted(theirs)
  # Weights survive exactly; b_hr, b_hz move into bias_ih (their sum survives), b_in and
  # b_hn stay where they were.
  for layer in ('_l0', '_l1', '_l0_reverse', '_l1_reverse'):
    for w in ('weight_ih', 'weight_hh'):
      np.testing.assert_array_equal(_np(ours[w + layer]), _np(theirs[w + layer]))
    b_ih, b_hh = _np(theirs['bias_ih' + layer]), _np(theirs['bias_hh' + layer])
    r_ih, r_hh = _np(ours['bias_ih' + layer]), _np(ours['bias_hh' + layer])
    np.testing.assert_allclose(r_ih[:2 * H] + r_hh[:2 * H], b_ih[:2 * H] + b_hh[:2 * H],
                               atol=1e-6)
    np.testing.assert_array_equal(r_ih[2 * H:], b_ih[2 * H:])  # b_in
    np.testing.assert_array_equal(r_hh[2 * H:], b_hh[2 * H:])  # b_hn


P = 2  # proj_size: PyTorch requires proj_size < hidden_size


def test_projected_lstm_both_ways():
  """``torch.nn.LSTM(proj_size=P)``, two bidirectional layers, time-major:
  from_torch gives ``nr.LSTM(proj_features=P)`` with PyTorch's outputs and
  ``(h_n, c_n)`` (h of P features, c of H), plain and packed; to_torch gives
  the weights back exactly. And to_torch of a stack of ``nr.RNN``s over
  projected cells of both kinds, against PyTorch."""
  torch.manual_seed(3)
  module = torch.nn.LSTM(IN, H, proj_size=P, num_layers=2, bidirectional=True).eval()
  model = nr.interop.from_torch(module)
  assert type(model).__name__ == 'LSTM' and model.proj_features == P
  assert model.forward[1].dense_i.kernel.shape == (2 * P, 4 * H)
  _check_against_torch(model, module)
  back = nr.interop.to_torch(model)
  assert back.proj_size == P
  theirs, ours = dict(module.named_parameters()), dict(back.named_parameters())
  for name, value in ours.items():
    if not name.startswith('bias'):
      np.testing.assert_array_equal(_np(value), _np(theirs[name]), err_msg=name)
    elif name.startswith('bias_ih'):  # b_ih + b_hh moves into b_ih, b_hh is zero
      b_hh = name.replace('bias_ih', 'bias_hh')
      np.testing.assert_allclose(_np(value), _np(theirs[name]) + _np(theirs[b_hh]), atol=1e-6,
                                 rtol=0, err_msg=name)
      np.testing.assert_array_equal(_np(ours[b_hh]), 0, err_msg=b_hh)

  def projected(kind, n_in, rngs):
    return nr.RNN(getattr(nr, kind)(n_in, H, proj_features=P, rngs=rngs))

  stack = random_module(lambda: nr.StackedRNN(
    nr.Bidirectional(projected('OptimizedLSTMCell', IN, nnx.Rngs(0)),
                     projected('LSTMCell', IN, nnx.Rngs(1))),
    nr.Bidirectional(projected('LSTMCell', 2 * P, nnx.Rngs(2)),
                     projected('OptimizedLSTMCell', 2 * P, nnx.Rngs(3)))))
  exported = nr.interop.to_torch(stack).eval()
  assert (exported.proj_size, exported.num_layers, exported.bidirectional) == (P, 2, True)
  _check_against_torch(stack, exported)


def test_from_torch_keeps_training_mode():
  module = _torch_layer('LSTM', 2, False, True, dropout=0.5)  # training mode
  model = nr.interop.from_torch(module, rngs=nnx.Rngs(0))
  x = _inputs(True)
  forward = nnx.jit(lambda model, x: model(x))
  assert not np.allclose(forward(model, x), forward(model, x))  # dropout is on
  model.eval()
  np.testing.assert_allclose(np.asarray(forward(model, x)), _torch_run(module.eval(), x)[0],
                             atol=ATOL, rtol=0)


def test_to_torch_warns_that_variational_dropout_is_left_out():
  """The torch module would train without the cells' dropout: say so. The
  eval-mode outputs are the model's."""
  model = random_module(lambda: nr.RNN(_cell('GRUCell', IN, nnx.Rngs(0), dropout_rate=0.3,
                                             recurrent_dropout_rate=0.2)))
  with pytest.warns(UserWarning, match=r'to_torch: PyTorch has no variational dropout.*0\.3 / '
                    r'0\.2 are not carried over'):
    module = nr.interop.to_torch(model)
  model.eval()
  _check_against_torch(model, module.eval())
  with pytest.warns(UserWarning, match='0.3 / 0.0'):
    nr.interop.to_torch(random_module(lambda: _cell('LSTMCell', IN, nnx.Rngs(0),
                                                    dropout_rate=0.3)))
  with pytest.warns(UserWarning, match='0.0 / 0.2'):
    nr.interop.to_torch(random_module(lambda: _cell('RNN_tanh', IN, nnx.Rngs(0),
                                                    recurrent_dropout_rate=0.2)))


def test_to_torch_warns_that_a_computation_dtype_is_left_out():
  """PyTorch computes in its parameters' dtype: a model computing in another
  would round otherwise in torch. The parameters carry over in their dtype."""
  cases = [
    (lambda r: nr.LSTM(IN, H, dtype=jnp.bfloat16, rngs=r), 'bfloat16 \\(parameters float32\\)',
     torch.float32),
    (lambda r: nr.RNN(nr.GRUCell(IN, H, dtype=jnp.float16, rngs=r)),
     'float16 \\(parameters float32\\)', torch.float32),
    (lambda r: nr.SimpleCell(IN, H, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=r),
     'float32 \\(parameters bfloat16\\)', torch.bfloat16),
  ]
  for factory, dtypes, torch_dtype in cases:
    with pytest.warns(UserWarning, match="to_torch: PyTorch computes in its parameters' dtype; "
                      f"the cells' dtype {dtypes} is not carried over"):
      module = nr.interop.to_torch(factory(nnx.Rngs(0)))
    assert {p.dtype for p in module.parameters()} == {torch_dtype}
  with warnings.catch_warnings():  # a dtype equal to the parameters' is carried over
    warnings.simplefilter('error')
    nr.interop.to_torch(nr.LSTM(IN, H, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    # ...and so is the default, dtype=None (the parameters'): no "dtype float64" warning.
    nr.interop.to_torch(random_module(lambda: nr.GRU(IN, H, rngs=nnx.Rngs(0))))


def test_to_torch_refuses_parameters_of_several_dtypes():
  """A PyTorch module has one dtype: built in the first layer's, it rounded
  the others' parameters silently."""
  cases = [
    (lambda r: nr.StackedRNN(nr.RNN(nr.GRUCell(IN, H, param_dtype=jnp.bfloat16, rngs=r)),
                             nr.RNN(nr.GRUCell(H, H, rngs=r))),
     'layer 0 bfloat16, layer 1 float32'),
    (lambda r: nr.Bidirectional(nr.RNN(nr.LSTMCell(IN, H, rngs=r)),
                                nr.RNN(nr.LSTMCell(IN, H, param_dtype=jnp.float16, rngs=r))),
     r'layer 0 float32, layer 0 \(backward\) float16'),
  ]
  for factory, got in cases:
    with pytest.raises(ValueError, match=r'to_torch: `module` expected parameters of one dtype '
                       rf'\(a PyTorch module has one\), got {got}\.'):
      nr.interop.to_torch(factory(nnx.Rngs(0)))
  # A cell whose parameter was given another dtype (set_value keeps the value's).
  cell = nr.GRUCell(IN, H, rngs=nnx.Rngs(0))
  cell.dense_h.kernel.set_value(cell.dense_h.kernel.get_value().astype(jnp.bfloat16))
  with pytest.raises(ValueError, match=r'parameters of one dtype .*got GRUCell bfloat16 and '
                     r'float32\.'):
    nr.interop.to_torch(cell)


@pytest.mark.parametrize('kind,num_layers,bidirectional', [
  ('RNN_tanh', 1, False), ('RNN_relu', 1, True), ('RNN_tanh', 2, False), ('LSTM', 1, False),
  ('GRU', 2, True)])
def test_a_round_trip_keeps_the_mode(kind, num_layers, bidirectional):
  """Without between-layer dropout the mode lives in the cells: it came back
  in training mode for torch.nn.RNN and its stacks (they were)."""
  for train in (False, True):
    module = _torch_layer(kind, num_layers, bidirectional, True).train(train)
    assert nr.interop.to_torch(nr.interop.from_torch(module)).training is train
  cell = torch.nn.GRUCell(IN, H).eval()
  assert not nr.interop.to_torch(nr.interop.from_torch(cell)).training


def test_to_torch_keeps_eval_mode():
  model = nr.interop.from_torch(_torch_layer('GRU', 2, False, True, dropout=0.5))
  assert nr.interop.to_torch(model).training
  model.eval()
  exported = nr.interop.to_torch(model)
  assert not exported.training  # dropout off, as in the model
  assert exported.dropout == 0.5
  x = _inputs(True)
  np.testing.assert_allclose(_torch_run(exported, x)[0], np.asarray(_call(model, x)), atol=ATOL,
                             rtol=0)
  # Without between-layer dropout the mode is the cells': eval mode only when all of them are.
  bi = random_module(lambda: _bidirectional('GRUCell', IN, nnx.Rngs(0)))
  bi.forward_rnn.eval()
  assert nr.interop.to_torch(bi).training  # the backward direction still trains
  bi.eval()
  assert not nr.interop.to_torch(bi).training
  # With between-layer dropout, the mode is that dropout's (PyTorch's training flag
  # switches only it), whatever the cells'.
  for part, training in (('dropout', False), ('cells', True)):
    gru = nr.GRU(IN, H, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))
    for m in [gru.dropout] if part == 'dropout' else [*gru.forward]:
      m.eval()
    assert nr.interop.to_torch(gru).training is training, part


@pytest.mark.parametrize('make,bias_of,where', [
  # bias_of(model): a bias made non-zero; where: the error names its owner and torch name.
  (lambda: torch.nn.GRU(IN, H, num_layers=2, bidirectional=True, bias=False),
   lambda m: m.backward[1].bias_hn, 'layer 1 (backward) has a non-zero bias_hh'),
  (lambda: torch.nn.LSTM(IN, H, proj_size=2, bias=False, batch_first=True),
   lambda m: m.forward[0].dense_h.bias, 'layer 0 has a non-zero bias_ih'),
  (lambda: torch.nn.RNN(IN, H, nonlinearity='relu', bias=False),
   lambda m: m.cell.dense_i.bias, 'layer 0 has a non-zero bias_ih'),
  (lambda: torch.nn.LSTMCell(IN, H, bias=False),
   lambda m: m.dense_h.bias, 'OptimizedLSTMCell has a non-zero bias_ih'),
  (lambda: torch.nn.GRUCell(IN, H, bias=False),
   lambda m: m.bias_hn, 'GRUCell has a non-zero bias_hh'),
], ids=['GRU', 'LSTM proj_size', 'RNN', 'LSTMCell', 'GRUCell'])
def test_bias_false_round_trip(make, bias_of, where):
  torch.manual_seed(0)
  module = make()
  model = nr.interop.from_torch(module)
  back = nr.interop.to_torch(model, bias=False)
  theirs, ours = module.state_dict(), back.state_dict()
  assert sorted(ours) == sorted(theirs)  # no bias keys: load_state_dict works both ways
  for k in theirs:
    np.testing.assert_array_equal(_np(ours[k]), _np(theirs[k]), err_msg=k)
  module.load_state_dict(ours)
  # A bias that is not zero (a trained one) cannot be dropped silently.
  bias = bias_of(model)
  bias.set_value(bias.get_value() + 0.5)
  name = where[-7:]
  with pytest.raises(ValueError, match=re.escape(
      f'to_torch: `bias` expected True: {where} (bias=False exports only modules whose biases '
      f'are all zero), got False (largest |{name}| = 0.5).')):
    nr.interop.to_torch(model, bias=False)


def test_simple_cells_compute_in_the_torch_modules_dtype():
  # SimpleCell's own default dtype is float32 (flax.nnx's); converted from
  # PyTorch it computes in the parameters' dtype, as LSTM and GRU do.
  torch.manual_seed(0)
  module = torch.nn.RNN(IN, H, batch_first=True, dtype=torch.bfloat16)
  model = nr.interop.from_torch(module)
  x = _inputs(True)
  y = _call(model, jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  with torch.no_grad():
    y_torch = module(torch.from_numpy(x).to(torch.bfloat16))[0].float().numpy()
  np.testing.assert_allclose(np.asarray(y, np.float32), y_torch, atol=3e-2, rtol=0)


# Each family once and each half dtype once: the dtype is read from the weights
# (bfloat16 through its own NumPy conversion, float16 NumPy's) the same way for
# every family, and each family's cells compute in the parameters' dtype.
@pytest.mark.parametrize('family,torch_dtype', [('LSTM', 'bfloat16'), ('GRU', 'float16')])
def test_half_precision_layers_match_torch_in_their_dtype(family, torch_dtype):
  # The converted layer keeps the module's dtype (parameters and computation);
  # its outputs match PyTorch's in that dtype up to half-precision rounding.
  torch.manual_seed(0)
  dtype = getattr(torch, torch_dtype)
  module = getattr(torch.nn, family)(IN, H, num_layers=2, batch_first=True, bidirectional=True,
                                     dtype=dtype)
  model = nr.interop.from_torch(module)
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
    jnp.dtype(torch_dtype)}
  x = _inputs(True)
  y = _call(model, jnp.asarray(x, torch_dtype))
  assert y.dtype == jnp.dtype(torch_dtype)
  with torch.no_grad():
    y_torch = module(torch.from_numpy(x).to(dtype))[0].float().numpy()
  atol = 2e-2 if torch_dtype == 'bfloat16' else 3e-3  # measured: 4e-3 and 5e-4
  np.testing.assert_allclose(np.asarray(y, np.float32), y_torch, atol=atol, rtol=0)
  # ...and back: to_torch builds modules of that dtype (a layer and a cell).
  back, cell = nr.interop.to_torch(model), nr.interop.to_torch(model.forward[0])
  assert {p.dtype for m in (back, cell) for p in m.parameters()} == {dtype}
  with torch.no_grad():
    y_back = back(torch.from_numpy(x).to(dtype))[0].float().numpy()
  np.testing.assert_allclose(y_back, y_torch, atol=atol, rtol=0)


@pytest.mark.filterwarnings('error')  # JAX's "will be truncated to float32" on each call
def test_a_float64_module_converts_to_float32_without_x64():
  torch.manual_seed(0)
  module = torch.nn.LSTM(IN, H, batch_first=True, dtype=torch.float64)
  model = nr.interop.from_torch(module)
  assert model.forward[0].param_dtype == jnp.float32  # what the parameters hold
  assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {
    jnp.dtype(jnp.float32)}
  x = _inputs(True)
  with torch.no_grad():
    y_torch = module(torch.from_numpy(x).double())[0].numpy()
  np.testing.assert_allclose(_call(model, x), y_torch, atol=1e-5)


# -- errors -----------------------------------------------------------------------
@pytest.mark.filterwarnings('ignore:dropout option adds dropout after all but last')  # torch's
def test_from_torch_errors():
  with pytest.raises(TypeError, match=r'from_torch: `module` expected one of torch.nn.LSTM.*'
                                      r'got Linear'):
    nr.interop.from_torch(torch.nn.Linear(2, 3))
  with pytest.raises(TypeError, match=r'from_torch: `rngs` expected an nnx.Rngs \(or None\), '
                                      r'got int'):
    nr.interop.from_torch(torch.nn.GRU(IN, H), rngs=0)
  # The modules are built as any nnx module (then overwritten): a dropout stream alone is
  # not enough, for a cell or a layer with dropout.
  for module in (torch.nn.GRUCell(IN, H), torch.nn.LSTM(IN, H, num_layers=2, dropout=0.5)):
    with pytest.raises(ValueError, match=r"from_torch: `rngs` expected an nnx.Rngs with a "
                       r"'params' \(or default\) stream.*got streams \('dropout',\)"):
      nr.interop.from_torch(module, rngs=nnx.Rngs(dropout=1))
  nr.interop.from_torch(torch.nn.GRUCell(IN, H), rngs=nnx.Rngs(params=0))  # no dropout needed
  # A layer with dropout between its layers needs a dropout (or default) stream too: flax's
  # raw KeyError ("No RngStream named 'dropout'") before. nnx.Rngs(0) is a default stream.
  for module in (torch.nn.LSTM(IN, H, num_layers=2, dropout=0.5),
                 torch.nn.GRU(IN, H, dropout=0.25),  # nr.GRU keeps the rate with one layer
                 torch.nn.RNN(IN, H, num_layers=2, dropout=0.5)):
    with pytest.raises(ValueError, match=r"from_torch: `rngs` expected an nnx.Rngs with a "
                       r"'dropout' \(or default\) stream: the module's dropout=0\.(5|25) "
                       r"between layers draws from it, got streams \('params',\)"):
      nr.interop.from_torch(module, rngs=nnx.Rngs(params=0))
    for rngs in (nnx.Rngs(params=0, dropout=1), nnx.Rngs(1)):
      nr.interop.from_torch(module, rngs=rngs)
  # torch.nn.RNN of one layer becomes an nr.RNN, without dropout: no stream needed.
  nr.interop.from_torch(torch.nn.RNN(IN, H, dropout=0.5), rngs=nnx.Rngs(params=0))
  # PyTorch takes dropout=1, dropout_rate is below 1: "GRU: `dropout_rate` expected a float
  # in [0, 1), got 1.0." before, naming an argument the caller never passed.
  for module in (torch.nn.GRU(IN, H, num_layers=2, dropout=1.0),
                 torch.nn.LSTM(IN, H, dropout=1.0),  # nr.LSTM keeps the rate with one layer
                 torch.nn.RNN(IN, H, num_layers=2, dropout=1.0)):
    with pytest.raises(ValueError, match=r"from_torch: `module` expected dropout < 1 \(the "
                       r"converted dropout_rate is in \[0, 1\).*got (GRU|LSTM|RNN) with "
                       r"dropout=1\.0\.$"):
      nr.interop.from_torch(module)
  nr.interop.from_torch(torch.nn.RNN(IN, H, dropout=1.0))  # one nr.RNN: no dropout to keep
  # A module built on torch's meta device (deferred initialisation) holds no values.
  for module in (torch.nn.LSTM(IN, H, device='meta'), torch.nn.GRUCell(IN, H, device='meta')):
    with pytest.raises(ValueError, match=r"from_torch: `module` expected a module whose "
                       r"parameters hold values.*got parameters on torch's 'meta' device"):
      nr.interop.from_torch(module)
  # Materialised (to_empty, then a state_dict), it converts.
  module = torch.nn.GRU(IN, H, device='meta').to_empty(device='cpu')
  module.load_state_dict(torch.nn.GRU(IN, H).state_dict())
  x = np.ones((T, B, IN), np.float32)
  with torch.no_grad():
    np.testing.assert_allclose(_call(nr.interop.from_torch(module), x),
                               module(torch.from_numpy(x))[0].numpy(), atol=1e-6)


def test_from_torch_weights_replaced_by_others_of_another_shape():
  # The sizes come from input_size / hidden_size / proj_size, the values from the tensors:
  # a weight replaced after construction hit an AssertionError (no argument, no hint).
  for module, name in ((torch.nn.LSTM(IN, H), 'weight_ih_l0'), (torch.nn.GRUCell(IN, H),
                       'weight_hh'), (torch.nn.LSTM(IN, H, proj_size=2), 'weight_hr_l0')):
    rows, cols = getattr(module, name).shape
    setattr(module, name, torch.nn.Parameter(torch.zeros(rows, cols + 2)))
    with pytest.raises(ValueError, match=r"^from_torch: `module` expected weights of the shapes "
                       r"its input_size, hidden_size \(and proj_size\) give: .* of shape .*, got "
                       rf"shape \({cols + 2}, \d+\) \(a weight replaced after the module was "
                       r"built\?\)\.$"):
      nr.interop.from_torch(module)


class _Compiled(torch.nn.Module):
  """torch.compile's wrapper as from_torch sees it (an nn.Module holding the
  module as ``_orig_mod``), without importing torch._dynamo (1.8 s)."""

  def __init__(self, module):
    super().__init__()
    self._orig_mod = module


def test_from_torch_names_what_to_pass_for_a_wrapper_or_a_state_dict():
  # The docs' "Checkpoints": the module, not a state_dict; a wrapper's module.
  # "got OptimizedModule" / "got OrderedDict" before, naming no way forward.
  module = torch.nn.LSTM(IN, H)
  expected = r'from_torch: `module` expected one of torch.nn.LSTM, .*torch.nn.RNNCell, got '
  for wrapper, got in [(_Compiled(module), r'_Compiled, a wrapper: pass the LSTM it wraps, its '
                        r'\._orig_mod\.'),
                       (torch.nn.DataParallel(module), r'DataParallel, a wrapper: pass the LSTM '
                        r'it wraps, its \.module\.'),
                       (module.state_dict(), r"OrderedDict, a state_dict: load it into the "
                        r"torch module first \(module.load_state_dict, a wrapper's key prefix "
                        r"stripped\) and pass the module\.")]:
    with pytest.raises(TypeError, match=expected + got):
      nr.interop.from_torch(wrapper)
  # Nothing convertible inside: no hint.
  with pytest.raises(TypeError, match=expected + r'DataParallel\.$'):
    nr.interop.from_torch(torch.nn.DataParallel(torch.nn.Linear(2, 3)))
  # The wrapped module converts.
  x = _inputs(False)
  np.testing.assert_allclose(_call(nr.interop.from_torch(torch.nn.DataParallel(module).module), x),
                             _torch_run(module, x)[0], atol=ATOL, rtol=0)


def test_from_torch_tells_torch_nn_classes_from_others_of_their_name():
  # "expected one of torch.nn.LSTM, ..., got LSTM." before, for torch.ao's quantizable
  # (and quantized) LSTM, which is no torch.nn.LSTM; and no hint for a TorchScript GRU.
  from torch.ao.nn.quantizable import LSTM as QuantizableLSTM
  expected = r'from_torch: `module` expected one of torch.nn.LSTM, .*torch.nn.RNNCell, got '
  with pytest.raises(TypeError, match=expected + r'torch\.ao\.nn\.quantizable\.modules\.rnn\.'
                     r'LSTM, not a subclass of torch\.nn\.LSTM\.$'):
    nr.interop.from_torch(QuantizableLSTM(IN, H))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # torch.jit.script's
    original = torch.nn.GRU(IN, H)
    scripted = torch.jit.script(original)
  with pytest.raises(TypeError, match=expected + r'RecursiveScriptModule, a TorchScript GRU: '
                     r'load its state_dict\(\) into a torch\.nn\.GRU of the same options'):
    nr.interop.from_torch(scripted)
  # As the message says: its state_dict in a torch.nn.GRU converts.
  module = torch.nn.GRU(IN, H)
  module.load_state_dict(scripted.state_dict())
  x = _inputs(False)
  np.testing.assert_allclose(_call(nr.interop.from_torch(module), x),
                             _torch_run(original, x)[0], atol=ATOL, rtol=0)


def test_from_torch_refuses_a_subclass_that_redefines_forward():
  # Converted silently before, computing the built-in GRU: outputs off by 0.75 here.
  class ScaledGRU(torch.nn.GRU):
    def forward(self, x, hx=None):
      y, h = super().forward(x, hx)
      return 2 * y, h

  class GRUWithoutBias(torch.nn.GRU):  # only other defaults: converts
    def __init__(self, *args, **kwargs):
      super().__init__(*args, bias=False, **kwargs)

  class ClippedCell(torch.nn.RNNCell):
    def forward(self, x, hx=None):
      return super().forward(x, hx).clamp(-0.5, 0.5)

  for module, name, base in [(ScaledGRU(IN, H), 'ScaledGRU', 'GRU'),
                             (ClippedCell(IN, H), 'ClippedCell', 'RNNCell')]:
    with pytest.raises(TypeError, match=rf'from_torch: `module` expected a torch.nn.{base} '
                       r"computing as the built-in one \(.*load the module's state_dict into a "
                       rf'torch.nn.{base} of the same options\), got {name}, a subclass that '
                       r'redefines forward\.'):
      nr.interop.from_torch(module)
  torch.manual_seed(0)
  module = GRUWithoutBias(IN, H)
  x = _inputs(False)
  np.testing.assert_allclose(_call(nr.interop.from_torch(module), x), _torch_run(module, x)[0],
                             atol=ATOL, rtol=0)
  # The way out the message gives: the weights in a plain module.
  scaled = ScaledGRU(IN, H)
  plain = torch.nn.GRU(IN, H)
  plain.load_state_dict(scaled.state_dict())
  with torch.no_grad():
    want = scaled(torch.from_numpy(x))[0].numpy() / 2
  np.testing.assert_allclose(_call(nr.interop.from_torch(plain), x), want, atol=ATOL, rtol=0)


def test_from_torch_warns_that_forward_hooks_are_left_out():
  # A hook that changes the outputs changed PyTorch's numbers, silently not these.
  torch.manual_seed(0)
  module = torch.nn.GRU(IN, H)
  x = _inputs(False)
  want = _torch_run(module, x)[0]
  module.register_forward_hook(lambda mod, args, out: (3 * out[0], out[1]))
  module.register_forward_pre_hook(lambda mod, args: args)
  assert np.abs(_torch_run(module, x)[0] - 3 * want).max() < ATOL
  with pytest.warns(UserWarning, match=r"from_torch: the 1 module's forward pre-hook\(s\) and 1 "
                    r"module's forward hook\(s\) are not carried over \(the converted module "
                    r'computes its forward alone'):
    model = nr.interop.from_torch(module)
  np.testing.assert_allclose(_call(model, x), want, atol=ATOL, rtol=0)  # the hookless forward
  with warnings.catch_warnings():  # none without hooks
    warnings.simplefilter('error')
    nr.interop.from_torch(torch.nn.GRU(IN, H))
  # A hook on every module (register_module_forward_hook) changes this one's numbers too.
  plain = torch.nn.GRU(IN, H)
  hookless = _torch_run(plain, x)[0]
  handle = torch.nn.modules.module.register_module_forward_hook(
    lambda mod, args, out: (3 * out[0], out[1]) if isinstance(mod, torch.nn.GRU) else out)
  try:
    assert np.abs(_torch_run(plain, x)[0] - 3 * hookless).max() < 3 * ATOL
    with pytest.warns(UserWarning, match=r'from_torch: the 1 global forward hook\(s\) are not '
                      r'carried over'):
      model = nr.interop.from_torch(plain)
  finally:
    handle.remove()
  np.testing.assert_allclose(_call(model, x), hookless, atol=ATOL, rtol=0)


@pytest.mark.parametrize('reparametrize', ['weight_norm', 'prune', 'parametrizations'])
def test_from_torch_converts_the_weights_weight_norm_and_pruning_compute(reparametrize):
  # torch.nn.utils.weight_norm and prune recompute the weight in a forward pre-hook. A
  # checkpoint loaded into such a module leaves the weight attribute at its old value
  # until the next forward: from_torch copied that stale weight before (outputs off by
  # about 0.1 here), with the warning for hooks that change inputs or outputs.
  # torch.nn.utils.parametrizations compute the weight when it is read (no hook).
  from torch.nn.utils import prune

  def make(seed):
    torch.manual_seed(seed)
    module = torch.nn.LSTM(IN, H, num_layers=2, proj_size=2)
    for name in ('weight_hh_l1', 'weight_hr_l0'):
      if reparametrize == 'weight_norm':
        with warnings.catch_warnings():
          warnings.simplefilter('ignore', FutureWarning)  # torch's deprecation
          torch.nn.utils.weight_norm(module, name)
      elif reparametrize == 'parametrizations':
        torch.nn.utils.parametrizations.weight_norm(module, name)
      else:
        prune.l1_unstructured(module, name, amount=0.5)
    return module

  trained = make(0)
  with torch.no_grad():
    for p in trained.parameters():
      p.add_(0.5 * torch.randn_like(p))
  module = make(1)
  module.load_state_dict(trained.state_dict())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    model = nr.interop.from_torch(module)
  x = _inputs(False)
  np.testing.assert_allclose(_call(model, x), _torch_run(module, x)[0], atol=ATOL, rtol=0)
  assert not [str(w.message) for w in caught]  # these hooks are carried over: no warning


def test_from_torch_counts_each_kind_of_hook_it_leaves_out():
  # Two hooks of the module's and a pre-hook of every module's: each counted, each named.
  module = torch.nn.GRUCell(IN, H)
  for _ in range(2):
    module.register_forward_hook(lambda mod, args, out: out)
  handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, args: args)
  try:
    with pytest.warns(UserWarning, match=r"^from_torch: the 2 module's forward hook\(s\) and 1 "
                      r'global forward pre-hook\(s\) are not carried over'):
      nr.interop.from_torch(module)
  finally:
    handle.remove()


def test_from_torch_gives_the_state_dict_hint_to_a_state_dict_only():
  # Another mapping (a config, say) is no state_dict: no advice to load it.
  with pytest.raises(TypeError, match=r'from_torch: `module` expected one of torch.nn.LSTM, .*'
                                      r'torch.nn.RNNCell, got dict\.$'):
    nr.interop.from_torch({'hidden_size': H, 'num_layers': 2})


def test_torch_tensors_get_a_clear_error():
  model = nr.interop.from_torch(torch.nn.GRU(IN, H, batch_first=True))
  x = _inputs(True)
  with pytest.raises(TypeError, match=r'GRU: `inputs` expected a JAX or NumPy array \(convert a '
                     r'tensor first, e.g. x.numpy\(\)\), got torch.Tensor'):
    model(torch.from_numpy(x))
  with pytest.raises(TypeError, match=r'GRU: `seq_lengths` expected a JAX or NumPy array .*'
                     r'got torch.Tensor'):
    model(x, seq_lengths=torch.from_numpy(LENGTHS))
  rnn = nr.interop.from_torch(torch.nn.RNN(IN, H, batch_first=True))
  with pytest.raises(TypeError, match=r'RNN: `seq_lengths` expected a JAX or NumPy array'):
    rnn(x, seq_lengths=torch.from_numpy(LENGTHS))
  # A carry kept in torch (h0, c0 from PyTorch code) is named too.
  h0 = torch.zeros(B, H)
  with pytest.raises(TypeError, match=r'GRU: `initial_carry` expected a JAX or NumPy array .*'
                     r'got torch.Tensor'):
    model(x, initial_carry=h0)
  lstm = random_module(lambda: nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0))))
  with pytest.raises(TypeError, match=r'RNN: `initial_carry` expected a JAX or NumPy array'):
    lstm(x, initial_carry=(h0, h0))
  with pytest.raises(TypeError, match=r'LSTMCell: `carry` expected a JAX or NumPy array'):
    lstm.cell((h0, h0), x[:, 0])


def test_a_packed_sequence_gets_a_clear_error():
  # A PackedSequence (a tuple, no shape) was "expected an array, got PackedSequence";
  # the message now says what replaces it, and the recipe gives PyTorch's outputs.
  module = _torch_layer('GRU', 1, True, True)
  model = nr.interop.from_torch(module)
  x = _inputs(True)
  packed = torch_rnn.pack_padded_sequence(torch.from_numpy(x), torch.from_numpy(LENGTHS),
                                          batch_first=True, enforce_sorted=False)
  message = (r"expected a JAX or NumPy array \(PyTorch's PackedSequence is the padded array "
             r'with seq_lengths=lengths here: padded, lengths = pad_packed_sequence\(packed, '
             r'batch_first=...\), then padded.numpy\(\), lengths.numpy\(\)\), got '
             r'torch.nn.utils.rnn.PackedSequence\.')
  with pytest.raises(TypeError, match='GRU: `inputs` ' + message):
    model(packed)
  with pytest.raises(TypeError, match='GRU: `seq_lengths` ' + message):
    model(x, seq_lengths=packed)
  stack = nr.interop.from_torch(_torch_layer('RNN_tanh', 2, False, True))
  with pytest.raises(TypeError, match=r'StackedRNN: `inputs`, passed on to layers\[0\] \(RNN\): '
                     'RNN: `inputs` ' + message):
    stack(packed)
  padded, lengths = torch_rnn.pad_packed_sequence(packed, batch_first=True)
  ours = _run(model, padded.numpy(), jnp.asarray(lengths.numpy(), jnp.int32))
  _assert_same(ours, _torch_run(module, x, LENGTHS))


@pytest.mark.parametrize('kind,num_layers,bidirectional,got,how', [
  ('GRU', 1, False, r'leaf shapes \[\(3, 6\)\], got \[\(1, 3, 6\)\]', r'index it, h_0\[0\]'),
  ('LSTM', 2, True, r'a pair \(forward_carry, backward_carry\), got ndarray',
   r"a tuple over layers .*h_0\[l \* num_directions \+ d\] \(an LSTM's \(c_0\[...\], "
   r'h_0\[...\]\), c first\)'),
  ('RNN_tanh', 1, True, r'a pair \(forward_carry, backward_carry\), got ndarray',
   r'a \(forward, backward\) pair, \(h_0\[0\], h_0\[1\]\)'),
  ('RNN_relu', 2, False, r'a tuple of 2 carries \(one per layer, None for the default\), got '
   r'ndarray', r'a tuple over layers'),
], ids=['GRU', 'LSTM 2 layers bidirectional', 'RNN bidirectional', 'RNN 2 layers'])
def test_a_carry_in_torchs_layout_gets_a_hint(kind, num_layers, bidirectional, got, how):
  # PyTorch's stacked (num_layers * num_directions, batch, hidden) h_0 / c_0: the error said
  # what it expected, not how to get there from PyTorch's; the hint's recipe gives its numbers.
  module = _torch_layer(kind, num_layers, bidirectional, True).eval()
  model = nr.interop.from_torch(module)
  rows = num_layers * (1 + bidirectional)
  x = _inputs(True)
  rng = np.random.default_rng(2)
  h0, c0 = (rng.normal(size=(rows, B, H)).astype(np.float32) for _ in range(2))
  lstm = kind == 'LSTM'
  where = {'GRU': 'GRU', 'LSTM': 'LSTM'}.get(kind, 'StackedRNN' if num_layers > 1
                                               else 'Bidirectional')
  entry = r'\[0\]' if lstm else ''
  with pytest.raises(ValueError, match=rf'{where}: `initial_carry{entry}` expected {got}\. '
                     r"PyTorch's h_0 / c_0, \(num_layers \* num_directions, batch, hidden\) = "
                     rf'\({rows}, 3, 6\), are not a carry here: {how}.*; see "The carry" in '
                     r'docs/migrating_from_pytorch.md\.$') as info:
    model(x, initial_carry=(h0, c0) if lstm else h0)
  assert ('c first' in str(info.value)) == lstm  # the LSTM's carry order for LSTMs alone
  per_row = [(c, h) for c, h in zip(c0, h0)] if lstm else list(h0)
  if rows == 1:
    carry = per_row[0]
  elif where == 'Bidirectional':
    carry = tuple(per_row)
  else:
    d = 1 + bidirectional
    layers = [per_row[d * i:d * (i + 1)] for i in range(num_layers)]
    carry = tuple(tuple(pair) if bidirectional else pair[0] for pair in layers)
  with torch.no_grad():
    y_t, _ = module(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)) if lstm
                    else torch.from_numpy(h0))
  y = nnx.jit(lambda model, x, carry: model(x, initial_carry=carry))(model, x, carry)
  np.testing.assert_allclose(y, _np(y_t), atol=ATOL, rtol=0)


def test_a_carry_in_torchs_layout_gets_a_hint_for_time_major_inputs():
  # PyTorch's batch_first=False: inputs (time, batch, features); h_0 is
  # (num_layers, batch, hidden) all the same. The stack reads the batch off the
  # inputs' second axis (time 5, batch 3 here); the carry the hint gives is PyTorch's.
  module = _torch_layer('RNN_relu', 2, False, False).eval()
  model = nr.interop.from_torch(module)
  x = _inputs(False)
  h0 = np.random.default_rng(2).normal(size=(2, B, H)).astype(np.float32)
  with pytest.raises(ValueError, match=r'^StackedRNN: `initial_carry` expected a tuple of 2 '
                     r"carries .*\. PyTorch's h_0 / c_0, \(num_layers \* num_directions, batch, "
                     r'hidden\) = \(2, 3, 6\), are not a carry here: a tuple over layers'):
    model(x, initial_carry=h0)
  with torch.no_grad():
    y_t, _ = module(torch.from_numpy(x), torch.from_numpy(h0))
  np.testing.assert_allclose(model(x, initial_carry=(h0[0], h0[1])), _np(y_t), atol=ATOL, rtol=0)


def test_a_list_h0_c0_gets_the_hint_of_the_pair():
  # [h_0, c_0], a list, is PyTorch's pair as the tuple is.
  module = _torch_layer('LSTM', 1, False, True).eval()
  model = nr.interop.from_torch(module)
  h0, c0 = np.zeros((2, 1, B, H), np.float32)
  with pytest.raises(ValueError, match=r"^LSTM: `initial_carry.*PyTorch's h_0 / c_0, .* = "
                     r'\(1, 3, 6\), are not a carry here: index it, h_0\[0\]'):
    model(_inputs(True), initial_carry=[h0, c0])


def test_no_torch_layout_hint_for_a_stack_of_a_layer_of_another_kind():
  # An RNN over a convolutional cell, a pair of multi-layer directions: no PyTorch
  # layer is either, and a stack holding one gets no recipe for PyTorch's h_0,
  # whatever its other layers.
  r = nnx.Rngs(0)
  conv = nr.RNN(nr.ConvLSTMCell(IN, H, (3,), rngs=r))
  bi = nr.Bidirectional(nr.GRU(H, H, num_layers=2, rngs=r), nr.GRU(H, H, num_layers=2, rngs=r))
  h0 = np.zeros((1, B, H), np.float32)
  for stack in (nr.StackedRNN(conv), nr.StackedRNN(nr.RNN(nr.GRUCell(IN, H, rngs=r)), bi)):
    n = len(stack.layers)
    with pytest.raises(ValueError, match=rf'^StackedRNN: `initial_carry` expected a tuple of {n} '
                       r'carries \(one per layer, None for the default\), got ndarray\.$'):
      stack(_inputs(True), initial_carry=h0)


def test_no_torch_layout_hint_for_a_pair_of_multi_layer_directions():
  # PyTorch has no layer of this layout (its bidirectional layers pair the directions
  # layer by layer): a (2, batch, hidden) carry gets no recipe for PyTorch's h_0.
  r = nnx.Rngs(0)
  bi = nr.Bidirectional(nr.GRU(IN, H, num_layers=2, rngs=r), nr.GRU(IN, H, num_layers=2, rngs=r))
  with pytest.raises(ValueError, match=r'^Bidirectional: `initial_carry` expected a pair '
                                       r'\(forward_carry, backward_carry\), got ndarray\.$'):
    bi(_inputs(True), initial_carry=np.zeros((2, B, H), np.float32))


def test_a_one_layer_h0_of_torchs_layout_warns_where_it_broadcasts():
  # A one-layer torch.nn.RNN converts to nr.RNN, which runs a (1, batch, hidden) h_0 as one
  # beam (flax.nnx's semantics: outputs (1, time, batch, hidden)); the warning says so, and
  # its way, h_0[0], gives PyTorch's numbers.
  module = _torch_layer('RNN_tanh', 1, False, True).eval()
  model = nr.interop.from_torch(module)
  x, h0 = _inputs(True), np.random.default_rng(2).normal(size=(1, B, H)).astype(np.float32)
  with jax.numpy_rank_promotion('allow'), pytest.warns(  # (B, H) + (1, B, H)
      UserWarning, match=r"RNN: `initial_carry` has leading axes of size 1 that the inputs lack "
                         r"\(leaf shapes \[\(1, 3, 6\)\], the cell's \[\(3, 6\)\]\).*PyTorch's h_0 "
                         r"of shape \(1, batch, hidden\) is h_0\[0\] here\."):
    beams = model(x, initial_carry=h0)
  with torch.no_grad():
    want = _np(module(torch.from_numpy(x), torch.from_numpy(h0))[0])
  np.testing.assert_allclose(np.swapaxes(beams[0], 0, 1), want, atol=ATOL, rtol=0)  # that run
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    np.testing.assert_allclose(model(x, initial_carry=h0[0]), want, atol=ATOL, rtol=0)


def test_a_projected_lstm_carry_in_torchs_order_gets_a_hint():
  # With proj_size, h and c differ in shape: PyTorch's (h_0, c_0) order is named; the
  # carry (c, h) then gives PyTorch's numbers.
  torch.manual_seed(3)
  module = torch.nn.LSTM(IN, H, proj_size=P, batch_first=True).eval()
  model = nr.interop.from_torch(module)
  x = _inputs(True)
  rng = np.random.default_rng(4)
  h0, c0 = rng.normal(size=(1, B, P)).astype(np.float32), rng.normal(size=(1, B, H)).astype(
      np.float32)
  with pytest.raises(ValueError, match=re.escape(
      f'LSTM: `initial_carry` expected leaf shapes [({B}, {H}), ({B}, {P})] (an LSTM carry is '
      "(c, h), c first; PyTorch's (h_0, c_0) is the other way round), got "
      f'[({B}, {P}), ({B}, {H})].')):
    model(x, initial_carry=(h0[0], c0[0]))
  with torch.no_grad():
    y_t, _ = module(torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
  np.testing.assert_allclose(model(x, initial_carry=(c0[0], h0[0])), _np(y_t), atol=ATOL,
                             rtol=0)


def _abstract(factory):
  """The module without parameter values (to_torch checks structure before values)."""
  return nnx.eval_shape(lambda: factory(nnx.Rngs(0)))


def _gru_rnn(rngs, hidden=H):
  return nr.RNN(nr.GRUCell(IN, hidden, rngs=rngs))


class _DampedGRU(nr.GRUCell):  # a user's GRU: PyTorch's GRU computes something else
  def step(self, carry, inputs, recurrent_mask):
    new_h, y = super().step(carry, inputs, recurrent_mask)
    return 0.8 * new_h, y


class _LoggedRNN(nr.RNN):
  def __call__(self, *args, **kwargs):
    return super().__call__(*args, **kwargs)


class _OwnCell(nr.RNNCellBase):
  """A cell of the user's own: h + inputs' projection."""

  def __init__(self, in_features, hidden_features, *, rngs):
    super().__init__(in_features, hidden_features, rngs=rngs)
    self.linear = nnx.Linear(in_features, hidden_features, rngs=rngs)

  def step(self, carry, inputs, recurrent_mask):
    h = carry + self.linear(inputs)
    return h, h


TO_TORCH_ERRORS = [
  (lambda r: _DampedGRU(IN, H, rngs=r), TypeError,
   r'to_torch: `module` expected nr.GRUCell computing as the built-in one \(a subclass may '
   r'change __init__ or add members.*got _DampedGRU, a subclass that redefines step'),
  (lambda r: nr.RNN(_DampedGRU(IN, H, rngs=r)), TypeError,
   r'got _DampedGRU, a subclass that redefines step'),
  (lambda r: _LoggedRNN(nr.GRUCell(IN, H, rngs=r)), TypeError,
   r'expected nr.RNN computing as the built-in one.*got _LoggedRNN, a subclass that redefines '
   r'__call__'),
  (lambda r: nr.MGUCell(IN, H, rngs=r), TypeError,
   r'to_torch: `module` expected an OptimizedLSTMCell.*got MGUCell'),
  (lambda r: nr.SimpleCell(IN, IN, residual=True, rngs=r), ValueError,
   r'to_torch: `module` expected a SimpleCell with activation_fn tanh or relu.*residual=True'),
  (lambda r: nr.GRUCell(IN, H, gate_fn=jax.nn.hard_sigmoid, rngs=r), ValueError,
   r'expected cells with gate_fn=sigmoid.*hard_sigmoid'),
  (lambda r: nr.OptimizedLSTMCell(IN, H, activation_fn=jax.nn.relu, rngs=r), ValueError,
   r'expected cells with gate_fn=sigmoid and activation_fn=tanh .*got OptimizedLSTMCell with '
   r'sigmoid, relu'),
  (lambda r: nr.RNN(nr.GRUCell(IN, H, rngs=r), reverse=True), ValueError,
   r'expected an RNN with reverse=False.*got reverse=True'),
  (lambda r: nr.GRU(IN, H, reverse=True, keep_order=True, rngs=r), ValueError,
   r'expected an nr.GRU with reverse=False.*got reverse=True'),
  (lambda r: nr.RNN(nr.GRUCell(IN, H, rngs=r), learn_initial_carry=True), ValueError,
   r"expected an RNN starting from zeros \(PyTorch's layers do\), got learn_initial_carry=True"),
  (lambda r: nr.Bidirectional(_gru_rnn(r), nr.RNN(nr.GRUCell(
    IN, H, carry_init=jax.nn.initializers.normal(), rngs=r))), ValueError,
   r'expected an RNN starting from zeros.*got a cell with a carry_init'),
  (lambda r: nr.OptimizedLSTMCell(IN, H, zoneout_rate=0.5, rngs=r), ValueError,
   r'expected cells without zoneout.*got OptimizedLSTMCell with zoneout_rate=0.5'),
  (lambda r: nr.RNN(nr.SimpleCell(IN, H, zoneout_rate=0.5, rngs=r)), ValueError,
   r'expected cells without zoneout.*got SimpleCell with zoneout_rate=0.5'),
  (lambda r: nr.Bidirectional(_gru_rnn(r), _gru_rnn(r), merge_fn=lambda a, b: a + b),
   ValueError, r'expected a Bidirectional with the default merge_fn'),
  (lambda r: nr.Bidirectional(_gru_rnn(r), nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=r))),
   ValueError, r'expected cells of one family'),
  # torch.nn.RNN has one nonlinearity: tanh and relu directions are two families.
  (lambda r: nr.Bidirectional(nr.RNN(nr.SimpleCell(IN, H, rngs=r)),
                              nr.RNN(nr.SimpleCell(IN, H, activation_fn=jax.nn.relu, rngs=r))),
   ValueError, r'expected cells of one family \(all LSTM, all GRU or all SimpleCell with one '
   r'activation\), got \["\(\'RNN\', \'relu\'\)", "\(\'RNN\', \'tanh\'\)"\]\.'),
  # Directions that are fused layers, not nr.RNNs (Bidirectional takes them).
  (lambda r: nr.Bidirectional(nr.GRU(IN, H, rngs=r), nr.GRU(IN, H, rngs=r)), TypeError,
   r'^to_torch: `module` expected a Bidirectional of two nr.RNN layers, got GRU, GRU\.$'),
  (lambda r: nr.Bidirectional(_gru_rnn(r), _gru_rnn(r, H + 1)), ValueError,
   r'expected layers with 2 direction\(s\) of hidden size 6'),
  (lambda r: nr.StackedRNN(nr.Bidirectional(_gru_rnn(r), _gru_rnn(r)),
                           nr.RNN(nr.GRUCell(2 * H, H, rngs=r))), ValueError,
   r'expected layers with 2 direction\(s\) of hidden size 6, layer 1 taking 12 features, got '
   r'layer 1 with cells \(12->6\)'),
  # PyTorch has one dropout rate between all its layers.
  (lambda r: nr.StackedRNN(nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5, rngs=r),
                           nr.LSTM(H, H, rngs=r), dropout_rate=0.25, rngs=r), ValueError,
   r"to_torch: `module` expected a StackedRNN with one dropout rate between all its layers, "
   r"nested layers' included .*got dropout_rate the stack's 0.25, layers\[0\]'s 0.5"),
  (lambda r: nr.StackedRNN(nr.GRU(IN, H, num_layers=2, dropout_rate=0.5, rngs=r),
                           nr.GRU(H, H, num_layers=2, rngs=r)), ValueError,
   r"got dropout_rate the stack's 0.0, layers\[0\]'s 0.5, layers\[1\]'s 0.0"),
  (lambda r: nnx.Linear(2, 3, rngs=r), TypeError,
   r'to_torch: `module` expected an nnx_recurrent cell'),
  # A cell of the user's own (its step its own): not a built-in cell, not a
  # built-in that computes otherwise.
  (lambda r: nr.RNN(_OwnCell(IN, H, rngs=r)), TypeError,
   r'^to_torch: `module` expected an OptimizedLSTMCell, LSTMCell, GRUCell or SimpleCell '
   r'\(or a layer of them\), got _OwnCell\.$'),
  (lambda r: nr.OptimizedLSTMCell(IN, H, proj_features=2, rngs=r), ValueError,
   r'to_torch: `module` expected a cell without proj_features \(torch.nn.LSTMCell has no '
   r'projection; .*got OptimizedLSTMCell with proj_features=2'),
  (lambda r: nr.LSTM(IN, H, proj_features=H, rngs=r), ValueError,
   r"expected proj_features < hidden_features \(PyTorch's proj_size < hidden_size\), got "
   r'proj_features=6, hidden_features=6'),
  (lambda r: nr.StackedRNN(nr.RNN(nr.LSTMCell(IN, H, proj_features=2, rngs=r)),
                           nr.RNN(nr.LSTMCell(2, H, rngs=r))), ValueError,
   r'expected layers with 1 direction\(s\) of hidden size 6 projected to 2, layer 1 taking 2 '
   r'features, got layer 1 with cells \(2->6\)'),
]


@pytest.mark.filterwarnings('ignore:carry_init is provided in __init__')
@pytest.mark.parametrize('factory,error,match', TO_TORCH_ERRORS)
def test_to_torch_errors(factory, error, match):
  with pytest.raises(error, match=match):
    nr.interop.to_torch(_abstract(factory))


def _rebuilt_by_value(fn):
  """A ``jax.jit`` function as cloudpickle rebuilds it (JAX's functions do not
  pickle by reference): a new wrapper from its pickled state, without the
  original's ``__name__``, ``__module__`` or ``__wrapped__``, around a copy of
  the Python function (same module, name and code)."""
  state = fn.__getstate__()
  inner = state['fun']
  inner_copy = types.FunctionType(inner.__code__, inner.__globals__, inner.__name__,
                                  inner.__defaults__, inner.__closure__)
  inner_copy.__module__, inner_copy.__qualname__ = inner.__module__, inner.__qualname__
  rebuilt = type(fn).__new__(type(fn))
  rebuilt.__setstate__({**state, 'fun': inner_copy})
  return rebuilt


def test_to_torch_takes_jax_functions_rebuilt_by_value():
  """A model through cloudpickle (multiprocessing, Ray) computes as before,
  but its sigmoid / tanh / relu are copies of jax's: to_torch compared them
  with ``is`` and refused the model, naming them ``<PjitFunction>``."""
  sigmoid, tanh = _rebuilt_by_value(jax.nn.sigmoid), _rebuilt_by_value(jnp.tanh)
  assert sigmoid is not jax.nn.sigmoid and not hasattr(sigmoid, '__name__')
  relu = copy.copy(jax.nn.relu)  # a custom_jvp over a jit function
  relu.fun = relu.__wrapped__ = _rebuilt_by_value(jax.nn.relu.fun)
  for factory in (
      lambda r: nr.RNN(nr.OptimizedLSTMCell(IN, H, gate_fn=sigmoid, activation_fn=tanh, rngs=r)),
      lambda r: nr.RNN(nr.SimpleCell(IN, H, activation_fn=relu, rngs=r))):
    model = random_module(lambda factory=factory: factory(nnx.Rngs(0)))
    _check_against_torch(model, nr.interop.to_torch(model).eval())
  cell = nr.interop.to_torch(nr.GRUCell(IN, H, gate_fn=sigmoid, activation_fn=tanh,
                                        rngs=nnx.Rngs(0)))
  assert type(cell).__name__ == 'GRUCell'
  # Not another function: another of jax's rebuilt so, a user's sigmoid, one that only
  # copies sigmoid's name and module (functools.wraps). The message names them.
  @functools.wraps(jax.nn.sigmoid)
  def doubled(x):
    return 2 * jax.nn.sigmoid(x)

  def my_sigmoid(x):
    return 1 / (1 + jnp.exp(-x))

  for gate_fn, name in [(_rebuilt_by_value(jax.nn.hard_sigmoid), 'hard_sigmoid'),
                        (jax.jit(my_sigmoid), 'my_sigmoid'), (doubled, 'sigmoid')]:
    with pytest.raises(ValueError, match=r'to_torch: `module` expected cells with gate_fn=sigmoid '
                       rf'and activation_fn=tanh .*got GRUCell with {name}, tanh\.'):
      nr.interop.to_torch(nr.GRUCell(IN, H, gate_fn=gate_fn, activation_fn=tanh,
                                     rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r'expected a SimpleCell with activation_fn tanh or relu '
                     r'and residual=False, got activation_fn=sigmoid, residual=False\.'):
    nr.interop.to_torch(nr.SimpleCell(IN, H, activation_fn=sigmoid, rngs=nnx.Rngs(0)))


def test_to_torch_after_cloudpickle():
  # The real thing (cloudpickle is in the test extras, not a dependency of the package).
  import cloudpickle
  model = nr.LSTM(IN, H, num_layers=2, rngs=nnx.Rngs(0))
  model.eval()
  unpickled = cloudpickle.loads(cloudpickle.dumps(model))
  assert unpickled.forward[0].gate_fn is not jax.nn.sigmoid
  _check_against_torch(unpickled, nr.interop.to_torch(unpickled))


@pytest.mark.parametrize('factory', [
  lambda r: nr.LSTM(IN, H, rngs=r),
  lambda r: nr.Bidirectional(_gru_rnn(r), _gru_rnn(r)),
  lambda r: nr.LSTMCell(IN, H, rngs=r),  # per-gate layers
], ids=['LSTM', 'Bidirectional', 'LSTMCell'])
def test_to_torch_refuses_abstract_parameters(factory):
  # Checked after the structure (test_to_torch_errors): jax's raw "'ShapeDtypeStruct' object
  # is not subscriptable" before.
  with pytest.raises(TypeError, match=r'to_torch: `module` expected a module whose parameters '
                     r'hold values, got abstract leaves \(jax.ShapeDtypeStruct, as '
                     r'jax.eval_shape / nnx.eval_shape give\): restore or initialise them '
                     r'first\.'):
    nr.interop.to_torch(_abstract(factory))


def test_to_torch_stack_dropout_is_the_rate_between_every_two_layers():
  # Between a nested fused layer's own layers, and between the stack's.
  cases = [
    (lambda r: nr.StackedRNN(nr.LSTM(IN, H, num_layers=2, dropout_rate=0.5, rngs=r)), 2, 0.5),
    (lambda r: nr.StackedRNN(nr.LSTM(IN, H, num_layers=2, dropout_rate=0.3, rngs=r),
                             nr.LSTM(H, H, rngs=r), dropout_rate=0.3, rngs=r), 3, 0.3),
    (lambda r: nr.StackedRNN(nr.GRU(IN, H, dropout_rate=0.7, rngs=r),  # one layer: never applied
                             nr.GRU(H, H, rngs=r), dropout_rate=0.2, rngs=r), 2, 0.2),
    # One layer in all: no dropout (PyTorch's would be unused, and warns that it is).
    (lambda r: nr.GRU(IN, H, dropout_rate=0.25, rngs=r), 1, 0.0),
  ]
  for factory, num_layers, dropout in cases:
    exported = nr.interop.to_torch(factory(nnx.Rngs(0)))
    assert (exported.num_layers, exported.dropout) == (num_layers, dropout)


def test_to_torch_bias_is_a_bool():
  # A truthy non-bool would build a module with biases, a falsy one drop them.
  for value in (0, 'no'):
    with pytest.raises(TypeError, match=rf'to_torch: `bias` expected a bool, got {value!r}'):
      nr.interop.to_torch(_abstract(_gru_rnn), bias=value)


def test_to_torch_converts_a_subclass_that_only_changes_defaults():
  class GRUWithoutHn(nr.GRUCell):
    def __init__(self, in_features, hidden_features, *, rngs):
      super().__init__(in_features, hidden_features, use_bias_hn=False, rngs=rngs)

    def describe(self):  # new members are fine
      return 'a GRU'

  cell = random_module(lambda: GRUWithoutHn(IN, H, rngs=nnx.Rngs(0)))
  x = np.random.default_rng(0).normal(size=(B, IN)).astype(np.float32)
  h = np.random.default_rng(1).normal(size=(B, H)).astype(np.float32)
  with torch.no_grad():
    want = nr.interop.to_torch(cell)(torch.from_numpy(x), torch.from_numpy(h)).numpy()
  np.testing.assert_allclose(_call(cell, jnp.asarray(h), jnp.asarray(x))[1], want, atol=1e-5)


def test_import_does_not_load_torch():
  # A fresh import of the package with torch unloaded and blocked
  # (tests/fresh_import.py): an import of torch on the way is recorded.
  with fresh_package(blocked=('torch',)) as attempts:
    fresh = importlib.import_module('nnx_recurrent')
    importlib.import_module('nnx_recurrent.interop')
    assert callable(fresh.interop.from_torch) and fresh is not nr
    assert 'torch' not in sys.modules
  assert attempts == [], f'torch imported: {attempts}'
  assert sys.modules['torch'] is torch and sys.modules['nnx_recurrent'] is nr


@pytest.mark.parametrize('call, where, arg', [
  (lambda c, x: nr.RNN(c)(x, segment_ids=torch.ones(2, 5, dtype=torch.int32)), 'RNN',
   'segment_ids'),
  (lambda c, x: c((torch.zeros(2, 4),) * 2, x[:, 0]), 'LSTMCell', 'carry'),
], ids=['segment_ids', 'cell_carry'])
def test_torch_tensors_get_a_clear_error_where_checked_alone(call, where, arg):
  # As test_torch_tensors_get_a_clear_error, for the arguments whose checks
  # see a tensor first (segment_ids: no seq_lengths' number check before;
  # a cell's carry: a broadcasting one, checked leaf by leaf).
  cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=re.escape(
      f'{where}: `{arg}` expected a JAX or NumPy array (convert a tensor first, e.g. '
      'x.numpy()), got torch.Tensor.')):
    call(cell, jnp.ones((2, 5, 3)))


def test_to_torch_refuses_cells_whose_projections_lora_surgery_swapped():
  """to_torch reads the cells' kernels: a projection nnx's LoRA surgery swapped for an
  nnx.LoRALinear (which nr.RNN runs, as flax.nnx's RNN does) is a TypeError naming
  it, not a torch module without the adapter (outputs 0.18 off, silently)."""
  x = jnp.ones((2, 5, IN))
  for make in (lambda: nr.RNN(nr.OptimizedLSTMCell(IN, H, rngs=nnx.Rngs(0))),
               lambda: nr.RNN(nr.SimpleCell(IN, H, rngs=nnx.Rngs(0)))):
    plain, swapped = make(), make()
    lora_swapped(swapped.cell)
    assert not np.allclose(swapped(x), plain(x))  # the adapter changes what nr.RNN computes
    name = type(swapped.cell).__name__
    with pytest.raises(TypeError, match=r'to_torch: `module` expected cells of the nnx.Linear '
                       rf'projections they build .*, got {name} with dense_h of type LoRALinear\.'):
      nr.interop.to_torch(swapped)
  fused = nr.GRU(IN, H, num_layers=2, rngs=nnx.Rngs(0))
  lora_swapped(fused.forward[1], 'dense_i')
  with pytest.raises(TypeError, match=r'GRUCell with dense_i of type LoRALinear\.'):
    nr.interop.to_torch(fused)


def test_typed_user_calls_from_torch_layer_runs():
  """tests/typed_user_calls.py's from_torch user (mypy reads from_torch's result as Any,
  not nnx.Module, which has no num_layers): the converted LSTM's outputs, its layers."""
  from tests import typed_user_calls

  torch_lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
  x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
  y, num_layers = typed_user_calls.from_torch_layer(torch_lstm, x)
  want, _ = torch_lstm(torch.from_numpy(x))
  np.testing.assert_allclose(y, want.detach().numpy(), atol=1e-5)
  assert num_layers == 2
