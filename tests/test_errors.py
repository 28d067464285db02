"""Bad input gets a ValueError/TypeError naming the argument, not an XLA trace."""

import pickle
import re
from typing import NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from nnx_recurrent import _checks, compat
from tests import reference as ref
from tests.user_cells import SowingCell


# Random parameters from NumPy: no initializer to compile (the values do not matter here).
@pytest.fixture(scope='module')
def lstm():
  return ref.build(lambda: nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module')
def conv():
  return ref.build(lambda: nr.ConvLSTMCell(2, 3, (3, 3), rngs=nnx.Rngs(0)))


X = jnp.ones((2, 5, 3))


def m(*parts):
  """A regex matching the literal message fragments in order."""
  return '.*'.join(re.escape(p) for p in parts)


def abstractly(fn):
  """Runs ``fn()`` under ``nnx.eval_shape``: modules it builds get abstract
  parameters and its computations are traced, not compiled. The argument
  checks are Python's: they raise, or pass, alike."""
  nnx.eval_shape(lambda: (fn(), None)[1])


# -- inputs ---------------------------------------------------------------------
def test_rnn_last_axis_not_in_features(lstm):
  with pytest.raises(ValueError, match=m('RNN: `inputs` expected last axis of size 3',
                                         'got shape (2, 5, 4)')):
    nr.RNN(lstm)(jnp.ones((2, 5, 4)))


def test_cell_last_axis_not_in_features(lstm):
  with pytest.raises(ValueError, match=m('LSTMCell: `inputs` expected last axis of size 3',
                                         'got shape (2, 4)')):
    lstm(lstm.initialize_carry((2, 3)), jnp.ones((2, 4)))


def test_cell_options_other_than_dropout_masks_and_rngs(lstm):
  with pytest.raises(TypeError, match=m("LSTMCell.__call__() got an unexpected keyword argument "
                                        "'mask'. A cell's options are the keywords dropout_masks "
                                        "and rngs.")):
    lstm(lstm.initialize_carry((2, 3)), jnp.ones((2, 3)), mask=None)


def test_too_few_axes(lstm, conv):
  with pytest.raises(ValueError, match=m('`inputs` expected at least 2 axes', 'got shape (5,)')):
    nr.RNN(lstm)(jnp.ones((5,)))
  with pytest.raises(ValueError, match=m('`inputs` expected at least 4 axes',
                                         'got shape (5, 4, 2)')):
    nr.RNN(conv)(jnp.ones((5, 4, 2)))
  with pytest.raises(ValueError, match=m('ConvLSTMCell: `inputs` expected at least 3 feature',
                                         'got shape (4, 2)')):
    conv(conv.initialize_carry((1, 4, 4, 2)), jnp.ones((4, 2)))


@pytest.mark.parametrize('input_shape', [(), (5,)])
def test_conv_initialize_carry_needs_the_spatial_axes(conv, input_shape):
  # `()` is one unbatched vector step for dense cells only.
  with pytest.raises(ValueError, match=m('ConvLSTMCell.initialize_carry: `input_shape` expected '
                                         'at least 3 feature axes', f'got shape {input_shape}')):
    conv.initialize_carry(input_shape)


def test_inputs_not_an_array(lstm):
  with pytest.raises(TypeError, match=m('RNN: `inputs` expected an array', 'got str')):
    nr.RNN(lstm)('abc')


@pytest.mark.parametrize('inputs, got', [
  (np.full((2, 5, 3), 'a'), 'got dtype <U1.'), (np.empty((2, 5, 3), object), 'got dtype object.'),
  (jax.random.split(jax.random.key(0), (2, 5, 3)), 'got dtype key<fry>.'),
], ids=['str_array', 'object_array', 'prng_keys'])
def test_inputs_of_no_numbers(lstm, inputs, got):
  # Found by differential fuzzing: jax's own TypeError ("Value ... with dtype
  # <U1 is not a valid JAX array type"), naming no argument, came first.
  for layer in (nr.RNN(lstm), nr.LSTM(3, 4, rngs=nnx.Rngs(0)), nr.GRU(3, 4, rngs=nnx.Rngs(0))):
    where = type(layer).__name__
    with pytest.raises(TypeError, match=m(f'{where}: `inputs` expected an array of numbers', got)):
      layer(inputs)


# -- seq_lengths ----------------------------------------------------------------
def test_seq_lengths_shape_not_batch_shape(lstm):
  with pytest.raises(ValueError, match=m('RNN: `seq_lengths` expected shape batch shape',
                                         '(2,)', 'got shape (3,)')):
    nr.RNN(lstm)(X, seq_lengths=jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=m('`seq_lengths` expected shape', '(2, 3)',
                                         'got shape (2,)')):
    nr.RNN(lstm)(jnp.ones((2, 3, 5, 3)), seq_lengths=jnp.array([1, 2]))
  with pytest.raises(ValueError, match=m('`seq_lengths` expected shape', 'got shape (2, 1)')):
    nr.RNN(lstm)(X, seq_lengths=jnp.array([[1], [2]]))


@pytest.mark.parametrize('lengths', [np.array([True, False]), jnp.array([1 + 0j, 2])])
def test_seq_lengths_not_integer(lstm, lengths):
  with pytest.raises((TypeError, ValueError), match=m('`seq_lengths` expected an integer array',
                                                      f'got dtype {lengths.dtype}')):
    nr.RNN(lstm)(X, seq_lengths=lengths)


def test_boolean_seq_lengths_say_they_are_not_a_mask(lstm):
  # flax.nnx and flax.linen read [True, False] as lengths [1, 0]: a mask passed
  # by mistake runs there, so the message says what to pass instead.
  from nnx_recurrent import compat
  mask = np.ones((2, 5), bool)
  rnn = compat.RNN(compat.LSTMCell(4))
  v = rnn.init(jax.random.key(0), X)
  calls = [lambda lengths: nr.RNN(lstm)(X, seq_lengths=lengths),
           lambda lengths: nr.LSTM(3, 4, rngs=nnx.Rngs(0))(X, seq_lengths=lengths),
           lambda lengths: rnn.apply(v, X, seq_lengths=lengths)]
  for call, where in zip(calls, ('RNN', 'LSTM', 'RNN')):
    with pytest.raises(TypeError, match=m(
        f'{where}: `seq_lengths` expected an integer array of shape batch shape (lengths, not '
        'a mask: a boolean mask of shape (*batch, time) gives them as mask.sum(-1)), got '
        'dtype bool.')):
      call(mask[:, 0])
    np.testing.assert_allclose(call(mask.sum(-1)), call(None), atol=1e-6)  # all True: in full
  # The hint is for booleans: lengths of another dtype that is no integer get none.
  with pytest.raises(TypeError, match=m('RNN: `seq_lengths` expected an integer array of shape '
                                        'batch shape, got dtype complex64.')):
    nr.RNN(lstm)(X, seq_lengths=np.array([5, 2], np.complex64))


@pytest.mark.parametrize('lengths, got', [([1.0, 2.5], '[2.5]'), ([np.nan, 2.0], '[nan]'),
                                          ([np.inf, 2.0], '[inf]')])  # inf == round(inf)
def test_float_seq_lengths_not_whole(lstm, lengths, got):
  # Whole-number floats are lengths (the sum of a float mask); others are not.
  with pytest.raises(ValueError, match=m('`seq_lengths` expected whole numbers', f'got {got} '
                                         'among them')):
    nr.RNN(lstm)(X, seq_lengths=jnp.array(lengths))
  with pytest.raises(ValueError, match=m('flip_sequences: `seq_lengths` expected whole numbers')):
    nr.flip_sequences(X, jnp.array(lengths), num_batch_dims=1, time_major=False)


def test_negative_seq_lengths_refused_when_concrete(lstm):
  with pytest.raises(ValueError, match=m('RNN: `seq_lengths` expected non-negative lengths, '
                                         'got minimum -1.')):
    nr.RNN(lstm)(X, seq_lengths=jnp.array([-1, 9]))
  # NumPy's int64 is read on the host: jax would wrap -2**40 to 0, a valid length.
  with pytest.raises(ValueError, match=m('RNN: `seq_lengths` expected non-negative lengths, '
                                         'got minimum -1099511627776.')):
    nr.RNN(lstm)(X, seq_lengths=np.array([-2**40, 9], np.int64))


@pytest.mark.parametrize('reverse, keep_order', [(False, False), (True, False), (True, True)])
def test_seq_lengths_out_of_range_under_jit(reverse, keep_order):
  # Documented (check_seq_lengths, RNN.__call__): a length above time acts as
  # time; under jit values cannot be checked, and a negative one acts as 0.
  cell, _ = ref.make_cell('gru')
  rnn = nr.RNN(cell, return_carry=True, reverse=reverse, keep_order=keep_order)
  x = ref.normal((3, 4, 3), seed=3)

  @nnx.jit
  def run(rnn, x, lengths):
    return rnn(x, seq_lengths=lengths)

  carry0 = cell.initialize_carry((3, 3))
  got_carry, got_y = run(rnn, x, jnp.array([9, -3, 2]))
  want_carry, want_y = run(rnn, x, jnp.array([4, 0, 2]))
  np.testing.assert_array_equal(got_y, want_y)
  np.testing.assert_array_equal(got_carry, want_carry)
  np.testing.assert_array_equal(got_carry[1], carry0[1])  # like a length-0 row
  assert np.asarray(got_y[0]).all()  # like a full row


def test_shape_errors_still_raise_under_jit(lstm):
  @nnx.jit
  def run(rnn, x, lengths):
    return rnn(x, seq_lengths=lengths)

  with pytest.raises(ValueError, match=m('`seq_lengths` expected shape', 'got shape (3,)')):
    run(nr.RNN(lstm), X, jnp.array([1, 2, 3]))


def test_flip_sequences_seq_lengths_shape():
  with pytest.raises(ValueError, match=m('flip_sequences: `seq_lengths` expected shape',
                                         'got shape (3,)')):
    nr.flip_sequences(X, jnp.array([1, 2, 3]), num_batch_dims=1, time_major=False)


# -- initial_carry --------------------------------------------------------------
def test_initial_carry_wrong_structure(lstm):
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a pytree with structure',
                                         'got structure')):
    nr.RNN(lstm)(X, initial_carry=jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=m('`initial_carry` expected a pytree', 'got structure')):
    nr.RNN(lstm)(X, initial_carry=(jnp.zeros((2, 4)),) * 3)


def test_initial_carry_wrong_shapes(lstm):
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected leaf shapes',
                                         '[(2, 4), (2, 4)]', 'got [(2, 4), (2, 5)]')):
    nr.RNN(lstm)(X, initial_carry=(jnp.zeros((2, 4)), jnp.zeros((2, 5))))
  with pytest.raises(ValueError, match=m('`initial_carry` expected leaf shapes',
                                         'got [(4,), (4,)]')):
    nr.RNN(lstm)(X, initial_carry=(jnp.zeros((4,)), jnp.zeros((4,))))
  # A carry may have more rows than the inputs (beams), not fewer: one row for a
  # batch of 2 would change the carry's shape after the first step.
  with pytest.raises(ValueError, match=m('`initial_carry` expected leaf shapes [(2, 4), (2, 4)] '
                                         '(or larger shapes they broadcast to), '
                                         'got [(1, 4), (1, 4)]')):
    nr.RNN(lstm)(X, initial_carry=(jnp.zeros((1, 4)),) * 2)
  # A Python number for a leaf: it broadcasts, but the step's carry would not
  # keep its shape (flax.nnx fails in the scan or in a dot_general then).
  with pytest.raises(ValueError, match=m('`initial_carry` expected leaf shapes [(2, 4), (2, 4)] '
                                         '(or larger shapes they broadcast to), got [(), (2, 4)]')):
    nr.RNN(lstm)(X, initial_carry=(1.0, jnp.zeros((2, 4))))
  gru = ref.build(lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(1)))
  with pytest.raises(ValueError, match=m('`initial_carry` expected leaf shapes [(2, 4)] '
                                         '(or larger shapes they broadcast to), got [()]')):
    nr.RNN(gru)(X, initial_carry=0.5)


def test_initial_carry_of_integers_for_a_float_carry(lstm):
  """An integer carry for this package's float one is refused up front, not
  truncated at each step (flax.nnx's scan fails on the dtypes with a
  TypeError too)."""
  with pytest.raises(TypeError, match=m("RNN: `initial_carry` expected floating leaves (dtype "
                                        "float32), got dtypes ['int32', 'int32']")):
    nr.RNN(lstm)(X, initial_carry=(jnp.zeros((2, 4), jnp.int32),) * 2)


def test_bidirectional_initial_carry_not_a_pair(lstm):
  bi = nr.Bidirectional(nr.RNN(lstm), nr.RNN(ref.build(lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(1)))))
  with pytest.raises(ValueError, match=m('Bidirectional: `initial_carry` expected a pair')):
    bi(X, initial_carry=jnp.zeros((2, 4)))
  good_f = lstm.initialize_carry((2, 3))
  # nr.LSTM's one-layer nesting ((fwd, bwd),) given to a Bidirectional.
  with pytest.raises(ValueError, match=m('expected a pair (forward_carry, backward_carry), '
                                         'got tuple of length 1.')):
    bi(X, initial_carry=((good_f, jnp.zeros((2, 4))),))
  with pytest.raises(ValueError, match=m('`initial_carry` expected leaf shapes')):
    bi(X, initial_carry=(good_f, jnp.zeros((2, 5))))


def test_initialize_carry_needs_rngs_for_carry_init(lstm):
  with pytest.raises(ValueError, match=m('`rngs` expected a PRNG source', 'got None')):
    lstm.initialize_carry((2, 3), carry_init=jax.nn.initializers.normal())
  with pytest.raises(TypeError, match=m('`rngs` expected an nnx.Rngs, nnx.RngStream or a PRNG key',
                                        'got int')):
    lstm.initialize_carry((2, 3), rngs=3, carry_init=jax.nn.initializers.normal())


# -- constructors ---------------------------------------------------------------
@pytest.mark.parametrize('ctor, exc, msg', [
  (lambda: nr.LSTMCell(3, 0, rngs=nnx.Rngs(0)), ValueError,
   m('LSTMCell: `hidden_features` expected a positive int, got 0')),
  (lambda: nr.SimpleCell(3, 2.5, rngs=nnx.Rngs(0)), TypeError,
   m('SimpleCell: `hidden_features` expected a positive int, got 2.5')),
  (lambda: nr.GRUCell(0, 4, rngs=nnx.Rngs(0)), ValueError,
   m('GRUCell: `in_features` expected a positive int, got 0')),
  (lambda: nr.MGUCell(3, 4, dropout_rate=1.5, rngs=nnx.Rngs(0)), ValueError,
   m('MGUCell: `dropout_rate` expected a float in [0, 1), got 1.5')),
  (lambda: nr.OptimizedLSTMCell(3, 4, recurrent_dropout_rate=-0.1, rngs=nnx.Rngs(0)),
   ValueError, m('`recurrent_dropout_rate` expected a float in [0, 1), got -0.1')),
  (lambda: nr.ConvLSTMCell(2, 3, (3, 3), strides=(1, 2, 1), rngs=nnx.Rngs(0)), ValueError,
   m('ConvLSTMCell: `strides` expected 2 ints (one per kernel axis), got (1, 2, 1)')),
  (lambda: nr.ConvLSTMCell(2, 3, (3, 3), strides=(0, 1), rngs=nnx.Rngs(0)), ValueError,
   m('ConvLSTMCell: `strides` expected a positive int, got 0')),
  (lambda: nr.ConvLSTMCell(2, 3, 3, rngs=nnx.Rngs(0)), TypeError,
   m('ConvLSTMCell: `kernel_size` expected a sequence of 1 to 3 ints (one per spatial axis), '
     'got 3')),
  (lambda: nr.ConvLSTMCell(2, 3, (3, 3, 3, 3), rngs=nnx.Rngs(0)), ValueError,
   m('`kernel_size` expected a sequence of 1 to 3 ints')),
  (lambda: nr.LSTMCell(3, 4, rngs=0), TypeError, m('LSTMCell: `rngs` expected an nnx.Rngs')),
  (lambda: nr.RNN(lambda c, x: (c, x)), TypeError, m('RNN: `cell` expected an RNNCellBase')),
  (lambda: nr.RNN(nnx.Linear(3, 4, rngs=nnx.Rngs(0))), TypeError,
   m('RNN: `cell` expected an RNNCellBase', 'got Linear')),  # a module, but not a cell
  (lambda: nr.Bidirectional(nr.LSTM(3, 4, bidirectional=True, rngs=nnx.Rngs(0)),
                            nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)))), TypeError,
   m('Bidirectional: `forward_rnn` expected a one-direction sequence layer',
     'got LSTM, which already runs both directions')),
  (lambda: nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)), unroll=-1), ValueError,
   m('RNN: `unroll` expected a bool or a non-negative int, got -1')),
], ids=['hidden0', 'hidden_float', 'in0', 'dropout', 'recurrent_dropout', 'strides_len',
        'strides0', 'kernel_int', 'kernel_4d', 'rngs', 'cell', 'cell_module',
        'bidirectional_twice', 'unroll'])
