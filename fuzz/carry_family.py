"""A user's cell with odd carries and outputs in nr.RNN and compat.RNN, against
a NumPy loop of the documented semantics (docs/migrating_from_nnx.md:
"Batch-first outputs", and "Three behaviours differ", item 1;
docs/migrating_from_linen.md for compat.RNN).

The cell is a tanh RNN whose carry may also hold leaves shared by the rows: a
step counter of shape ``()`` and a ``(F,)`` vector (a running mean of every
row's ``h``) whose size is drawn, the batch's leading size included, where
only the probe of the cell's ``initialize_carry`` and one step (traced at two
batch sizes) tells it from a row's leaf; the counter is float32 or int32 (the
carry returned keeps the dtypes). Its outputs may add a scalar per step (the
sum of ``h`` over every row) and the shared vector. Carries come as a dict or
a tuple, given or the default; the carry is returned or not. nr.RNN gets NaN
in the padding at times: it must reach no output or carry. The reference runs
the whole batch at every step as the layer does: at a row's padding the cell
sees zero inputs and the row's kept carry; the rows' leaves keep their carry
there and their outputs are zero; shared leaves go on at every step and are
never zeroed. Reversed runs reverse each row within its length; ``keep_order``
puts the rows' outputs back in input order, and an output leaf shared by the
rows has no one order when rows reverse by their own lengths: the layer must
raise a ``ValueError`` naming ``cell`` there. Batch-first outputs get time
after the batch axes, a leaf with no room for them (``ndim <= batch axes``)
keeping time first; the output shapes are checked against that rule on its own
too. compat.RNN runs the same cell written in Linen, to flax.linen's values at
padding (the cell runs on over the padding as given, its outputs stay, the
carry returned keeps each row's last valid ``h`` and the shared leaves' last;
without ``return_carry`` nothing is masked, the same outputs); there
keep_order with lengths over shared outputs follows flax.linen's
``flip_sequences``, which reorders a leaf by its shape: the shared vector, of
one batch axis whose size is its own (or 1), has entry ``i`` put back by row
``i``'s length (by the one row's), and any other shared output (the scalar per
step, another size, two batch axes) must raise the ``ValueError``.

At times on a mesh of one Explicit ``data`` axis over this process's devices
(docs/checkpoints_and_sharding.md), the first batch axis that many times
longer and split over it (the inputs, lengths and a given ``h``; a given
shared leaf replicated): the same values, and every leaf of a row's (``h``,
carried and output) split over ``data`` on that axis and on no other, every
shared leaf (the counter, the shared vector, the per-step scalar) whole, with
or without padding. (compat's shared vector reordered as rows, above, is
a gather by the rows' lengths and may be split as they are.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import nnx_recurrent as nr
from fuzz._core import Case, Mismatch

KEYS = ('h', 'n', 's')  # the carry's leaves, in the order a tuple carry holds them


class Shape(NamedTuple):
  """What the cell carries and outputs besides ``h``, and its carry's form."""

  form: str  # 'dict' or 'tuple'
  counter: bool  # a () step counter n
  count_dtype: str  # the counter's dtype, 'float32' or 'int32'
  shared: int  # the size F of the shared vector s (0: none)
  total: bool  # a per-step scalar output, sum(h')
  emit_shared: bool  # s' as an output

  def pack(self, leaves: dict) -> Any:
    return leaves if self.form == 'dict' else tuple(leaves[k] for k in KEYS if k in leaves)

  def unpack(self, carry: Any) -> dict:
    if self.form == 'dict':
      return dict(carry)
    return dict(zip([k for k in KEYS if k == 'h' or (k == 'n' and self.counter)
                     or (k == 's' and self.shared)], carry))

  def carry(self, batch: tuple[int, ...], hidden: int) -> Any:
    leaves = {'h': jnp.zeros((*batch, hidden))}
    if self.counter:
      leaves['n'] = jnp.zeros((), self.count_dtype)
    if self.shared:
      leaves['s'] = jnp.zeros((self.shared,))
    return self.pack(leaves)

  def step(self, w, u, b, carry, x):
    """``h' = tanh(x W + h U + b + 0.1 n + 0.1 mean(s))``; ``n' = n + 1`` and
    ``s' = 0.5 s + mean(h')`` shared by the rows, where the cell has them."""
    c = self.unpack(carry)
    drive = 0.1 * c['n'] if self.counter else 0.0
    if self.shared:
      drive = drive + 0.1 * c['s'].mean()
    pre = x @ w + c['h'] @ u
    h = jnp.tanh(pre + jnp.broadcast_to(b, pre.shape) + drive)  # (no rank promotion)
    new = {'h': h}
    if self.counter:
      new['n'] = c['n'] + 1
    if self.shared:
      new['s'] = 0.5 * c['s'] + h.mean()
    out = {'h': h}
    if self.total:
      out['total'] = h.sum()
    if self.emit_shared and self.shared:
      out['s'] = new['s']
    return self.pack(new), out


