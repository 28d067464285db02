"""LayerNormLSTMCell, LayerNormGRUCell and ConvGRUCell (issue 15, items 2 and 3).

References: the cells' formulas written independently in NumPy float64
(tests/reference.py: ``layer_norm``, ``step_with_recurrent_mask``) through the
masked per-row RNN of the reference (each row run on its unpadded part), with
and without dropout masks; finite differences (``check_grads``) for the
gradients; the float32 cell for bfloat16 compute; and, for properties, the same
cell on scaled inputs (layer norm) or rolled inputs (circular padding).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import nnx_recurrent as nr
from tests import reference as ref

ATOL = RTOL = 1e-5
# Lengths for a (2, 3) batch with time 5: empty, one step, full, and between.
LENGTHS = np.array([[0, 1, 5], [3, 5, 2]], np.int32)
BATCH, TIME = LENGTHS.shape, 5

# name -> (factory(rngs, **kw) -> cell, features of one step)
CELLS = {
  'ln_lstm': (lambda r, **kw: nr.LayerNormLSTMCell(3, 4, **kw, rngs=r), (3,)),
  'ln_gru': (lambda r, **kw: nr.LayerNormGRUCell(3, 4, **kw, rngs=r), (3,)),
  'ln_lstm_plain': (lambda r, **kw: nr.LayerNormLSTMCell(
    3, 4, use_scale=False, use_bias=False, epsilon=1e-3, **kw, rngs=r), (3,)),
  'ln_gru_plain': (lambda r, **kw: nr.LayerNormGRUCell(
    3, 4, use_scale=False, use_bias=False, epsilon=1e-3, **kw, rngs=r), (3,)),
  'conv_gru_1d_s2': (lambda r, **kw: nr.ConvGRUCell(2, 3, (3,), strides=2, **kw, rngs=r),
                     (5, 2)),
  'conv_gru_2d': (lambda r, **kw: nr.ConvGRUCell(2, 3, (3, 3), **kw, rngs=r), (4, 5, 2)),
  'conv_gru_3d_s2_no_bias': (lambda r, **kw: nr.ConvGRUCell(
    2, 2, (2, 3, 2), strides=(1, 2, 2), use_bias=False, **kw, rngs=r), (3, 4, 5, 2)),
  # The factored ConvLSTMCell, for the options it gained here (zoneout).
  'conv_lstm_1d_s2': (lambda r, **kw: nr.ConvLSTMCell(2, 3, (3,), strides=2, **kw, rngs=r),
                      (5, 2)),
}


def _make(name, seed=0, **kw):
  """A cell of :data:`CELLS` with random parameters (biases and scales included)."""
  factory, features = CELLS[name]
  cell = ref.build(lambda: factory(nnx.Rngs(seed), **kw), seed + 100)
  # Built abstractly (no initializer compiles): a dropout stream needs concrete values.
  stream = nnx.state(cell, nnx.RngState)
  nnx.update(cell, jax.tree_util.tree_map(
    lambda a: jax.random.key(seed) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    else jnp.zeros(a.shape, a.dtype), stream))
  return cell, features


def _close(got, want, atol=ATOL, rtol=RTOL):
  g_leaves, w_leaves = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  assert len(g_leaves) == len(w_leaves)
  for g, w in zip(g_leaves, w_leaves):
    assert tuple(g.shape) == tuple(w.shape)
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w, np.float64),
                               atol=atol, rtol=rtol)


@nnx.jit
def _run(module, x, initial_carry, seq_lengths):
  return module(x, initial_carry=initial_carry, seq_lengths=seq_lengths, return_carry=True)


# -- the formulas, through nr.RNN ----------------------------------------------------
@pytest.mark.parametrize('name, reverse', [
  ('ln_lstm', False), ('ln_gru', True), ('ln_lstm_plain', True), ('ln_gru_plain', False),
  ('conv_gru_1d_s2', True), ('conv_gru_2d', False), ('conv_gru_3d_s2_no_bias', False),
])
def test_rnn_matches_numpy_reference(name, reverse):
  """Two batch axes, lengths 0 to 5, a random initial carry: every valid step
  against the NumPy formula run row by row on the unpadded part, padding zero."""
  cell, features = _make(name)
  x = ref.normal((*BATCH, TIME, *features), seed=2)
  carry0 = ref.random_carry(cell, (*BATCH, *features))
  rnn = nr.RNN(cell, reverse=reverse, keep_order=reverse)
  carry, y = _run(rnn, x, carry0, jnp.asarray(LENGTHS))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, LENGTHS, carry0, num_batch_dims=2,
                             reverse=reverse, keep_order=reverse)
  _close(y, y_ref)
  _close(carry, carry_ref)
  assert np.abs(y_ref).max() > 0.1


def test_masked_rows_equal_unpadded_runs():
  """The module itself on one row's unpadded part gives that row's outputs and carry."""
  cell, _ = _make('ln_gru')
  x = np.asarray(ref.normal((2, TIME, 3), seed=3))  # sliced on the host
  rnn = nr.RNN(cell)
  carry, y = (np.asarray(a) for a in _run(rnn, x, None, jnp.array([TIME, 2])))
  carry_1, y_1 = _run(rnn, x[1:, :2], None, None)
  _close(y[1:, :2], y_1, atol=1e-6, rtol=1e-6)
  _close(carry[1:], carry_1, atol=1e-6, rtol=1e-6)
  assert not y[1, 2:].any()


def test_bidirectional_and_stacked_layer_norm_cells():
  lengths = np.array([5, 0, 3], np.int32)

  def make():
    rngs = nnx.Rngs(0)
    return nr.StackedRNN(
      nr.Bidirectional(nr.RNN(nr.LayerNormLSTMCell(3, 4, rngs=rngs)),
                       nr.RNN(nr.LayerNormGRUCell(3, 4, rngs=rngs))),
      nr.RNN(nr.LayerNormGRUCell(8, 4, rngs=rngs)))

  stack = ref.build(make, seed=7)
  x = ref.normal((3, TIME, 3), seed=4)
  (c_bi, c_top), y = _run(stack, x, None, jnp.asarray(lengths))
  bi, top = stack.layers
  fwd, bwd = bi.forward_rnn.cell, bi.backward_rnn.cell
  c_f, y_f = ref.rnn(ref.cell_params(fwd), x, lengths, fwd.initialize_carry((3, 3)),
                     num_batch_dims=1)
  c_b, y_b = ref.rnn(ref.cell_params(bwd), x, lengths, bwd.initialize_carry((3, 3)),
                     num_batch_dims=1, reverse=True, keep_order=True)
  y1 = np.concatenate([y_f, y_b], axis=-1)
  c_t, y_t = ref.rnn(ref.cell_params(top.cell), y1, lengths,
                     top.cell.initialize_carry((3, 8)), num_batch_dims=1)
  _close(y, y_t)
  _close((c_bi, c_top), ((c_f, c_b), c_t))


def test_bidirectional_and_stacked_conv_gru():
  lengths = np.array([4, 1], np.int32)

  def make():
    rngs = nnx.Rngs(0)
    conv = lambda i: nr.RNN(nr.ConvGRUCell(i, 3, (3,), padding='CIRCULAR', rngs=rngs))  # noqa: E731
    return nr.StackedRNN(nr.Bidirectional(conv(2), conv(2)), conv(6))

  stack = ref.build(make, seed=8)
  x = ref.normal((2, 4, 6, 2), seed=5)
  # The NumPy convolution is 'SAME' only; circular padding is the same
  # convolution of the signal tiled three times, cropped to the middle.
  tile = lambda a: np.concatenate([a, a, a], axis=-2)  # noqa: E731
  crop = lambda a: a[..., 6:12, :]  # noqa: E731
  (c_bi, c_top), y = _run(stack, x, None, jnp.asarray(lengths))
  bi, top = stack.layers
  zeros = np.zeros((2, 18, 3))
  c_f, y_f = ref.rnn(ref.cell_params(bi.forward_rnn.cell), tile(x), lengths, zeros,
                     num_batch_dims=1)
  c_b, y_b = ref.rnn(ref.cell_params(bi.backward_rnn.cell), tile(x), lengths, zeros,
                     num_batch_dims=1, reverse=True, keep_order=True)
  c_t, y_t = ref.rnn(ref.cell_params(top.cell), np.concatenate([y_f, y_b], axis=-1), lengths,
                     zeros, num_batch_dims=1)
  _close(y, crop(y_t))
  _close((c_bi, c_top), ((crop(c_f), crop(c_b)), crop(c_t)))


@pytest.mark.parametrize('name', ['ln_lstm', 'ln_gru', 'conv_gru_1d_s2'])
def test_gate_and_activation_functions_are_the_ones_given(name):
  """``gate_fn=hard_sigmoid``, ``activation_fn=soft_sign``: one step against the NumPy formula
  with the same functions (written in NumPy)."""
  cell, features = _make(name, gate_fn=nnx.hard_sigmoid, activation_fn=nnx.soft_sign)
  x = ref.normal((2, *features), seed=17, scale=3.0)  # beyond hard_sigmoid's linear part
  carry = ref.random_carry(cell, (2, *features))
  new, y = nnx.jit(lambda cell, carry, x: cell(carry, x))(cell, carry, x)
  p = dict(ref.cell_params(cell), gate_fn=lambda v: np.clip(v + 3.0, 0.0, 6.0) / 6.0,
           activation_fn=lambda v: v / (1.0 + np.abs(v)))
  want, y_want = ref.step(p, jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), carry),
                          np.asarray(x))
  _close((new, y), (want, y_want))


# -- gradients -------------------------------------------------------------------------
def test_gradients_match_finite_differences():
  """One check (parameters and inputs) through nr.RNN with lengths, on the layer-normalized
  LSTM: the cells' code is plain JAX (no custom derivative), so one is representative."""
  graphdef, params, rest = nnx.split(nr.RNN(_make('ln_lstm')[0]), nnx.Param, ...)
  x = ref.normal((2, 3, 3), seed=6)
  lengths = jnp.array([3, 2])

  @jax.jit
  def f(params, x):
    return nnx.merge(graphdef, params, rest)(x, seq_lengths=lengths)

  check_grads(f, (params, x), order=1, modes=('rev',), atol=1e-2, rtol=1e-2, eps=1e-3)