def test_bad_constructor_args(ctor, exc, msg):
  with pytest.raises(exc, match=msg):
    abstractly(ctor)  # no initializer runs: the arguments are checked in Python alike


@pytest.mark.parametrize('option', [dict(zoneout_rate=0.2), dict(keep_rngs=True),
                                    dict(param_dtype=jnp.bfloat16)])
def test_a_subclass_giving_options_without_sizes_is_refused(option):
  # Only a bare super().__init__() is a cell in flax's style; any option needs the sizes.
  class Cell(nr.RNNCellBase):
    def __init__(self):
      super().__init__(**option)

  with pytest.raises(TypeError, match=m('Cell: `in_features` expected a positive int',
                                        'got None')):
    Cell()


# -- constructors: dtypes, rates, layers given where sequence layers go ------------------
@pytest.mark.parametrize('ctor, exc, msg', [
  (lambda: nr.LSTMCell(3, 4, dtype='bf16', rngs=nnx.Rngs(0)), TypeError,
   m("LSTMCell: `dtype` expected a floating dtype", "got 'bf16'")),
  (lambda: nr.GRUCell(3, 4, param_dtype=jnp.int32, rngs=nnx.Rngs(0)), TypeError,
   m('GRUCell: `param_dtype` expected a floating dtype', 'got int32')),
  (lambda: nr.LSTM(3, 4, param_dtype='bf16', rngs=nnx.Rngs(0)), TypeError,
   m("LSTM: `param_dtype` expected a floating dtype", "got 'bf16'")),
  (lambda: nr.Bidirectional(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)),
                            nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)))), TypeError,
   m('Bidirectional: `forward_rnn` expected a sequence layer instance',
     'got LSTMCell, a cell (wrap it: nr.RNN(cell))')),
  (lambda: nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))), nr.RNN), TypeError,
   m('Bidirectional: `backward_rnn` expected a sequence layer instance', 'got the class RNN')),
], ids=['dtype', 'param_dtype_int', 'fused_param_dtype', 'bidirectional_cell',
        'bidirectional_class'])
def test_bad_constructor_args_beyond_sizes(ctor, exc, msg):
  with pytest.raises(exc, match=msg):
    ctor()


# Functions given as strings or values (Keras spells them 'tanh'): refused when
# the cell is built, not when the scan first calls them.
@pytest.mark.parametrize('ctor, msg', [
  (lambda r: nr.LSTMCell(3, 4, gate_fn='sigmoid', rngs=r),
   m("LSTMCell: `gate_fn` expected a callable, got 'sigmoid'")),
  (lambda r: nr.GRUCell(3, 4, activation_fn='tanh', rngs=r),
   m("GRUCell: `activation_fn` expected a callable, got 'tanh'")),
  (lambda r: nr.SimpleCell(3, 4, activation_fn=None, rngs=r),
   m('SimpleCell: `activation_fn` expected a callable, got None')),
  (lambda r: nr.ConvGRUCell(2, 3, (3,), gate_fn='hard_sigmoid', rngs=r),
   m("ConvGRUCell: `gate_fn` expected a callable, got 'hard_sigmoid'")),
  (lambda r: nr.GRUCell(3, 4, bias_init=jnp.zeros(12), rngs=r),
   m('GRUCell: `bias_init` expected a callable, got ArrayImpl')),
  (lambda r: nr.MGUCell(3, 4, forget_bias_init=1.0, rngs=r),
   m('MGUCell: `forget_bias_init` expected a callable, got 1.0')),
  (lambda r: nr.LayerNormLSTMCell(3, 4, scale_init=1, rngs=r),
   m('LayerNormLSTMCell: `scale_init` expected a callable, got 1')),
  (lambda r: nr.LSTMCell(3, 4, proj_features=2, proj_kernel_init='orthogonal', rngs=r),
   m("LSTMCell: `proj_kernel_init` expected a callable, got 'orthogonal'")),
  (lambda r: nr.OptimizedLSTMCell(3, 4, carry_init='zeros', rngs=r),
   m("OptimizedLSTMCell: `carry_init` expected a callable, got 'zeros'")),
  (lambda r: nr.LSTM(3, 4, recurrent_kernel_init='orthogonal', rngs=r),
   m("LSTM: `recurrent_kernel_init` expected a callable, got 'orthogonal'")),
], ids=['gate_fn', 'activation_fn', 'none', 'conv_gate_fn', 'array_init', 'mgu_bias',
        'scale_init', 'proj_init', 'carry_init', 'fused'])
def test_functions_that_are_not_callable(ctor, msg):
  with pytest.raises(TypeError, match=msg):
    ctor(nnx.Rngs(0))


def test_rates_accept_numpy_and_jax_scalars():
  for rate in (np.float32(0.25), jnp.array(0.25), 0):
    cell = nr.LSTMCell(3, 4, dropout_rate=rate, rngs=nnx.Rngs(0))
    assert cell.dropout_rate == float(rate)
  # Not a number: a TypeError (a number out of range: a ValueError, above).
  with pytest.raises(TypeError, match=m('`dropout_rate` expected a float in [0, 1)', 'got True')):
    nr.LSTMCell(3, 4, dropout_rate=True, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=m('GRU: `dropout_rate` expected a float in [0, 1)',
                                        "got '0.1'")):
    nr.GRU(3, 4, num_layers=2, dropout_rate='0.1', rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=m('StackedRNN: `dropout_rate` expected a float in [0, 1)',
                                        'got None')):
    nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))), dropout_rate=None,
                  rngs=nnx.Rngs(0))


def test_rates_and_epsilon_of_other_kinds():
  # (Their bounds, a rate of 1 and an epsilon of 0: test_new_cells, test_dropout.)
  # 0-d floating and integer arrays are numbers, as Python and NumPy ints are
  # (_checks._is_real), stored as Python floats; a 0-d bool array is refused.
  cell = nr.LSTMCell(3, 4, dropout_rate=jnp.array(0), rngs=nnx.Rngs(0))
  assert type(cell.dropout_rate) is float and cell.dropout_rate == 0.0
  cell = nr.LayerNormGRUCell(3, 4, epsilon=jnp.array(1), rngs=nnx.Rngs(0))
  assert type(cell.epsilon) is float and cell.epsilon == 1.0
  with pytest.raises(TypeError, match=m('`dropout_rate` expected a float in [0, 1)',
                                        'got Array(False, dtype=bool')):
    nr.LSTMCell(3, 4, dropout_rate=jnp.array(False), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=m('`epsilon` expected a positive float',
                                        'got Array(True, dtype=bool')):
    nr.LayerNormGRUCell(3, 4, epsilon=jnp.array(True), rngs=nnx.Rngs(0))
  # A traced value cannot be read on the host: a message naming the argument,
  # not jax's ConcretizationTypeError. Raised before any initializer is traced.
  with pytest.raises(TypeError, match=m('LSTMCell: `dropout_rate` expected a float in [0, 1), '
                                        'got JitTracer')):
    jax.jit(lambda r: nr.LSTMCell(3, 4, dropout_rate=r, rngs=nnx.Rngs(0)) and 0)(0.25)
  with pytest.raises(TypeError, match=m('LayerNormGRUCell: `epsilon` expected a positive float, '
                                        'got JitTracer')):
    jax.jit(lambda e: nr.LayerNormGRUCell(3, 4, epsilon=e, rngs=nnx.Rngs(0)) and 0)(1e-5)


def test_numpy_ints_as_sizes_and_flags():
  # NumPy integers are ints (sizes read from arrays' shapes); stored as Python
  # ints, and the parameters are those of the same Python sizes. A bool is no size.
  cell = nr.LSTMCell(np.int64(3), np.int32(4), rngs=nnx.Rngs(0))
  assert (type(cell.in_features), type(cell.hidden_features)) == (int, int)
  assert cell.in_features == 3 and cell.hidden_features == 4
  want = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(cell, nnx.Param),
               nnx.state(want, nnx.Param))
  with pytest.raises(TypeError, match=m('LSTMCell: `hidden_features` expected a positive int, '
                                        'got True.')):
    nr.LSTMCell(3, True, rngs=nnx.Rngs(0))
  # Flags: NumPy's 0 and 1 as Python's, read as bools.
  assert nr.RNN(want, reverse=np.int64(1)).reverse is True
  assert nr.MGUCell(3, 4, reset_gate=np.int32(0), rngs=nnx.Rngs(0)).reset_gate is False


# -- a cell's own call and initialize_carry --------------------------------------------
@pytest.mark.parametrize('carry, exc, msg', [
  (jnp.zeros((2, 4)), ValueError, m('LSTMCell: `carry` expected a pytree with structure')),
  ((jnp.zeros((2, 5)),) * 2, ValueError,
   m('`carry` expected leaf shapes that broadcast with [(2, 4), (2, 4)], got [(2, 5), (2, 5)]')),
  ((jnp.zeros((3, 4)),) * 2, ValueError, m('got [(3, 4), (3, 4)]')),
  (None, ValueError, m('LSTMCell: `carry` expected a pytree')),
  ((jnp.zeros((2, 4), jnp.int32),) * 2, TypeError,
   m('`carry` expected floating leaves (dtype float32)', "got dtypes ['int32', 'int32']")),
  # A Python number broadcasts as a leaf, a bool does not (it would step as 1.0).
  ((True, jnp.zeros((2, 4))), ValueError, m('got [(), (2, 4)]')),
], ids=['one_array', 'features', 'batch', 'none', 'int', 'bool'])
def test_cell_call_checks_the_carry(lstm, carry, exc, msg):
  with pytest.raises(exc, match=msg):
    lstm(carry, X[:, 0])


@pytest.mark.parametrize('cell, carry, got', [
  ('LSTMCell', (jnp.zeros((2, 4)), 1.0), 'got shape ().'),
  ('LSTMCell', (jnp.zeros((2, 4)), jnp.zeros((2, 1))), 'got shape (2, 1).'),
  ('GRUCell', jnp.float32(0.0), 'got shape ().'),
  ('MGUCell', jnp.zeros((1,)), 'got shape (1,).'),
], ids=['lstm_scalar_h', 'lstm_h_of_width_1', 'gru_scalar', 'mgu_width_1'])
def test_cell_call_h_that_broadcasts_but_cannot_enter_the_recurrent_product(cell, carry, got):
  # These pass the broadcast check (as a scalar c computes, they would), then
  # failed with jax's "dot_general requires ..." TypeError, naming nothing.
  # flax.nnx's cells fail too: no call that runs in flax is refused.
  ours = getattr(nr, cell)(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=m(f'{cell}: `carry` expected its last array (h, which '
                                         'the recurrent product reads) to end in the feature '
                                         'axes (4,)', got)):
    ours(carry, X[:, 0])
  with pytest.raises(TypeError, match='dot_general'):
    getattr(nnx, cell if cell != 'MGUCell' else 'GRUCell')(3, 4, rngs=nnx.Rngs(0))(carry, X[:, 0])


def test_a_given_carry_of_the_wrong_shape_is_not_blamed_on_step(lstm):
  # The pointer to num_carry_arrays is for a step's new carry, not for the caller's.
  with pytest.raises(ValueError, match=r'LSTMCell: `carry` expected .* got \[\(2, 5\), '
                     r'\(2, 5\)\]\.$'):
    lstm((jnp.zeros((2, 5)),) * 2, jnp.ones((2, 3)))


def test_cell_call_carry_that_broadcasts_and_lists_as_in_flax(lstm):
  x = np.ones((2, 3), np.float32)
  zeros = np.zeros((2, 4), np.float32)
  carries = ([np.zeros((1, 4), np.float32)] * 2, (0.0, zeros))
  # One shared input row stepped against a batch of carries (beam search).
  beams = tuple(ref.normal((5, 4), seed=i) for i in range(2))

  @nnx.jit  # one program for all the calls
  def run(lstm):
    return (lstm((zeros, zeros), x), [lstm(carry, x) for carry in carries],
            lstm(beams, x[:1])[1], lstm(beams, jnp.broadcast_to(x[:1], (5, 3)))[1])

  (ref_carry, ref_y), outs, y_shared, y_tiled = run(lstm)
  for new_carry, y in outs:  # broadcasts (and a list unpacks), as it computes
    np.testing.assert_array_equal(y, ref_y)
    np.testing.assert_array_equal(new_carry[0], ref_carry[0])
  np.testing.assert_allclose(y_shared, y_tiled, atol=1e-6)


def test_cell_with_its_own_initialize_carry_is_not_checked_against_the_base():
  class Counted(nr.GRUCell):
    def initialize_carry(self, input_shape, rngs=None, carry_init=None):
      return super().initialize_carry(input_shape, rngs), jnp.zeros(input_shape[:-1])

    def step(self, carry, x, mask):
      h, n = carry
      h, y = super().step(h, x, mask)
      return (h, n + 1), y

  # Equal parameters (the same structure filled from the same seed), no initializer run.
  counted = ref.build(lambda: Counted(3, 4, rngs=nnx.Rngs(0)))
  plain = ref.build(lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))
  ((h, n), y), y_plain = nnx.jit(lambda counted, plain: (  # one program
    nr.RNN(counted)(X, return_carry=True), nr.RNN(plain)(X)))(counted, plain)
  np.testing.assert_array_equal(y, y_plain)
  np.testing.assert_array_equal(n, [5.0, 5.0])


def test_dropout_masks_and_merge_fn_of_the_wrong_kind(lstm):
  with pytest.raises(TypeError, match=m('LSTMCell: `dropout_masks` expected None or the '
                                        'DropoutMasks', 'got tuple')):
    lstm(lstm.initialize_carry((2, 3)), X[:, 0], dropout_masks=(None, None))
  with pytest.raises(TypeError, match=m('Bidirectional: `merge_fn` expected a function',
                                        "got 'concat'")):
    nr.Bidirectional(nr.RNN(lstm), nr.RNN(lstm), merge_fn='concat')


# Convolutional directions whose outputs differ in a spatial axis (kernels 3
# and 1, 'VALID': 3 and 5 points of 5): no concatenation on the last axis.
X_CONV = jnp.ones((2, 4, 5, 2))
UNEVEN = m("Bidirectional: `backward_rnn` expected outputs of forward_rnn's shape but the last "
           'axis, (2, 4, 3, _) (the default merge_fn concatenates them on it; pass a merge_fn',
           'got outputs of shape (2, 4, 5, 3).')


def _uneven_directions(**kw):
  return nr.Bidirectional(*(nr.RNN(nr.ConvLSTMCell(2, 3, (k,), padding='VALID',
                                                   rngs=nnx.Rngs(k))) for k in (3, 1)), **kw)


def test_directions_the_default_merge_cannot_concatenate():
  with pytest.raises(ValueError, match=UNEVEN):
    abstractly(lambda: _uneven_directions()(X_CONV))
  linen = compat.Bidirectional(*(compat.RNN(compat.ConvLSTMCell(3, (k,), padding='VALID'))
                                 for k in (3, 1)))
  with pytest.raises(ValueError, match=UNEVEN):
    jax.eval_shape(lambda: linen.init(jax.random.key(0), X_CONV))


