"""Every sequence layer, nested, against a step-by-step reference.

A case builds a random tree of this package's sequence layers: ``RNN`` (any
cell, ``reverse`` / ``keep_order``, ``unroll``, ``remat``, a learned initial
carry), ``Bidirectional`` (of ``RNN``, unidirectional fused layers or
stacks), the fused ``LSTM`` / ``GRU`` (layers, directions, the XLA scans or the
Pallas kernels interpreted) and ``StackedRNN`` of any of them (``reverse`` /
``keep_order`` too), and runs it on a batch with no masking, ``seq_lengths``
or packed ``segment_ids`` (padding between segments, ids reused after it), with
NaN, inf or 1e30 at the padding. A quarter of the cases are convolutional:
steps of ``(*spatial, channels)`` with one or two spatial axes, through
``ConvLSTMCell`` / ``ConvGRUCell`` (kernels of 1-3, strides 1 or 2 and any
padding flax's ``Conv`` takes outside a ``Bidirectional``, there only those
that keep the shape) in ``RNN``, ``Bidirectional`` and ``StackedRNN``. A third
of this package's own cells (MGU, the layer-normalized ones) drop out
(variational dropout on the inputs and the recurrent state, from the cell's
own stream) outside ``streaming``: the reference steps get the masks
``dropout_masks`` draws from a copy of the stream, each row its own for all
its steps and segments.

The reference knows nothing of masks, scans or packing: a Python loop of
cells over each sequence *alone* (one segment of one row, cut out with
NumPy), reversed by NumPy where a layer runs backwards, layers chained by
hand. flax.nnx's cells are the reference cells wherever flax.nnx has the cell
(the fused layers are given flax.nnx's parameters); for the cells flax.nnx
lacks (MGU, the layer-normalized ones, a user's own cell whose outputs are a
readout of another width) and for flax.nnx's cells run by ``nr.RNN`` itself,
the loop runs a copy of the cell: their step is checked elsewhere, and here
the sequence machinery around it is.

What the docs promise is what is compared: each segment's outputs equal a run
on the segment alone; a row's first segment starts from the row's initial
carry (a stack's ``None`` entries: that layer's default), every later one
from the default (zeros, or the learned carry); the returned carry is the
carry after the row's last segment (the initial carry for a row with none);
outputs at padding are zeros; and gradients: the parameters' (the learned
carries' too), and the inputs' (zero at padding).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._common import as_rows, draw_segments, garbage, params
from fuzz._core import Case

STANDARD = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell']  # flax.nnx has them
OWN = ['MGUCell', 'LayerNormLSTMCell', 'LayerNormGRUCell']
CONV = ['ConvLSTMCell', 'ConvGRUCell']
FUSED = {'LSTM': 'OptimizedLSTMCell', 'GRU': 'GRUCell'}


# -- the reference: loops over one sequence (time, 1, features) --------------
# Variational dropout in the reference: each dropping cell's masks for the
# whole batch, ``(rows, ...)`` (drawn by ``draw_dropout_masks`` as nr.RNN
# draws them), by the Loop's ``dropout`` number, and the row being run.
_DROPOUT: dict[str, Any] = {'masks': {}, 'row': 0}


class Loop(nnx.Module):
  """A cell looped over one sequence; backwards with ``reverse`` (outputs in
  processing order unless ``keep_order``). The reference of ``nr.RNN``.
  ``dropout``: with variational dropout, this Loop's number in ``_DROPOUT``:
  every step of a row gets the row's masks, whatever segment it is in
  (docs/masking.md: the segments of a row share their masks)."""

  def __init__(self, cell: Any, in_shape: tuple[int, ...], learned: Any = None,
               reverse: bool = False, keep_order: bool = False, dropout: int | None = None):
    self.cell, self.in_shape = cell, in_shape  # one step's features: (in_features,) or conv
    self.learned = nnx.data(learned)  # nnx.Params, one per carry leaf, or None
    self.reverse, self.keep_order, self.dropout = reverse, keep_order, dropout

  def default(self) -> Any:
    zeros = jax.tree.map(jnp.zeros_like,
                         self.cell.initialize_carry((1, *self.in_shape), rngs=nnx.Rngs(0)))
    if self.learned is None:
      return zeros
    leaves, treedef = jax.tree.flatten(zeros)
    return treedef.unflatten([jnp.broadcast_to(p[...], z.shape)
                              for p, z in zip(self.learned, leaves)])

  def fill(self, carry: Any) -> Any:
    return self.default() if carry is None else carry

  def cells(self) -> list[Any]:
    return [self.cell]

  def __call__(self, xs: jax.Array, carry: Any) -> tuple[Any, jax.Array]:
    carry, ys, kw = self.fill(carry), [], {}
    if self.dropout is not None:
      row = _DROPOUT['row']
      kw['dropout_masks'] = jax.tree.map(lambda m: m[row:row + 1],
                                         _DROPOUT['masks'][self.dropout])
    for x in (xs[::-1] if self.reverse else xs):
      carry, y = self.cell(carry, x, **kw)
      ys.append(y)
    out = jnp.stack(ys)
    return carry, (out[::-1] if self.reverse and self.keep_order else out)


class Pair(nnx.Module):
  """Forward and backward references, outputs concatenated: the reference of
  ``nr.Bidirectional`` and of one bidirectional fused layer."""

  def __init__(self, forward: Any, backward: Any):
    self.forward, self.backward = forward, backward

  def default(self) -> Any:
    return (self.forward.default(), self.backward.default())

  def fill(self, carry: Any) -> Any:
    carry = (None, None) if carry is None else carry
    return (self.forward.fill(carry[0]), self.backward.fill(carry[1]))

  def cells(self) -> list[Any]:
    return self.forward.cells() + self.backward.cells()

  def __call__(self, xs: jax.Array, carry: Any) -> tuple[Any, jax.Array]:
    carry = self.fill(carry)
    c_f, y_f = self.forward(xs, carry[0])
    c_b, y_b = self.backward(xs, carry[1])
    return (c_f, c_b), jnp.concatenate([y_f, y_b], axis=-1)


class Chain(nnx.Module):
  """References applied one after another, on the sequence reversed with
  ``reverse``: the reference of ``nr.StackedRNN`` and of the fused layers
  (``single``: one carry, not a tuple of one, for a fused layer of one
  unidirectional layer)."""

  def __init__(self, layers: list[Any], reverse: bool = False, keep_order: bool = False,
               single: bool = False):
    self.layers = nnx.List(layers)
    self.reverse, self.keep_order, self.single = reverse, keep_order, single

  def _per_layer(self, carry: Any) -> tuple[Any, ...]:
    if carry is None:
      return (None,) * len(self.layers)
    return (carry,) if self.single else tuple(carry)

  def _out(self, carries: list[Any]) -> Any:
    return carries[0] if self.single else tuple(carries)

  def default(self) -> Any:
    return self._out([layer.default() for layer in self.layers])

  def fill(self, carry: Any) -> Any:
    return self._out([layer.fill(c) for layer, c in zip(self.layers, self._per_layer(carry))])

  def cells(self) -> list[Any]:
    return [cell for layer in self.layers for cell in layer.cells()]

  def __call__(self, xs: jax.Array, carry: Any) -> tuple[Any, jax.Array]:
    seq, carries = xs[::-1] if self.reverse else xs, []
    for layer, c in zip(self.layers, self._per_layer(carry)):
      c, seq = layer(seq, c)
      carries.append(c)
    return self._out(carries), (seq[::-1] if self.reverse and self.keep_order else seq)


class ReadoutCell(nr.RNNCellBase):
  """A user's cell (docs/cells.md, "Writing your own cell"): a leaky tanh
  state, and outputs that are a readout of another width."""

  def __init__(self, in_features: int, hidden_features: int, readout: int, *, rngs: nnx.Rngs):
    super().__init__(in_features, hidden_features, rngs=rngs)
    self.dense_i = nnx.Linear(in_features, hidden_features, rngs=rngs)
    self.dense_h = nnx.Linear(hidden_features, hidden_features, use_bias=False, rngs=rngs)
    self.readout = nnx.Linear(hidden_features, readout, rngs=rngs)

  def step(self, carry: Any, inputs: Any, recurrent_mask: Any) -> tuple[Any, Any]:
    h_in = carry if recurrent_mask is None else carry * recurrent_mask
    new_h = 0.5 * carry + 0.5 * jnp.tanh(self.dense_i(inputs) + self.dense_h(h_in))
    return new_h, self.readout(new_h)


# -- the layers under test and their references --------------------------------
def nr_cells(layer: Any) -> list[Any]:
  """A layer's cells in the order of its reference's ``cells()``."""
  if isinstance(layer, _Oriented):
    return nr_cells(layer.stack)
  if isinstance(layer, nr.RNN):
    return [layer.cell]
  if isinstance(layer, nr.Bidirectional):
    return nr_cells(layer.forward_rnn) + nr_cells(layer.backward_rnn)
  if isinstance(layer, nr.StackedRNN):
    return [cell for sub in layer.layers for cell in nr_cells(sub)]
  return [cell for l in range(layer.num_layers)  # fused
          for cell in ([layer.forward[l], layer.backward[l]] if layer.bidirectional
                       else [layer.forward[l]])]


def nr_learned(layer: Any) -> list[Any]:
  """The learned initial carries (``nnx.Param`` leaves), in reference order."""
  if isinstance(layer, _Oriented):
    return nr_learned(layer.stack)
  if isinstance(layer, nr.RNN):
    return [] if layer.initial_carry is None else jax.tree.leaves(
      layer.initial_carry, is_leaf=lambda v: isinstance(v, nnx.Variable))
  if isinstance(layer, nr.Bidirectional):
    return nr_learned(layer.forward_rnn) + nr_learned(layer.backward_rnn)
  if isinstance(layer, nr.StackedRNN):
    return [p for sub in layer.layers for p in nr_learned(sub)]
  return []


def ref_learned(ref: Any) -> list[Any]:
  if isinstance(ref, Loop):
    return [] if ref.learned is None else list(ref.learned)
  if isinstance(ref, Pair):
    return ref_learned(ref.forward) + ref_learned(ref.backward)
  return [p for sub in ref.layers for p in ref_learned(sub)]


class Builder:
  """Draws a tree of layers and builds it with its reference."""

  def __init__(self, case: Case, time: int, streaming: bool = False, learn: bool = True,
               conv: bool = False):
    """``streaming``: layers that can run in chunks only (nothing backwards);
    ``learn``: learned initial carries may be drawn; ``conv``: convolutional
    cells (steps of ``(*spatial, channels)``)."""
    self.case, self.time, self.count = case, time, 0
    self.streaming, self.learn, self.conv = streaming, learn, conv
    self.in_bidirectional = 0  # > 0: building a Bidirectional's directions
    self.dropping: list[tuple[Any, Loop]] = []  # cells with variational dropout, their Loops

  def seed(self) -> int:
    self.count += 1
    return 100 * self.case.config['init_seed'] + self.count

  def cell(self, name: str, feat: tuple[int, ...], hidden: int
           ) -> tuple[Any, Any, tuple[int, ...]]:
    """Ours and the reference cell, with the same parameters, and the shape
    of one step's outputs (``feat``: one step's input features)."""
    case = self.case
    if self.conv:
      kind = case.pick(f'{name}.cell', CONV)
      # The directions of a Bidirectional must give outputs of one shape.
      strides = 1 if self.in_bidirectional else case.pick(f'{name}.strides', [1, 1, 2])
      kernel = tuple(case.integer(f'{name}.kernel{i}', 1, 3) for i in range(len(feat) - 1))
      padding = _padding(case, name, kernel, feat[:-1], keep_shape=bool(self.in_bidirectional))
      ours = getattr(nr, kind)(feat[-1], hidden, kernel, strides=strides, padding=padding,
                               rngs=nnx.Rngs(self.seed()))
      return ours, nnx.clone(ours), ours.output_shape((1, *feat))[1:]
    in_f = feat[0]
    kind = case.pick(f'{name}.cell', STANDARD + OWN + ['ReadoutCell'])
    seed = self.seed()
    if kind == 'ReadoutCell':
      ours = ReadoutCell(in_f, hidden, case.integer(f'{name}.readout', 1, 4), rngs=nnx.Rngs(seed))
      return ours, nnx.clone(ours), (ours.readout.out_features,)
    if kind in OWN:
      rates = {}
      if not self.streaming and case.pick(f'{name}.dropout', [False, False, True]):
        rates = dict(dropout_rate=case.pick(f'{name}.dropout_rate', [0.0, 0.3, 0.5]),
                     recurrent_dropout_rate=case.pick(f'{name}.recurrent_dropout_rate',
                                                      [0.3, 0.5]))
      # Variational dropout from the cell's own stream: the masks do not
      # depend on where the cell sits in the tree.
      ours = getattr(nr, kind)(in_f, hidden, **rates, rngs=nnx.Rngs(seed, dropout=seed + 1))
      return ours, nnx.clone(ours), (hidden,)
    if case.pick(f'{name}.source', ['nr', 'nr', 'flax.nnx']) == 'flax.nnx':
      ours = getattr(nnx, kind)(in_f, hidden, rngs=nnx.Rngs(seed))  # flax.nnx's cell in nr.RNN
      return ours, nnx.clone(ours), (hidden,)
    # nr.GRUCell's bias_hn starts at zero: flax.nnx's cell computes the same.
    kw = {'use_bias_hn': case.pick(f'{name}.use_bias_hn', [False, True])} \
        if kind == 'GRUCell' else {}
    return (getattr(nr, kind)(in_f, hidden, **kw, rngs=nnx.Rngs(seed)),
            getattr(nnx, kind)(in_f, hidden, rngs=nnx.Rngs(seed)), (hidden,))

  def rnn(self, name: str, feat: tuple[int, ...]) -> tuple[Any, Any, tuple[int, ...]]:
    case = self.case
    hidden = case.integer(f'{name}.hidden', 1, 5)
    ours_cell, ref_cell, out = self.cell(name, feat, hidden)
    reverse = keep_order = False
    if not self.streaming:
      reverse = bool(case.pick(f'{name}.reverse', [False, True]))
      keep_order = bool(case.pick(f'{name}.keep_order', [False, True]))
    learn = self.learn and bool(case.pick(f'{name}.learn_initial_carry', [False, False, True]))
    ours = nr.RNN(ours_cell, reverse=reverse, keep_order=keep_order,
                  unroll=case.pick(f'{name}.unroll', [1, 1, 2, 0]),
                  remat=bool(case.pick(f'{name}.remat', [False, False, True])),
                  learn_initial_carry=learn)
    learned = None
    if learn:  # a random learned carry, so that where it is used shows
      learned = []
      for p in nr_learned(ours):
        p[...] = jnp.asarray(case.normal(p[...].shape))
        learned.append(nnx.Param(p[...]))
      learned = nnx.List(learned)
    dropout = None
    if getattr(ours_cell, 'recurrent_dropout_rate', 0.0):
      dropout = len(self.dropping)
    loop = Loop(ref_cell, feat, learned, reverse, keep_order, dropout)
    if dropout is not None:
      self.dropping.append((ours_cell, loop))
    return ours, loop, out

  def draw_dropout_masks(self, batch: tuple[int, ...], dtype: Any) -> None:
    """Each dropping cell's masks for the next call, drawn from a copy of its
    stream as ``RNN`` draws them (``dropout_masks``, one call per layer call),
    as ``(rows, ...)`` for the reference."""
    _DROPOUT['masks'] = {}
    for cell, loop in self.dropping:
      masks = nnx.clone(cell).dropout_masks((*batch, *loop.in_shape), dtype=dtype)
      _DROPOUT['masks'][loop.dropout] = jax.tree.map(
        lambda m: m.reshape((math.prod(batch), *m.shape[len(batch):])), masks)

  def fused(self, name: str, feat: tuple[int, ...], bidirectional: bool
            ) -> tuple[Any, Any, tuple[int, ...]]:
    case, (in_f,) = self.case, feat
    kind = case.pick(f'{name}.layer', ['LSTM', 'GRU'])
    implementation = case.pick(f'{name}.implementation', ['xla', 'xla', 'auto', 'pallas']
                               if self.time <= 4 else ['xla', 'auto'])
    hidden = case.integer(f'{name}.hidden', 1, 5)
    layers = case.integer(f'{name}.num_layers', 1, 2)
    order = {}
    if not bidirectional and not self.streaming:
      order = dict(reverse=bool(case.pick(f'{name}.reverse', [False, True])),
                   keep_order=bool(case.pick(f'{name}.keep_order', [False, True])))
    ours = getattr(nr, kind)(in_f, hidden, num_layers=layers, bidirectional=bidirectional,
                             implementation=implementation, **order, rngs=nnx.Rngs(self.seed()))
    d = 1 + bidirectional
    refs = []
    for l in range(layers):
      size = in_f if l == 0 else d * hidden
      pair = []
      for direction in (ours.forward, ours.backward)[:d]:
        cell = getattr(nnx, FUSED[kind])(size, hidden, rngs=nnx.Rngs(self.seed()))
        nnx.update(direction[l], nnx.state(cell, nnx.Param))  # flax.nnx's parameters in ours
        pair.append(cell)
      refs.append(Pair(Loop(pair[0], (size,)),
                       Loop(pair[1], (size,), reverse=True, keep_order=True))
                  if bidirectional else Loop(pair[0], (size,)))
    ref = Chain(refs, **order, single=layers == 1 and not bidirectional)
    return ours, ref, (d * hidden,)

  def layer(self, name: str, feat: tuple[int, ...], depth: int, role: str = 'top'
            ) -> tuple[Any, Any, tuple[int, ...]]:
    """One layer of a kind drawn, for steps of ``feat`` features; with the
    shape of its outputs' features. ``role``: ``'top'`` (the model),
    ``'inner'`` (a layer of a stack) or ``'direction'`` (of a Bidirectional:
    unidirectional layers only, their ``reverse`` / ``keep_order`` set by the
    Bidirectional). Convolutional cells have no fused layers."""
    kinds = ['rnn', 'rnn'] if self.conv else ['rnn', 'rnn', 'fused']
    if role != 'direction' and not self.streaming:
      kinds += ['bidirectional'] if self.conv else ['bidirectional', 'fused_bidirectional']
    if depth < 2:
      kinds += ['stacked']
    kind = self.case.pick(f'{name}.kind', kinds)
    if kind == 'rnn':
      return self.rnn(name, feat)
    if kind.startswith('fused'):
      return self.fused(name, feat, kind == 'fused_bidirectional')
    if kind == 'bidirectional':
      self.in_bidirectional += 1
      f, f_ref, f_out = self.layer(f'{name}.f', feat, depth + 1, 'direction')
      b, b_ref, b_out = self.layer(f'{name}.b', feat, depth + 1, 'direction')
      self.in_bidirectional -= 1
      f_ref.reverse, f_ref.keep_order = False, False
      b_ref.reverse, b_ref.keep_order = True, True
      return nr.Bidirectional(f, b), Pair(f_ref, b_ref), (*f_out[:-1], f_out[-1] + b_out[-1])
    ours, refs, size = [], [], feat
    for i in range(self.case.integer(f'{name}.num_layers', 1, 3 - depth)):
      layer, ref, size = self.layer(f'{name}.{i}', size, depth + 1, 'inner')
      ours.append(layer)
      refs.append(ref)
    stack: Any = nr.StackedRNN(*ours)
    order = dict(reverse=False, keep_order=False)
    # A stack takes them at call time; as a layer or direction, its caller's.
    if role == 'top' and not self.streaming:
      order = dict(reverse=bool(self.case.pick(f'{name}.reverse', [False, True])),
                   keep_order=bool(self.case.pick(f'{name}.keep_order', [False, True])))
      stack = _Oriented(stack, **order)
    return stack, Chain(refs, **order), size


def _padding(case: Case, name: str, kernel: tuple[int, ...], spatial: tuple[int, ...],
             keep_shape: bool) -> Any:
  """A convolutional cell's ``padding``, in each form flax's ``Conv`` takes
  (its strings, an int, ``(low, high)`` pairs), that leaves every spatial axis
  at least one point; ``keep_shape``: one that keeps the spatial shape at
  stride 1 (a Bidirectional's directions must give outputs of one shape)."""
  forms = ['SAME', 'SAME', 'SAME_LOWER', 'CIRCULAR', 'REFLECT', 'int', 'pairs']
  forms += ['CAUSAL'] if len(kernel) == 1 else []
  forms += [] if keep_shape else ['VALID']
  form = case.pick(f'{name}.padding', forms)
  if form == 'VALID':
    return form if all(k <= s for k, s in zip(kernel, spatial)) else 'SAME'
  if form == 'int':
    if keep_shape:  # 2p = k - 1 on every axis
      return kernel[0] // 2 if len(set(kernel)) == 1 and kernel[0] % 2 else 'SAME'
    p = case.integer(f'{name}.padding_int', 0, 2)
    return p if all(s + 2 * p >= k for k, s in zip(kernel, spatial)) else 'SAME'
  if form == 'pairs':
    pairs = []
    for i, (k, s) in enumerate(zip(kernel, spatial)):
      lo = case.integer(f'{name}.padding{i}_low', 0, k - 1 if keep_shape else 2)
      hi = k - 1 - lo if keep_shape else case.integer(f'{name}.padding{i}_high', 0, 2)
      pairs.append((lo, hi) if s + lo + hi >= k else ((k - 1) // 2, k // 2))
    return tuple(pairs)
  return form


class _Oriented(nnx.Module):
  """A top-level ``StackedRNN`` called with ``reverse`` / ``keep_order``."""

  def __init__(self, stack: Any, reverse: bool, keep_order: bool):
    self.stack, self.reverse, self.keep_order = stack, reverse, keep_order

  def __call__(self, x: Any, **kw: Any) -> Any:
    return self.stack(x, reverse=self.reverse, keep_order=self.keep_order, **kw)


# -- the case ------------------------------------------------------------------
def _random_carry(case: Case, ref: Any, batch: tuple[int, ...], stack: bool) -> Any:
  """A random initial carry for the batch; a stack's entries may be ``None``."""
  def one(tree):
    return jax.tree.map(lambda a: jnp.asarray(case.normal((*batch, *a.shape[1:]))), tree)
  if stack and isinstance(ref, Chain):
    return tuple(None if case.rng.random() < 0.3 else one(layer.default())
                 for layer in ref.layers)
  return one(ref.default())


def _carry_rows(carry: Any, batch: tuple[int, ...]) -> Any:
  return jax.tree.map(lambda a: jnp.reshape(a, (math.prod(batch), *a.shape[len(batch):])), carry)


def stream_case(case: Case) -> None:
  """The layers that stream (nothing backwards) run in two or three chunks,
  each chunk's carry the next one's ``initial_carry``, with each chunk's own
  lengths, or its own ids (a row whose chunk opens a new segment reset to
  the default carry, as docs/streaming.md says to): against the same loops
  over each whole sequence."""
  run(case, streaming=True)


def run(case: Case, streaming: bool = False) -> None:
  in_f = case.integer('in_features', 1, 4)
  conv = case.pick('features', ['vector', 'vector', 'vector', 'conv']) == 'conv'
  # Convolutional steps: 1 or 2 spatial axes of 1-5 points, then channels.
  feat = (*(case.integer(f'spatial{i}', 1, 5) for i in range(case.integer('spatial_axes', 1, 2))),
          in_f) if conv else (in_f,)
  batch = tuple(case.integer(f'batch{i}', 1, 3)
                for i in range(case.pick('batch_axes', [0, 1, 1, 2])))
  time = case.integer('time', 1 + streaming, 6)
  time_major = bool(case.pick('time_major', [False, True]))
  case.integer('init_seed', 0, 9)
  masking = case.pick('masking', ['none', 'lengths', 'segments', 'segments']) if streaming \
      else None
  # A learned carry would reset a streamed segment to a value the reset below
  # takes from the reference, outside ours' gradient: none with ids.
  builder = Builder(case, time, streaming, learn=masking != 'segments', conv=conv)
  ours, ref, out = builder.layer('top', feat, 0)
  rows = math.prod(batch)

  if masking is None:
    masking = case.pick('masking', ['none', 'lengths', 'segments', 'segments'])
  kw: dict[str, Any] = {}
  if masking == 'segments':
    ids, segments = draw_segments(case, rows, time)
    case.config['segment_ids'] = ids.tolist()
    ids_b = ids.reshape((*batch, time))
    kw['segment_ids'] = jnp.asarray(np.moveaxis(ids_b, -1, 0) if time_major else ids_b)
  elif masking == 'lengths':
    lengths = np.asarray(case.rng.choice([0, 1, time, time + 2, *range(time + 1)], size=batch))
    case.config['lengths'] = lengths.tolist()
    segments = [[(0, min(int(n), time))] if n else [] for n in lengths.reshape(-1)]
    kw['seq_lengths'] = jnp.asarray(lengths, jnp.int32)
  else:
    segments = [[(0, time)]] * rows
  valid = np.zeros((rows, time), bool)
  for r, segs in enumerate(segments):
    for s, e in segs:
      valid[r, s:e] = True

  given = (_random_carry(case, ref, batch, isinstance(ours, (_Oriented, nr.StackedRNN)))
           if case.pick('initial_carry', [0, 1]) else None)
  x = case.normal((time, *batch, *feat) if time_major else (*batch, time, *feat))
  time_axis = 0 if time_major else len(batch)
  valid_b = valid.reshape((*batch, time))
  x_ours = garbage(case, x, valid_b, time_axis, len(feat)) if masking != 'none' else x
  w_y = case.normal((rows, time, *out))
  at_valid = valid.reshape((rows, time) + (1,) * len(out))
  w_c = [case.normal((rows, *leaf.shape[1:])) for leaf in jax.tree.leaves(ref.default())]

  def carry_loss(carry_rows):
    return sum(jnp.sum(c * w) for c, w in zip(jax.tree.leaves(carry_rows), w_c))

  cuts = sorted({int(t) for t in case.rng.integers(1, time, size=case.integer('cuts', 1, 2))}) \
      if streaming else []
  case.config['chunks'] = [0, *cuts, time]

  def chunked(model, x):
    """``model`` over the chunks, each chunk's carry passed on."""
    if not cuts:
      return model(x, initial_carry=given, return_carry=True, time_major=time_major, **kw)
    carry, ys, bounds = given, [], [0, *cuts, time]
    for a, b in zip(bounds[:-1], bounds[1:]):
      chunk_kw: dict[str, Any] = {}
      if masking == 'lengths':
        chunk_kw['seq_lengths'] = jnp.asarray(np.clip(lengths - a, 0, b - a), jnp.int32)
      elif masking == 'segments':
        ids_c = ids[:, a:b]
        if a:  # rows whose chunk opens a new segment, after an earlier one: the default
          new = ((ids_c[:, 0] == 0) | (ids_c[:, 0] != ids[:, a - 1])) & (ids_c != 0).any(1)
          new &= (ids[:, :a] != 0).any(1)
          carry = jax.tree.map(
            lambda c, d, new=new: jnp.where(new.reshape(batch + (1,) * (c.ndim - len(batch))),
                                            d[0], c), carry, ref.default())
        ids_c = ids_c.reshape((*batch, b - a))
        chunk_kw['segment_ids'] = jnp.asarray(np.moveaxis(ids_c, -1, 0) if time_major else ids_c)
      carry, y = model(jax.lax.slice_in_dim(x, a, b, axis=time_axis), initial_carry=carry,
                       return_carry=True, time_major=time_major, **chunk_kw)
      ys.append(y)
    return carry, jnp.concatenate(ys, axis=time_axis)

  def ours_loss(model, x):
    carry, y = chunked(model, x)
    y_rows = jnp.moveaxis(y, 0, len(batch)) if time_major else y
    y_rows = jnp.reshape(y_rows, (rows, time, *out))
    carry_rows = _carry_rows(carry, batch)
    loss = jnp.sum(jnp.where(at_valid, y_rows * w_y, 0)) + carry_loss(carry_rows)
    return loss, (carry_rows, y_rows)

  given_rows = None if given is None else _carry_rows(given, batch)

  def ref_loss(ref, x_rows):
    loss, outputs, carries = 0.0, [], []
    for r in range(rows):
      _DROPOUT['row'] = r
      first = None if given_rows is None else jax.tree.map(lambda a, r=r: a[r:r + 1], given_rows)
      carry = ref.fill(first)  # a row without segments returns it
      for k, (s, e) in enumerate(segments[r]):
        carry, y = ref(x_rows[r, s:e, None], ref.fill(first) if k == 0 else ref.default())
        loss += jnp.sum(y[:, 0] * w_y[r, s:e])
        outputs.append(y[:, 0])
      carries.append(carry)
    carry_rows = jax.tree.map(lambda *a: jnp.concatenate(a), *carries)
    return loss + carry_loss(carry_rows), (carry_rows, outputs)

  builder.draw_dropout_masks(batch, x.dtype)  # before ours' call advances the streams
  grad = nnx.grad(ours_loss, argnums=(0, 1), has_aux=True)
  (g_ours, dx_ours), (c_ours, y_ours) = grad(ours, jnp.asarray(x_ours))
  grad = nnx.jit(nnx.grad(ref_loss, argnums=(0, 1), has_aux=True))
  (g_ref, dx_ref), (c_ref, y_ref) = grad(ref, jnp.asarray(as_rows(x, batch, time_major)))

  y_ours = np.asarray(y_ours)
  expected = np.concatenate(y_ref) if y_ref else np.zeros((0, *out), np.float32)
  order = [(r, t) for r, segs in enumerate(segments) for s, e in segs for t in range(s, e)]
  at = tuple(np.array(i, int) for i in zip(*order)) if order else (np.zeros(0, int),) * 2
  case.close('outputs (segments)', y_ours[at], expected)
  case.close('outputs at padding (zeros)', y_ours[~valid], np.zeros_like(y_ours[~valid]))
  case.close('carry', c_ours, c_ref)

  dx_ours = as_rows(dx_ours, batch, time_major)
  case.close('input gradients', dx_ours[valid], np.asarray(dx_ref)[valid], atol=1e-4, rtol=1e-4)
  case.close('input gradients at padding (zeros)', dx_ours[~valid],
             np.zeros_like(dx_ours[~valid]), atol=0, rtol=0)

  g_model, g_refs = nnx.clone(ours), nnx.clone(ref)
  nnx.update(g_model, g_ours)
  nnx.update(g_refs, g_ref)
  for i, (mine, theirs) in enumerate(zip(nr_cells(g_model), g_refs.cells(), strict=True)):
    mine, theirs = params(mine), params(theirs)
    case.close(f'cell {i} gradients', {k: mine[k] for k in theirs}, theirs,
               atol=1e-4, rtol=1e-4)
  case.close('learned carry gradients', [p[...] for p in nr_learned(g_model)],
             [p[...] for p in ref_learned(g_refs)], atol=1e-4, rtol=1e-4)