# -- layer norm: the formula's choices and the scale of the inputs -----------------------
def _math_block(doc: str) -> list[str]:
  block = doc.split('.. math::', 1)[1].split(r'\end{array}', 1)[0]
  return [line.strip() for line in block.strip().splitlines()[1:]]


# The formulas step_with_recurrent_mask implements, as the docstrings write them.
MATH = {
  nr.LayerNormLSTMCell: [
    r'(i, f, g, o) = \mathrm{LN}(W_i x; \gamma_i) + \mathrm{LN}(W_h h; \gamma_h) + b \\',
    r"c' = \sigma(f) * c + \sigma(i) * \tanh(g) \\",
    r"h' = \sigma(o) * \tanh(\mathrm{LN}(c'; \gamma_c, \beta_c))",
  ],
  nr.LayerNormGRUCell: [
    r'(x_r, x_z, x_n) = \mathrm{LN}(W_i x; \gamma_i) + b_i \\',
    r'(h_r, h_z, h_n) = \mathrm{LN}(W_h h; \gamma_h) \\',
    r'r = \sigma(x_r + h_r) \\',
    r'z = \sigma(x_z + h_z) \\',
    r'n = \tanh(x_n + r * (h_n + b_{hn})) \\',
    r"h' = (1 - z) * n + z * h",
  ],
  nr.ConvGRUCell: [
    r'r = \sigma(W_{ir} \circledast x + b_{ir} + W_{hr} \circledast h + b_{hr}) \\',
    r'z = \sigma(W_{iz} \circledast x + b_{iz} + W_{hz} \circledast h + b_{hz}) \\',
    r'n = \tanh(W_{in} \circledast x + b_{in} + r * (W_{hn} \circledast h + b_{hn})) \\',
    r"h' = (1 - z) * n + z * h",
  ],
}