def test_directions_of_other_shapes_merge_with_a_merge_fn():
  # Each direction's outputs averaged over its own spatial axis; their difference.
  bi = _uneven_directions(merge_fn=lambda a, b: a.mean(-2) - b.mean(-2))
  y, y_f, y_b = nnx.jit(lambda bi: (
    bi(X_CONV), bi.forward_rnn(X_CONV),
    bi.backward_rnn(X_CONV, reverse=True, keep_order=True)))(bi)
  assert y_f.shape == (2, 4, 3, 3) and y_b.shape == (2, 4, 5, 3)
  np.testing.assert_allclose(y, y_f.mean(-2) - y_b.mean(-2), rtol=1e-6, atol=1e-7)


def test_dropout_masks_of_the_wrong_shape_and_carry_init_at_call_time():
  cell = nr.LSTMCell(3, 4, dropout_rate=0.5, recurrent_dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = X[:, 0]
  carry = cell.initialize_carry(x.shape)
  good = cell.dropout_masks(x.shape)
  for masks, msg in [
    (good._replace(input=jnp.ones((2, 4))), m('LSTMCell: `dropout_masks.input` expected an array '
                                              "that broadcasts to the inputs' shape (2, 3)",
                                              'got shape (2, 4)')),
    (good._replace(input=jnp.ones((5, 2, 3))), m('got shape (5, 2, 3)')),
    (good._replace(recurrent=good.input), m('`dropout_masks.recurrent` expected an array that '
                                            'broadcasts to the shape of h (2, 4)',
                                            'got shape (2, 3)')),
  ]:
    with pytest.raises(ValueError, match=msg):
      cell(carry, x, dropout_masks=masks)
  # Masks that broadcast (one row shared by the batch) are applied, as they compute.
  shared = nr.DropoutMasks(jnp.array([[0.0, 2.0, 2.0]]), None)
  y, y_ref = nnx.jit(lambda cell: (  # one program for both calls
    cell(carry, x, dropout_masks=shared)[1],
    cell(carry, x * shared.input, dropout_masks=nr.DropoutMasks(None, None))[1]))(cell)
  np.testing.assert_allclose(y, y_ref, atol=1e-6)
  with pytest.raises(TypeError, match=m("LSTMCell.initialize_carry: `carry_init` expected a "
                                        "callable, got 'normal'")):
    cell.initialize_carry(x.shape, rngs=nnx.Rngs(0), carry_init='normal')


def test_cell_call_in_pytorch_argument_order(lstm):
  with pytest.raises(TypeError, match=m('LSTMCell: `inputs` expected an array (a cell is called '
                                        'as cell(carry, inputs))', 'got tuple')):
    lstm(X[:, 0], lstm.initialize_carry((2, 3)))


def test_the_pytorch_carry_hint_is_for_initial_carry_errors_only():
  # PyTorch's (h_0, c_0) of a bidirectional LSTM, (2, batch, hidden) each, passes
  # Bidirectional's pair check; an error about another argument raised in the
  # directions (here seq_lengths) gets no recipe for h_0, the carry's own error does.
  B, T, IN, H = 3, 4, 2, 5
  bi = nr.Bidirectional(*(nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(i))) for i in range(2)))
  h0 = c0 = np.zeros((2, B, H), np.float32)
  x = np.ones((B, T, IN), np.float32)
  with pytest.raises(ValueError, match=m('Bidirectional: `seq_lengths`, passed on to forward_rnn '
                                         '(RNN): RNN: `seq_lengths` expected shape batch shape = '
                                         '(3,), got shape (4,).')) as info:
    bi(x, initial_carry=(h0, c0), seq_lengths=np.arange(1, 5))
  assert str(info.value).endswith('got shape (4,).')
  with pytest.raises(ValueError, match=m('Bidirectional: `initial_carry[0]`, the carry of '
                                         "forward_rnn (RNN)", "PyTorch's h_0 / c_0")):
    bi(x, initial_carry=(h0, c0))


def test_pytorch_h0_c0_given_to_a_stack_of_two_lstm_layers_get_the_hint_at_the_entry():
  # (h_0, c_0) of a 2-layer PyTorch LSTM, (2, batch, hidden) each, passes the stack's
  # count of carries (one per layer); the first layer's error names its entry and
  # gets the recipe for h_0, each layer's (c_0[l], h_0[l]).
  B, T, IN, H = 3, 4, 2, 5
  stack = nr.StackedRNN(nr.RNN(nr.LSTMCell(IN, H, rngs=nnx.Rngs(0))),
                        nr.RNN(nr.LSTMCell(H, H, rngs=nnx.Rngs(1))))
  h0 = c0 = np.zeros((2, B, H), np.float32)
  with pytest.raises(ValueError, match=m(
      'StackedRNN: `initial_carry[0]`, the carry of layers[0] (RNN): RNN: `initial_carry` '
      "expected a pytree with structure (array, array), got structure array. PyTorch's h_0 / "
      'c_0, (num_layers * num_directions, batch, hidden) = (2, 3, 5), are not a carry here: '
      "a tuple over layers", "(an LSTM's (c_0[...], h_0[...]), c first)")):
    stack(np.ones((B, T, IN), np.float32), initial_carry=(h0, c0))


def test_initialize_carry_takes_numpy_shapes_and_rngs_without_a_carry_stream(lstm):
  want = lstm.initialize_carry((2, 3))
  for shape in (np.array([2, 3]), (jnp.array(2), np.int64(3))):
    for a, b in zip(lstm.initialize_carry(shape), want):
      np.testing.assert_array_equal(a, b)
  assert [a.shape for a in lstm.initialize_carry((0, 3))] == [(0, 4)] * 2  # an empty batch
  rngs = nnx.Rngs(dropout=1)  # no carry or default stream: the zeros need none
  np.testing.assert_array_equal(lstm.initialize_carry((2, 3), rngs)[1], want[1])
  assert int(rngs['dropout'].count[...]) == 0


@pytest.mark.parametrize('args, got', [
  ((jax.random.key(0), (2, 3)), 'got an array of dtype key<fry>'),
  ((2,), 'got 2'),
  (((2.5, 3),), 'got (2.5, 3)'),
  (((True, 3),), 'got (True, 3)'),
  (((jnp.array(2.0), 3),), 'got (Array(2., dtype=float32'),  # a 0-d array: an integer one only
], ids=['linen_order', 'int', 'float_dims', 'bool', 'float_array'])
def test_initialize_carry_input_shape(lstm, args, got):
  with pytest.raises(TypeError, match=m('LSTMCell.initialize_carry: `input_shape` expected a '
                                        'tuple of ints', "flax.linen's (rng, input_shape)", got)):
    lstm.initialize_carry(*args)


def test_a_negative_size_in_a_shape_is_a_value_error(lstm):
  # The right kind (ints), a wrong value: a ValueError, as everywhere else; a 0-d
  # integer array is an int there too, as jnp.array(3) is taken (it was a TypeError
  # saying "expected a tuple of ints" of a tuple of ints).
  for shape in ((-1, 3), [2, np.int64(-3)], (2, jnp.array(-1)), (np.array(-2), 3)):
    with pytest.raises(ValueError, match=m('LSTMCell.initialize_carry: `input_shape` expected a '
                                           'tuple of non-negative ints', f'got {shape!r}')):
      lstm.initialize_carry(shape)
  # A negative beside an entry that is no int: the wrong kind, a TypeError.
  with pytest.raises(TypeError, match=m('LSTMCell.initialize_carry: `input_shape` expected a '
                                        'tuple of ints (', "got (-1, 'a').")):
    lstm.initialize_carry((-1, 'a'))


def test_rnn_initial_carry_of_integers(lstm):
  carry = tuple(np.zeros((2, 4), np.int32) for _ in range(2))
  with pytest.raises(TypeError, match=m('RNN: `initial_carry` expected floating leaves')):
    nr.RNN(lstm)(X, initial_carry=carry)
  with pytest.raises(TypeError, match=m('LSTM: `initial_carry` expected floating leaves')):
    abstractly(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0))(X, initial_carry=carry))


def test_stacked_dropout_without_rngs():
  stack = ref.build(lambda: nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))),
                                          nr.RNN(nr.GRUCell(4, 4, rngs=nnx.Rngs(1))),
                                          dropout_rate=0.5))
  with pytest.raises(ValueError, match=m('StackedRNN: `rngs` expected a PRNG source for the '
                                         'dropout between layers in training mode', 'got None')):
    stack(X)
  call = nnx.jit(lambda stack, rngs=None: stack(X, rngs=rngs))  # a compile, not eager ops
  train = call(stack, nnx.Rngs(2))
  stack.eval()
  assert not np.allclose(train, call(stack))  # the call's rngs did drop units


@pytest.mark.parametrize('kw, exc, msg', [
  (dict(num_batch_dims=5), ValueError, m('`num_batch_dims` expected an int in [0, 2]', 'got 5')),
  (dict(num_batch_dims=3), ValueError, m('`num_batch_dims` expected an int in [0, 2]', 'got 3')),
  (dict(num_batch_dims=-1), ValueError, m('`num_batch_dims` expected an int in [0, 2]', 'got -1')),
  (dict(num_batch_dims=1.0), TypeError, m('`num_batch_dims` expected an int', 'got 1.0')),
  (dict(num_batch_dims=1, seq_lengths=jnp.array([[6, 1]])), ValueError,
   m('`seq_lengths` expected shape batch shape = (2,)', 'got shape (1, 2)')),
], ids=['too_many', 'no_time_axis', 'negative', 'float', 'lengths_shape'])
def test_flip_sequences_arguments(kw, exc, msg):
  kw.setdefault('seq_lengths', None)
  with pytest.raises(exc, match=m('flip_sequences: ') + '.*' + msg):
    nr.flip_sequences(X, time_major=False, **kw)


def test_unpack_sequences_under_jit():
  ids = jnp.array([[1, 1, 2, 2, 0]])
  with pytest.raises(TypeError, match=m('unpack_sequences: `segment_ids` expected concrete '
                                        'values', 'got a traced array')):
    jax.jit(lambda y, s: nr.unpack_sequences(y, s)[0])(jnp.ones((1, 5, 3)), ids)


def test_compat_construction_and_carry_arguments():
  from nnx_recurrent import compat

  with pytest.raises(TypeError, match=m('LSTMCell: `features` expected a positive int, got 4.0')):
    compat.LSTMCell(4.0)
  with pytest.raises(TypeError, match=m('LSTMCell.initialize_carry: `input_shape` expected a '
                                        "tuple of ints (the arguments are flax.linen's (rng, "
                                        'input_shape))')):
    compat.LSTMCell(4).initialize_carry((2, 3), jax.random.key(0))
  with pytest.raises(TypeError, match=m('Bidirectional: `forward_rnn` expected an RNN module',
                                        'got GRUCell, a cell (wrap it: RNN(cell))')):
    compat.Bidirectional(compat.GRUCell(4), compat.RNN(compat.GRUCell(4)))
  with pytest.raises(TypeError, match=m('Bidirectional: `backward_rnn` expected an RNN module '
                                        '(compat or flax.linen), got int.')):
    compat.Bidirectional(compat.RNN(compat.GRUCell(4)), 4)  # flax.linen fails at the call
  # flax.linen takes these and fails inside the call, naming neither argument nor layer.
  with pytest.raises(TypeError, match=m("RNN: `unroll` expected a bool or a non-negative int, "
                                        "got 'a'.")):
    compat.RNN(compat.GRUCell(4), unroll='a')
  with pytest.raises(ValueError, match=m('RNN: `unroll` expected a bool or a non-negative int, '
                                         'got -1.')):
    compat.RNN(compat.GRUCell(4), unroll=-1)
  with pytest.raises(TypeError, match=m('Bidirectional: `merge_fn` expected a function '
                                        "(forward_outputs, backward_outputs) -> outputs, got "
                                        "'concatenate'.")):
    compat.Bidirectional(compat.RNN(compat.GRUCell(4)), compat.RNN(compat.GRUCell(4)),
                         merge_fn='concatenate')
  linen_bi = compat.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.GRUCell(4)))
  with pytest.raises(TypeError, match=m('Bidirectional: `segment_ids` expected None, since '
                                        'forward_rnn (flax.linen.recurrent.RNN) takes no '
                                        'segment_ids (packed sequences need compat.RNN layers), '
                                        'got ids.')):
    abstractly(lambda: linen_bi.init(jax.random.key(0), X, segment_ids=jnp.ones((2, 5), int)))


# -- convolutional cells: padding -----------------------------------------------------
_PADDINGS = ("one of 'SAME', 'SAME_LOWER', 'VALID', 'CIRCULAR', 'REFLECT', 'CAUSAL' "
             "('CAUSAL' for 1-D kernels only), an int, or a sequence of 2 ints or (low, high) "
             'tuples (one per kernel axis)')


@pytest.mark.parametrize('padding, exc, got', [
  ('BOGUS', ValueError, "got 'BOGUS'"),
  ('circular', ValueError, "got 'circular'"),  # flax compares its own modes in upper case
  ((1,), ValueError, 'got (1,)'),
  (((1, 1), [1, 1]), ValueError, 'got ((1, 1), [1, 1])'),  # flax takes pairs as tuples only
  ((1, 1.5), ValueError, 'got (1, 1.5)'),
  (1.5, TypeError, 'got 1.5'),
  (None, TypeError, 'got None'),
  (True, TypeError, 'got bool'),  # flax would read True as 1
  ((True, 1), ValueError, 'got (True, 1)'),
  (((1, 1, 1), 1), ValueError, 'got ((1, 1, 1), 1)'),  # a pair has two entries
], ids=['unknown', 'lower_case_flax_mode', 'too_few', 'list_pair', 'float_entry', 'float',
        'none', 'bool', 'bool_entry', 'triple'])
def test_conv_padding_refused_at_construction(padding, exc, got):
  for cls in (nr.ConvLSTMCell, nr.ConvGRUCell):
    with pytest.raises(exc, match=m(f'{cls.__name__}: `padding` expected {_PADDINGS}', got)):
      cls(2, 3, (3, 3), padding=padding, rngs=nnx.Rngs(0))


def test_conv_causal_padding_needs_a_1d_kernel():
  with pytest.raises(ValueError, match=m("ConvLSTMCell: `padding` expected a padding other than "
                                         "'CAUSAL' for a kernel of 2 axes", "got 'CAUSAL'")):
    nr.ConvLSTMCell(2, 3, (3, 3), padding='CAUSAL', rngs=nnx.Rngs(0))


@pytest.mark.parametrize('kernel_size, padding, spatial', [
  ((3, 3), 'same', (6, 6)), ((3, 3), 'VALID', (4, 4)), ((3, 3), 'SAME_LOWER', (6, 6)),
  ((3, 3), 'REFLECT', (6, 6)), ((3, 3), (1, (0, 2)), (6, 6)), ((3, 3), 0, (4, 4)),
  ((3,), 'CAUSAL', (6,)), ((3,), [1], (6,)),
])
def test_conv_paddings_flax_takes_still_run(kernel_size, padding, spatial):
  # Traced only (nnx.eval_shape): the padding is applied as the scan is traced.
  x = np.ones((1, 2, *(6,) * len(kernel_size), 2), np.float32)
  y = nnx.eval_shape(lambda: nr.RNN(nr.ConvLSTMCell(2, 3, kernel_size, padding=padding,
                                                    rngs=nnx.Rngs(0)))(x))
  assert y.shape == (1, 2, *spatial, 3)


# Layers reading steps of other feature-axis counts than they are given would
# read a feature axis as time (or time as a batch axis) and run on silently.
def _conv(r, in_features=3, axes=1):
  return nr.RNN(nr.ConvLSTMCell(in_features, 4, (3,) * axes, rngs=r))


