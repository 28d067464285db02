"""The ``initial_carry`` forms of the fused ``LSTM`` / ``GRU``: those of the equivalent stack.

A fused layer computes what ``RNN`` / ``Bidirectional`` / ``StackedRNN`` over
its cells compute (docs/bidirectional_and_stacks.md), so it takes the carries
that stack takes, with the same values: lists for tuples, and ``None`` for a
layer's or a direction's default carry; and it refuses what the stack refuses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nnx_recurrent as nr
from tests import reference as ref
from tests.test_fused import LENGTHS, B, H, I, T, assert_trees_close, call, make, random_carry

# Each configuration (num_layers, bidirectional) once. The forms are read by
# the layers' shared code (_FusedBase._initial_carry and _cell_carry) before
# any step runs; the cells differ in their carry: the LSTM's (c, h) is a tuple
# too (a list in the 'lists' form, at every level), the GRU's an array. The
# LSTM in every configuration but one bidirectional layer (two run the same
# loop once per layer); the GRU in that one, which has every kind of form
# (lists, the layer's None, each direction's None). The GRU's given carries in
# two bidirectional layers: tests/test_fused.py::
# test_matches_generic_values_and_grads[2-bi-lengths-GRU]; one of two GRU
# layers left to its default: test_packed_segments_with_a_layer_left_to_its_default.
CASES = [(nr.LSTM, 1, False), (nr.LSTM, 2, False), (nr.LSTM, 2, True), (nr.GRU, 1, True)]


def equivalent(layer):
  """The documented equivalent of ``layer`` over its own cells: ``RNN`` for one
  one-direction layer, else a ``StackedRNN`` of ``RNN`` or ``Bidirectional``."""
  if layer.num_layers == 1 and not layer.bidirectional:
    return nr.RNN(layer.forward[0])
  return nr.StackedRNN(*[
    nr.Bidirectional(nr.RNN(layer.forward[k]), nr.RNN(layer.backward[k])) if layer.bidirectional
    else nr.RNN(layer.forward[k]) for k in range(layer.num_layers)])


def as_lists(tree):
  """``tree`` with every tuple a list."""
  if isinstance(tree, (tuple, list)):
    return [as_lists(t) for t in tree]
  return tree


def forms(layer, carry):
  """Carries the equivalent stack takes: the full tuple, lists, ``None`` for
  each layer in turn, and ``None`` for each direction in turn: of the one
  layer, or, with more, one direction per layer (the last layer's second, the
  others' first), each direction and each layer once (the layers' carries are
  read in one loop, the same code for each)."""
  out = {'tuple': carry, 'lists': as_lists(carry)}
  if layer.num_layers == 1 and not layer.bidirectional:
    return out
  for k in range(layer.num_layers):
    out[f'layer {k} None'] = carry[:k] + (None,) + carry[k + 1:]
    if layer.bidirectional:
      directions = range(2) if layer.num_layers == 1 else [
        int(k == layer.num_layers - 1)]
      for d in directions:
        pair = (None, carry[k][1]) if d == 0 else [as_lists(carry[k][0]), None]
        out[f'layer {k} direction {d} None'] = carry[:k] + (pair,) + carry[k + 1:]
  return out


def check_forms_against_the_stack(layer, x, keep=lambda name: True):
  """Each of :func:`forms` (those whose name ``keep`` keeps) given to ``layer``
  and to :func:`equivalent`: the same outputs and final carries (one
  compilation). Returns the names checked."""
  carry = random_carry(layer)
  names = [name for name in forms(layer, carry) if keep(name)]

  def run(m, x):
    stack = equivalent(m)
    kw = dict(seq_lengths=LENGTHS, return_carry=True)
    return [(m(x, initial_carry=form, **kw), stack(x, initial_carry=form, **kw))
            for name, form in forms(m, carry).items() if keep(name)]

  for name, (got, want) in zip(names, call(layer, x, run=run)):
    try:
      assert_trees_close(got, want)
    except AssertionError as e:
      raise AssertionError(f'initial_carry form {name!r}') from e
  return names


@pytest.mark.parametrize('cls,num_layers,bidirectional', CASES)
def test_initial_carry_forms_of_the_equivalent_stack(cls, num_layers, bidirectional):
  """Lists and per-layer / per-direction ``None`` give what the stack gives
  for them (which is the default carry in the ``None`` parts)."""
  layer = make(cls, num_layers, bidirectional)
  names = check_forms_against_the_stack(layer, ref.normal((B, T, I), seed=3))
  assert len(names) == {(1, False): 2, (1, True): 5, (2, False): 4, (2, True): 6}[
    num_layers, bidirectional]


def test_initial_carry_forms_with_the_pallas_kernels():
  """The forms with a ``None`` reach the Pallas kernels (interpret mode on the
  CPU: one tiny bidirectional layer), which run both directions in one launch:
  both directions' default carries, and one direction's default with the
  other's given carry. The full tuple and its lists (read into the same carry:
  the test above) give the kernels the random carry that
  ``tests/test_pallas.py::test_matches_xla_and_numpy[LSTM]`` gives this layer
  (with these lengths) and checks against the XLA scans."""
  layer = make(nr.LSTM, 1, True, implementation='pallas')
  names = check_forms_against_the_stack(layer, ref.normal((B, T, I), seed=3),
                                        keep=lambda name: 'None' in name)
  assert names == ['layer 0 None', 'layer 0 direction 0 None', 'layer 0 direction 1 None']


def zeros(*shape):
  return jnp.zeros(shape)


@pytest.mark.parametrize('cls,num_layers,bidirectional,carry,message', [
  # What the stack refuses too: leaves shaped for other rows (no broadcasting over
  # the batch: nr.RNN and flax.nnx's RNN take none either), a cell's carry of
  # another structure, a per-layer tuple of another length.
  (nr.LSTM, 1, False, (zeros(1, H), zeros(1, H)),
   r'^LSTM: `initial_carry` expected leaf shapes \[\(3, 4\), \(3, 4\)\], '
   r'got \[\(1, 4\), \(1, 4\)\]\.'),
  (nr.GRU, 1, False, zeros(H),
   r'^GRU: `initial_carry` expected leaf shapes \[\(3, 4\)\], got \[\(4,\)\]\.'),
  (nr.LSTM, 1, False, (zeros(B, H), None),
   r"^LSTM: `initial_carry` expected the cell's carry, a pair \(c, h\) of arrays, "
   r'got \(array, None\)\.'),
  (nr.GRU, 1, False, [zeros(B, H)],
   r"^GRU: `initial_carry` expected the cell's carry, an array h, got \[array\]\."),
  (nr.GRU, 2, False, zeros(B, H),
   r'^GRU: `initial_carry` expected a tuple of 2 carries \(one per layer, None for the '
   r'default\), got ArrayImpl\.'),
  (nr.LSTM, 1, True, (None, None),
   r'^LSTM: `initial_carry` expected a tuple of 1 carry \(one per layer, None for the '
   r'default\), got tuple of length 2\.'),
  (nr.GRU, 2, True, ((zeros(B, H), zeros(B, H)), (zeros(B, H),)),
   r'^GRU: `initial_carry\[1\]` expected a pair \(forward_carry, backward_carry\), '
   r'got tuple of length 1\.'),
  (nr.LSTM, 2, True, (None, (None, [zeros(B, H), zeros(B, H + 1)])),
   r'^LSTM: `initial_carry\[1\]\[1\]` expected leaf shapes \[\(3, 4\), \(3, 4\)\], '
   r'got \[\(3, 4\), \(3, 5\)\]\.'),
])
def test_initial_carry_refusals_are_the_stacks(cls, num_layers, bidirectional, carry, message):
  """A carry the stack refuses is refused, naming the entry and its structure plainly."""
  layer = make(cls, num_layers, bidirectional)
  x = jnp.zeros((B, T, I))
  for module, expected in ((layer, message), (equivalent(layer), '`initial_carry')):
    with pytest.raises(ValueError, match=expected):
      nnx.eval_shape(lambda m: m(x, initial_carry=carry), module)


def test_a_carry_kept_in_another_library_is_named_in_its_entry():
  torch = pytest.importorskip('torch')
  layer = make(nr.GRU, 2)
  with pytest.raises(TypeError, match=r'GRU: `initial_carry\[1\]` expected a JAX or NumPy array'):
    layer(jnp.zeros((B, T, I)), initial_carry=(None, torch.zeros(B, H)))
  # A tensor where the LSTM's (c, h) goes: the tensor named, not the structure.
  with pytest.raises(TypeError, match=r'LSTM: `initial_carry` expected a JAX or NumPy array '
                                      r'\(convert a tensor first, e\.g\. x\.numpy\(\)\), '
                                      r'got torch\.Tensor'):
    make(nr.LSTM)(jnp.zeros((B, T, I)), initial_carry=torch.zeros(B, H))


def test_packed_segments_with_a_layer_left_to_its_default():
  """With ``segment_ids`` too: a layer given ``None`` starts each row's first
  segment from zeros, as in the stack, the others from the carry given."""
  layer = make(nr.GRU, 2)
  ids = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
  form = (None, random_carry(layer)[1])

  def run(m, x):
    kw = dict(initial_carry=form, segment_ids=ids, return_carry=True)
    return m(x, **kw), equivalent(m)(x, **kw)

  got, want = call(layer, ref.normal((B, T, I), seed=4), run=run)
  assert_trees_close(got, want)


@pytest.mark.parametrize('cls', [nr.LSTM, nr.GRU])
def test_beams_over_shared_inputs_are_refused_with_the_way_round(cls):
  """A carry of beams, ``(beams, batch, hidden)`` over ``(batch, time, features)``
  inputs (what nr.RNN broadcasts, as flax.nnx does), is refused, saying so; the
  way the message gives (the inputs repeated per beam) gives each beam's run of
  the NumPy reference."""
  layer, beams = make(cls), 2
  beam_carry = random_carry(layer, batch_shape=(beams, B))
  x = ref.normal((B, T, I), seed=3)
  with pytest.raises(ValueError, match=r'`initial_carry` expected leaf shapes .*one carry row '
                                       r'per input row: the fused layers take no beams over '
                                       r'shared inputs.*without seq_lengths, use nr.RNN'):
    layer(x, initial_carry=beam_carry, seq_lengths=LENGTHS)
  beam_carry = jax.tree_util.tree_map(np.asarray, beam_carry)  # NumPy: nothing to compile
  flat = jax.tree_util.tree_map(lambda c: c.reshape((beams * B, H)), beam_carry)
  carry, y = jax.tree_util.tree_map(np.asarray, call(  # one compilation
    layer, np.tile(np.asarray(x), (beams, 1, 1)), initial_carry=flat,
    seq_lengths=np.tile(LENGTHS, beams), return_carry=True))
  for k in range(beams):
    want_carry, want_y = ref.rnn(ref.cell_params(layer.forward[0]), x, LENGTHS,
                                 jax.tree_util.tree_map(lambda c, k=k: c[k], beam_carry),
                                 num_batch_dims=1)
    rows = slice(k * B, (k + 1) * B)
    np.testing.assert_allclose(y[rows], want_y, rtol=1e-5, atol=1e-5)
    assert_trees_close(jax.tree_util.tree_map(lambda c, rows=rows: c[rows], carry), want_carry)