@pytest.mark.parametrize('cls', list(MATH))
def test_docstring_math_is_the_tested_formula(cls):
  assert _math_block(cls.__doc__) == MATH[cls]
  if cls is not nr.ConvGRUCell:
    doc = ' '.join(cls.__doc__.split())
    assert 'normalized over all their' in doc and 'units at once' in doc
    assert re.search(r'mean and \(biased\) variance of all :math:`m` units', doc)


def _per_gate_lstm(p, carry, x):
  """The rejected alternative: each gate's pre-activation normalized on its own."""
  c, h = carry
  norm = lambda v, g: np.concatenate([  # noqa: E731
    ref.layer_norm(part, gp, 0.0, p['eps'])
    for part, gp in zip(np.split(v, 4, axis=-1), np.split(g, 4))], axis=-1)
  pre = norm(x @ p['W_i'], p['g_i']) + norm(h @ p['W_h'], p['g_h']) + p['b']
  i, f, g, o = np.split(pre, 4, axis=-1)
  c = ref.sigmoid(f) * c + ref.sigmoid(i) * np.tanh(g)
  return c, ref.sigmoid(o) * np.tanh(ref.layer_norm(c, p['g_c'], p['b_c'], p['eps']))


def test_layer_norm_lstm_normalizes_all_gates_jointly():
  """The cell equals the joint formula and is far from the per-gate one."""
  cell, _ = _make('ln_lstm')
  x = ref.normal((2, 3), seed=9)
  carry = ref.random_carry(cell, (2, 3))
  (c, h), _ = nnx.jit(lambda cell, carry, x: cell(carry, x))(cell, carry, x)
  p = ref.cell_params(cell)
  carry_np = tuple(np.asarray(a, np.float64) for a in carry)
  (c_joint, h_joint), _ = ref.step(p, carry_np, np.asarray(x))
  _close((c, h), (c_joint, h_joint))
  c_gate, h_gate = _per_gate_lstm(p, carry_np, np.asarray(x, np.float64))
  assert np.abs(c_gate - c_joint).max() > 1e-2