@pytest.mark.parametrize('ctor, msg', [
  (lambda r: nr.StackedRNN(_conv(r), nr.RNN(nr.GRUCell(4, 4, rngs=r))),
   m('StackedRNN: `layers[1]` expected a layer reading steps of 2 feature axes (the outputs of '
     'layers[0], RNN), got nr.RNN of GRUCell, which reads 1 feature axis.')),
  (lambda r: nr.StackedRNN(_conv(r), nr.LSTM(4, 4, rngs=r)),
   m('`layers[1]` expected a layer reading steps of 2 feature axes', 'got nr.LSTM, which reads '
     '1 feature axis.')),
  (lambda r: nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=r)), _conv(r, 4)),
   m('`layers[1]` expected a layer reading steps of 1 feature axis (the outputs of layers[0], '
     'RNN), got nr.RNN of ConvLSTMCell, which reads 2 feature axes.')),
  (lambda r: nr.StackedRNN(_conv(r), _conv(r, 4, axes=2)),
   m('`layers[1]` expected a layer reading steps of 2 feature axes', 'got nr.RNN of '
     'ConvLSTMCell, which reads 3 feature axes.')),
  (lambda r: nr.StackedRNN(nr.Bidirectional(_conv(r), _conv(r)), nr.RNN(nr.GRUCell(8, 4, rngs=r))),
   m('(the outputs of layers[0], Bidirectional), got nr.RNN of GRUCell, which reads 1 feature '
     'axis.')),
  (lambda r: nr.Bidirectional(_conv(r), nr.RNN(nr.GRUCell(3, 4, rngs=r))),
   m("Bidirectional: `backward_rnn` expected a layer reading steps of 2 feature axes "
     "(forward_rnn's: both directions read the same inputs), got nr.RNN of GRUCell, which "
     'reads 1 feature axis.')),
  (lambda r: nr.Bidirectional(nnx.RNN(nnx.GRUCell(3, 4, rngs=r)), _conv(r)),
   m('`backward_rnn` expected a layer reading steps of 1 feature axis', 'got nr.RNN of '
     'ConvLSTMCell, which reads 2 feature axes.')),
  (lambda r: nr.Bidirectional(_conv(r), nr.GRU(3, 4, rngs=r)),
   m('`backward_rnn` expected a layer reading steps of 2 feature axes', 'got nr.GRU, which '
     'reads 1 feature axis.')),
  (lambda r: nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=r)),
                           nr.Bidirectional(_conv(r, 4), _conv(r, 4))),
   m('`layers[1]` expected a layer reading steps of 1 feature axis', 'got nr.Bidirectional, '
     'which reads 2 feature axes.')),
  (lambda r: nr.StackedRNN(nr.RNN(nnx.GRUCell(3, 4, rngs=r)), _conv(r, 4)),
   m('`layers[1]` expected a layer reading steps of 1 feature axis (the outputs of layers[0], '
     'RNN), got nr.RNN of ConvLSTMCell, which reads 2 feature axes.')),
], ids=['conv_then_cell', 'conv_then_fused', 'cell_then_conv', 'conv1d_then_conv2d',
        'bidirectional_conv_then_cell', 'directions_conv_cell', 'directions_flax_conv',
        'directions_conv_fused', 'cell_then_bidirectional_conv', 'flax_cell_then_conv'])
def test_layers_given_steps_of_another_number_of_feature_axes(ctor, msg):
  with pytest.raises(ValueError, match=msg):
    abstractly(lambda: ctor(nnx.Rngs(0)))


def test_compat_directions_reading_another_number_of_feature_axes():
  # flax.linen builds and runs it, the GRU reading the ConvLSTM's spatial axis as time.
  with pytest.raises(ValueError, match=m(
      "Bidirectional: `backward_rnn` expected a layer reading steps of 2 feature axes "
      "(forward_rnn's: both directions read the same inputs), got compat.RNN of GRUCell, "
      'which reads 1 feature axis.')):
    compat.Bidirectional(compat.RNN(compat.ConvLSTMCell(4, (3,))), compat.RNN(compat.GRUCell(4)))
  with pytest.raises(ValueError, match=m('got compat.RNN of ConvLSTMCell, which reads 3 feature '
                                         'axes.')):
    compat.Bidirectional(compat.RNN(nn.GRUCell(4)), compat.RNN(compat.ConvLSTMCell(4, (3, 3))))


def test_a_users_cell_may_give_steps_of_fewer_feature_axes_than_it_reads():
  # A flax-style cell reading (points, channels) and giving a running sum of
  # the flattened step; then a running sum of those: (t + 1) (t + 2) / 2.
  class FlatSum(nr.RNNCellBase):
    def __init__(self, axes, size=6):
      super().__init__()
      self.axes, self.size = axes, size

    def __call__(self, carry, inputs):
      new = carry + inputs.reshape(*inputs.shape[:inputs.ndim - self.axes], -1)
      return new, new

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros(input_shape[:len(input_shape) - self.axes] + (self.size,))

    @property
    def num_feature_axes(self):
      return self.axes

  y = nr.StackedRNN(nr.RNN(FlatSum(2)), nr.RNN(FlatSum(1)))(jnp.ones((2, 4, 2, 3)))
  t = np.arange(4)
  np.testing.assert_array_equal(y, np.broadcast_to(((t + 1) * (t + 2) / 2)[None, :, None],
                                                   (2, 4, 6)))
  # Nested, beside this package's layers: a stack reads what its first layer reads and
  # gives what its last gives (unknown after the user's cell), and a Bidirectional with
  # its own merge_fn gives what it merges to: each stack builds, and runs as its layers
  # composed by hand.
  r = nnx.Rngs(0)
  conv, back = _conv(r, 3), _conv(r, 3)
  flat, gru = nr.RNN(FlatSum(2, 8)), nr.RNN(nr.GRUCell(8, 4, rngs=r))
  flat_sum = lambda a, b: (a + b).reshape(*a.shape[:-2], -1)  # noqa: E731
  stacks = [nr.StackedRNN(nr.StackedRNN(conv, flat), gru),
            nr.StackedRNN(conv, nr.StackedRNN(flat, gru)),
            nr.StackedRNN(nr.Bidirectional(conv, back, merge_fn=flat_sum), gru)]
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 2, 3)), jnp.float32)
  got, by_hand = nnx.jit(lambda stacks, conv, back, flat, gru: (
    [stack(x) for stack in stacks],
    [gru(flat(conv(x)))] * 2 + [gru(flat_sum(conv(x), back(x, reverse=True, keep_order=True)))]
  ))(stacks, conv, back, flat, gru)
  for g, w in zip(got, by_hand):
    np.testing.assert_allclose(g, w, atol=1e-6)

  # A flax.nnx cell that leaves num_feature_axes to its base class (which
  # raises NotImplementedError) in flax.nnx's RNN: built, and failing when
  # called, as in flax.nnx.
  class NoAxes(nnx.RNNCellBase):
    def __call__(self, carry, inputs):
      return carry + inputs, carry + inputs

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros(input_shape)

  bi = nr.Bidirectional(nnx.RNN(NoAxes()), nnx.RNN(NoAxes()))
  with pytest.raises(NotImplementedError):
    bi(jnp.ones((2, 4, 3)))


def test_conv_inputs_the_convolution_leaves_no_point_of():
  # 'VALID' with a kernel of 3 over 2 points (nnx.Conv gives 0), 3 x 1 points
  # (0 on the second axis); explicit pads leave one point of 1.
  for cls in (nr.ConvLSTMCell, nr.ConvGRUCell):
    for kernel, padding, spatial, out in [((3,), 'VALID', (2,), (0,)),
                                          ((3, 2), 'VALID', (3, 1), (1, 0)),
                                          ((3,), ((0, 1),), (1,), (0,))]:
      cell = cls(2, 3, kernel, padding=padding, rngs=nnx.Rngs(0))
      msg = m(f'{cls.__name__}: `inputs` expected steps of a spatial shape that the input '
              f'convolution (kernel_size {kernel}, strides {(1,) * len(kernel)}, padding '
              f'{padding!r}) leaves points of, got spatial shape {spatial}, which it takes to '
              f'{out}.')
      x = np.ones((1, 2, *spatial, 2), np.float32)
      with pytest.raises(ValueError, match=msg):
        abstractly(lambda: nr.RNN(cell)(x))  # noqa: B023 (called at once)
      with pytest.raises(ValueError, match=msg):
        cell.initialize_carry(x[:, 0].shape)
  # compat's cells (flax.linen's fails in a broadcast) and a stack's later layer.
  with pytest.raises(ValueError, match=m('ConvLSTMCell: `inputs` expected', 'got spatial '
                                         'shape (2,), which it takes to (0,).')):
    jax.eval_shape(lambda: compat.RNN(compat.ConvLSTMCell(3, (3,), padding='VALID')).init(
      jax.random.key(0), jnp.ones((1, 2, 2, 2))))
  def stack(points):
    return nr.StackedRNN(*(nr.RNN(nr.ConvLSTMCell(c, 3, (3,), padding='VALID', rngs=nnx.Rngs(0)))
                           for c in (2, 3)))(np.ones((1, 2, points, 2), np.float32))

  with pytest.raises(ValueError, match=m('ConvLSTMCell: `inputs` expected', 'got spatial shape '
                                         '(2,), which it takes to (0,).')):
    abstractly(lambda: stack(4))
  assert nnx.eval_shape(lambda: stack(5)).shape == (1, 2, 1, 3)  # one point left: runs


@pytest.mark.parametrize('kw, exc, msg', [
  (dict(kernel_size=3), TypeError,
   m('ConvLSTMCell: `kernel_size` expected a sequence of 1 to 3 ints (one per spatial axis), '
     'got 3.')),
  (dict(kernel_size=(3, 3), strides=2.0), TypeError,
   m('ConvLSTMCell: `strides` expected None, an int or 2 ints (one per kernel axis), got 2.0.')),
  (dict(kernel_size=(3, 3), strides=(1, 1, 1)), ValueError,
   m('ConvLSTMCell: `strides` expected 2 ints (one per kernel axis), got (1, 1, 1).')),
  (dict(kernel_size=(3, 3), padding='BOGUS'), ValueError,
   m('ConvLSTMCell: `padding` expected one of', "got 'BOGUS'.")),
], ids=['int_kernel', 'float_strides', 'strides_len', 'padding'])
def test_compat_conv_geometry(kw, exc, msg):
  # flax.linen's ConvLSTMCell fails on an int kernel_size too (len() of an int):
  # a TypeError naming it, when the module is built.
  from nnx_recurrent import compat

  with pytest.raises(exc, match=msg):
    compat.ConvLSTMCell(4, **kw)


def test_compat_cell_step_names_inputs_with_too_few_feature_axes():
  # A ConvLSTMCell of one spatial axis reads (*batch, width, channels): one step's
  # input of one axis is refused by name (not an index error of the convolution).
  cell = compat.ConvLSTMCell(4, (3,))
  carry = cell.initialize_carry(jax.random.key(0), (2, 5, 3))
  with pytest.raises(ValueError, match=m('ConvLSTMCell: `inputs` expected at least 2 feature '
                                         'axes, got shape (3,).')):
    cell.init(jax.random.key(0), carry, jnp.ones((3,)))


def test_compat_conv_cell_keeps_its_features_against_a_carry_of_another_size():
  # flax.linen's ConvLSTMCell sizes its convolutions by `features`, not by the
  # carry (its Dense cells take the carry's size): a carry of 6 channels for a
  # cell of 4 is named (flax.linen fails in jax: 'mul got incompatible shapes').
  x = jnp.ones((2, 5, 3))
  carry = compat.ConvLSTMCell(6, (3,)).initialize_carry(jax.random.key(0), x.shape)
  with pytest.raises(ValueError, match=m('ConvLSTMCell: `carry` expected leaf shapes that '
                                         'broadcast with [(2, 5, 4), (2, 5, 4)], got '
                                         '[(2, 5, 6), (2, 5, 6)].')):
    compat.ConvLSTMCell(4, (3,)).init(jax.random.key(0), carry, x)


def test_compat_cell_applied_without_variables_raises_linens_error():
  x = jnp.ones((2, 3))
  carry = compat.LSTMCell(4).initialize_carry(jax.random.key(0), x.shape)
  for ns in (nn, compat):  # flax.linen's error, word for word
    with pytest.raises(flax.errors.ScopeCollectionNotFound,
                       match=m('Tried to access "kernel" from collection "params" in "/ii" but '
                               'the collection is empty.')):
      ns.LSTMCell(4).apply({}, carry, x)


def test_compat_conv_takes_what_linen_takes():
  from nnx_recurrent import compat

  for kw in (dict(kernel_size=[3, 3], strides=1, padding=1), dict(kernel_size=(3,), strides=None,
                                                                   padding='CAUSAL')):
    cell = compat.ConvLSTMCell(4, **kw)
    x = np.ones((2, *(6,) * len(kw['kernel_size']), 3), np.float32)
    (_, y), _ = jax.eval_shape(lambda cell=cell, x=x: cell.init_with_output(
      jax.random.key(1), cell.initialize_carry(jax.random.key(0), x.shape), x))
    assert y.shape == x.shape[:-1] + (4,)


def test_nnx_conv_strides_of_the_wrong_kind():
  with pytest.raises(TypeError, match=m('ConvGRUCell: `strides` expected None, an int or 2 ints',
                                        "got '2'")):
    nr.ConvGRUCell(2, 3, (3, 3), strides='2', rngs=nnx.Rngs(0))
  # A bool is no int here (as for every size); too few strides are refused, as too many are.
  with pytest.raises(TypeError, match=m('ConvGRUCell: `strides` expected None, an int or 2 ints '
                                        '(one per kernel axis), got True.')):
    nr.ConvGRUCell(2, 3, (3, 3), strides=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=m('ConvGRUCell: `strides` expected 2 ints (one per kernel '
                                         'axis), got (2,).')):
    nr.ConvGRUCell(2, 3, (3, 3), strides=(2,), rngs=nnx.Rngs(0))


# -- initial_carry of other libraries' cells --------------------------------------------
def test_flax_nnx_cell_initial_carry_checked_against_its_initialize_carry():
  cell = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected leaf shapes '
                                         '[(2, 4), (2, 4)]', 'got [(2, 5), (2, 5)]')):
    nr.RNN(cell)(X, initial_carry=(jnp.zeros((2, 5)),) * 2)
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a pytree with structure',
                                         'got structure')):
    nr.RNN(cell)(X, initial_carry=jnp.zeros((2, 4)))
  # A list: flax's step takes it but returns its tuple, a carry of another structure.
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a pytree with structure '
                                         '(array, array)', 'got structure [array, array].')):
    nr.RNN(cell)(X, initial_carry=[jnp.zeros((2, 4))] * 2)
  # One row for a batch of 2: the step takes it, but returns 2 (flax.nnx: jax's scan error).
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected leaf shapes '
                                         '[(2, 4), (2, 4)]', 'got [(1, 4), (1, 4)].')):
    nr.RNN(cell)(X, initial_carry=(jnp.zeros((1, 4)),) * 2)
  # A carry that fits runs, and the check draws nothing from the cell's streams.
  with pytest.warns(UserWarning, match='keep_rngs argument is deprecated'):
    kept = nnx.LSTMCell(3, 4, keep_rngs=True, rngs=nnx.Rngs(0))
  count = int(kept.rngs.count[...])
  y = nr.RNN(kept)(X, initial_carry=(jnp.zeros((2, 4)),) * 2)
  assert y.shape == (2, 5, 4) and int(kept.rngs.count[...]) == count


def test_cell_whose_initialize_carry_cannot_be_traced_is_not_checked():
  class NeedsTwo(nnx.Module):  # initialize_carry with a signature of its own
    def __init__(self):
      self.num_feature_axes = 1

    def initialize_carry(self, input_shape, rngs, scale):
      return jnp.full(input_shape[:-1] + (3,), scale)

    def __call__(self, carry, x):
      return carry + x, carry

  y = nr.RNN(NeedsTwo())(X, initial_carry=jnp.zeros((2, 3)))
  np.testing.assert_array_equal(y[:, -1], jnp.full((2, 3), 4.0))


def test_compat_rnn_linen_cell_initial_carry_structure():
  import flax.linen as nn

  from nnx_recurrent import compat

  rnn = compat.RNN(nn.LSTMCell(4))
  with pytest.raises(ValueError, match=m('RNN: `initial_carry` expected a pytree with structure '
                                         '(array, array)', 'got structure array.')):
    rnn.init(jax.random.key(0), X, initial_carry=jnp.zeros((2, 4)))
  # flax.linen's Dense cells take their size from the carry: a wider one runs.
  wide = (np.zeros((2, 6), np.float32),) * 2
  y, _ = jax.eval_shape(lambda: rnn.init_with_output(jax.random.key(0), X, initial_carry=wide))
  assert y.shape == (2, 5, 6)


