"""Cells against their NumPy formula, flax.linen and flax.nnx; ``initialize_carry``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref

ATOL = RTOL = 1e-5


def _assert_tree_close(got, want, atol=ATOL, rtol=RTOL):
  got_leaves, want_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(got_leaves) == len(want_leaves)
  for g, w in zip(got_leaves, want_leaves):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               atol=atol, rtol=rtol)


def _to_np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


# -- the formula ----------------------------------------------------------------
# Every cell with one batch axis; one of each family with two.
REFERENCE_CASES = [(name, (2,)) for name in ref.CELLS] + [
  (name, (2, 3)) for name in ('simple_residual', 'optimized_lstm', 'gru', 'mgu_no_reset',
                              'conv_lstm_2d_s2')]


@pytest.mark.parametrize('name, batch', REFERENCE_CASES)
def test_cell_matches_numpy_reference(name, batch):
  cell, features = ref.make_cell(name)
  p = ref.cell_params(cell)
  if 'b_hn' in p and p['b_hn'] is not None:
    assert np.abs(p['b_hn']).max() > 0.1  # the bias inside r * (...) must matter
  xs = ref.normal((3, *batch, *features), seed=2)
  carry = ref.random_carry(cell, xs.shape[1:])
  carry_ref = _to_np(carry)
  step = nnx.jit(lambda cell, carry, x: cell(carry, x))  # one compile, not one per op
  for x in np.asarray(xs):  # a few steps, each compared
    carry, y = step(cell, carry, x)
    carry_ref, y_ref = ref.step(p, carry_ref, np.asarray(x))
    _assert_tree_close(carry, carry_ref)
    _assert_tree_close(y, y_ref)


def test_conv_reference_padding_matches_lax():
  # The reference convolution itself, against lax, for odd/even kernels and strides.
  x = np.random.default_rng(0).normal(size=(2, 7, 6, 3))
  w = np.random.default_rng(1).normal(size=(3, 2, 3, 5))
  for strides in [(1, 1), (2, 1), (2, 3)]:
    want = jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), strides, 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(ref.conv_same(x, w, strides), want, atol=1e-4)


# -- flax.linen -----------------------------------------------------------------
LINEN = {
  'simple': lambda: nn.SimpleCell(features=4),
  'simple_residual': lambda: nn.SimpleCell(features=4, residual=True),
  'lstm': lambda: nn.LSTMCell(features=4),
  'optimized_lstm': lambda: nn.OptimizedLSTMCell(features=4),
  'gru': lambda: nn.GRUCell(features=4),
  'mgu': lambda: nn.MGUCell(features=4),
  'mgu_no_reset': lambda: nn.MGUCell(features=4, reset_gate=False),
  # flax.linen applies the strides to the hidden conv too (and crashes): stride 1 only.
  'conv_lstm_2d': lambda: nn.ConvLSTMCell(features=3, kernel_size=(3, 3)),
  'conv_lstm_3d': lambda: nn.ConvLSTMCell(features=2, kernel_size=(2, 2, 2)),
}


@pytest.mark.parametrize('name', list(LINEN))
def test_cell_matches_flax_linen(name):
  cell, features = ref.make_cell(name)
  linen_cell = LINEN[name]()
  xs = ref.normal((3, 2, 3, *features), seed=3)
  carry = ref.random_carry(cell, xs.shape[1:])
  variables = ref.linen_variables(ref.cell_params(cell))
  # Our mapping yields exactly linen's variable tree (names, shapes); traced, not run.
  init = jax.eval_shape(linen_cell.init, jax.random.key(0), carry, xs[0])
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), init, variables)
  carry_linen = carry

  @nnx.jit  # both libraries' steps in one program (one compile, not two)
  def steps(cell, carry, carry_linen, x):
    return cell(carry, x), linen_cell.apply(variables, carry_linen, x)

  for x in np.asarray(xs):
    (carry, y), (carry_linen, y_linen) = steps(cell, carry, carry_linen, x)
    _assert_tree_close(carry, carry_linen)
    _assert_tree_close(y, y_linen)


# -- flax.nnx drop-ins ----------------------------------------------------------
FLAX_NNX = {
  'simple': (nr.SimpleCell, nnx.SimpleCell),
  'lstm': (nr.LSTMCell, nnx.LSTMCell),
  'optimized_lstm': (nr.OptimizedLSTMCell, nnx.OptimizedLSTMCell),
}


def _state_signature(module):
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {path: (type(v), v[...].shape, v[...].dtype) for path, v in flat}


def _metadata(module):
  return {path: v.get_metadata() for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', list(FLAX_NNX))
def test_drop_in_for_flax_nnx_state(name, param_dtype):
  ours_cls, theirs_cls = FLAX_NNX[name]
  # A random bias init and the three metadata, each of its own: each reaches its parameters.
  kw = dict(param_dtype=param_dtype, bias_init=nnx.initializers.normal(1.0),
            kernel_metadata={'tag': 'k'}, recurrent_kernel_metadata={'tag': 'rk'},
            bias_metadata={'tag': 'b'})
  if param_dtype == jnp.bfloat16 and name != 'lstm':
    # flax.nnx's SimpleCell and OptimizedLSTMCell use a plain orthogonal init:
    # no bfloat16 QR on CPU (its LSTMCell and ours compute it in float32).
    kw['recurrent_kernel_init'] = nnx.initializers.lecun_normal()
  ours = ours_cls(3, 4, **kw, rngs=nnx.Rngs(0))
  theirs = theirs_cls(3, 4, **kw, rngs=nnx.Rngs(0))
  assert _state_signature(ours) == _state_signature(theirs)
  assert _metadata(ours) == _metadata(theirs)
  # Same creation order and initializers: equal Rngs give equal parameters.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param))
  # Same default computation dtype: the step's output dtype, for inputs of either dtype
  # (traced only; the new carry keeps the carry's dtype in ours, by design).
  carry = ours.initialize_carry((2, 3))
  for dtype in (jnp.bfloat16, jnp.float32):
    x = jax.ShapeDtypeStruct((2, 3), dtype)
    y_ours, y_theirs = (nnx.eval_shape(lambda cell, x: cell(carry, x)[1], cell, x)
                        for cell in (ours, theirs))
    assert y_ours.dtype == y_theirs.dtype, dtype


@pytest.mark.parametrize('param_dtype', [jnp.complex64, jnp.float64])
@pytest.mark.parametrize('name', [*FLAX_NNX, 'gru'])
def test_complex_and_float64_parameters_are_flax_nnx_values(name, param_dtype):
  # The orthogonal init is computed in the parameters' dtype, as flax's: a complex
  # orthogonal matrix, not a real one cast (half precision alone goes through float32).
  ours_cls, theirs_cls = FLAX_NNX.get(name, (functools.partial(nr.GRUCell, use_bias_hn=False),
                                             nnx.GRUCell))
  with jax.enable_x64(param_dtype == jnp.float64):
    ours = ours_cls(3, 4, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    theirs = theirs_cls(3, 4, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    assert _state_signature(ours) == _state_signature(theirs)
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param))


@pytest.mark.parametrize('name', [*FLAX_NNX, 'simple_soft_sign_residual'])
def test_drop_in_for_flax_nnx_outputs(name):
  options = dict(activation_fn=nnx.soft_sign, residual=True)  # the last case's
  ours_cls, theirs_cls = FLAX_NNX.get(name, (functools.partial(nr.SimpleCell, **options),
                                             functools.partial(nnx.SimpleCell, **options)))
  # Random parameters, built without running initializers.
  theirs = ref.build(lambda: theirs_cls(3, 4, rngs=nnx.Rngs(1)), seed=5)
  ours = nnx.eval_shape(lambda: ours_cls(3, 4, rngs=nnx.Rngs(0)))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  x = ref.normal((2, 5, 3), seed=4)
  carry = ref.random_carry(ours, (2, 3))

  def runs(lib, cell):  # one step, then the RNN of the library over the cell
    kw = dict(rngs=False) if lib is nnx else {}
    return cell(carry, x[:, 0]), lib.RNN(cell, return_carry=True, **kw)(x, initial_carry=carry)

  # flax.nnx.RNN over flax's cell vs nr.RNN over ours (no masking): one program.
  got, want = nnx.jit(lambda ours, theirs: (runs(nr, ours), runs(nnx, theirs)))(ours, theirs)
  _assert_tree_close(got, want, atol=1e-6, rtol=1e-6)


def test_gru_gate_and_activation_functions_are_the_ones_given_as_in_flax_nnx():
  # hard_sigmoid gates and a soft_sign activation; reference: flax.nnx's GRUCell given the
  # same (random parameters; inputs beyond hard_sigmoid's linear part). The LSTM cells':
  # tests/test_compat.py (compat's OptimizedLSTMCell steps ours against flax.linen's).
  fns = dict(gate_fn=nnx.hard_sigmoid, activation_fn=nnx.soft_sign)
  theirs = ref.build(lambda: nnx.GRUCell(3, 4, **fns, rngs=nnx.Rngs(1)), seed=6)
  ours = nnx.eval_shape(lambda: nr.GRUCell(3, 4, use_bias_hn=False, **fns, rngs=nnx.Rngs(0)))
  nnx.update(ours, nnx.state(theirs, nnx.Param))
  h, x = ref.random_carry(ours, (2, 3)), ref.normal((2, 3), seed=7, scale=3.0)
  got, want = nnx.jit(lambda ours, theirs: (ours(h, x), theirs(h, x)))(ours, theirs)
  _assert_tree_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_step_by_hand_keeps_a_bfloat16_carry_under_float32_computation():
  # bfloat16 parameters stepped in float32: the new carry is rounded back to the carry's
  # bfloat16, so that jax.lax.scan over the cell keeps its carry type. Reference: the NumPy
  # step in float64, its carry rounded to bfloat16 after each step.
  cell = ref.build(lambda: nr.GRUCell(3, 4, dtype=jnp.float32, param_dtype=jnp.bfloat16,
                                      rngs=nnx.Rngs(0)))
  xs = ref.normal((5, 2, 3), seed=3)  # (time, batch, features)
  carry0 = cell.initialize_carry((2, 3))
  h, _ = nnx.jit(lambda cell: jax.lax.scan(cell, carry0, xs))(cell)
  p = ref.cell_params(cell)
  want = np.zeros((2, 4))
  for x in np.asarray(xs):
    want, _ = ref.step(p, want, x)
    want = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
  assert h.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(h, np.float64), want, atol=2e-2)


def test_a_cell_with_its_own_initialize_carry_keeps_its_carrys_dtype_by_hand():
  # A cell on the base class with an initialize_carry of its own (its carry is
  # not checked) that steps in bfloat16: the new carry comes back in the
  # carry's float32, as over RNN's steps, so jax.lax.scan over the cell runs
  # (it raised: carry input float32, output bfloat16). Reference: NumPy,
  # rounding each step's carry to bfloat16 as the step does.
  class Decay(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros((*input_shape[:-1], 4), jnp.float32)

    def step(self, carry, inputs, recurrent_mask):
      h = (0.5 * carry + inputs.sum(-1, keepdims=True)).astype(jnp.bfloat16)
      return h, h

  cell = Decay()
  xs = ref.normal((5, 2, 3), seed=3)  # (time, batch, features)
  h, ys = nnx.jit(lambda cell: jax.lax.scan(cell, cell.initialize_carry((2, 3)), xs))(cell)
  want = np.zeros((2, 4))
  for x in np.asarray(xs, np.float64):
    want = np.asarray(jnp.asarray(0.5 * want + x.sum(-1, keepdims=True), jnp.bfloat16),
                      np.float64)
  assert h.dtype == jnp.float32 and ys.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(h, np.float64), want, rtol=1e-2)


def test_a_cell_with_its_own_initialize_carry_whose_step_makes_a_new_carry_returns_it():
  # The dtype cast above applies where the step keeps the carry's structure; a step
  # that makes a carry of its own from another (here from None: it starts one) returns
  # it as computed (matching it against the carry given raised). The next step, of the
  # structure it made, keeps its dtypes. NumPy: the running sum of the inputs.
  class Lazy(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

    def initialize_carry(self, input_shape, rngs=None):
      zeros = jnp.zeros((*input_shape[:-1], 4), jnp.float32)
      return zeros, zeros

    def step(self, carry, inputs, recurrent_mask):
      c = jnp.zeros((*inputs.shape[:-1], 4), jnp.float32) if carry is None else carry[0]
      c = c + inputs.sum(-1, keepdims=True)
      return (c, c.astype(jnp.bfloat16)), c.astype(jnp.bfloat16)

  cell = Lazy()
  xs = np.asarray(ref.normal((2, 2, 3), seed=4))  # (time, batch, features)
  carry, _ = cell(None, xs[0])
  assert carry[1].dtype == jnp.bfloat16  # as computed
  carry, y = cell((carry[0], carry[1].astype(jnp.float32)), xs[1])
  assert [a.dtype for a in carry] == [jnp.float32, jnp.float32] and y.dtype == jnp.bfloat16
  want = np.broadcast_to(xs.astype(np.float64).sum((0, 2))[:, None], (2, 4))
  np.testing.assert_allclose(np.asarray(carry[0], np.float64), want, rtol=1e-5, atol=1e-5)


# -- initialize_carry -----------------------------------------------------------
@pytest.mark.parametrize('param_dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', ['simple', 'lstm', 'gru', 'mgu', 'conv_lstm_2d'])
def test_initialize_carry_zeros_without_rngs(name, param_dtype):
  factory, features = ref.CELLS[name]
  cell = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))
  cell = ref.build(lambda: type(cell)(**_ctor_kwargs(cell), param_dtype=param_dtype,
                                      rngs=nnx.Rngs(0)))
  carry = cell.initialize_carry((2, 3, *features))  # no rngs: zeros need none
  leaves = jax.tree_util.tree_leaves(carry)
  n_leaves = 2 if isinstance(cell, (nr.LSTMCell, nr.ConvLSTMCell)) else 1
  assert len(leaves) == n_leaves
  expected_shape = (2, 3, *features[:-1], cell.hidden_features)
  for leaf in leaves:
    assert leaf.shape == expected_shape
    assert leaf.dtype == param_dtype
    assert not np.asarray(leaf, np.float32).any()


def _ctor_kwargs(cell):
  if isinstance(cell, nr.ConvLSTMCell):
    return dict(in_features=cell.in_features, hidden_features=cell.hidden_features,
                kernel_size=cell.kernel_size)
  return dict(in_features=cell.in_features, hidden_features=cell.hidden_features)


@pytest.mark.parametrize('source', ['key', 'rngs', 'stream'])
@pytest.mark.parametrize('name', ['lstm', 'gru'])
def test_initialize_carry_with_carry_init(name, source):
  cell, _ = ref.make_cell(name)
  init = jax.nn.initializers.normal(1.0)
  n = 2 if name == 'lstm' else 1
  if source == 'key':
    # A raw key (an extension): split, one key per carry array, as flax.linen does.
    carry = cell.initialize_carry((2, 3), rngs=jax.random.key(7), carry_init=init)
    keys = [jax.random.key(7)] if n == 1 else list(jax.random.split(jax.random.key(7), n))
    leaves = [np.asarray(init(k, (2, 4), jnp.float32)) for k in keys]
    expected = leaves[0] if n == 1 else tuple(leaves)
  else:
    # An Rngs or RngStream: drawn from as flax.nnx draws (once per carry array).
    make = ((lambda: nnx.Rngs(carry=7)) if source == 'rngs'
            else (lambda: nnx.RngStream(7, tag='carry')))
    carry = cell.initialize_carry((2, 3), rngs=make(), carry_init=init)
    theirs = (nnx.LSTMCell if n == 2 else nnx.GRUCell)(3, 4, rngs=nnx.Rngs(0))
    expected = theirs.initialize_carry((2, 3), make(), carry_init=init)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _to_np(carry), _to_np(expected))
  if n == 2:
    assert not np.allclose(carry[0], carry[1])


@pytest.mark.parametrize('strides, spatial, expected', [
  ((2, 2), (7, 6), (4, 3)),
  ((2, 1), (7, 6), (4, 6)),
  ((1, 3), (5, 5), (5, 2)),
  (np.int64(2), (7, 6), (4, 3)),  # one NumPy int for every axis
])
def test_conv_lstm_carry_shape_with_strides(strides, spatial, expected):
  cell = ref.build(lambda: nr.ConvLSTMCell(3, 4, (3, 3), strides=strides, rngs=nnx.Rngs(0)))
  c, h = cell.initialize_carry((2, *spatial, 3))
  assert c.shape == h.shape == (2, *expected, 4)
  # The carry fits the cell's own output (traced: shapes are the point).
  x = jnp.ones((2, *spatial, 3))
  (c2, h2), y = nnx.eval_shape(lambda cell: cell((c, h), x), cell)
  assert c2.shape == y.shape == (2, *expected, 4)


def test_mgu_forget_bias_init():
  cell = nr.MGUCell(3, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(cell.dense_i.bias[...][:4], 1.0)  # b_if
  np.testing.assert_array_equal(cell.dense_i.bias[...][4:], 0.0)  # b_in
  np.testing.assert_array_equal(cell.bias_hn[...], 0.0)
  # Random initializers for both halves draw from their own keys: b_if and b_in differ.
  normal = nnx.initializers.normal(1.0)
  cell = nr.MGUCell(3, 4, forget_bias_init=normal, activation_bias_init=normal,
                    rngs=nnx.Rngs(0))
  b_if, b_in = np.split(np.asarray(cell.dense_i.bias[...]), 2)
  assert np.abs(b_if - b_in).max() > 0.1


def test_the_gru_b_hn_key_is_not_the_next_key_of_the_params_stream():
  # flax.nnx's GRUCell has no b_hn: its key is taken beside the params stream,
  # which stays as flax.nnx's, and is not that stream's next key (else the next
  # layer built from the same Rngs would draw a parameter with b_hn's key).
  init, zeros = jax.nn.initializers.normal(1.0), jax.nn.initializers.zeros  # no QR to compile
  kw = dict(kernel_init=zeros, recurrent_kernel_init=zeros, bias_init=init)
  ours, theirs = nnx.Rngs(0), nnx.Rngs(0)
  cell = nr.GRUCell(2, 3, **kw, rngs=ours)
  nnx.GRUCell(2, 3, **kw, rngs=theirs)
  following = ours.params()
  np.testing.assert_array_equal(jax.random.key_data(following),
                                jax.random.key_data(theirs.params()))
  assert np.abs(np.asarray(cell.bias_hn[...]) - np.asarray(init(following, (3,)))).min() > 1e-6


# -- no PRNG state by default ---------------------------------------------------
def _rng_variables(module):
  flat = nnx.to_flat_state(nnx.state(module))
  return [path for path, v in flat if isinstance(v, (nnx.RngKey, nnx.RngCount))]


@pytest.mark.parametrize('name', list(ref.CELLS))
def test_no_prng_state_by_default(name):
  factory = ref.CELLS[name][0]
  cell = nnx.eval_shape(lambda: factory(nnx.Rngs(0)))  # the state's structure is all we need
  assert _rng_variables(cell) == []
  assert _rng_variables(nr.RNN(cell)) == []
  bi = nr.Bidirectional(nr.RNN(cell), nr.RNN(nnx.eval_shape(lambda: factory(nnx.Rngs(1)))))
  assert _rng_variables(bi) == []


def test_prng_state_only_with_dropout():
  # The other side of the check above: with dropout the stream is kept, so the
  # helper does find RNG variables when they exist.
  cell = nnx.eval_shape(lambda: nr.LSTMCell(3, 4, dropout_rate=0.5, rngs=nnx.Rngs(0)))
  assert _rng_variables(cell)


@pytest.mark.parametrize('padding,hh_padding,width', [
  ('VALID', 'SAME', 4), ('CIRCULAR', 'CIRCULAR', 6), (((2, 0),), ((2, 0),), 6),
  (((1, 0),), 'SAME', 5), ('CAUSAL', 'CAUSAL', 6), ('REFLECT', 'REFLECT', 6),
  (((4, 1),), 'SAME', 9),  # beyond the kernel: the cell pads the inputs itself (below)
  (3, 'SAME', 10),  # an int: that many points on both sides, beyond the kernel too
])
def test_conv_lstm_hidden_padding(padding, hh_padding, width):
  """The hidden conv takes ``padding`` where it keeps the state's shape, else 'SAME'.

  Reference: flax.linen's ``Conv`` with the expected paddings and the cell's formula.
  """
  cell = ref.build(lambda: nr.ConvLSTMCell(2, 3, (3,), padding=padding, rngs=nnx.Rngs(0)))
  x = ref.normal((2, 6, 2), seed=1)
  carry = ref.random_carry(cell, x.shape)
  (c, h), y = nnx.jit(lambda cell: cell(carry, x))(cell)
  p = nnx.to_pure_dict(nnx.state(cell, nnx.Param))

  @jax.jit  # the reference in one program
  def reference(p):
    gates = (nn.Conv(12, (3,), padding=padding).apply({'params': p['ih']}, x)
             + nn.Conv(12, (3,), padding=hh_padding).apply({'params': p['hh']}, carry[1]))
    i, g, f, o = jnp.split(gates, 4, axis=-1)
    c_ref = jax.nn.sigmoid(f + 1) * carry[0] + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c_ref, jax.nn.sigmoid(o) * jnp.tanh(c_ref)

  c_ref, y_ref = reference(p)
  np.testing.assert_allclose(c, c_ref, atol=1e-5)
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  assert c.shape == (2, width, 3)  # the input conv's output width


def test_conv_lstm_same_lower_padding_matches_flax_linen():
  """``'SAME_LOWER'`` keeps the shape at stride 1, so the hidden convolution takes it too,
  as flax.linen's ConvLSTMCell (an even kernel is padded on the low side, not the high
  side as by ``'SAME'``); lower case, as lax takes it. Reference: flax.linen's cell on
  the same parameters."""
  cell = ref.build(lambda: nr.ConvLSTMCell(2, 3, (2, 3), padding='same_lower',
                                           rngs=nnx.Rngs(0)))
  x = ref.normal((2, 4, 5, 2), seed=1)
  carry = ref.random_carry(cell, x.shape)
  linen = nn.ConvLSTMCell(features=3, kernel_size=(2, 3), padding='same_lower')
  variables = {'params': nnx.to_pure_dict(nnx.state(cell, nnx.Param))}
  got, want = nnx.jit(lambda cell: (cell(carry, x), linen.apply(variables, carry, x)))(cell)
  _assert_tree_close(got, want)


# 1 point in, 2 out; in 2-D one axis beyond the kernel is enough for the cells' own pads.
@pytest.mark.parametrize('cls, kernel, padding, spatial, out', [
  (nr.ConvLSTMCell, (2,), ((2, 0),), (1,), (2,)),
  (nr.ConvGRUCell, (2, 1), ((2, 0), (0, 0)), (1, 1), (2, 1)),
])
def test_conv_input_gradient_with_padding_beyond_the_kernel(cls, kernel, padding, spatial, out):
  """XLA:CPU's input gradient of a convolution whose low padding reaches the
  kernel's size reads memory it never wrote (jax 0.10.2: different values at
  every call, up to 1e30); the cells pad such inputs themselves.

  Reference: central differences of the step (its values are checked against
  flax.linen's ``Conv`` above), over an RNN unrolled in one program.
  """
  cell = ref.build(lambda: cls(2, 3, kernel, padding=padding, rngs=nnx.Rngs(0)))
  rnn = nr.RNN(cell, unroll=True)
  x = np.asarray(ref.normal((2, 3, *spatial, 2), seed=1), np.float32)
  w = ref.normal((2, 3, *out, 3), seed=2)

  def loss(rnn, x):
    return jnp.sum(rnn(x) * w)

  @nnx.jit  # every perturbed input as a row of a second batch axis, in one program
  def differences(rnn):
    eye = np.eye(x.size, dtype=np.float32).reshape(-1, *x.shape) * 1e-2
    up, down = (jnp.sum(rnn(x[None] + sign * eye) * w[None], axis=tuple(range(1, w.ndim + 1)))
                for sign in (1, -1))
    return ((up - down) / 2e-2).reshape(x.shape)

  expected = differences(rnn)
  grad = nnx.jit(nnx.grad(loss, argnums=1))
  for _ in range(5):  # the wrong values change from call to call
    np.testing.assert_allclose(grad(rnn, x), expected, atol=2e-3)


# -- writing a cell on RNNCellBase ------------------------------------------------
class _MinimalLSTM(nr.RNNCellBase):
  """A user's two-array cell: c' = f c + (1 - f) tanh(W x + U h), h' = tanh(c')."""

  num_carry_arrays = 2

  def __init__(self, in_features, hidden_features, *, rngs, **options):
    super().__init__(in_features, hidden_features, rngs=rngs, **options)
    self.w = nnx.Linear(in_features, 2 * hidden_features, rngs=rngs)
    self.u = nnx.Linear(hidden_features, 2 * hidden_features, use_bias=False, rngs=rngs)
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # the cell's own state

  def step(self, carry, inputs, recurrent_mask):
    c, h = carry
    h_in = h if recurrent_mask is None else h * recurrent_mask
    f, g = jnp.split(self.w(inputs) + self.u(h_in), 2, axis=-1)
    f = jax.nn.sigmoid(f)
    new_c = f * c + (1 - f) * jnp.tanh(g)
    self.calls[...] += 1
    return (new_c, jnp.tanh(new_c)), jnp.tanh(new_c)


def _minimal_lstm_numpy(cell, xs, lengths, recurrent_mask=None):
  w, b, u = (np.asarray(v[...], np.float64) for v in (cell.w.kernel, cell.w.bias, cell.u.kernel))
  batch, steps, _ = xs.shape
  c = h = np.zeros((batch, cell.hidden_features))
  ys = np.zeros((batch, steps, cell.hidden_features))
  for t in range(steps):
    h_in = h if recurrent_mask is None else h * recurrent_mask
    f, g = np.split(xs[:, t] @ w + b + h_in @ u, 2, axis=-1)
    f = ref.sigmoid(f)
    new_c = f * c + (1 - f) * np.tanh(g)
    valid = (t < lengths)[:, None]
    c, h = np.where(valid, new_c, c), np.where(valid, np.tanh(new_c), h)
    ys[:, t] = np.where(valid, h, 0.0)
  return (c, h), ys


def test_cell_written_on_the_base_class_runs_its_step_with_masking():
  cell = _MinimalLSTM(3, 4, rngs=nnx.Rngs(0))
  xs = np.asarray(ref.normal((2, 6, 3), seed=3), np.float64)
  lengths = np.array([6, 2])
  (c, h), y = nr.RNN(cell)(jnp.asarray(xs, jnp.float32), seq_lengths=jnp.asarray(lengths),
                           return_carry=True)
  (c_ref, h_ref), y_ref = _minimal_lstm_numpy(cell, xs, lengths)
  _assert_tree_close((c, h, y), (c_ref, h_ref, y_ref))
  assert int(cell.calls[...]) == 6  # the cell's own state advanced once per step, kept
  assert cell.initialize_carry((5, 3))[0].shape == (5, 4)  # num_carry_arrays arrays of (5, 4)
  assert len(cell.initialize_carry((5, 3))) == 2


def test_cell_written_on_the_base_class_gets_the_base_class_dropout():
  cell = _MinimalLSTM(3, 4, recurrent_dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
  masks = cell.dropout_masks((2, 3))
  assert masks.input is None
  mask = np.asarray(masks.recurrent, np.float64)
  assert set(np.unique(mask)) <= {0.0, 2.0} and mask.shape == (2, 4)
  xs = np.asarray(ref.normal((2, 1, 3), seed=4), np.float64)
  h0 = np.asarray(ref.normal((2, 4), seed=5), np.float64)
  carry = (jnp.zeros((2, 4)), jnp.asarray(h0, jnp.float32))
  x = jnp.asarray(xs[:, 0], jnp.float32)
  (_, h), _ = nnx.jit(lambda cell: cell(carry, x, dropout_masks=masks))(cell)
  w, b, u = (np.asarray(v[...], np.float64) for v in (cell.w.kernel, cell.w.bias, cell.u.kernel))
  f, g = np.split(xs[:, 0] @ w + b + (h0 * mask) @ u, 2, axis=-1)
  np.testing.assert_allclose(h, np.tanh((1 - ref.sigmoid(f)) * np.tanh(g)), atol=1e-5)
  cell.eval()
  assert cell.dropout_masks((2, 3)) is None


def test_cell_in_flax_style_calls_the_base_constructor_without_arguments():
  class Counter(nr.RNNCellBase):
    def __init__(self):
      super().__init__()
      self.n = nnx.Variable(jnp.zeros(()))

    def __call__(self, carry, inputs):
      self.n[...] += 1
      return carry + inputs.sum(-1, keepdims=True), carry

    def initialize_carry(self, input_shape, rngs=None):
      return jnp.zeros(input_shape[:-1] + (1,))

    @property
    def num_feature_axes(self):
      return 1

  cell = Counter()
  y = nr.RNN(cell)(jnp.ones((2, 4, 3)), seq_lengths=jnp.array([4, 1]))
  np.testing.assert_array_equal(y[..., 0], [[0, 3, 6, 9], [0, 0, 0, 0]])
  assert float(cell.n[...]) == 4


def test_cell_on_the_base_class_without_step_or_constructor_says_what_is_missing():
  class NoStep(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

  with pytest.raises(NotImplementedError,
                     match=r'NoStep must implement step\(carry, inputs, recurrent_mask\)'):
    NoStep()(jnp.zeros((2, 4)), jnp.ones((2, 3)))

  class OldHook(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

    def _step(self, carry, inputs, recurrent_mask):
      return carry, carry

  with pytest.raises(NotImplementedError,
                     match=r'called it _step: rename it step\)'):
    OldHook()(jnp.zeros((2, 4)), jnp.ones((2, 3)))

  class NoInit(nr.RNNCellBase):
    def step(self, carry, inputs, recurrent_mask):
      return carry, carry

  with pytest.raises(TypeError, match=r'NoInit: the cell has no `hidden_features`; its '
                                      r'constructor must call super\(\).__init__'):
    NoInit()(jnp.zeros((2, 4)), jnp.ones((2, 3)))
  with pytest.raises(TypeError, match='NoInit: `hidden_features` expected a positive int, '
                                      'got None'):
    nr.RNNCellBase.__init__(NoInit(), 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='NoInit: `in_features` expected a positive int, got None'):
    nr.RNNCellBase.__init__(NoInit(), dropout_rate=0.5)


def test_tabulate_lists_a_cell_once_not_its_step():
  table = nnx.tabulate(nr.RNN(_MinimalLSTM(3, 4, rngs=nnx.Rngs(0))), jnp.ones((2, 5, 3)))
  assert 'cell/step' not in table and 'cell/w' in table


class _LeakyMixin:
  def step(self, carry, inputs, recurrent_mask):
    new_h = 0.5 * carry + 0.5 * jnp.tanh(self.w(inputs))
    return new_h, new_h


class _MixedInLeaky(_LeakyMixin, nr.RNNCellBase):
  def __init__(self, rngs):
    super().__init__(3, 4, rngs=rngs)
    self.w = nnx.Linear(3, 4, rngs=rngs)


def test_step_from_a_mixin_or_assigned_later_is_the_cells_step():
  cell = _MixedInLeaky(nnx.Rngs(0))
  x = np.asarray(ref.normal((2, 3), seed=2), np.float64)
  h, _ = cell(jnp.ones((2, 4)), jnp.asarray(x, jnp.float32))
  w, b = (np.asarray(v[...], np.float64) for v in (cell.w.kernel, cell.w.bias))
  np.testing.assert_allclose(h, 0.5 + 0.5 * np.tanh(x @ w + b), atol=1e-6)

  class Late(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

  Late.step = lambda self, carry, inputs, mask: (carry + 1, carry)
  np.testing.assert_array_equal(Late()(jnp.zeros((2, 4)), jnp.ones((2, 3)))[0], 1.0)


def test_a_step_replaced_since_the_class_was_made_is_the_cells_step(monkeypatch):
  # As Python looks a method up at each call: a patched step (mock.patch.object, a
  # reassignment) of a class that had one runs, on the class or on a base class.
  class Sub(nr.GRUCell):
    pass

  cell = Sub(3, 4, rngs=nnx.Rngs(0))
  carry, x = jnp.zeros((2, 4)), jnp.ones((2, 3))
  with monkeypatch.context() as m:
    m.setattr(Sub, 'step', lambda self, carry, inputs, mask: (carry + 1, carry + 2))
    np.testing.assert_array_equal(cell(carry, x)[1], 2.0)
    np.testing.assert_array_equal(nr.RNN(cell)(jnp.ones((2, 5, 3)))[:, -1], 6.0)
  with monkeypatch.context() as m:
    m.setattr(nr.GRUCell, 'step', lambda self, carry, inputs, mask: (carry + 1, carry + 3))
    np.testing.assert_array_equal(cell(carry, x)[1], 3.0)
  h = np.asarray(cell(carry, x)[1])  # unpatched again: the GRU's step
  assert np.all(np.abs(h) < 1) and np.any(h != 0)


def test_what_step_returns_is_checked_against_the_carry():
  class ForgotTwoArrays(nr.RNNCellBase):  # a (c, h) carry without num_carry_arrays = 2
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

    def step(self, carry, inputs, recurrent_mask):
      c, h = carry  # unpacks the batch axis of the one-array carry
      return (c, h), h

  with pytest.raises(ValueError, match=r'ForgotTwoArrays.step: `new_carry` expected a pytree '
                                       r'with structure array, got structure '
                                       r'\(array, array\) \(the carry is num_carry_arrays '
                                       r'= 1 array\(s\) of shapes \(2, 4\)'):
    nr.RNN(ForgotTwoArrays())(jnp.ones((2, 5, 3)))

  class WrongWidth(nr.RNNCellBase):
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))

    def step(self, carry, inputs, recurrent_mask):
      return jnp.concatenate([carry, carry], -1), carry

  with pytest.raises(ValueError, match=r'WrongWidth.step: `new_carry` expected leaf shapes that '
                                       r'broadcast with \[\(2, 4\)\], got \[\(2, 8\)\]'):
    WrongWidth()(jnp.zeros((2, 4)), jnp.ones((2, 3)))

  class OnlyCarry(WrongWidth):
    def step(self, carry, inputs, recurrent_mask):
      return carry

  with pytest.raises(TypeError, match=r'OnlyCarry.step: `return value` expected a pair '
                                      r'\(new_carry, output\), got ArrayImpl'):
    OnlyCarry()(jnp.zeros((2, 4)), jnp.ones((2, 3)))

  class ThreeValues(WrongWidth):  # a step that also returns the gates, say
    def step(self, carry, inputs, recurrent_mask):
      return carry, carry, inputs

  with pytest.raises(TypeError, match=r'ThreeValues.step: `return value` expected a pair '
                                      r'\(new_carry, output\), got tuple of length 3'):
    ThreeValues()(jnp.zeros((2, 4)), jnp.ones((2, 3)))


@pytest.mark.parametrize('value, error', [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_num_carry_arrays_is_checked_when_the_class_is_made(value, error):
  with pytest.raises(error, match=rf'Cell: `num_carry_arrays` expected a positive int, '
                                  rf'got {value!r}'):
    type('Cell', (nr.RNNCellBase,), {'num_carry_arrays': value})


def test_forgotten_base_constructor_is_named_by_every_entry_point():
  class NoSuper(nr.RNNCellBase):
    def __init__(self):
      self.w = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    def step(self, carry, inputs, recurrent_mask):
      return carry, carry

  message = (r'NoSuper: the cell has no `hidden_features`; its constructor must call '
             r'super\(\).__init__\(in_features, hidden_features, rngs=rngs, ...\)')
  with pytest.raises(TypeError, match=message):
    nr.RNN(NoSuper())(jnp.ones((2, 5, 3)))
  with pytest.raises(TypeError, match=message):
    NoSuper().initialize_carry((2, 3))


def test_cell_with_two_feature_axes_keeps_them_in_its_carry():
  class PerPosition(nr.RNNCellBase):  # a dense step at each of the positions
    def __init__(self):
      super().__init__(3, 4, rngs=nnx.Rngs(0))
      self.w = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    @property
    def num_feature_axes(self):
      return 2

    def step(self, carry, inputs, recurrent_mask):
      new_h = jnp.tanh(self.w(inputs) + carry)
      return new_h, new_h

  cell = PerPosition()
  assert cell.initialize_carry((2, 5, 3)).shape == (2, 5, 4)
  x = np.asarray(ref.normal((2, 6, 5, 3), seed=3), np.float64)
  y = nnx.jit(lambda cell: nr.RNN(cell)(jnp.asarray(x, jnp.float32),
                                        seq_lengths=jnp.array([6, 2])))(cell)
  w, b = (np.asarray(v[...], np.float64) for v in (cell.w.kernel, cell.w.bias))
  h = np.zeros((2, 5, 4))
  for t in range(2):
    h = np.tanh(x[:, t] @ w + b + h)
  np.testing.assert_allclose(y[:, 1], h, atol=1e-5)


def test_rnn_reads_a_list_as_a_two_array_initial_carry():
  rnn = nr.RNN(nr.LSTMCell(3, 4, rngs=nnx.Rngs(0)))
  c, h = (ref.normal((2, 4), seed=s) for s in (1, 2))
  x = ref.normal((2, 5, 3), seed=3)
  np.testing.assert_array_equal(rnn(x, initial_carry=[c, h]), rnn(x, initial_carry=(c, h)))