def test_layer_norm_of_a_large_cell_state_with_a_small_spread():
  """Zero kernels and biases: every gate is sigmoid(0) = 1/2 and ``c' = c / 2``, here
  ``50 + 0.005 * noise``; its norm needs the two-pass variance (``E[c'^2] - mean^2``
  cancels in float32 at this mean: 2500 * 6e-8 >> the variance 2.5e-5)."""
  zeros = nnx.initializers.zeros_init()
  c = jnp.asarray(100.0 + 0.01 * np.asarray(ref.normal((2, 8), seed=11)), jnp.float32)
  carry, x = (c, jnp.zeros((2, 8))), ref.normal((2, 3), seed=12)

  @nnx.jit  # built (its own initializers) and stepped in one program
  def build_and_step():
    cell = nr.LayerNormLSTMCell(3, 8, kernel_init=zeros, recurrent_kernel_init=zeros,
                                rngs=nnx.Rngs(0))
    return cell, cell(carry, x)

  cell, ((new_c, h), _) = build_and_step()
  (c_ref, h_ref), _ = ref.step(ref.cell_params(cell), tuple(np.asarray(a, np.float64)
                                                           for a in carry), np.asarray(x))
  np.testing.assert_allclose(new_c, c_ref, rtol=1e-6)
  assert np.abs(h_ref).max() > 0.3  # the normalized spread reaches the output
  np.testing.assert_allclose(h, h_ref, atol=5e-3)


def test_default_epsilon_scales_and_biases_are_flax_layer_norms():
  """The defaults written out, not read from the cell: epsilon 1e-6 (nnx.LayerNorm's), unit
  scales, zero biases. Inputs of 1e-3 give ``W_i x`` a variance near epsilon, so it shows."""
  carry = (ref.normal((2, 4), seed=15), ref.normal((2, 4), seed=16))
  x = ref.normal((2, 3), seed=14, scale=1e-3)
  w_i, w_h = ref.normal((3, 16), seed=19), ref.normal((4, 16), seed=20, scale=0.5)
  given = lambda w: lambda key, shape, dtype: w  # noqa: E731  (no initializer to compile)
  cell = nr.LayerNormLSTMCell(3, 4, kernel_init=given(w_i), recurrent_kernel_init=given(w_h),
                              rngs=nnx.Rngs(0))
  new_carry, _ = nnx.jit(lambda cell: cell(carry, x))(cell)
  ones, zeros = np.ones, np.zeros
  p = dict(kind='lnlstm', eps=1e-6, W_i=np.asarray(w_i, np.float64),
           W_h=np.asarray(w_h, np.float64), g_i=ones(16), g_h=ones(16), b=zeros(16),
           g_c=ones(4), b_c=zeros(4))
  carry_np = tuple(np.asarray(a, np.float64) for a in carry)
  want, _ = ref.step(p, carry_np, np.asarray(x))
  _close(new_carry, want)
  other_eps, _ = ref.step(dict(p, eps=1e-5), carry_np, np.asarray(x))
  assert np.abs(other_eps[1] - want[1]).max() > 1e-2


def _promote_through_bfloat16(arrays, dtype=None, **kwargs):
  return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in arrays)


def test_dtype_and_promote_dtype_reach_the_dense_layers_and_the_norms():
  """``dtype=bfloat16``, and a promote_dtype that rounds through bfloat16. Reference: flax's
  nnx.Linear and nnx.LayerNorm given the same option, on the cell's parameters, and the GRU
  formula (the biases added in the norms' output dtype, as the cell documents)."""
  h, x = ref.normal((2, 4), seed=17), ref.normal((2, 3), seed=18)
  cases = []
  for kw in (dict(dtype=jnp.bfloat16), dict(promote_dtype=_promote_through_bfloat16)):
    cell, _ = _make('ln_gru', **kw)
    layers = {  # built without initializers; the cell's parameters below
      'dense_i': lambda kw=kw: nnx.Linear(3, 12, use_bias=False, **kw, rngs=nnx.Rngs(0)),
      'dense_h': lambda kw=kw: nnx.Linear(4, 12, use_bias=False, **kw, rngs=nnx.Rngs(0)),
      'ln_i': lambda kw=kw: nnx.LayerNorm(12, use_bias=False, use_fast_variance=False, **kw,
                                          rngs=nnx.Rngs(0)),
      'ln_h': lambda kw=kw: nnx.LayerNorm(12, use_bias=False, use_fast_variance=False, **kw,
                                          rngs=nnx.Rngs(0))}
    layers = {name: nnx.eval_shape(make) for name, make in layers.items()}
    for name, layer in layers.items():
      nnx.update(layer, nnx.state(getattr(cell, name), nnx.Param))
    cases.append((cell, layers))

  @nnx.jit  # both cases in one program
  def steps(cases):
    out = []
    for cell, f in cases:
      xs = f['ln_i'](f['dense_i'](x))
      xr, xz, xn = jnp.split(xs + cell.bias[...].astype(xs.dtype)[None], 3, axis=-1)
      hr, hz, hn = jnp.split(f['ln_h'](f['dense_h'](h)), 3, axis=-1)
      r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
      hn = hn + cell.bias_hn[...].astype(hn.dtype)[None]
      out.append((cell(h, x)[1], (1 - z) * jnp.tanh(xn + r * hn) + z * h))
    return out

  for (cell, _), (got, want) in zip(cases, steps(cases)):
    _close(got, want, atol=1e-6, rtol=0)
    in_float64, _ = ref.step(ref.cell_params(cell), np.asarray(h, np.float64), np.asarray(x))
    assert np.abs(np.asarray(got, np.float64) - in_float64).max() > 1e-3  # bfloat16 mattered