# -- seq_lengths given as Python objects -------------------------------------------------
@pytest.mark.parametrize('lengths, got', [
  ('ab', "got 'ab'."), ([[1], [2, 3]], 'got list of length 2.'), ([None, 1], 'got list of '
                                                                   'length 2.'),
  (np.array(['a', 'b']), 'got dtype <U1.'), (jax.random.key(0), 'got dtype key<fry>.'),
], ids=['str', 'ragged', 'none_entry', 'str_array', 'prng_key'])
def test_seq_lengths_that_are_no_numbers(lstm, lengths, got):
  # Checked before a scalar is broadcast to the batch (jax refused a string there).
  for layer in (nr.RNN(lstm), nr.LSTM(3, 4, rngs=nnx.Rngs(0))):
    where = type(layer).__name__
    with pytest.raises(TypeError, match=m(f'{where}: `seq_lengths` expected an integer array of '
                                          'shape batch shape', got)):
      layer(X, seq_lengths=lengths)


@pytest.mark.parametrize('ids, got', [
  ([[1, 1], [2]], 'got a ragged list of length 2.'), ('ids', "got dtype <U3."),
  ([['a'] * 5] * 2, 'got dtype <U1.'), ([[1.5] * 5] * 2, 'got dtype float64.'),
], ids=['ragged', 'str', 'str_list', 'float_list'])
def test_segment_ids_that_are_no_integers(lstm, ids, got):
  # Found by differential fuzzing: a ragged list raised numpy's own ValueError
  # ("setting an array element with a sequence"), naming no argument.
  from nnx_recurrent import compat

  linen = compat.RNN(compat.LSTMCell(4))
  variables = linen.init(jax.random.key(0), X)
  for where, call in (('RNN', nr.RNN(lstm)), ('GRU', nr.GRU(3, 4, rngs=nnx.Rngs(0))),
                      ('RNN', lambda x, **kw: linen.apply(variables, x, **kw))):
    with pytest.raises(ValueError, match=m(f'{where}: `segment_ids` expected an integer array '
                                           'of shape (*batch, time)', got)):
      call(X, segment_ids=ids)


def test_seq_lengths_list_is_the_array_it_spells(lstm):
  rnn = nr.RNN(lstm)
  spellings = ([5.0, 2.0], [5, 2], (5, 2), jnp.array([5.0, 2.0]))

  @nnx.jit  # one program; the lengths are constants in it, as concrete as in an eager call
  def run(rnn):
    return (rnn(X, seq_lengths=jnp.array([5, 2])), [rnn(X, seq_lengths=s) for s in spellings],
            nr.flip_sequences(X, [5.0, 2.0], num_batch_dims=1, time_major=False),
            nr.flip_sequences(X, jnp.array([5, 2]), num_batch_dims=1, time_major=False))

  want, outs, flipped, flipped_want = run(rnn)
  for y in outs:
    np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(flipped, flipped_want)
  with pytest.raises(ValueError, match=m('RNN: `seq_lengths` expected whole numbers',
                                         'got [2.5] among them')):
    rnn(X, seq_lengths=[5.0, 2.5])


def test_lists_passed_to_jit_are_the_arrays_they_spell(lstm):
  # A list given to a jitted function arrives as a list of tracers, which NumPy
  # cannot read: it raised "expected an integer array ..., got list of length 2"
  # (for segment_ids "a ragged list") where the same list runs outside jit.
  x = ref.normal((2, 5, 3))
  p = ref.cell_params(lstm)
  zeros = (np.zeros((2, 4)), np.zeros((2, 4)))
  rnn = nr.RNN(lstm, return_carry=True)
  lengths_ref = np.array([5, 2])
  carry_ref, y_ref = ref.rnn(p, x, lengths_ref, zeros, num_batch_dims=1)
  run = nnx.jit(lambda rnn, lengths: rnn(x, seq_lengths=lengths))
  for lengths in ([5, 2], [5.0, 2.0], (5, 2)):
    carry, y = run(rnn, lengths)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    for got, want in zip(carry, carry_ref):
      np.testing.assert_allclose(got, want, atol=1e-5)
  flipped = jax.jit(lambda lengths: nr.flip_sequences(x, lengths, num_batch_dims=1,
                                                      time_major=False))([5, 2])
  want = np.asarray(x)[[[0], [1]], [[4, 3, 2, 1, 0], [1, 0, 4, 3, 2]]]  # flax's order
  np.testing.assert_array_equal(flipped, want)
  # Packed: row 0 holds two segments (3 and 2 steps), row 1 one of 2 and padding.
  ids = [[1, 1, 1, 2, 2], [3, 3, 0, 0, 0]]
  y = nnx.jit(lambda rnn, ids: rnn(x, segment_ids=ids))(rnn, ids)[1]
  one = lambda row: (np.zeros((1, 4)), np.zeros((1, 4)))  # noqa: E731
  parts = [ref.rnn(p, x[r:r + 1, a:b], None, one(r), num_batch_dims=1)[1][0]
           for r, a, b in ((0, 0, 3), (0, 3, 5), (1, 0, 2))]
  y_ref = np.zeros((2, 5, 4))
  y_ref[0] = np.concatenate(parts[:2])
  y_ref[1, :2] = parts[2]
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  with pytest.raises(TypeError, match=m('RNN: `seq_lengths` expected an integer array of shape '
                                        'batch shape', 'got list of length 2.')):
    nnx.jit(lambda rnn, n: rnn(x, seq_lengths=[n, [2]]))(rnn, 5)  # ragged, traced
  with pytest.raises(ValueError, match=m('RNN: `seq_lengths` expected shape batch shape = '
                                         '(2,), got shape (3,).')):
    run(rnn, [5, 2, 1])


def test_fused_initial_carry_leaves_must_have_the_carry_shapes():
  # The fused layers take no broadcasting carry (flax.nnx's LSTM neither): a
  # number for a leaf is refused, as a leaf of another shape.
  with pytest.raises(ValueError, match=m('LSTM: `initial_carry` expected leaf shapes '
                                         '[(2, 4), (2, 4)], got [(), ()].')):
    abstractly(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0))(X, initial_carry=(0.0, 0.0)))


# -- call-time rngs --------------------------------------------------------------------
_RNGS = 'expected an nnx.Rngs, nnx.RngStream or a PRNG key (or None)'


@pytest.mark.parametrize('call, where, got', [
  (lambda c, r: nr.RNN(c)(X, rngs=r), 'RNN', 'int'),
  (lambda c, r: c(c.initialize_carry((2, 3)), X[:, 0], rngs=r), 'LSTMCell', 'int'),
  (lambda c, r: c.initialize_carry((2, 3), rngs=r), 'LSTMCell.initialize_carry', 'int'),
  (lambda c, r: nr.Bidirectional(nr.RNN(c), nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(1))))(
    X, rngs=r), 'Bidirectional', 'int'),
  (lambda c, r: nr.LSTM(3, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))(X, rngs=r),
   'LSTM', 'int'),
  (lambda c, r: nr.GRU(3, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))(X, rngs=r),
   'GRU', 'int'),
  (lambda c, r: nr.StackedRNN(nr.RNN(c), nr.RNN(nr.GRUCell(4, 4, rngs=nnx.Rngs(1))),
                              dropout_rate=0.5)(X, rngs=r), 'StackedRNN', 'int'),
], ids=['rnn', 'cell', 'initialize_carry', 'bidirectional', 'lstm', 'gru', 'stacked'])
def test_call_rngs_of_the_wrong_kind_name_the_module(call, where, got):
  cell = nr.LSTMCell(3, 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=m(f'{where}: `rngs` {_RNGS}, got {got}.')):
    call(cell, 0)
  with pytest.raises(TypeError, match=m(f'{where}: `rngs` {_RNGS}, got str.')):
    call(cell, 'a')


@pytest.mark.parametrize('call, where', [
  (lambda c, r: nr.RNN(c)(X, rngs=r), 'RNN'),
  (lambda c, r: c(c.initialize_carry((2, 3)), X[:, 0], rngs=r), 'LSTMCell'),
  (lambda c, r: c.initialize_carry((2, 3), rngs=r), 'LSTMCell.initialize_carry'),
  (lambda c, r: nr.LSTM(3, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0))(X, rngs=r),
   'LSTM'),
  (lambda c, r: nnx.jit(lambda c, r: nr.RNN(c)(X, rngs=r))(c, r), 'RNN'),  # traced: by dtype
], ids=['rnn', 'cell', 'initialize_carry', 'lstm', 'rnn-jit'])
def test_call_rngs_arrays_that_are_not_one_key_name_the_module(call, where):
  # Any jax.Array passed as "a PRNG key": jax.random.split / fold_in raised inside the
  # scan before ("JAX encountered invalid PRNG key data", "split accepts a single key").
  cell = nr.LSTMCell(3, 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
  for array, got in ((jnp.ones(3), 'dtype float32 and shape (3,)'),
                     (jnp.array(0), 'dtype int32 and shape ()')):
    with pytest.raises(TypeError, match=m(f'{where}: `rngs` {_RNGS}: jax.random.key(seed), or '
                                          "jax.random.PRNGKey(seed)'s uint32 data of shape (2,), "
                                          f'got an array of {got}.')):
      call(cell, array)
  with pytest.raises(ValueError, match=m(f'{where}: `rngs` {_RNGS}: one key, of shape () (a '
                                         'call splits it, one per use), got a key array of '
                                         'shape (2,).')):
    call(cell, jax.random.split(jax.random.key(0), 2))
  for key in (jax.random.key(1), jax.random.PRNGKey(1)):  # a typed key and a raw one
    call(cell, key)


def test_stacked_rngs_of_the_wrong_kind_at_construction():
  # nnx.Dropout's TypeError ("rngs must be a Rngs, RngStream or None") named neither.
  layers = (nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))), nr.RNN(nr.GRUCell(4, 4, rngs=nnx.Rngs(1))))
  for rngs, got in ((3, 'int'), (jax.random.key(0), 'PRNGKeyArray')):
    for rate in (0.0, 0.5):
      with pytest.raises(TypeError, match=m('StackedRNN: `rngs` expected None, an nnx.Rngs or an '
                                            'nnx.RngStream', f'got {got}.')):
        nr.StackedRNN(*layers, dropout_rate=rate, rngs=rngs)
  nr.StackedRNN(*layers, dropout_rate=0.5, rngs=nnx.Rngs(0).dropout)(X)  # a stream is taken


def test_zoneout_set_after_construction_without_a_stream_names_rngs(lstm):
  # A cell built without a rate keeps no stream; a zoneout rate set later in
  # training mode needs a call's rngs: a TypeError naming them, not an assert.
  cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  cell.zoneout_rate = 0.5
  cell.train()
  with pytest.raises(TypeError, match=m('LSTMCell: `rngs` expected an nnx.Rngs, nnx.RngStream or '
                                        'a PRNG key, got NoneType.')):
    abstractly(lambda: cell(cell.initialize_carry((2, 3)), X[:, 0]))


def test_epsilon_accepts_numpy_and_jax_scalars():
  for eps in (np.float32(1e-5), np.float64(1e-5), jnp.array(1e-5), 1):
    cell = nr.LayerNormLSTMCell(3, 4, epsilon=eps, rngs=nnx.Rngs(0))
    assert cell.epsilon == float(eps)
  for eps, exc in ((True, TypeError), (jnp.array([1e-5]), TypeError), (np.inf, ValueError),
                   (-1e-5, ValueError)):
    with pytest.raises(exc, match=m('LayerNormGRUCell: `epsilon` expected a positive float')):
      nr.LayerNormGRUCell(3, 4, epsilon=eps, rngs=nnx.Rngs(0))


# -- boolean flags ---------------------------------------------------------------------
def _cell(r=None):
  return nr.LSTMCell(3, 4, rngs=r or nnx.Rngs(0))


@pytest.mark.parametrize('make, where, flag', [
  (lambda v, r: nr.MGUCell(3, 4, reset_gate=v, rngs=r), 'MGUCell', 'reset_gate'),
  (lambda v, r: nr.SimpleCell(3, 4, residual=v, rngs=r), 'SimpleCell', 'residual'),
  (lambda v, r: nr.GRUCell(3, 4, use_bias_hn=v, rngs=r), 'GRUCell', 'use_bias_hn'),
  (lambda v, r: nr.LSTMCell(3, 4, keep_rngs=v, rngs=r), 'LSTMCell', 'keep_rngs'),
  (lambda v, r: nr.LayerNormLSTMCell(3, 4, use_scale=v, rngs=r), 'LayerNormLSTMCell',
   'use_scale'),
  (lambda v, r: nr.LayerNormGRUCell(3, 4, use_bias=v, rngs=r), 'LayerNormGRUCell', 'use_bias'),
  (lambda v, r: nr.ConvGRUCell(2, 3, (3,), use_bias=v, rngs=r), 'ConvGRUCell', 'use_bias'),
  (lambda v, r: nr.RNN(_cell(r), time_major=v), 'RNN', 'time_major'),
  (lambda v, r: nr.RNN(_cell(r), return_carry=v), 'RNN', 'return_carry'),
  (lambda v, r: nr.RNN(_cell(r), reverse=v), 'RNN', 'reverse'),
  (lambda v, r: nr.RNN(_cell(r), keep_order=v), 'RNN', 'keep_order'),
  (lambda v, r: nr.RNN(_cell(r), remat=v), 'RNN', 'remat'),
  (lambda v, r: nr.RNN(_cell(r), learn_initial_carry=v), 'RNN', 'learn_initial_carry'),
  (lambda v, r: nr.Bidirectional(nr.RNN(_cell(r)), nr.RNN(_cell(r)), time_major=v),
   'Bidirectional', 'time_major'),
  (lambda v, r: nr.StackedRNN(nr.RNN(_cell(r)), return_carry=v), 'StackedRNN', 'return_carry'),
  (lambda v, r: nr.StackedRNN(nr.RNN(_cell(r)), time_major=v), 'StackedRNN', 'time_major'),
  (lambda v, r: nr.LSTM(3, 4, bidirectional=v, rngs=r), 'LSTM', 'bidirectional'),
  (lambda v, r: nr.GRU(3, 4, keep_order=v, rngs=r), 'GRU', 'keep_order'),
  # Calls run abstractly: the flags are checked as they are traced.
  (lambda v, r: abstractly(lambda: nr.RNN(_cell())(X, reverse=v)), 'RNN', 'reverse'),
  (lambda v, r: abstractly(lambda: nr.RNN(_cell())(X, time_major=v)), 'RNN', 'time_major'),
  (lambda v, r: abstractly(lambda: nr.Bidirectional(nr.RNN(_cell()), nr.RNN(_cell()))(
    X, return_carry=v)), 'Bidirectional', 'return_carry'),
  (lambda v, r: abstractly(lambda: nr.StackedRNN(nr.RNN(_cell()))(X, keep_order=v)),
   'StackedRNN', 'keep_order'),
  (lambda v, r: abstractly(lambda: nr.LSTM(3, 4, rngs=nnx.Rngs(0))(X, return_carry=v)), 'LSTM',
   'return_carry'),
  (lambda v, r: nr.flip_sequences(X, None, 1, time_major=v), 'flip_sequences', 'time_major'),
  (lambda v, r: nr.pack_sequences([np.ones((2, 3))], sort_by_length=v), 'pack_sequences',
   'sort_by_length'),
], ids=lambda x: x if isinstance(x, str) else None)
def test_boolean_flags_refuse_what_is_no_bool(make, where, flag):
  # A string is truthy: reverse='no' reversed. NumPy's bool_ is a bool, and so
  # are the integers 0 and 1 (flags written the C way, which flax takes).
  # Built abstractly (no initializer runs): the flags are checked in Python alike.
  for value, got in (('no', "got 'no'."), (2, 'got 2.'), (1.0, 'got 1.0.')):
    with pytest.raises(TypeError, match=m(f'{where}: `{flag}` expected a bool', got)):
      abstractly(lambda value=value: make(value, nnx.Rngs(0)))
  abstractly(lambda: make(np.bool_(False), nnx.Rngs(0)))
  abstractly(lambda: make(0, nnx.Rngs(0)))


