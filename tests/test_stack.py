"""``StackedRNN``: equal to composing its layers by hand, and to the NumPy formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference
from tests.random_params import ZERO_INIT as _Z
from tests.random_params import random_module
from tests.random_params import randomize_params as _randomize

ATOL = 2e-5
B, T, IN, H = 3, 6, 4, 5
LENGTHS = np.array([6, 0, 3])
IDS = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3], [0, 4, 0, 5, 5, 6]], np.int32)


def _stack(time_major=False):
  def make():
    rngs = nnx.Rngs(0)
    bi = nr.Bidirectional(nr.RNN(nr.LSTMCell(IN, H, rngs=rngs)),
                          nr.RNN(nr.GRUCell(IN, H, rngs=rngs)))
    top = nr.RNN(nr.GRUCell(2 * H, H, rngs=rngs), time_major=time_major)
    return nr.StackedRNN(bi, top, time_major=time_major)

  return random_module(make)  # random parameters, no initializer run


def _x(seed=1):
  return np.random.default_rng(seed).normal(size=(B, T, IN)).astype(np.float32)


@pytest.mark.parametrize('mask', ['none', 'seq_lengths', 'segment_ids'])
def test_equals_manual_composition(mask):
  stack = _stack()
  x = _x()
  kw = {'none': {}, 'seq_lengths': dict(seq_lengths=LENGTHS),
        'segment_ids': dict(segment_ids=IDS)}[mask]
  rng = np.random.default_rng(3)
  c_top = rng.normal(size=(B, H)).astype(np.float32)

  @nnx.jit
  def both(stack, x, c_top):
    got = stack(x, initial_carry=(None, c_top), return_carry=True, **kw)
    bi, top = stack.layers
    c1, y1 = bi(x, return_carry=True, **kw)
    c2, y2 = top(y1, initial_carry=c_top, return_carry=True, **kw)
    return got, ((c1, c2), y2)

  got, want = both(stack, x, c_top)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, atol=ATOL)
  (c_bi, _), ys = got
  assert len(got[0]) == 2 and len(c_bi) == 2  # one carry per layer, a pair for Bidirectional
  if mask == 'seq_lengths':
    np.testing.assert_array_equal(np.asarray(ys)[np.arange(T)[None] >= LENGTHS[:, None]], 0)
  if mask == 'segment_ids':
    np.testing.assert_array_equal(np.asarray(ys)[IDS == 0], 0)


def test_numpy_reference_two_layers_time_major():
  # Only the first layer is time major: the stack takes its time_major from the
  # first layer and passes it to every layer; a call's time_major overrides it.
  stack = random_module(lambda: nr.StackedRNN(
    nr.RNN(nr.SimpleCell(IN, H, rngs=nnx.Rngs(0)), time_major=True),
    nr.RNN(nr.MGUCell(H, H, rngs=nnx.Rngs(1))),
  ))
  assert stack.time_major  # taken from the first layer
  x = _x()
  ((c1, c2), ys), batch_major = nnx.jit(lambda stack: (
    stack(np.swapaxes(x, 0, 1), seq_lengths=LENGTHS, return_carry=True),
    stack(x, seq_lengths=LENGTHS, time_major=False)))(stack)
  p1, p2 = (reference.cell_params(layer.cell) for layer in stack.layers)
  zeros = np.zeros((B, H))
  r1, y1 = reference.rnn(p1, x, LENGTHS, zeros, num_batch_dims=1)
  r2, y2 = reference.rnn(p2, y1, LENGTHS, zeros, num_batch_dims=1)
  np.testing.assert_allclose(np.swapaxes(ys, 0, 1), y2, atol=ATOL)
  np.testing.assert_allclose(batch_major, y2, atol=ATOL)
  np.testing.assert_allclose(c1, r1, atol=ATOL)
  np.testing.assert_allclose(c2, r2, atol=ATOL)


def test_dropout_between_layers_only():
  # Identity layers (h = W_i x, W_i = I, W_h = 0): the output is the input after
  # the between-layer dropout: 0 or 1 / (1 - 0.25) per element.
  ident = dict(activation_fn=lambda a: a, **_Z)
  rngs = nnx.Rngs(0)
  layers = [nr.RNN(nr.SimpleCell(H, H, **ident, rngs=rngs)) for _ in range(2)]
  for layer in layers:
    layer.cell.dense_i.kernel[...] = jnp.eye(H)
  stack = nr.StackedRNN(*layers, dropout_rate=0.25, rngs=nnx.Rngs(dropout=1))
  x = jnp.ones((8, T, H))
  lengths = np.array([T] * 7 + [2])
  # Under nnx.jit, which carries the streams' updates out: a repeated call is
  # the same program.
  masked = nnx.jit(lambda stack: stack(x, seq_lengths=lengths))
  plain = nnx.jit(lambda stack, rngs=None: stack(x, rngs=rngs))
  y = np.asarray(masked(stack))
  np.testing.assert_allclose(np.unique(y[:7]), [0, 1 / 0.75], rtol=1e-6)
  assert 0.15 < (y[:7] == 0).mean() < 0.35  # a quarter dropped
  assert len({tuple(y[0, t]) for t in range(T)}) > 1  # plain dropout: a new mask every step
  np.testing.assert_array_equal(y[7, 2:], 0)  # padding stays zero
  assert not np.array_equal(y, np.asarray(masked(stack)))
  # One layer: nothing after the last layer, so no RNG is needed in training.
  np.testing.assert_array_equal(plain(nr.StackedRNN(layers[0], dropout_rate=0.5)), x)
  # Evaluation: the plain composition; a key at call time is reproducible.
  k = jax.random.key(0)
  np.testing.assert_array_equal(plain(stack, k), plain(stack, k))
  stack.eval()
  np.testing.assert_array_equal(plain(stack), x)


@pytest.mark.parametrize('conv', [False, True])
def test_dropout_between_layers_ignores_padding_after_and_the_layout(conv):
  # One key, the same valid steps: padded steps appended, time_major, or the
  # batch as two axes do not change the between-layer dropout mask of a valid
  # step (as with the fused layers, which draw it time first).
  rngs = nnx.Rngs(0, dropout=1)
  if conv:  # outputs with a spatial axis: (batch, time, 3, features)
    layers = [nr.RNN(nr.ConvGRUCell(2, 2, (2,), rngs=rngs)) for _ in range(2)]
    feat = (3, 2)
  else:
    layers = [nr.RNN(nr.GRUCell(IN, H, rngs=rngs)), nr.RNN(nr.GRUCell(H, H, rngs=rngs))]
    feat = (IN,)
  stack = nr.StackedRNN(*layers, dropout_rate=0.5, rngs=rngs)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, T, *feat)), jnp.float32)
  lengths = jnp.array([6, 2, 5, 0])
  key = jax.random.key(3)
  y = stack(x, seq_lengths=lengths, rngs=key)
  padded = jnp.concatenate([x, jnp.ones((4, 3, *feat))], axis=1)
  np.testing.assert_array_equal(stack(padded, seq_lengths=lengths, rngs=key)[:, :T], y)
  y_tm = stack(jnp.swapaxes(x, 0, 1), seq_lengths=lengths, rngs=key, time_major=True)
  np.testing.assert_array_equal(jnp.swapaxes(y_tm, 0, 1), y)
  y_2 = stack(x.reshape(2, 2, T, *feat), seq_lengths=lengths.reshape(2, 2), rngs=key)
  np.testing.assert_array_equal(y_2.reshape(y.shape), y)
  stack.eval()
  assert not np.allclose(stack(x, seq_lengths=lengths), y)  # there was dropout


def test_errors():
  stack = _stack()
  x = _x()
  with pytest.raises(ValueError, match=r'StackedRNN: `initial_carry` expected a tuple of 2 '
                     r'carries \(one per layer, None for the default\), got tuple of length 1'):
    stack(x, initial_carry=(None,))
  with pytest.raises(ValueError, match=r'`initial_carry` expected a tuple of 2 carries .* '
                     r'got tuple of length 3'):
    stack(x, initial_carry=(None, None, None))
  with pytest.raises(ValueError, match=r'`initial_carry` expected a tuple of 2 carries .* '
                     r'got ndarray'):
    stack(x, initial_carry=np.zeros((B, H)))
  with pytest.raises(ValueError, match=r'StackedRNN: `layers` expected at least one layer'):
    nr.StackedRNN()
  with pytest.raises(TypeError, match=r'StackedRNN: `layers\[1\]` expected an RNN, '
                     r'Bidirectional, LSTM, GRU or StackedRNN layer, got GRUCell'):
    nr.StackedRNN(stack.layers[0], nnx.eval_shape(lambda: nr.GRUCell(2 * H, H, rngs=nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r'StackedRNN: `initial_carry\[1\]`, the carry of '
                     r'layers\[1\] \(RNN\): RNN: `initial_carry` expected leaf shapes '
                     r'\[\(3, 5\)\] .*got \[\(3, 6\)\]'):
    # Traced only (eagerly the first layer would run): the check is on shapes.
    nnx.jit(lambda stack: stack(x, initial_carry=(None, np.zeros((B, H + 1)))))(stack)


def test_a_wrong_carry_entry_is_named_by_its_index():
  # Found by the errors fuzz family: the layer's own error named `initial_carry`,
  # not which of the stack's (or the pair's) entries was wrong.
  stack, x = _stack(), _x()
  bi = stack.layers[0]
  zeros = np.zeros((B, H), np.float32)
  with pytest.raises(ValueError, match=r'^StackedRNN: `initial_carry\[0\]`, the carry of '
                     r'layers\[0\] \(Bidirectional\): Bidirectional: `initial_carry` '
                     r'expected a pair'):
    stack(x, initial_carry=(zeros, None))
  with pytest.raises(ValueError, match=r'^Bidirectional: `initial_carry\[0\]`, the carry of '
                     r'forward_rnn \(RNN\): RNN: `initial_carry` expected a pytree with '
                     r'structure \(array, array\), got structure array'):
    bi(x, initial_carry=(zeros, zeros))
  with pytest.raises(ValueError, match=r'^StackedRNN: `initial_carry\[0\]`, the carry of '
                     r'layers\[0\] \(Bidirectional\): Bidirectional: `initial_carry\[1\]`, '
                     r'the carry of backward_rnn \(RNN\): RNN: `initial_carry` expected leaf '
                     r'shapes \[\(3, 5\)\]'):
    stack(x, initial_carry=(((zeros, zeros), zeros[:, :2]), None))


def test_a_stack_in_a_stack_is_one_layer_with_a_tuple_of_carries():
  """``StackedRNN(StackedRNN(a, b), c)``, against flax.nnx's ``RNN`` chained by
  hand on flax.nnx's cells: the outputs (zeros at padding), each layer's carry
  nested as the stacks are, an inner ``None`` initial carry taking that layer's
  default, and the gradients of every cell."""
  rngs = nnx.Rngs(0)
  theirs = [nnx.LSTMCell(IN, H, rngs=rngs), nnx.GRUCell(H, H, rngs=rngs),
            nnx.SimpleCell(H, 3, rngs=rngs)]
  ours = [nr.LSTMCell(IN, H, rngs=nnx.Rngs(0)), nr.GRUCell(H, H, use_bias_hn=False, rngs=rngs),
          nr.SimpleCell(H, 3, rngs=rngs)]
  for mine, cell in zip(ours, theirs):
    nnx.update(mine, nnx.state(_randomize(cell), nnx.Param))
  stack = nr.StackedRNN(nr.StackedRNN(nr.RNN(ours[0]), nr.RNN(ours[1])), nr.RNN(ours[2]))
  chain = nnx.List([nnx.RNN(cell, return_carry=True) for cell in theirs])
  x = _x()
  rng = np.random.default_rng(2)
  c_a = tuple(rng.normal(size=(B, H)).astype(np.float32) for _ in range(2))
  c_c = rng.normal(size=(B, 3)).astype(np.float32)
  zeros = np.zeros((B, H), np.float32)
  valid = np.arange(T)[None] < LENGTHS[:, None]
  rows = LENGTHS > 0  # flax.nnx's carry of a length-0 row is not the initial carry

  def ours_loss(stack):
    carries, y = stack(x, initial_carry=((c_a, None), c_c), seq_lengths=LENGTHS,
                       return_carry=True)
    return jnp.sum(jnp.where(valid[..., None], y, 0) ** 2), (carries, y)

  def theirs_loss(chain):
    y, carries = x, []
    for rnn, c in zip(chain, [c_a, zeros, c_c]):
      c, y = rnn(y, initial_carry=c, seq_lengths=LENGTHS)
      carries.append(c)
    return jnp.sum(jnp.where(valid[..., None], y, 0) ** 2), (carries, y)

  g_ours, ((inner, c_top), y) = nnx.grad(ours_loss, has_aux=True)(stack)
  g_theirs, (carries, y_ref) = nnx.grad(theirs_loss, has_aux=True)(chain)
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(y)[~valid], 0)
  assert len(inner) == 2 and isinstance(inner[0], tuple)  # (c, h) of the LSTM, h of the GRU
  for got, want in zip(jax.tree.leaves((inner, c_top)), jax.tree.leaves(carries)):
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=ATOL)
  got = nnx.to_pure_dict(g_ours)['layers']
  want = nnx.to_pure_dict(g_theirs)
  per_layer = [got[0]['layers'][0]['cell'], got[0]['layers'][1]['cell'], got[1]['cell']]
  for l, mine in enumerate(per_layer):
    for path, leaf in nnx.to_flat_state(nnx.State(want[l]['cell'])):
      mine_leaf = mine
      for key in path:
        mine_leaf = mine_leaf[key]
      np.testing.assert_allclose(mine_leaf, leaf, atol=1e-4, err_msg=f'layer {l} {path}')


def test_reverse_through_nested_convolutional_stacks():
  """``reverse`` finds the time axis through Bidirectional and StackedRNN nesting:
  a stack of convolutional cells (inputs ``(batch, time, width, channels)``) run
  in reverse equals the stack run on each row reversed within its length."""
  rngs = nnx.Rngs(0)
  inner = lambda: nr.StackedRNN(nr.RNN(nr.ConvLSTMCell(2, 2, (3,), **_Z, rngs=rngs)))
  stack = _randomize(nr.StackedRNN(nr.Bidirectional(inner(), inner())))
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 2)).astype(np.float32)
  lengths = np.array([4, 3])
  flipped = x.copy()
  for b, n in enumerate(lengths):
    flipped[b, :n] = x[b, :n][::-1]

  @nnx.jit  # the three runs in one program
  def runs(stack):
    return (stack(x, seq_lengths=lengths, reverse=True),  # processing order
            stack(flipped, seq_lengths=lengths), stack(x, seq_lengths=lengths))

  got, want, forward = (np.asarray(a) for a in runs(stack))
  assert got.shape == (2, 4, 6, 4)
  np.testing.assert_allclose(got, want, atol=ATOL)
  assert not np.allclose(got, forward, atol=1e-3)
  np.testing.assert_array_equal(got[1, 3:], 0)


def test_reverse_and_keep_order_with_a_fused_first_layer():
  """A fused GRU (no ``cell``: one feature axis) first: ``reverse`` runs the stack on
  each row reversed within its length; against the NumPy formula of its cell."""
  stack = random_module(lambda: nr.StackedRNN(nr.GRU(IN, H, rngs=nnx.Rngs(0)),
                                              nr.RNN(nr.SimpleCell(H, H, rngs=nnx.Rngs(1)))))
  x = _x()
  got, kept = nnx.jit(lambda stack: [stack(x, seq_lengths=LENGTHS, reverse=True, keep_order=k)
                                     for k in (False, True)])(stack)
  zeros = np.zeros((B, H))
  p1, p2 = reference.cell_params(stack.layers[0].forward[0]), reference.cell_params(
    stack.layers[1].cell)
  _, y1 = reference.rnn(p1, x, LENGTHS, zeros, num_batch_dims=1, reverse=True)
  _, y2 = reference.rnn(p2, y1, LENGTHS, zeros, num_batch_dims=1)  # processing order
  np.testing.assert_allclose(got, y2, atol=ATOL)
  in_order = y2.copy()
  for b, n in enumerate(LENGTHS):
    in_order[b, :n] = y2[b, :n][::-1]
  np.testing.assert_allclose(kept, in_order, atol=ATOL)


@pytest.mark.parametrize('time_major', [False, True])
def test_reverse_and_keep_order_with_two_batch_axes(time_major):
  # Two batch axes, batch-major or time-major: each row reversed within its length, put
  # back in input order (along the time axis of the caller's layout), as the NumPy
  # reference runs each row alone.
  cell, features = reference.make_cell('gru')
  lengths = np.array([[0, 1, 5], [3, 5, 2]], np.int32)
  x = reference.normal((2, 3, 5, *features), seed=2)
  stack = nr.StackedRNN(nr.RNN(cell))
  x_in = jnp.moveaxis(x, 2, 0) if time_major else x
  y = nnx.jit(lambda stack, x: stack(x, seq_lengths=jnp.asarray(lengths), reverse=True,
                                     keep_order=True, time_major=time_major))(stack, x_in)
  _, want = reference.rnn(reference.cell_params(cell), x, lengths, np.zeros((2, 3, 4)),
                          num_batch_dims=2, reverse=True, keep_order=True)
  np.testing.assert_allclose(jnp.moveaxis(y, 0, 2) if time_major else y, want, atol=ATOL)


def test_a_key_at_call_time_gives_each_gap_its_own_mask():
  # Three identity layers, dropout 0.5 in the two gaps: an element survives both
  # gaps (value 1 / 0.5**2 = 4) with probability 1/4 when their masks are
  # independent, 1/2 when they are the same mask.
  ident = dict(activation_fn=lambda a: a, **_Z)
  layers = [nr.RNN(nr.SimpleCell(H, H, **ident, rngs=nnx.Rngs(0))) for _ in range(3)]
  for layer in layers:
    layer.cell.dense_i.kernel[...] = jnp.eye(H)
  stack = nr.StackedRNN(*layers, dropout_rate=0.5)
  y = np.asarray(nnx.jit(lambda stack: stack(jnp.ones((8, T, H)), rngs=jax.random.key(3)))(
    stack))
  np.testing.assert_array_equal(np.unique(y), [0, 4])
  assert 0.15 < (y == 4).mean() < 0.35


def test_dropout_between_layers_can_be_attached_after_construction():
  # The slot holds nnx.data(None) without dropout, as flax's optional submodules do.
  stack = random_module(lambda: nr.StackedRNN(nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0))),
                                              nr.RNN(nr.GRUCell(4, 4, rngs=nnx.Rngs(1)))))
  x = jnp.ones((2, 5, 3))
  call = nnx.jit(lambda stack: stack(x))  # a program per structure: plain, dropout, eval
  plain = call(stack)
  stack.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=2))
  assert not np.allclose(call(stack), plain)
  stack.eval()
  np.testing.assert_array_equal(call(stack), plain)


class _Readout(nr.RNNCellBase):
  """A cell of the user's own whose output (a readout of ``h``) is not ``h``."""

  def __init__(self, in_features, hidden_features, out_features, *, rngs, **options):
    super().__init__(in_features, hidden_features, rngs=rngs, **options)
    self.gru = nr.GRUCell(in_features, hidden_features, **_Z, rngs=rngs)
    self.readout = nnx.Linear(hidden_features, out_features, rngs=rngs)

  def step(self, carry, inputs, recurrent_mask):
    h, _ = self.gru(carry, inputs)
    return h, self.readout(h)