class OddCell(nnx.Module):
  """The cell in flax.nnx's style."""

  num_feature_axes = 1

  def __init__(self, w, u, b, shape: Shape):
    self.w, self.u, self.b = (nnx.Param(jnp.asarray(a)) for a in (w, u, b))
    self.shape = shape

  def initialize_carry(self, input_shape, rngs=None):
    return self.shape.carry(tuple(input_shape[:-1]), self.u.shape[0])

  def __call__(self, carry, x):
    return self.shape.step(self.w[...], self.u[...], self.b[...], carry, x)


class LinenOddCell(nn.RNNCellBase):
  """The cell in flax.linen's style, for compat.RNN."""

  hidden: int
  shape: Shape

  @nn.compact
  def __call__(self, carry, x):
    w = self.param('w', nn.initializers.zeros_init(), (x.shape[-1], self.hidden))
    u = self.param('u', nn.initializers.zeros_init(), (self.hidden, self.hidden))
    b = self.param('b', nn.initializers.zeros_init(), (self.hidden,))
    return self.shape.step(w, u, b, carry, x)

  def initialize_carry(self, rng, input_shape):
    return self.shape.carry(tuple(input_shape[:-1]), self.hidden)

  @property
  def num_feature_axes(self) -> int:
    return 1


def _step(p: dict, c: dict, x: np.ndarray) -> tuple[dict, dict]:
  """The cell's step in NumPy (float64), over the whole batch."""
  drive = 0.1 * c['n'] if 'n' in c else 0.0
  if 's' in c:
    drive = drive + 0.1 * c['s'].mean()
  h = np.tanh(x @ p['w'] + c['h'] @ p['u'] + p['b'] + drive)
  new = {'h': h}
  if 'n' in c:
    new['n'] = c['n'] + 1
  if 's' in c:
    new['s'] = 0.5 * c['s'] + h.mean()
  out = {'h': h, 'total': h.sum(), 's': new.get('s')}
  return new, out


def reference(p: dict, xs: np.ndarray, lengths: np.ndarray | None, carry: dict, *,
              reverse: bool, keep_order: bool, outputs: tuple[str, ...],
              linen: bool = False, shared_by_shape: bool = False) -> tuple[dict, dict]:
  """``(carry, outputs)`` for time-major ``xs`` ``(T, *batch, IN)``; outputs
  time-major, in processing order unless ``keep_order`` (shared leaves only
  flipped: the caller skips lengths with them). ``linen``: flax.linen's
  values at padding, as compat.RNN gives them with ``return_carry``: the cell
  runs on over the padding as given and its outputs stay, and the carry
  returned keeps each row's last valid ``h``. ``shared_by_shape``: the shared
  vector's outputs put back by flax.linen's rule, entry ``i`` of ``(F,)`` by
  row ``i``'s reversal (one batch axis of size ``F`` or 1)."""
  time, batch = xs.shape[0], xs.shape[1:-1]
  t = np.arange(time).reshape((time,) + (1,) * len(batch))
  full = np.broadcast_to(np.full(batch, time) if lengths is None else lengths, batch)
  idx = np.where(t < full, full - 1 - t, time - 1 - t + full) if reverse \
    else np.broadcast_to(t, (time, *batch))
  valid = t < full  # processing order: each row's valid steps first
  taken = np.take_along_axis(xs, idx[..., None], axis=0)
  if not linen:
    taken = np.where(valid[..., None], taken, 0.0)
  ys: dict[str, list] = {k: [] for k in outputs}
  running = carry
  for step in range(time):
    v = valid[step][..., None]
    new, out = _step(p, running, taken[step])
    carry = {**new, 'h': np.where(v, new['h'], carry['h'])}
    running = new if linen else carry
    for k in outputs:
      ys[k].append(np.where(v, out[k], 0.0) if k == 'h' and not linen else out[k])
  stacked = {k: np.stack(v) for k, v in ys.items()}
  if reverse and keep_order:
    def back(k, y):
      if k == 'h':
        return np.take_along_axis(y, idx[..., None], axis=0)
      if k == 's' and shared_by_shape:  # (T, F) by (T, B): B == F, or B == 1
        return np.take_along_axis(y, np.broadcast_to(idx, y.shape), axis=0)
      return y[::-1]
    stacked = {k: back(k, y) for k, y in stacked.items()}
  return carry, stacked