@pytest.mark.parametrize('make, where, flag', [
  (lambda v: compat.MGUCell(4, reset_gate=v), 'MGUCell', 'reset_gate'),
  (lambda v: compat.SimpleCell(4, residual=v), 'SimpleCell', 'residual'),
  (lambda v: compat.ConvLSTMCell(4, (3,), use_bias=v), 'ConvLSTMCell', 'use_bias'),
  (lambda v: compat.RNN(compat.GRUCell(4), reverse=v), 'RNN', 'reverse'),
  (lambda v: compat.RNN(compat.GRUCell(4), return_carry=v), 'RNN', 'return_carry'),
  (lambda v: compat.RNN(compat.GRUCell(4), keep_order=v), 'RNN', 'keep_order'),
  (lambda v: compat.Bidirectional(compat.RNN(compat.GRUCell(4)), compat.RNN(compat.GRUCell(4)),
                                  time_major=v), 'Bidirectional', 'time_major'),
  (lambda v: compat.Bidirectional(compat.RNN(compat.GRUCell(4)), compat.RNN(compat.GRUCell(4)),
                                  return_carry=v), 'Bidirectional', 'return_carry'),
  (lambda v: jax.eval_shape(lambda: compat.RNN(compat.GRUCell(4)).init(
    jax.random.key(0), X, keep_order=v)), 'RNN', 'keep_order'),
], ids=lambda x: x if isinstance(x, str) else None)
def test_compat_boolean_flags_refuse_what_is_no_bool(make, where, flag):
  # flax.linen reads the old RNN(cell, 64) as time_major=64: refused; 0 and 1 are flags.
  for value, got in (('no', "got 'no'."), (64, 'got 64.')):
    with pytest.raises(TypeError, match=m(f'{where}: `{flag}` expected a bool', got)):
      make(value)
  make(np.bool_(True))
  make(1)


# -- flip_sequences: lengths beyond the time axis ------------------------------------------
def test_flip_sequences_lengths_out_of_range():
  # As in RNN: a length above the time axis flips the whole row (flax.linen's
  # flip_sequences wraps it around: its row [0, 1, 2] with length 5 comes back
  # [1, 0, 2]); a negative one is refused.
  x = jnp.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(nr.flip_sequences(x, jnp.array([5, 2]), 1, False),
                                [[2, 1, 0], [4, 3, 5]])
  with pytest.raises(ValueError, match=m('flip_sequences: `seq_lengths` expected non-negative '
                                         'lengths, got minimum -1.')):
    nr.flip_sequences(x, jnp.array([-1, 2]), 1, False)


def test_uint32_lengths_above_int32_and_an_empty_batch(lstm):
  # uint32 lengths above int32's maximum act as the time axis: read as int32
  # uncapped they would wrap to negative lengths, acting as 0 (the initial carry).
  rnn = nr.RNN(lstm, return_carry=True)
  got, _ = rnn(X, seq_lengths=np.array([2**32 - 1, 2], np.uint32))
  want, _ = rnn(X, seq_lengths=np.array([5, 2]))
  np.testing.assert_array_equal(got, want)
  # No rows: nothing to check (NumPy's min of an empty array raises).
  assert nr.flip_sequences(jnp.ones((0, 3)), np.zeros((0,), np.int32), 1, False).shape == (0, 3)


def test_flip_sequences_lengths_out_of_range_under_jit_clip():
  x = jnp.arange(6).reshape(2, 3)
  flip = jax.jit(lambda x, s: nr.flip_sequences(x, s, 1, False))
  np.testing.assert_array_equal(flip(x, jnp.array([5, -1])), flip(x, jnp.array([3, 0])))


# -- layers that do not chain ---------------------------------------------------------------
def test_stacked_layers_that_do_not_chain_are_refused_at_construction():
  abstractly(_stacked_layers_that_do_not_chain)  # refused on sizes: no parameter is needed


def _stacked_layers_that_do_not_chain():
  r = nnx.Rngs(0)
  bi = nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(3, 2, rngs=r)))
  for layers, i, size, source, got in [
    ((nr.RNN(nr.LSTMCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(5, 5, rngs=r))), 1, 4,
     'the output size of layers[0], RNN', 'RNN with in_features 5'),
    ((bi, nr.RNN(nr.GRUCell(4, 5, rngs=r))), 1, 6, 'the output size of layers[0], Bidirectional',
     'RNN with in_features 4'),
    ((nr.LSTM(3, 4, bidirectional=True, rngs=r), nr.GRU(4, 4, rngs=r)), 1, 8,
     'the output size of layers[0], LSTM', 'GRU with in_features 4'),
    ((nr.RNN(nr.LSTMCell(3, 4, proj_features=2, rngs=r)), nr.RNN(nr.GRUCell(2, 5, rngs=r)),
      nr.RNN(nr.GRUCell(4, 5, rngs=r))), 2, 5, 'the output size of layers[1], RNN',
     'RNN with in_features 4'),
    ((_conv(r), _conv(r, in_features=5)), 1, 4, 'the output size of layers[0], RNN',
     'RNN with in_features 5'),  # a convolutional layer's channels: its hidden_features
  ]:
    with pytest.raises(ValueError, match=m(f'StackedRNN: `layers[{i}]` expected a layer reading '
                                           f'{size} features ({source})', f'got {got}.')):
      nr.StackedRNN(*layers)


def test_nested_stacks_chain_by_their_first_input_and_last_output():
  abstractly(_nested_stacks_chain_by_their_first_input_and_last_output)  # sizes only


def _nested_stacks_chain_by_their_first_input_and_last_output():
  r = nnx.Rngs(0)
  # An inner stack reads 4 features (its first layer) and gives 2 (its last).
  inner = lambda: nr.StackedRNN(nr.RNN(nr.GRUCell(4, 6, rngs=r)),  # noqa: E731
                                nr.RNN(nr.GRUCell(6, 2, rngs=r)))
  stack = nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.Bidirectional(inner(), inner()),
                        nr.RNN(nr.GRUCell(4, 5, rngs=r)))  # 3 -> 4 -> 2 + 2 -> 5
  assert stack(X).shape == (2, 5, 5)
  bi = nr.Bidirectional(inner(), inner())
  with pytest.raises(ValueError, match=m('StackedRNN: `layers[1]` expected a layer reading 6 '
                                         'features (the output size of layers[0], RNN)',
                                         'got Bidirectional with in_features 4.')):
    nr.StackedRNN(nr.RNN(nr.GRUCell(3, 6, rngs=r)), bi)
  with pytest.raises(ValueError, match=m('StackedRNN: `layers[1]` expected a layer reading 4 '
                                         'features (the output size of layers[0], Bidirectional)',
                                         'got RNN with in_features 6.')):
    nr.StackedRNN(bi, nr.RNN(nr.GRUCell(6, 5, rngs=r)))


def test_stacked_layers_of_unknown_sizes_are_left_to_the_call():
  shapes = []

  def build_and_call():
    r = nnx.Rngs(0)
    # flax.nnx's cell has in_features (read) but its outputs are not known here; a
    # merge_fn of one's own gives outputs of a size known only when it runs.
    stack = nr.StackedRNN(nr.RNN(nnx.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(4, 5, rngs=r)))
    summed = nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(3, 4, rngs=r)),
                              merge_fn=lambda a, b: a + b)
    stacks = (stack, nr.StackedRNN(summed, nr.RNN(nr.GRUCell(4, 5, rngs=r))))
    shapes.extend(s(X).shape for s in stacks)

  # Built and called abstractly (traced): the sizes meet in the calls.
  abstractly(build_and_call)
  assert shapes == [(2, 5, 5)] * 2
  abstractly(_unknown_sizes_that_do_not_meet)


def _unknown_sizes_that_do_not_meet():
  # The second layer's inputs are the first one's outputs, not the stack's inputs: the
  # error names the layer, not the `inputs` the stack was given.
  r = nnx.Rngs(0)
  stack = nr.StackedRNN(nr.RNN(nnx.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(5, 5, rngs=r)))
  with pytest.raises(ValueError, match=m('StackedRNN: in layers[1] (RNN): RNN: `inputs` expected '
                                         "last axis of size 5 (the cell's in_features), got "
                                         'shape (2, 5, 4).')):
    stack(X)


def test_bidirectional_directions_that_read_different_sizes():
  abstractly(_bidirectional_directions_that_read_different_sizes)  # refused on sizes


def _bidirectional_directions_that_read_different_sizes():
  r = nnx.Rngs(0)
  with pytest.raises(ValueError, match=m('Bidirectional: `backward_rnn` expected a layer reading 3 '
                                         "features (forward_rnn's in_features: both directions "
                                         'read the same inputs), got RNN with in_features 5.')):
    nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(5, 5, rngs=r)))
  with pytest.raises(ValueError, match=m('`backward_rnn` expected a layer reading 3 features',
                                         'got GRU with in_features 4.')):
    nr.Bidirectional(nr.LSTM(3, 4, rngs=r), nr.GRU(4, 4, rngs=r))


@pytest.mark.parametrize('rng, got', [
  (0, 'got 0 (a seed: pass jax.random.key(0)).'), ('key', "got 'key'."),
  (jnp.zeros(2), 'got an array of dtype float32 and shape (2,).'),
  # A NumPy integer is a seed too; raw key data has an axis (a 0-d uint32 is none).
  (np.int32(3), 'got np.int32(3) (a seed: pass jax.random.key(3)).'),
  (np.array(5, np.uint32), 'got an array of dtype uint32 and shape ().'),
], ids=['int', 'str', 'float_array', 'numpy_int', 'uint32_scalar'])
def test_compat_initialize_carry_rng_that_is_no_key(rng, got):
  # flax.linen splits the rng whatever the carry_init, and fails in jax alike
  # ('invalid PRNG key data').
  with pytest.raises(TypeError, match=m('LSTMCell.initialize_carry: `rng` expected a PRNG key '
                                        '(jax.random.key(seed)) or None', got)):
    compat.LSTMCell(4).initialize_carry(rng, (2, 3))


def test_compat_initialize_carry_takes_typed_and_raw_keys_and_none():
  want = compat.GRUCell(4).initialize_carry(None, (2, 3))
  for rng in (jax.random.key(0), jax.random.PRNGKey(0), np.array([0, 1], np.uint32)):
    np.testing.assert_array_equal(compat.GRUCell(4).initialize_carry(rng, (2, 3)), want)


def test_compat_to_nnx_checkpoint_group_that_is_no_mapping():
  cell = compat.LSTMCell(4)
  x = jnp.ones((2, 3))
  params = dict(cell.init(jax.random.key(0), cell.initialize_carry(None, x.shape), x)['params'])
  where = m("to_nnx (LSTMCell): `params` expected a LSTMCell checkpoint with 'ii/kernel'")
  for group, got in ((3, "got 'ii' of type int."),
                     ({'bias': jnp.zeros(4)}, "got 'ii' with the leaves ['bias'].")):
    with pytest.raises(ValueError, match=where + '.*' + m("('ii' a mapping with a 'kernel')", got)):
      compat.to_nnx(cell, {'params': {**params, 'ii': group}})
  with pytest.raises(ValueError, match=where + '.*' + m("got 'ii/kernel' of type int.")):
    compat.to_nnx(cell, {'params': {**params, 'ii': {'kernel': 3}}})
  with pytest.raises(ValueError, match=where + '.*' + m("got the groups ['hf', 'hg'")):
    compat.to_nnx(cell, {'params': {k: v for k, v in params.items() if k != 'ii'}})
  # A group that is None (a checkpoint with a hole) is missing, not skipped.
  with pytest.raises(flax.errors.ScopeParamNotFoundError,
                     match=m("to_nnx (LSTMCell): `params` expected 'hf' with leaves ['bias', "
                             "'kernel'], got NoneType.")):
    compat.to_nnx(cell, {'params': {**params, 'hf': None}})



def test_a_flag_traced_by_a_transform_says_to_mark_it_static():
  """``jax.jit`` or ``nn.remat`` turn a call's flag into a tracer: say so."""
  rnn = nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=m('RNN: `return_carry` expected a bool, got '
                                        'DynamicJaxprTracer (a traced value', 'static_argnums')):
    jax.jit(lambda flag: rnn(jnp.ones((2, 5, 3)), return_carry=flag))(True)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(compat.RNN)(compat.GRUCell(4))(x, return_carry=True)

  with pytest.raises(TypeError, match=m('RNN: `return_carry` expected a bool', 'a traced value',
                                        'static_argnums')):
    Model().init(jax.random.key(0), jnp.ones((2, 5, 3)))


class _CarryCell(nnx.Module):
  """A cell whose step returns ``step(h)`` and whose carry is ``carry(shape)``."""

  num_feature_axes = 1

  def __init__(self, carry, step):
    self.carry, self.step = carry, step

  def initialize_carry(self, input_shape, rngs=None):
    return self.carry(input_shape)

  def __call__(self, h, x):
    new = self.step(h, x)
    return new, new


def test_a_step_that_changes_its_carry_gets_a_clear_error():
  x, lengths = jnp.ones((2, 5, 3)), jnp.array([5, 2])
  # A floating step cast to an integer carry (a mistaken initialize_carry) would
  # cut the recurrence silently: flax.nnx's scan refuses it, and so do we.
  ints = nr.RNN(_CarryCell(lambda s: jnp.zeros((*s[:-1], 4), jnp.int32),
                           lambda h, x: jnp.tanh(h + x.sum(-1, keepdims=True))))
  for kwargs in ({}, {'seq_lengths': lengths}):
    with pytest.raises(TypeError, match=m('RNN: `cell` expected a step that returns a carry leaf '
                                          'of the kind of its carry leaf (int32), got float32')):
      ints(x, **kwargs)
  # A step that loses the batch axis: with seq_lengths, the carry selection named
  # nothing ("Incompatible shapes for broadcasting"); without, jax's scan named its body.
  lossy = nr.RNN(_CarryCell(lambda s: jnp.zeros((*s[:-1], 4)), lambda h, x: h.sum(0) + 1))
  for kwargs in ({}, {'seq_lengths': lengths}):
    with pytest.raises(TypeError, match=m("RNN: `cell` expected a step that returns a carry of "
                                          "its carry's shapes [(2, 4)], got [(4,)]")):
      lossy(x, **kwargs)
  # A step that adds a leaf of the same shape: one more, named as such.
  grown = nr.RNN(_CarryCell(lambda s: (jnp.zeros((*s[:-1], 4)),), lambda h, x: (h[0], h[0])))
  for kwargs in ({}, {'seq_lengths': lengths}):
    with pytest.raises(TypeError, match=m("RNN: `cell` expected a step that returns a carry of "
                                          "its carry's shapes [(2, 4)], got [(2, 4), (2, 4)]")):
      grown(x, **kwargs)
  # A complex step for a real carry: the cast back to float32 would drop the
  # imaginary part at every step silently (complex is a kind of its own).
  real = nr.RNN(_CarryCell(lambda s: jnp.zeros((*s[:-1], 4)),
                           lambda h, x: h * (1 + 1j) + x.sum(-1, keepdims=True)))
  with pytest.raises(TypeError, match=m('RNN: `cell` expected a step that returns a carry leaf '
                                        'of the kind of its carry leaf (float32), got complex64')):
    real(x)


def test_a_signed_step_for_an_unsigned_carry_is_cast_back_as_one_kind():
  # Integers are one kind, signed or not: a uint32 step counter that a step
  # moves by an int32 (uint32 + int32 is int32 here) goes on in uint32, as a
  # lower-precision float step goes on in its carry's dtype.
  x, lengths = jnp.ones((2, 5, 3)), np.array([5, 2])
  counter = nr.RNN(_CarryCell(lambda s: jnp.zeros((*s[:-1], 1), jnp.uint32),
                              lambda h, x: h + jnp.int32(1)), return_carry=True)
  carry, ys = counter(x, seq_lengths=lengths)
  assert carry.dtype == jnp.uint32
  np.testing.assert_array_equal(carry[:, 0], lengths)
  want = np.where(np.arange(5) < lengths[:, None], np.arange(1, 6), 0)
  np.testing.assert_array_equal(ys[..., 0], want)