@pytest.mark.parametrize('name', ['ln_lstm', 'ln_gru'])
def test_outputs_do_not_depend_on_the_scale_of_the_inputs(name):
  """With ``epsilon=1e-10`` (``a² var(W_i x) >> epsilon`` for these inputs and scales), inputs
  scaled by 100 and by 0.01 give the same outputs and carries, through nr.RNN with lengths."""
  cell, features = _make(name, epsilon=1e-10)
  x = ref.normal((3, TIME, *features), seed=10)
  lengths = jnp.array([5, 3, 1])
  carry0 = ref.random_carry(cell, (3, *features))
  rnn = nr.RNN(cell)
  carry, y = _run(rnn, x, carry0, lengths)
  x = np.asarray(x)  # scaled on the host
  for scale in (100.0, 0.01):
    carry_s, y_s = _run(rnn, (x * scale).astype(np.float32), carry0, lengths)
    _close(y_s, y, atol=1e-4, rtol=1e-4)
    _close(carry_s, carry, atol=1e-4, rtol=1e-4)
  # A negative scale flips LN(W_i x): the outputs change (the check has teeth).
  _, y_neg = _run(rnn, -x, carry0, lengths)
  assert np.abs(np.asarray(y_neg) - np.asarray(y)).max() > 1e-2


# -- ConvGRU: circular padding is translation-equivariant ----------------------------------
@pytest.mark.parametrize('kernel_size, strides, spatial, shift, out_shift', [
  ((3, 3), 1, (5, 6), (1, 2), (1, 2)),  # stride 1: a shift of the input shifts the state
  ((3,), 2, (8,), (2,), (1,)),  # stride 2: a shift by 2 shifts the state by 1
])
def test_conv_gru_circular_padding_is_translation_equivariant(kernel_size, strides, spatial,
                                                              shift, out_shift):
  cell = ref.build(lambda: nr.ConvGRUCell(2, 3, kernel_size, strides=strides,
                                          padding='CIRCULAR', rngs=nnx.Rngs(0)), 11)
  x = np.asarray(ref.normal((2, TIME, *spatial, 2), seed=12))  # rolled on the host
  lengths = jnp.array([TIME, 3])
  rnn = nr.RNN(cell)
  axes = tuple(range(2, 2 + len(spatial)))
  carry, y = (np.asarray(a) for a in _run(rnn, x, None, lengths))
  carry_r, y_r = _run(rnn, np.roll(x, shift, axes), None, lengths)
  _close(y_r, np.roll(y, out_shift, axes), atol=1e-6, rtol=1e-6)
  _close(carry_r, np.roll(carry, out_shift, tuple(a - 1 for a in axes)), atol=1e-6, rtol=1e-6)
  if strides == 1:  # zero padding ('SAME') breaks it: the state differs near the border
    same = nr.RNN(ref.build(lambda: nr.ConvGRUCell(2, 3, kernel_size, rngs=nnx.Rngs(0)), 11))
    _, y_s = _run(same, x, None, lengths)
    _, y_sr = _run(same, np.roll(x, shift, axes), None, lengths)
    assert np.abs(np.asarray(y_sr) - np.roll(np.asarray(y_s), out_shift, axes)).max() > 1e-2
  else:  # a shift by less than the stride is no shift of the state
    _, y_1 = _run(rnn, np.roll(x, 1, axes), None, lengths)
    assert np.abs(np.asarray(y_1) - y).max() > 1e-2


