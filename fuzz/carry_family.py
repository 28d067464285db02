"""A user's cell with odd carries and outputs in nr.RNN, against a NumPy loop
of the documented semantics (docs/migrating_from_nnx.md: "Batch-first outputs",
and "Three behaviours differ", item 1).

The cell is a tanh RNN whose carry may also hold leaves shared by the rows: a
step counter of shape ``()`` and a ``(F,)`` vector (a running mean of every
row's ``h``) whose size is drawn, the batch's leading size included, where
only the probe of the cell's ``initialize_carry`` and one step (traced at two
batch sizes) tells it from a row's leaf. Its outputs may add a scalar per step
(the sum of ``h`` over every row) and the shared vector. Carries come as a
dict or a tuple, given or the default. The reference runs the whole batch at
every step as the layer does: at a row's padding the cell sees zero inputs and
the row's kept carry; the rows' leaves keep their carry there and their
outputs are zero; shared leaves go on at every step and are never zeroed.
Reversed runs reverse each row within its length; ``keep_order`` puts the
rows' outputs back in input order, and an output leaf shared by the rows has
no one order when rows reverse by their own lengths: the layer must raise a
``ValueError`` naming ``cell`` there. Batch-first outputs get time after the
batch axes, a leaf with no room for them (``ndim <= batch axes``) keeping time
first.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from fuzz._core import Case, Mismatch

KEYS = ('h', 'n', 's')  # the carry's leaves, in the order a tuple carry holds them


class OddCell(nnx.Module):
  """``h' = tanh(x W + h U + b + 0.1 n + 0.1 mean(s))``; ``n' = n + 1`` and
  ``s' = 0.5 s + mean(h')`` shared by the rows, where the cell has them."""

  num_feature_axes = 1

  def __init__(self, w, u, b, *, form: str, counter: bool, shared: int, total: bool,
               emit_shared: bool):
    self.w, self.u, self.b = (nnx.Param(jnp.asarray(a)) for a in (w, u, b))
    self.form, self.counter, self.shared = form, counter, shared
    self.total, self.emit_shared = total, emit_shared

  def pack(self, leaves: dict) -> Any:
    return leaves if self.form == 'dict' else tuple(leaves[k] for k in KEYS if k in leaves)

  def unpack(self, carry: Any) -> dict:
    if self.form == 'dict':
      return dict(carry)
    return dict(zip([k for k in KEYS if k == 'h' or (k == 'n' and self.counter)
                     or (k == 's' and self.shared)], carry))

  def initialize_carry(self, input_shape, rngs=None):
    leaves = {'h': jnp.zeros((*input_shape[:-1], self.u.shape[0]))}
    if self.counter:
      leaves['n'] = jnp.zeros(())
    if self.shared:
      leaves['s'] = jnp.zeros((self.shared,))
    return self.pack(leaves)

  def __call__(self, carry, x):
    c = self.unpack(carry)
    drive = 0.1 * c['n'] if self.counter else 0.0
    if self.shared:
      drive = drive + 0.1 * c['s'].mean()
    pre = x @ self.w[...] + c['h'] @ self.u[...]
    h = jnp.tanh(pre + jnp.broadcast_to(self.b[...], pre.shape) + drive)  # (no rank promotion)
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
              reverse: bool, keep_order: bool, outputs: tuple[str, ...]) -> tuple[dict, dict]:
  """``(carry, outputs)`` for time-major ``xs`` ``(T, *batch, IN)``; outputs
  time-major, in processing order unless ``keep_order`` (shared leaves only
  flipped: the caller skips lengths with them)."""
  time, batch = xs.shape[0], xs.shape[1:-1]
  t = np.arange(time).reshape((time,) + (1,) * len(batch))
  full = np.broadcast_to(np.full(batch, time) if lengths is None else lengths, batch)
  idx = np.where(t < full, full - 1 - t, time - 1 - t + full) if reverse \
    else np.broadcast_to(t, (time, *batch))
  valid = t < full  # processing order: each row's valid steps first
  taken = np.take_along_axis(xs, idx[..., None], axis=0)
  taken = np.where(valid[..., None], taken, 0.0)
  ys: dict[str, list] = {k: [] for k in outputs}
  for step in range(time):
    v = valid[step][..., None]
    new, out = _step(p, carry, taken[step])
    carry = {**new, 'h': np.where(v, new['h'], carry['h'])}
    for k in outputs:
      ys[k].append(np.where(v, out[k], 0.0) if k == 'h' else out[k])
  stacked = {k: np.stack(v) for k, v in ys.items()}
  if reverse and keep_order:
    stacked = {k: (np.take_along_axis(y, idx[..., None], axis=0) if k == 'h'
                   else y[::-1]) for k, y in stacked.items()}
  return carry, stacked


def run(case: Case) -> None:
  nb = case.pick('batch_axes', [1, 2])
  batch = tuple(case.integer(f'batch_{i}', 1, 4) for i in range(nb))
  time, in_f = case.integer('time', 1, 6), case.integer('in', 1, 3)
  hid = case.integer('hidden', 1, 4)
  form = case.pick('form', ['dict', 'tuple'])
  counter = case.pick('counter', [False, True])
  shared = case.pick('shared', [0, batch[0], batch[0] + 1, 2])
  total = case.pick('total', [False, True])
  emit_shared = bool(shared) and case.pick('emit_shared', [False, True])
  time_major, reverse = case.pick('time_major', [False, True]), case.pick('reverse', [False, True])
  keep_order = reverse and case.pick('keep_order', [False, True])
  with_lengths = case.pick('lengths', [False, True])
  given = case.pick('initial_carry', [False, True])
  jit = case.pick('jit', [False, True])

  p = {'w': case.normal((in_f, hid), 0.5), 'u': case.normal((hid, hid), 0.5),
       'b': case.normal((hid,), 0.1)}
  cell = OddCell(p['w'], p['u'], p['b'], form=form, counter=counter, shared=shared,
                 total=total, emit_shared=emit_shared)
  xs = case.normal((time, *batch, in_f))
  lengths = case.rng.integers(0, time + 1, batch).astype(np.int32) if with_lengths else None
  start = {'h': np.zeros((*batch, hid), np.float32)}
  if counter:
    start['n'] = np.zeros((), np.float32)
  if shared:
    start['s'] = np.zeros((shared,), np.float32)
  if given:
    start = {k: case.normal(np.shape(v), 0.5) for k, v in start.items()}

  rnn = nr.RNN(cell, time_major=time_major, reverse=reverse, keep_order=keep_order,
               return_carry=True)
  x = xs if time_major else np.moveaxis(xs, 0, nb)
  kwargs: dict[str, Any] = {}
  if lengths is not None:
    kwargs['seq_lengths'] = jnp.asarray(lengths)
  if given:
    kwargs['initial_carry'] = cell.pack({k: jnp.asarray(v) for k, v in start.items()})

  def call(rnn, x, kwargs):
    return rnn(x, **kwargs)
  call = nnx.jit(call) if jit else call

  outputs = ('h',) + ('total',) * total + ('s',) * emit_shared
  shared_out = total or emit_shared
  if reverse and keep_order and lengths is not None and shared_out:
    try:
      call(rnn, jnp.asarray(x), kwargs)
    except ValueError as e:
      if 'RNN: `cell` expected per-step outputs that lead with the batch axes' not in str(e):
        raise Mismatch(f'keep_order over a shared output leaf: another ValueError: {e}') from e
      return
    raise Mismatch('keep_order over a shared output leaf with lengths ran (no one order)')

  carry, ys = call(rnn, jnp.asarray(x), kwargs)
  p64 = {k: np.asarray(v, np.float64) for k, v in p.items()}
  want_carry, want_ys = reference(p64, np.asarray(xs, np.float64), lengths,
                                  {k: np.asarray(v, np.float64) for k, v in start.items()},
                                  reverse=reverse, keep_order=keep_order, outputs=outputs)
  if not time_major:  # time after the batch axes, where a leaf has room for them
    want_ys = {k: y if y.ndim <= nb else np.moveaxis(y, 0, nb) for k, y in want_ys.items()}
  case.close('carry', cell.unpack(carry), want_carry)
  case.close('outputs', ys, want_ys)