def test_a_learned_carry_needs_floating_carry_leaves():
  cell = _CarryCell(lambda s: (jnp.zeros((*s[:-1], 4)), jnp.zeros((*s[:-1], 1), jnp.int32)),
                    lambda c, x: (c[0] + x.sum(-1, keepdims=True), c[1] + 1))
  cell.in_features = 3
  with pytest.raises(TypeError, match=m('RNN: `learn_initial_carry` expected a cell whose carry '
                                        'leaves are all floating (a learned carry is trained), '
                                        'got a carry leaf of dtype int32')):
    nr.RNN(cell, learn_initial_carry=True, rngs=nnx.Rngs(0))


def test_fused_gru_use_bias_hn_is_a_bool():
  with pytest.raises(TypeError, match=m("GRU: `use_bias_hn` expected a bool, got 'no'")):
    nr.GRU(3, 4, use_bias_hn='no', rngs=nnx.Rngs(0))


def _two_grus(rngs):
  return (nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))), nr.RNN(nr.GRUCell(4, 4, rngs=nnx.Rngs(1))))


@pytest.mark.parametrize('build, call, where, why', [
  (lambda r: nr.LSTMCell(3, 4, dropout_rate=0.1, rngs=r), None,
   'LSTMCell', "'dropout' (or 'default') stream for dropout_rate=0.1"),
  (lambda r: nr.GRUCell(3, 4, zoneout_rate=0.2, recurrent_dropout_rate=0.1, rngs=r), None,
   'GRUCell', "'dropout' (or 'default') stream for recurrent_dropout_rate=0.1, zoneout_rate=0.2"),
  (lambda r: nr.LSTM(3, 4, num_layers=2, dropout_rate=0.5, rngs=r), None,
   'LSTM', "'dropout' (or 'default') stream for dropout_rate=0.5"),
  (lambda r: nr.StackedRNN(*_two_grus(r), dropout_rate=0.5, rngs=r), None,
   'StackedRNN', "'dropout' (or 'default') stream for dropout_rate=0.5"),
  # at call time, where a call's rngs replace the module's
  (lambda r: nr.RNN(nr.LSTMCell(3, 4, zoneout_rate=0.1, rngs=nnx.Rngs(0))), 'rngs',
   'LSTMCell', "'dropout' (or 'default') stream to draw dropout keys from"),
  (lambda r: nr.GRU(3, 4, num_layers=2, dropout_rate=0.5, rngs=nnx.Rngs(0)), 'rngs',
   'GRU', "'dropout' (or 'default') stream for the dropout between layers"),
  (lambda r: nr.StackedRNN(*_two_grus(r), dropout_rate=0.5, rngs=nnx.Rngs(0)), 'rngs',
   'StackedRNN', "'dropout' (or 'default') stream for the dropout between layers"),
])
def test_an_rngs_without_the_dropout_stream_is_named(build, call, where, why):
  # flax raises a KeyError naming neither the module nor the argument (and the
  # zoneout cell never asked for a 'dropout' stream by that name).
  params_only = nnx.Rngs(params=0)
  message = m(f'{where}: `rngs` expected an nnx.Rngs with a {why}', "got streams ('params',)")
  if call is None:
    with pytest.raises(ValueError, match=message):
      build(params_only)
    build(nnx.Rngs(default=0))  # flax's fallback stream serves, as in flax
    return
  module = build(nnx.Rngs(0))
  with pytest.raises(ValueError, match=message):
    module(X, rngs=params_only)
  y_train = module(X, rngs=nnx.Rngs(default=3))  # the fallback stream serves
  module.eval()  # no draws in evaluation mode: any rngs serve
  y_eval = module(X, rngs=params_only)
  np.testing.assert_array_equal(y_eval, module(X))
  assert not np.allclose(y_train, y_eval)  # the training call did draw


def test_composite_layers_name_the_argument_they_pass_on():
  # An inner layer's error about what it was handed names the layer the user called.
  r = nnx.Rngs(0)
  bi = nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(3, 4, rngs=r)))
  stack = nr.StackedRNN(nr.LSTM(3, 4, rngs=r), nr.RNN(nr.LSTMCell(4, 4, rngs=r)))
  for module, where, inner in ((bi, 'Bidirectional', 'forward_rnn (RNN): RNN'),
                               (stack, 'StackedRNN', 'layers[0] (LSTM): LSTM')):
    with pytest.raises(TypeError, match=m(f'{where}: `inputs`, passed on to {inner}: `inputs` '
                                          'expected an array, got list.')):
      module(X.tolist())
    with pytest.raises(ValueError, match=m(f'{where}: `inputs`, passed on to {inner}: `inputs` '
                                           'expected last axis of size 3')):
      module(jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=m(f'{where}: `seq_lengths`, passed on to {inner}: '
                                           '`seq_lengths` expected non-negative lengths')):
      module(X, seq_lengths=jnp.array([5, -1]))
    with pytest.raises(ValueError, match=m(f'{where}: `segment_ids`, passed on to {inner}: '
                                           '`segment_ids` expected an integer array')):
      module(X, segment_ids=jnp.ones((2, 5)))


def _linen_rnn():
  """compat's RNN over a GRUCell of 4 features, as an NNX layer (flax's bridge)."""
  layer = nnx.bridge.ToNNX(compat.RNN(compat.GRUCell(features=4)), rngs=nnx.Rngs(0))
  nnx.bridge.lazy_init(layer, X)
  return layer


def test_a_composite_keeps_the_class_of_the_error_it_names_its_argument_in():
  # compat's RNN refuses a carry of another size than its parameters with flax's
  # ScopeParamShapeError (a ParamShapeError): a Bidirectional around it, and a
  # stack around that, prefix the message and keep the class (they raised a
  # plain ValueError, which code catching flax's error did not catch).
  bi = nr.Bidirectional(_linen_rnn(), _linen_rnn())
  stack = nr.StackedRNN(bi, nr.RNN(nr.GRUCell(8, 4, rngs=nnx.Rngs(0))))
  bad = jnp.zeros((2, 6))
  inner = ('RNN: `initial_carry` expected a last axis of size 4 (the parameter '
           "'hr/kernel' has shape (4, 4); flax.linen's cells take their size from the carry), "
           'got size 6.')
  for call, prefix, blames in (
      (lambda: bi(X, initial_carry=(None, bad)),
       'Bidirectional: `initial_carry[1]`, the carry of backward_rnn (ToNNX): ',
       ('Bidirectional', 'initial_carry[1]')),
      (lambda: stack(X, initial_carry=((bad, None), None)),
       'StackedRNN: `initial_carry[0]`, the carry of layers[0] (Bidirectional): '
       'Bidirectional: `initial_carry[0]`, the carry of forward_rnn (ToNNX): ',
       ('StackedRNN', 'initial_carry[0]'))):
    try:
      call()
    except flax.errors.ScopeParamShapeError as e:
      error = e
    else:
      raise AssertionError('no error')
    assert type(error) is _checks.ParamShapeError and isinstance(error, ValueError)
    assert str(error) == prefix + inner
    assert _checks.origin(error) == _checks.Origin(*blames)  # the outermost entry
    copied = pickle.loads(pickle.dumps(error))  # the message as it stands, and the class
    assert type(copied) is type(error) and str(copied) == str(error)
    assert _checks.origin(copied) == _checks.origin(error)


def test_a_composite_names_both_levels_of_an_argument_it_passes_on():
  # A stack of Bidirectionals: the stack names its argument, then the pair its own.
  r = nnx.Rngs(0)
  bi = nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(3, 4, rngs=r)))
  stack = nr.StackedRNN(bi, nr.RNN(nr.GRUCell(8, 4, rngs=r)))
  levels = ('StackedRNN: `{0}`, passed on to layers[0] (Bidirectional): Bidirectional: `{0}`, '
            'passed on to forward_rnn (RNN): RNN: `{0}` expected ')
  with pytest.raises(ValueError, match='^' + m(levels.format('seq_lengths')
                                               + 'non-negative lengths, got minimum -1.')):
    stack(X, seq_lengths=jnp.array([5, -1]))
  with pytest.raises(TypeError, match='^' + m(levels.format('inputs') + 'an array, got list.')):
    stack(X.tolist())
  with pytest.raises(ValueError) as info:
    stack(jnp.ones((2, 5, 4)))
  assert _checks.origin(info.value) == _checks.Origin('StackedRNN', 'inputs')


def test_a_composite_says_which_inner_layer_raised_an_error_about_its_own_cell():
  # An error of ours about an inner layer's own argument (its cell) passed on as
  # raised: in a stack of Bidirectionals, which direction of which layer?
  r = nnx.Rngs(0)
  ints = _CarryCell(lambda s: jnp.zeros((*s[:-1], 4), jnp.int32),
                    lambda h, x: jnp.tanh(h + x.sum(-1, keepdims=True)))
  bi = nr.Bidirectional(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(ints))
  stack = nr.StackedRNN(nr.RNN(nr.GRUCell(3, 3, rngs=r)), bi)
  inner = ('RNN: `cell` expected a step that returns a carry leaf of the kind of its carry '
           'leaf (int32), got float32.')
  for module, prefix in (
      (bi, 'Bidirectional: in backward_rnn (RNN): '),
      (stack, 'StackedRNN: in layers[1] (Bidirectional): Bidirectional: in backward_rnn (RNN): ')):
    with pytest.raises(TypeError) as info:
      module(X)
    assert str(info.value) == prefix + inner
    assert _checks.origin(info.value) == _checks.Origin('RNN', 'cell')  # the cell's, still


def test_a_composite_passes_on_an_error_of_a_cell_of_yours_as_it_is():
  # The message reads as one of ours about an argument the pair passes on; it is
  # the user's, and stays as raised (the pair rewrote it, taking it for ours).
  raised = []

  def step(h, x):
    raised.append(ValueError('RNN: `seq_lengths` looks odd'))
    raise raised[-1]

  cell = _CarryCell(lambda s: jnp.zeros((*s[:-1], 4)), step)
  bi = nr.Bidirectional(nr.RNN(cell), nr.RNN(cell))
  for kwargs in ({}, {'seq_lengths': jnp.array([5, 2])}):
    with pytest.raises(ValueError) as info:
      bi(X, **kwargs)
    assert info.value is raised[-1] and type(info.value) is ValueError
    assert str(info.value) == 'RNN: `seq_lengths` looks odd'
    assert _checks.origin(info.value) is None


def test_a_reworded_error_of_ours_pickles_as_it_reads():
  # CarrySizeError is built from its parts, not its message: a reworded one
  # pickles with the message as it stands (and its Origin).
  error = _checks.CarrySizeError('GRUCell', 'a last axis of size 4', 'size 6')
  assert _checks.origin(error) == _checks.Origin('GRUCell', 'carry')
  _checks.reword(error, 'RNN: `initial_carry`, the carry: ' + str(error),
                 _checks.Origin('RNN', 'initial_carry'))
  copied = pickle.loads(pickle.dumps(error))
  assert type(copied) is _checks.CarrySizeError and str(copied) == str(error)
  assert (copied.where, copied.expected, copied.got) == ('GRUCell', 'a last axis of size 4',
                                                         'size 6')
  assert _checks.origin(copied) == _checks.Origin('RNN', 'initial_carry')


def test_sizes_given_as_0d_arrays_are_taken_as_flax_takes_them():
  # Sizes read off another array (jnp.array(4), x.shape as an array): flax takes
  # them; ours keep a Python int (flax.nnx's keeps the array, in its state).
  x = np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)
  for size in (np.array(4), jnp.array(4), np.int64(4)):
    ours = nr.LSTMCell(np.array(3), size, rngs=nnx.Rngs(0))
    theirs = nnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
    assert type(ours.in_features) is int and type(ours.hidden_features) is int
    carry = (jnp.full((2, 4), 0.5), jnp.full((2, 4), -0.5))
    np.testing.assert_allclose(ours(carry, x)[1], theirs(carry, x)[1], atol=1e-6)
  assert nr.GRU(3, jnp.array(4), num_layers=jnp.array(2), rngs=nnx.Rngs(0)).num_layers == 2
  # A kernel size as a NumPy array, as flax.linen's ConvLSTMCell takes it.
  xs = np.ones((1, 5, 2), np.float32)
  for lib in (nn, compat):
    cell = lib.ConvLSTMCell(3, np.array([3]))
    carry = cell.initialize_carry(jax.random.key(0), xs.shape)
    variables = cell.init(jax.random.key(1), carry, xs)
    if lib is nn:
      expected = cell.apply(variables, carry, xs)
    else:
      np.testing.assert_allclose(cell.apply(variables, carry, xs)[1], expected[1], atol=1e-6)
  assert nr.ConvLSTMCell(2, 3, np.array([3, 3]), rngs=nnx.Rngs(0)).kernel_size == (3, 3)
  for bad, exc in ((jnp.array(0), ValueError), (jnp.array(2.0), TypeError),
                   (jnp.array([3]), TypeError)):
    with pytest.raises(exc, match=m('GRUCell: `in_features` expected a positive int, got ')):
      nr.GRUCell(bad, 4, rngs=nnx.Rngs(0))


def test_a_cell_takes_list_inputs_as_flax_cells_do():
  # flax.nnx's cells read inputs with jnp.asarray (nnx.Linear); a tuple stays
  # refused (a carry passed in the inputs' place: cell(inputs, carry)).
  h = jnp.full((2, 4), 0.25)
  x = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
  ours, theirs = nr.GRUCell(3, 4, rngs=nnx.Rngs(0)), nnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(ours(h, x)[1], theirs(h, x)[1], atol=1e-6)
  np.testing.assert_allclose(ours(h, x)[1], ours(h, jnp.asarray(x))[1], atol=0)
  for bad in ([[1.0, 2.0], [3.0]], [[None, 1.0, 2.0]]):
    with pytest.raises(TypeError, match=m('GRUCell: `inputs` expected an array or nested lists '
                                          'of numbers, got a list that makes no array')):
      ours(h, bad)
  with pytest.raises(TypeError, match=m('GRUCell: `inputs` expected an array (a cell is called '
                                        'as cell(carry, inputs)), got tuple')):
    ours(h, (jnp.ones((2, 3)),))


def test_inputs_of_the_hidden_size_with_the_right_carry_are_not_called_swapped():
  # The PyTorch-order message needs a carry of the input size too; inputs of the
  # hidden size beside a right carry are wrong inputs, named as such.
  cell = nnx.eval_shape(lambda: nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))  # checked before any math
  with pytest.raises(ValueError, match=re.escape(
      "GRUCell: `inputs` expected last axis of size 3 (the cell's in_features), "
      'got shape (2, 4).')):
    cell(jnp.zeros((2, 4)), jnp.zeros((2, 4)))


def test_query_methods_check_their_input_shape():
  lstm = nr.LSTMCell(3, 4, dropout_rate=0.1, rngs=nnx.Rngs(0))
  conv = nr.ConvLSTMCell(2, 3, (3, 3), strides=2, rngs=nnx.Rngs(0))
  for method in ('output_shape', 'dropout_masks'):
    for bad, got in ((3, 'got 3.'), (None, 'got NoneType.')):
      with pytest.raises(TypeError, match=m(f'LSTMCell.{method}: `input_shape` expected a tuple '
                                            'of ints', got)):
        getattr(lstm, method)(bad)
    with pytest.raises(ValueError, match=m(f'LSTMCell.{method}: `input_shape` expected last axis '
                                           "of size 3 (the cell's in_features), got shape (2, 5)")):
      getattr(lstm, method)((2, 5))
  with pytest.raises(ValueError, match=m('ConvLSTMCell.output_shape: `input_shape` expected at '
                                         'least 3 feature axes, got shape (2, 2)')):
    conv.output_shape((2, 2))
  # What they answer: the step's output shape, and masks of the input's shape.
  x = jnp.ones((1, 8, 8, 2))
  assert conv.output_shape(x.shape) == conv(conv.initialize_carry(x.shape), x)[1].shape
  assert lstm.output_shape([2, 3]) == (2, 4)
  assert lstm.dropout_masks((2, 3)).input.shape == (2, 3)