# -- bfloat16 compute ----------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ln_lstm', 'ln_gru', 'conv_gru_1d_s2'])
def test_bfloat16_compute_is_close_to_the_reference(name):
  """``dtype=bfloat16`` (float32 parameters and carry): the NumPy formula at bfloat16's
  tolerance, and not the float32 result (the compute really is in bfloat16)."""
  cell, features = _make(name, dtype=jnp.bfloat16)
  x = ref.normal((2, TIME, *features), seed=13)
  lengths = np.array([5, 2])
  carry, y = _run(nr.RNN(cell), x, None, jnp.asarray(lengths))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(carry))
  carry_ref, y_ref = ref.rnn(ref.cell_params(cell), x, lengths,
                             cell.initialize_carry((2, *features)), num_batch_dims=1)
  _close(y, y_ref, atol=5e-2, rtol=5e-2)
  _close(carry, carry_ref, atol=5e-2, rtol=5e-2)
  assert np.abs(y_ref).max() > 0.1
  assert np.abs(np.asarray(y, np.float64) - y_ref).max() > 1e-4


# -- variational dropout -------------------------------------------------------------------
@pytest.mark.parametrize('name', ['ln_lstm', 'ln_gru', 'conv_gru_1d_s2'])
def test_dropout_masks_match_numpy_given_the_masks(name):
  """Training mode through nr.RNN: the NumPy formula with the same masks (input mask on x,
  recurrent mask on the h entering W_h only); evaluation mode: the formula without."""
  cell, features = _make(name, dropout_rate=0.3, recurrent_dropout_rate=0.4)
  x = ref.normal((3, TIME, *features), seed=14)

  @nnx.jit
  def run_and_masks(rnn, x, key):  # a key at call time sets the masks
    return rnn(x, rngs=key), rnn.cell.dropout_masks(x[:, 0].shape, key)

  y, masks = run_and_masks(nr.RNN(cell), x, jax.random.key(7))
  mi, mh = (np.asarray(m, np.float64) for m in masks)
  assert (mi == 0).any() and (mh == 0).any()
  p = ref.cell_params(cell)
  carry = jax.tree_util.tree_map(lambda a: np.zeros(a.shape),
                                 cell.initialize_carry(x[:, 0].shape))
  for t in range(TIME):
    carry, y_ref = ref.step_with_recurrent_mask(p, carry, np.asarray(x[:, t]) * mi, mh)
    np.testing.assert_allclose(y[:, t], y_ref, atol=2e-5)
  if name == 'ln_gru':  # the rest is the base class's, shared by every cell
    cell.eval()
    _, y_eval = _run(nr.RNN(cell), x, None, None)
    _, y_ref = ref.rnn(p, x, None, cell.initialize_carry(x[:, 0].shape), num_batch_dims=1)
    _close(y_eval, y_ref)


# -- zoneout (the base class's, through the cells' options) --------------------------------
@pytest.mark.parametrize('name', ['ln_lstm', 'conv_gru_1d_s2'])
def test_zoneout_against_the_formula(name):
  """Training: each carry unit is its old value or the formula's new one (both occur);
  the output is the new ``h``. Evaluation: ``rate * old + (1 - rate) * new``."""
  rate = 0.4
  cell, features = _make(name, zoneout_rate=rate)
  x = ref.normal((3, *features), seed=16)
  carry = ref.random_carry(cell, (3, *features))
  step = nnx.jit(lambda cell, carry, x: cell(carry, x))
  new, y = step(cell, carry, x)
  old = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), carry)
  want, y_want = ref.step(ref.cell_params(cell), old, np.asarray(x))
  _close(y, y_want)
  for o, n, w in zip(*(jax.tree_util.tree_leaves(t) for t in (old, new, want))):
    kept, fresh = np.isclose(n, o, atol=1e-6), np.isclose(n, w, atol=1e-5)
    assert (kept | fresh).all() and kept.any() and fresh.any()
  cell.eval()
  new, _ = step(cell, carry, x)
  _close(new, jax.tree_util.tree_map(lambda o, w: rate * o + (1 - rate) * w, old, want))


@pytest.mark.parametrize('name', ['ln_gru', 'conv_lstm_1d_s2'])
def test_zoneout_option_reaches_the_base_class(name):
  cell = nnx.eval_shape(lambda: CELLS[name][0](nnx.Rngs(0), zoneout_rate=0.25))
  assert cell.zoneout_rate == 0.25 and cell.rngs is not None
  with pytest.raises(ValueError, match=r'`zoneout_rate` expected a float in \[0, 1\), got 1\.0'):
    CELLS[name][0](nnx.Rngs(0), zoneout_rate=1.0)


# -- parameters ----------------------------------------------------------------------------
ZEROS = dict(kernel_init=nnx.initializers.zeros, recurrent_kernel_init=nnx.initializers.zeros)