def test_a_cell_whose_output_is_a_readout_chains_by_its_output_width():
  # The sizes that chain are what step returns (R = 7 here), not hidden_features,
  # found by tracing one step on a copy: the cell's RNG stream does not move.
  R = 7
  # Random parameters, no initializer run.
  cells = [random_module(lambda: _Readout(IN, H, R, rngs=nnx.Rngs(0), dropout_rate=0.5), seed)
           for seed in (0, 1)]
  counts = [int(c.rngs.count[...]) for c in cells]
  bi = nr.Bidirectional(nr.RNN(cells[0]), nr.RNN(cells[1]))
  top = random_module(lambda: nr.RNN(nr.SimpleCell(2 * R, H, rngs=nnx.Rngs(0))), 2)
  stack = nr.StackedRNN(bi, top)
  assert [int(c.rngs.count[...]) for c in cells] == counts
  with pytest.raises(ValueError, match=r'StackedRNN: `layers\[1\]` expected a layer reading '
                     r'14 features \(the output size of layers\[0\], Bidirectional\), got RNN '
                     r'with in_features 10'):
    nr.StackedRNN(bi, nr.RNN(nnx.eval_shape(lambda: nr.SimpleCell(2 * H, H, rngs=nnx.Rngs(0)))))

  stack.eval()
  x = _x()
  got = np.asarray(nnx.jit(lambda stack: stack(x, seq_lengths=LENGTHS))(stack))
  zeros = np.zeros((B, H))
  valid = (np.arange(T)[None] < LENGTHS[:, None])[..., None]
  halves = []
  for cell, rev in zip(cells, (False, True)):
    _, ys = reference.rnn(reference.cell_params(cell.gru), x, LENGTHS, zeros, num_batch_dims=1,
                          reverse=rev, keep_order=rev)
    w, b = np.asarray(cell.readout.kernel[...]), np.asarray(cell.readout.bias[...])
    halves.append((ys @ w + b) * valid)
  _, want = reference.rnn(reference.cell_params(top.cell), np.concatenate(halves, -1), LENGTHS,
                          zeros, num_batch_dims=1)
  np.testing.assert_allclose(got, want, atol=ATOL)


class _TwoOutputs(nr.RNNCellBase):
  """A cell of the user's own whose output is a pair of arrays (``RNN`` returns pytrees)."""

  def __init__(self, in_features, hidden_features, *, rngs):
    super().__init__(in_features, hidden_features, rngs=rngs)
    self.gru = nr.GRUCell(in_features, hidden_features, **_Z, rngs=rngs)

  def step(self, carry, inputs, recurrent_mask):
    h, _ = self.gru(carry, inputs)
    return h, (h, 2 * h)


def test_reverse_and_keep_order_put_a_pytree_of_outputs_back_in_input_order():
  # The last layer's outputs are a pair: each goes back in input order, as in RNN.
  cell = random_module(lambda: _TwoOutputs(IN, H, rngs=nnx.Rngs(0)))
  stack, rnn = nr.StackedRNN(nr.RNN(cell)), nr.RNN(cell)
  x = _x()
  for kw in (dict(seq_lengths=LENGTHS), dict(segment_ids=IDS)):
    got = stack(x, reverse=True, keep_order=True, **kw)
    want = rnn(x, reverse=True, keep_order=True, **kw)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(g, w, atol=ATOL)