def test_complex_inputs_need_complex_parameters():
  # A real cell would keep only the real part of its complex carry at every step.
  x = (jnp.ones((2, 5, 3)) * (1 + 1j)).astype(jnp.complex64)
  with pytest.raises(TypeError, match=m('LSTMCell: `inputs` expected real inputs for parameters of '
                                        'dtype float32', 'got dtype complex64.')):
    nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)))(x)
  for fused in (nr.LSTM(3, 4, rngs=nnx.Rngs(0)), nr.GRU(3, 4, bidirectional=True,
                                                        rngs=nnx.Rngs(0))):
    with pytest.raises(TypeError, match=m(f'{type(fused).__name__}: `inputs` expected real inputs '
                                          'for parameters of dtype float32')):
      fused(x)  # was: "RNN: `cell` expected a step that returns a carry leaf of the kind ..."
  # Complex parameters take them, as flax.nnx's.
  ours = nr.RNN(nr.LSTMCell(3, 4, param_dtype=jnp.complex64, rngs=nnx.Rngs(0)))(x)
  theirs = nnx.RNN(nnx.LSTMCell(3, 4, param_dtype=jnp.complex64, rngs=nnx.Rngs(0)))(x)
  assert ours.dtype == jnp.complex64 and float(jnp.abs(ours.imag).max()) > 1e-3
  np.testing.assert_allclose(ours, theirs, atol=1e-6)



class _State(NamedTuple):
  c: jax.Array
  h: jax.Array


def test_carry_structures_read_plainly_in_messages():
  # What the carry checks print for jax's PyTreeDef((*, *)).
  from nnx_recurrent import _checks

  a = jnp.zeros((2, 4))
  assert _checks.structure((a, a)) == '(array, array)'
  assert _checks.structure((a,)) == '(array,)'
  assert _checks.structure([a, None]) == '[array, None]'
  assert _checks.structure({'h': a, 'n': 1.0}) == "{'h': array, 'n': array}"
  assert _checks.structure(_State(a, a)) == '_State(c=array, h=array)'
  state = nnx.State({'h': a})  # another container: jax's own form
  assert _checks.structure(state) == str(jax.tree_util.tree_structure(state))
  cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=m('LSTMCell: `carry` expected a pytree with structure '
                                         '(array, array), got structure '
                                         "{'c': array, 'h': array}.")):
    cell({'c': a, 'h': a}, jnp.ones((2, 3)))


def test_rnn_state_axes_and_broadcast_rngs_that_are_no_filters(lstm):
  # flax checks them only at the first call, with a message that names neither
  # the argument nor the value (flax 0.12: "Invalid format specifier '!r'").
  filters = 'an nnx filter (a stream or Variable name'
  with pytest.raises(TypeError, match=m('RNN: `broadcast_rngs` expected ' + filters,
                                        '), got 3.')):
    nr.RNN(lstm, broadcast_rngs=3)
  with pytest.raises(TypeError, match=m('RNN: `state_axes` expected keys that are each '
                                        + filters, '), got 3.')):
    nr.RNN(lstm, state_axes={3: nnx.Carry})
  with pytest.raises(TypeError, match=m('RNN: `state_axes` expected values that are each '
                                        "nnx.Carry, None or an int axis, got 'carry' for the "
                                        'filter Ellipsis.')):
    nr.RNN(lstm, state_axes={...: 'carry'})
  # What flax takes still builds: names, types, tuples, predicates, StateAxes.
  nr.RNN(lstm, broadcast_rngs=('dropout', nnx.RngState))
  nr.RNN(lstm, broadcast_rngs=lambda path, value: False)
  nr.RNN(lstm, state_axes=nnx.StateAxes({nnx.Param: None, ...: nnx.Carry}))
  nr.RNN(lstm, state_axes={nnx.Param: np.int64(0), ...: nnx.Carry})  # an axis NumPy's int
  with pytest.raises(TypeError, match=m('RNN: `state_axes` expected None or a mapping from '
                                        'state filters to nnx.Carry, None or an axis, got '
                                        'list.')):
    nr.RNN(lstm, state_axes=[nnx.Param, nnx.Carry])


@pytest.mark.filterwarnings('ignore:Using .Module.sow\\(\\). outside:DeprecationWarning')
@pytest.mark.filterwarnings('ignore:\\s*Using .Module.perturb\\(\\). outside:DeprecationWarning')
def test_a_cell_sowing_at_each_step_is_a_type_error_naming_what_it_added():
  # The scan carries the cell's state, whose structure a sow grows: flax.nnx's RNN fails
  # with JAX's TypeError ("... the same pytree structure ..."); ours is a TypeError too
  # (code catching that one catches it), naming the Variable and what to do instead.
  x, lengths = jnp.ones((2, 4, 3)), jnp.array([4, 2])
  with pytest.raises(TypeError, match='same pytree structure'):
    nnx.RNN(SowingCell(3, 5, rngs=nnx.Rngs(0)))(x, seq_lengths=lengths)
  expected = ('RNN: `cell` expected a step that adds nothing to the state the scan carries '
              'from step to step (to stack a value sown at each step over time, give its type '
              'an axis: state_axes=nnx.StateAxes({nnx.Intermediate: 0, ...: nnx.Carry}); or '
              "return it in the step's output), got ")
  with pytest.raises(TypeError, match=re.escape(expected + 'cell.h (Intermediate) added by '
                                                'one step.')) as info:
    nr.RNN(SowingCell(3, 5, rngs=nnx.Rngs(0)))(x, seq_lengths=lengths)
  assert 'same pytree structure' in str(info.value.__cause__)  # JAX's, kept as the cause
  # Under nnx.capture the value goes into a Variable that holds a tree.
  with pytest.raises(TypeError, match=re.escape(expected) + r"cell\.__captures__.*'h'.* "
                     r'\(Intermediate\) added by one step\.'):
    nnx.capture(nr.RNN(SowingCell(3, 5, rngs=nnx.Rngs(0))), nnx.Intermediate)(x)
  # Another Variable type (nnx.perturb's): the fix names it.

  class Perturbing(nnx.LSTMCell):
    def __call__(self, carry, x):
      carry, h = super().__call__(carry, x)
      return carry, self.perturb('dh', h)

  with pytest.raises(TypeError, match=re.escape(
      'state_axes=nnx.StateAxes({nnx.Perturbation: 0, ...: nnx.Carry}); or return it in the '
      "step's output), got cell.dh (Perturbation) added by one step.")):
    nr.RNN(Perturbing(3, 5, rngs=nnx.Rngs(0)))(x)
  # In a composite, the path to the layer.
  pair = nr.Bidirectional(nr.RNN(nr.LSTMCell(3, 5, rngs=nnx.Rngs(0))),
                          nr.RNN(SowingCell(3, 5, rngs=nnx.Rngs(0))))
  with pytest.raises(TypeError, match=re.escape('Bidirectional: in backward_rnn (RNN): '
                                                + expected + 'cell.h (Intermediate)')):
    pair(x)


# -- gaps found by mutation testing of _checks ---------------------------------------------
def test_nested_stacks_name_each_level_of_what_they_pass_on():
  # A stack inside a stack: the outer one named no step of its own ("StackedRNN:
  # `inputs`, passed on to layers[0] (RNN)", the inner stack's layers[0]), as it
  # does around a layer of another class (a Bidirectional: test above).
  r = nnx.Rngs(0)
  inner = nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(4, 4, rngs=r)))
  outer = nr.StackedRNN(inner, nr.RNN(nr.GRUCell(4, 4, rngs=r)))
  levels = ('StackedRNN: `{0}`, passed on to layers[0] (StackedRNN): StackedRNN: `{0}`, passed '
            'on to layers[0] (RNN): RNN: `{0}` expected ')
  with pytest.raises(ValueError, match='^' + m(levels.format('inputs') + 'last axis of size 3')):
    outer(jnp.ones((2, 5, 7)))
  with pytest.raises(ValueError, match='^' + m(levels.format('seq_lengths')
                                               + 'non-negative lengths, got minimum -1.')):
    outer(X, seq_lengths=jnp.array([5, -1]))
  # The inner stack's own argument: which layer raised it.
  dropping = nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=r)), nr.RNN(nr.GRUCell(4, 4, rngs=r)),
                           dropout_rate=0.5)
  with pytest.raises(ValueError, match='^' + m('StackedRNN: in layers[0] (StackedRNN): '
                                               'StackedRNN: `rngs` expected a PRNG source')):
    nr.StackedRNN(dropping, nr.RNN(nr.GRUCell(4, 4, rngs=r)))(X)


class _NoInitializeCarry(nnx.Module):
  """A cell as flax.nnx allows it, without initialize_carry: its carry must be given."""

  num_feature_axes = 1

  def __call__(self, h, x):
    return h, h


def test_a_composite_given_no_carry_blames_no_entry_of_it():
  # No initial_carry given: the error is the inner layer's own, not about an entry
  # of an argument the user did not pass (`initial_carry[0]`, the carry of ...).
  for module, prefix in (
      (nr.StackedRNN(nr.RNN(_NoInitializeCarry())), 'StackedRNN: in layers[0] (RNN): '),
      (nr.Bidirectional(nr.RNN(_NoInitializeCarry()), nr.RNN(_NoInitializeCarry())),
       'Bidirectional: in forward_rnn (RNN): ')):
    with pytest.raises(ValueError) as info:
      module(X)
    assert str(info.value) == prefix + (
      'RNN: `initial_carry` expected a carry, since the cell _NoInitializeCarry has no '
      'initialize_carry to build one, got None.')
    assert _checks.origin(info.value) == _checks.Origin('RNN', 'initial_carry')


def test_a_flag_given_as_a_0d_array_of_numbers_is_refused():
  # jnp.array(True) is a flag, as flax reads it; a 0-d array of another number is
  # not, as its Python number (2, 0.5) is not (it was read as truthy).
  for value, got in ((jnp.array(2), 'ArrayImpl'), (np.array(0.5), 'ndarray')):
    with pytest.raises(TypeError, match=m('RNN: `reverse` expected a bool, got ' + got)):
      abstractly(lambda value=value: nr.RNN(_cell(), reverse=value))


def test_a_flag_given_as_a_0d_bool_array_is_the_bool_flax_reads():
  # flax reads a flag with `if flag`: a 0-d boolean array, NumPy's as jnp's, is
  # that bool. One of more axes is no flag (of one element it was read as
  # truthy; of several, bool() of it is jax's or NumPy's error, naming nothing).
  for value in (np.array(True), np.array(False), jnp.array(True)):
    assert nr.RNN(_cell(), reverse=value).reverse is bool(value)
  for value, got in ((jnp.array([True]), 'ArrayImpl'), (np.array([True, False]), 'ndarray')):
    with pytest.raises(TypeError, match=m(f'RNN: `reverse` expected a bool, got {got}.')):
      abstractly(lambda value=value: nr.RNN(_cell(), reverse=value))


def test_a_traced_size_is_refused_naming_the_argument():
  # A size traced by jax.jit cannot be read on the host: our message, not jax's
  # ConcretizationTypeError (which names no argument), as for a traced rate.
  with pytest.raises(TypeError, match=m('GRUCell: `hidden_features` expected a positive int, '
                                        'got JitTracer')):
    jax.jit(lambda n: nr.GRUCell(3, n, rngs=nnx.Rngs(0)) and 0)(4)


def test_a_dropout_mask_for_other_features_is_refused():
  cell = nr.LSTMCell(3, 4, dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = X[:, 0]
  # (2, 2): a mask for 2 features of 3; (2,): one value per row, which NumPy's
  # broadcasting aligns with the features (the last axis), not the rows.
  for shape in ((2, 2), (2,)):
    masks = cell.dropout_masks(x.shape)._replace(input=jnp.ones(shape))
    with pytest.raises(ValueError, match=m("LSTMCell: `dropout_masks.input` expected an array "
                                           "that broadcasts to the inputs' shape (2, 3), got "
                                           f'shape {shape}.')):
      cell(cell.initialize_carry(x.shape), x, dropout_masks=masks)


def test_boolean_segment_ids_get_no_hint_about_lengths(lstm):
  # The "lengths, not a mask: mask.sum(-1)" hint is for seq_lengths; segment ids
  # are no lengths.
  with pytest.raises(ValueError, match=m('RNN: `segment_ids` expected an integer array of shape '
                                         '(*batch, time), got dtype bool.')) as info:
    nr.RNN(lstm)(X, segment_ids=jnp.ones((2, 5), bool))
  assert 'mask' not in str(info.value)


def test_a_carry_init_given_after_the_rnn_was_built_asks_for_the_calls_rngs():
  # flax.nnx's RNN always keeps a carry stream; nr.RNN keeps one only for a cell
  # that needs it when the RNN is built (docs/migrating_from_nnx.md). A carry_init
  # given later: a ValueError naming the call's `rngs`, which then draws it.
  cell = nr.LSTMCell(3, 4, rngs=nnx.Rngs(0))
  rnn = nr.RNN(cell)
  theirs = nnx.RNN(nnx.LSTMCell(3, 4, rngs=nnx.Rngs(5)))
  nnx.update(theirs.cell, nnx.state(cell, nnx.Param))
  cell.carry_init = theirs.cell.carry_init = nnx.initializers.ones
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.float32)
  with pytest.raises(ValueError, match=m(
      "RNN: `rngs` expected an nnx.Rngs or nnx.RngStream in the call: the cell's carry_init "
      'draws the initial carry, and this RNN keeps no stream (built with rngs=False, or before '
      'the cell was given its carry_init; flax.nnx keeps one always, '
      'docs/migrating_from_nnx.md), got None.')):
    rnn(x)
  np.testing.assert_allclose(rnn(x, rngs=nnx.Rngs(1)), theirs(x), atol=1e-6)
  with pytest.warns(UserWarning, match='carry_init is provided in __init__'):  # (flax's too)
    built_with = nr.LSTMCell(3, 4, carry_init=nnx.initializers.ones, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=m("RNN: `rngs` expected an nnx.Rngs")):
    nr.RNN(built_with, rngs=False)(x)
  # Packed: an initial_carry given for each row's first segment, the later segments
  # start from the default carry, which then draws too: the same ValueError, and
  # with the call's rngs a later segment runs as flax.nnx's RNN on it alone.
  packed = nr.RNN(built_with, rngs=False)
  ids, zeros = jnp.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]]), (jnp.zeros((2, 4)),) * 2
  with pytest.raises(ValueError, match=m("RNN: `rngs` expected an nnx.Rngs or nnx.RngStream "
                                         "in the call: the cell's carry_init")):
    packed(x, initial_carry=zeros, segment_ids=ids)
  nnx.update(theirs.cell, nnx.state(built_with, nnx.Param))
  np.testing.assert_allclose(packed(x, initial_carry=zeros, segment_ids=ids,
                                    rngs=nnx.Rngs(1))[:1, 2:], theirs(x[:1, 2:]), atol=1e-6)


def test_a_variable_left_abstract_by_a_partial_restore_is_named():
  # A flax.nnx GRU checkpoint has no bias_hn: restored into an abstract default
  # nr.GRUCell (orbax's partial_restore, as nnx.update here), bias_hn stays a
  # ShapeDtypeStruct, and JAX's error named no variable ("Argument 'args[0]' of
  # shape float32[4] ... is not a valid JAX type").
  theirs = nnx.RNN(nnx.GRUCell(3, 4, rngs=nnx.Rngs(0)))
  ours = nnx.eval_shape(lambda: nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(1))))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  x = jnp.ones((2, 5, 3))
  with pytest.raises(TypeError, match=m(
      'RNN.__call__: the variable `cell.bias_hn` holds a jax.ShapeDtypeStruct, not an array',
      "A checkpoint of flax.nnx's GRUCell has no `bias_hn`: build "
      'nr.GRUCell(..., use_bias_hn=False)')):
    ours(x)
  fused = nnx.eval_shape(lambda: nr.LSTM(3, 4, num_layers=2, rngs=nnx.Rngs(0)))
  with pytest.raises(TypeError, match=m('LSTM.__call__: the variable `forward.0.',
                                        'holds a jax.ShapeDtypeStruct')):
    fused(x)
  # Restored in full, the same modules run (and the message is only read on an error).
  nnx.update(ours, {'cell': {'bias_hn': nnx.Param(jnp.zeros(4))}})
  np.testing.assert_allclose(ours(x), theirs(x), atol=1e-6)