def _param_shapes(module):
  return {'/'.join(map(str, path)): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


@pytest.mark.parametrize('make, expected', [
  (lambda r: nr.LayerNormLSTMCell(3, 4, rngs=r),
   {'dense_i/kernel': (3, 16), 'dense_h/kernel': (4, 16), 'ln_i/scale': (16,),
    'ln_h/scale': (16,), 'bias': (16,), 'ln_c/scale': (4,), 'ln_c/bias': (4,)}),
  (lambda r: nr.LayerNormLSTMCell(3, 4, use_scale=False, use_bias=False, rngs=r),
   {'dense_i/kernel': (3, 16), 'dense_h/kernel': (4, 16)}),
  (lambda r: nr.LayerNormGRUCell(3, 4, rngs=r),
   {'dense_i/kernel': (3, 12), 'dense_h/kernel': (4, 12), 'ln_i/scale': (12,),
    'ln_h/scale': (12,), 'bias': (12,), 'bias_hn': (4,)}),
  (lambda r: nr.LayerNormGRUCell(3, 4, use_bias=False, rngs=r),
   {'dense_i/kernel': (3, 12), 'dense_h/kernel': (4, 12), 'ln_i/scale': (12,),
    'ln_h/scale': (12,)}),
  (lambda r: nr.ConvGRUCell(2, 5, (3, 2), rngs=r),
   {'ih/kernel': (3, 2, 2, 15), 'ih/bias': (15,), 'hh/kernel': (3, 2, 5, 15),
    'hh/bias': (15,)}),
  (lambda r: nr.ConvGRUCell(2, 5, (3,), use_bias=False, rngs=r),
   {'ih/kernel': (3, 2, 15), 'hh/kernel': (3, 5, 15)}),
])
def test_parameter_layout(make, expected):
  assert _param_shapes(nnx.eval_shape(lambda: make(nnx.Rngs(0)))) == expected


def _tags(module) -> dict:
  """The ``'tag'`` metadata of each of ``module``'s parameters, by path."""
  return {path: v.get_metadata().get('tag')
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_initializers_dtypes_and_metadata_reach_their_parameters():
  cell = nnx.eval_shape(lambda: nr.LayerNormGRUCell(
    3, 4, param_dtype=jnp.bfloat16, kernel_metadata={'tag': 'k'},
    recurrent_kernel_metadata={'tag': 'rk'}, bias_metadata={'tag': 'b'},
    scale_metadata={'tag': 's'}, rngs=nnx.Rngs(0)))
  assert _tags(cell) == {('dense_i', 'kernel'): 'k', ('dense_h', 'kernel'): 'rk', ('bias',): 'b',
                  ('bias_hn',): 'b', ('ln_i', 'scale'): 's', ('ln_h', 'scale'): 's'}
  lstm_tags = _tags(nnx.eval_shape(lambda: nr.LayerNormLSTMCell(
    3, 4, bias_metadata={'tag': 'b'}, scale_metadata={'tag': 's'}, rngs=nnx.Rngs(0))))
  assert lstm_tags[('ln_c', 'scale')] == 's' and lstm_tags[('ln_c', 'bias')] == 'b'
  assert {v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(cell, nnx.Param))} == {
    jnp.dtype(jnp.bfloat16)}
  init = nnx.initializers.constant(0.25)
  lstm = nr.LayerNormLSTMCell(3, 4, bias_init=init, scale_init=nnx.initializers.constant(2.0),
                              kernel_init=nnx.initializers.constant(0.5),
                              recurrent_kernel_init=init, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(lstm.bias[...], 0.25)
  for ln in (lstm.ln_i, lstm.ln_h, lstm.ln_c):
    np.testing.assert_array_equal(ln.scale[...], 2.0)
  np.testing.assert_array_equal(lstm.ln_c.bias[...], 0.0)
  np.testing.assert_array_equal(lstm.dense_i.kernel[...], 0.5)
  np.testing.assert_array_equal(lstm.dense_h.kernel[...], 0.25)
  conv = nr.ConvGRUCell(2, 3, (3,), kernel_init=nnx.initializers.constant(0.5), bias_init=init,
                        recurrent_kernel_init=init, param_dtype=jnp.bfloat16,
                        kernel_metadata={'tag': 'k'}, recurrent_kernel_metadata={'tag': 'rk'},
                        bias_metadata={'tag': 'b'}, rngs=nnx.Rngs(0))
  for v, want in ((conv.ih.kernel, 0.5), (conv.hh.kernel, 0.25), (conv.ih.bias, 0.25),
                  (conv.hh.bias, 0.25)):
    assert v[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(v[...], np.float32), want)
  assert _tags(conv) == {
    ('ih', 'kernel'): 'k', ('hh', 'kernel'): 'rk', ('ih', 'bias'): 'b', ('hh', 'bias'): 'b'}
  assert conv.initialize_carry((2, 5, 2)).dtype == jnp.bfloat16


def test_no_prng_state_without_dropout_and_carry_options():
  for make in (lambda r: nr.LayerNormLSTMCell(3, 4, rngs=r),
               lambda r: nr.ConvGRUCell(2, 3, (3,), rngs=r)):
    cell = nnx.eval_shape(lambda make=make: make(nnx.Rngs(0)))
    assert not nnx.to_flat_state(nnx.state(cell, nnx.RngState))
  # flax.nnx's construction-time carry_init and keep_rngs: warned about, and working.
  with pytest.warns(UserWarning) as record:
    cell = nr.LayerNormGRUCell(3, 4, carry_init=nnx.initializers.ones, keep_rngs=True,
                               **ZEROS, rngs=nnx.Rngs(0))
  messages = [str(w.message) for w in record]
  assert any(m.startswith('carry_init is provided in __init__') for m in messages)
  assert any(m.startswith('keep_rngs argument is deprecated') for m in messages)
  np.testing.assert_array_equal(cell.initialize_carry((2, 3)), 1.0)


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize('make, exc, match', [
  (lambda: nr.LayerNormLSTMCell(3, 4, epsilon=0.0, rngs=nnx.Rngs(0)), ValueError,
   r'LayerNormLSTMCell: `epsilon` expected a positive float, got 0\.0\.'),
  (lambda: nr.LayerNormGRUCell(3, 4, epsilon='small', rngs=nnx.Rngs(0)), TypeError,
   r"LayerNormGRUCell: `epsilon` expected a positive float, got 'small'\."),
  (lambda: nr.LayerNormGRUCell(3, 0, rngs=nnx.Rngs(0)), ValueError,
   r'LayerNormGRUCell: `hidden_features` expected a positive int, got 0\.'),
  (lambda: nr.LayerNormLSTMCell(3.0, 4, rngs=nnx.Rngs(0)), TypeError,
   r'LayerNormLSTMCell: `in_features` expected a positive int, got 3\.0\.'),
  (lambda: nr.LayerNormLSTMCell(3, 4, recurrent_dropout_rate=1.0, rngs=nnx.Rngs(0)),
   ValueError, r'LayerNormLSTMCell: `recurrent_dropout_rate` expected a float in \[0, 1\)'),
  (lambda: nr.LayerNormGRUCell(3, 4, rngs=None), TypeError,
   r'LayerNormGRUCell: `rngs` expected an nnx.Rngs, got NoneType\.'),
  (lambda: nr.ConvGRUCell(2, 3, 3, rngs=nnx.Rngs(0)), TypeError,
   r'ConvGRUCell: `kernel_size` expected a sequence of 1 to 3 ints \(one per spatial axis\), '
   r'got 3\.'),
  (lambda: nr.ConvGRUCell(2, 3, (3, 3, 3, 3), rngs=nnx.Rngs(0)), ValueError,
   r'ConvGRUCell: `kernel_size` expected a sequence of 1 to 3 ints, got \(3, 3, 3, 3\)\.'),
  (lambda: nr.ConvGRUCell(2, 3, (3, 0), rngs=nnx.Rngs(0)), ValueError,
   r'ConvGRUCell: `kernel_size` expected a positive int, got 0\.'),
  (lambda: nr.ConvGRUCell(2, 3, (3, 3), strides=(1, 2, 1), rngs=nnx.Rngs(0)), ValueError,
   r'ConvGRUCell: `strides` expected 2 ints \(one per kernel axis\), got \(1, 2, 1\)\.'),
  (lambda: nr.ConvGRUCell(2, 3, (3,), strides=(0,), rngs=nnx.Rngs(0)), ValueError,
   r'ConvGRUCell: `strides` expected a positive int, got 0\.'),
])
def test_constructor_errors(make, exc, match):
  with pytest.raises(exc, match=match):
    make()


def test_input_shape_errors():
  cell, _ = _make('ln_gru')
  with pytest.raises(ValueError, match=r"LayerNormGRUCell: `inputs` expected last axis of size "
                     r"3 \(the cell's in_features\), got shape \(2, 5\)\."):
    cell(cell.initialize_carry((2, 3)), jnp.ones((2, 5)))
  conv, _ = _make('conv_gru_2d')
  with pytest.raises(ValueError, match=r'ConvGRUCell.initialize_carry: `input_shape` expected '
                     r'at least 3 feature axes, got shape \(4, 2\)\.'):
    conv.initialize_carry((4, 2))