def run(case: Case) -> None:
  layer = case.pick('layer', ['nr', 'compat'])
  nb = case.pick('batch_axes', [1, 2])
  batch = tuple(case.integer(f'batch_{i}', 1, 4) for i in range(nb))
  # An Explicit 'data' axis over this process's devices at times, splitting the
  # first batch axis (so that many times more rows): the shared leaves stay whole.
  mesh = None
  if case.pick('mesh', [False, False, True]):
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ('data',), axis_types=(AxisType.Explicit,))
    batch = (n * batch[0], *batch[1:])
  time, in_f = case.integer('time', 1, 6), case.integer('in', 1, 3)
  hid = case.integer('hidden', 1, 4)
  shared = case.pick('shared', [0, batch[0], batch[0] + 1, 2])
  shape = Shape(form=case.pick('form', ['dict', 'tuple']),
                counter=case.pick('counter', [False, True]), count_dtype='float32', shared=shared,
                total=case.pick('total', [False, True]),
                emit_shared=bool(shared) and case.pick('emit_shared', [False, True]))
  time_major, reverse = case.pick('time_major', [False, True]), case.pick('reverse', [False, True])
  keep_order = reverse and case.pick('keep_order', [False, True])
  with_lengths = case.pick('lengths', [False, True])
  given = case.pick('initial_carry', [False, True])
  jit = case.pick('jit', [False, True])
  return_carry = case.pick('return_carry', [False, True])
  if shape.counter:
    shape = shape._replace(count_dtype=case.pick('count_dtype', ['float32', 'int32']))
  # nr.RNN: the padding's values never reach the cell, NaN included (compat
  # runs the cell on them, as flax.linen: NaN would reach its outputs).
  nan_padding = layer == 'nr' and with_lengths and case.pick('nan_padding', [False, True])
  outputs = ('h',) + ('total',) * shape.total + ('s',) * shape.emit_shared
  shared_out = len(outputs) > 1
  # compat, as flax.linen: with keep_order over lengths, a shared output is put
  # back in each row's order by its shape (entry i by row i's, where its size
  # is the batch's one axis, or that axis is 1); any other fails.
  by_shape = (layer == 'compat' and reverse and keep_order and with_lengths
              and outputs == ('h', 's') and nb == 1 and batch[0] in (1, shared))

  p = {'w': case.normal((in_f, hid), 0.5), 'u': case.normal((hid, hid), 0.5),
       'b': case.normal((hid,), 0.1)}
  xs = case.normal((time, *batch, in_f))
  lengths = case.rng.integers(0, time + 1, batch).astype(np.int32) if with_lengths else None
  if nan_padding:
    pad = np.arange(time).reshape((time,) + (1,) * nb) >= lengths
    xs = np.where(pad[..., None], np.nan, xs).astype(np.float32)
  start = {'h': np.zeros((*batch, hid), np.float32)}
  if shape.counter:
    start['n'] = np.zeros((), shape.count_dtype)
  if shared:
    start['s'] = np.zeros((shared,), np.float32)
  if given:
    start = {k: (case.rng.integers(-3, 4, np.shape(v)).astype(v.dtype) if k == 'n'
                 else case.normal(np.shape(v), 0.5)) for k, v in start.items()}

  x = jnp.asarray(xs if time_major else np.moveaxis(xs, 0, nb))
  kwargs: dict[str, Any] = {}
  if lengths is not None:
    kwargs['seq_lengths'] = jnp.asarray(lengths)
  if given:
    kwargs['initial_carry'] = shape.pack({k: jnp.asarray(v) for k, v in start.items()})
  options = dict(time_major=time_major, reverse=reverse, keep_order=keep_order,
                 return_carry=return_carry)
  if layer == 'nr':
    module = nr.RNN(OddCell(p['w'], p['u'], p['b'], shape), **options)

    def call(module, x, kwargs):
      return module(x, **kwargs)
    call = nnx.jit(call) if jit else call
  else:
    module = nr.compat.RNN(LinenOddCell(hid, shape), **options)
    variables = {'params': {'cell': {k: jnp.asarray(v) for k, v in p.items()}}}

    def call(module, x, kwargs):
      return module.apply(variables, x, **kwargs)
    call = jax.jit(call, static_argnums=0) if jit else call

  if reverse and keep_order and lengths is not None and shared_out and not by_shape:
    try:
      call(module, x, kwargs)
    except ValueError as e:
      if 'RNN: `cell` expected per-step outputs that lead with the batch axes' not in str(e):
        raise Mismatch(f'keep_order over a shared output leaf: another ValueError: {e}') from e
      return
    raise Mismatch('keep_order over a shared output leaf with lengths ran (no one order)')

  if mesh is not None:  # the rows split over 'data'; the carry's shared leaves replicated
    with jax.set_mesh(mesh):
      x = jax.device_put(x, P(*[None] * time_major, 'data'))
      kwargs = {k: jax.device_put(v, P('data')) if k == 'seq_lengths' else v
                for k, v in kwargs.items()}
      if given:
        kwargs['initial_carry'] = shape.pack({k: jax.device_put(v, P('data') if k == 'h' else P())
                                              for k, v in shape.unpack(kwargs['initial_carry'])
                                              .items()})
      result = call(module, x, kwargs)
  else:
    result = call(module, x, kwargs)
  carry, ys = result if return_carry else (None, result)
  if mesh is not None:  # a row's leaves split over 'data' on their first batch axis, no other
    rows_at = {'h': int(time_major), 'total': None, 's': None}
    # (but compat's shared vector reordered by its shape as rows, flax.linen's
    # flip_sequences: a gather by the rows' lengths, split as they are)
    placed = {f'output {k}': (y, rows_at[k]) for k, y in ys.items()
              if not (by_shape and k == 's')}
    if return_carry:
      placed.update({f'carry {k}': (c, 0 if k == 'h' else None)
                     for k, c in shape.unpack(carry).items()})
    for what, (a, at) in placed.items():
      spec = tuple(jax.typeof(a).sharding.spec) + (None,) * np.ndim(a)
      want = tuple('data' if i == at else None for i in range(np.ndim(a)))
      if spec[:np.ndim(a)] != want:
        raise Mismatch(f'{what} split as {spec[:np.ndim(a)]}, not {want}')
  # The layout rule on its own: time after the batch axes where a leaf has
  # more axes than them, else first ((time,) for the per-step scalar).
  hidden_shape = (time, *batch, hid) if time_major else (*batch, time, hid)
  layout = {'h': hidden_shape, 'total': (time,),
            's': (time, shared) if time_major or nb > 1 else (shared, time)}
  got_shapes = {k: tuple(np.shape(y)) for k, y in ys.items()}
  want_shapes = {k: layout[k] for k in outputs}
  if got_shapes != want_shapes:
    raise Mismatch(f'output shapes {got_shapes} != {want_shapes}')
  p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
  want_carry, want_ys = reference(p64, np.asarray(xs, np.float64), lengths,
                                  {k: np.asarray(v, np.float64) for k, v in start.items()},
                                  reverse=reverse, keep_order=keep_order, outputs=outputs,
                                  linen=layer == 'compat', shared_by_shape=by_shape)
  if not time_major:  # time after the batch axes, where a leaf has room for them
    want_ys = {k: y if y.ndim <= nb else np.moveaxis(y, 0, nb) for k, y in want_ys.items()}
  if return_carry:
    case.same_dtypes('carry dtypes', shape.unpack(carry), start)  # the cell keeps them
    case.close('carry', shape.unpack(carry), want_carry)
  case.close('outputs', ys, want_ys)
