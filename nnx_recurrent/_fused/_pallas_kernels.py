"""The Pallas kernels of ``implementation='pallas'``: one direction's forward
recurrence and its backward, for the LSTM (projected or not) and the GRU.

:mod:`._pallas` lays the arrays out, calls these kernels inside a
:func:`jax.custom_vjp` and does the large matmuls around them. A kernel
program owns one block of batch rows for the whole sequence: a ``fori_loop``
over time with the state in the loop's carry.

Everything of width ``H`` or ``P`` is handled in column chunks (``lay.ch`` of
``Hp``, ``lay.cp`` of ``Pp``): the state is a tuple of ``(rows, chunk)``
pieces, ``h W_h`` is a sum of ``(rows, cp) x (cp, ch)`` tile products, and
each chunk's gate math runs as soon as its pre-activations are summed, so what
is live at once stays small: the old ``h``, the new ``h``, one chunk of ``c``
and of the gates, one weight tile. Unchunked, Triton staged every gate's whole
``(Hp, Hp)`` block at once: 520 KiB of shared memory for an LSTM at ``H = 128``
in float32 (an H200 block has 227 KiB) and 255 registers with spills, found by
compiling the kernels with Triton for ``sm_90a`` on a CPU
(``benchmarks/triton_resources.py``).

Up to ``settings.unrolled_chunks`` chunks of ``Hp``, the loop over them is
written out (static indices: weight tiles can be held across steps); beyond,
(``lay.rolled``) it is a ``fori_loop`` whose index picks and puts the state's
pieces by selects (values cannot be indexed) and places the loads and stores;
no weight tile is held. Written out at ``H = 512``, Triton took 4.4 and 12
minutes to compile the LSTM's forward and backward kernels (spilling 11 KiB
and 0.7 KiB); looped, 14 and 17 s (2 KiB and 0.4 KiB).

Triton's constraints (read from ``jax/_src/pallas/triton/lowering.py``, jax
0.10.2), and what the kernels do about them:

* Every array a kernel loads or stores must have a power-of-two number of
  elements: the batch block and the hidden size are padded to powers of two
  (``H`` to ``Hp`` within each gate, the projected size ``P`` to ``Pp``; the
  padded weight rows and columns are zero, so padded columns stay zero and
  never reach the real ones); chunks are powers of two.
* ``dot`` needs at least 16 rows, and contraction and output sizes of at least
  16 (Triton's smallest tile; the lowering checks it for float64): batch
  blocks have 16 rows or more (padding rows have length 0), chunks are 16
  wide or more. With ``settings.matmul == 'fma'`` the products are
  broadcast multiplies summed over ``K`` (no ``dot``), and a block may have
  any power-of-two rows, one included.
* Values cannot be sliced (``lax.slice`` has no lowering) nor concatenated
  (only ``[..., 1]`` pieces) nor split into 3: chunks and gates are read from
  and written to the refs (``pl.ds`` windows), never cut out of values.
* No scratch buffers and no scalar prefetch: the lengths (or the per-step
  flags of packed sequences) are an ordinary input block, the state lives in
  the loop's carry.
* Float32 matmuls follow ``jax_default_matmul_precision`` (JAX resolves it
  when the ``dot`` is traced): unset, Triton's lowering runs them in TF32;
  ``'highest'`` in full float32.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from nnx_recurrent._base import lstm_update
from nnx_recurrent._fused import _float16
from nnx_recurrent._fused._step_math import GRUMath, LSTMMath, identity

RESIDUALS = 5  # per step: LSTM i, f, g, o, c_prev; GRU r, z, n, h W_hn + b_hn, h_prev
GRADS = 4  # per step: LSTM d of i, f, g, o's inputs; GRU d of r's, z's, of h W_hn, of n's


def _dot(a, b, dtype, fma: bool):
  """``a @ b`` of ``(rows, K) x (K, N)`` blocks, ``a`` cast to ``b``'s dtype:
  a ``dot`` (tensor cores on a GPU; at least 16 rows), or with ``fma`` (the
  ``matmul='fma'`` setting) a broadcast product summed over ``K`` in ``dtype``,
  which Triton runs as multiply-adds on each thread's registers (any rows)."""
  if fma:
    return jnp.sum(a.astype(b.dtype).astype(dtype)[:, :, None] * b.astype(dtype)[None],
                   axis=1)
  return jax.lax.dot_general(a.astype(b.dtype), b, (((1,), (0,)), ((), ())),
                             preferred_element_type=dtype)


def _add(total, term):
  return term if total is None else total + term


class _Tiles:
  """A weight ref's last two axes as ``(rows, cols)`` tiles, indexed ``(*lead,
  row chunk, column chunk)``. The first tiles that fit ``budget[0]`` bytes
  (shared with the kernel's other weights, and consumed) are loaded once,
  before the time loop, and stay on chip across steps; the others are loaded
  at each use (from L2 on a GPU)."""

  def __init__(self, ref, rows: int, cols: int, budget: list[int], fma: bool):
    self.ref, self.rows, self.cols, self.fma = ref, rows, cols, fma
    size = rows * cols * jnp.dtype(ref.dtype).itemsize
    counts = tuple(ref.shape[:-2]) + (ref.shape[-2] // rows, ref.shape[-1] // cols)
    self.held = {}
    for key in itertools.product(*map(range, counts)):
      if budget[0] < size:
        break
      budget[0] -= size
      self.held[key] = self._load(key)

  def _load(self, key):
    *lead, r, c = key
    return self.ref[(*lead, pl.ds(r * self.rows, self.rows), pl.ds(c * self.cols, self.cols))]

  def __call__(self, *key):
    # Nothing is held when a key is traced (a loop over chunks): no hashing.
    return self.held[key] if self.held and key in self.held else self._load(key)

  def times(self, a, key, dtype):
    """``a`` times tile ``key``, as the ``matmul`` setting multiplies (:func:`_dot`)."""
    return _dot(a, self(*key), dtype, self.fma)


def _column(pieces, tiles, lead, j, dtype):
  """Column chunk ``j`` of ``concat(pieces) @ W``: ``pieces`` are the column
  chunks of the left operand, ``tiles(*lead, i, j)`` the tiles of ``W``."""
  total = None
  for i, p in enumerate(pieces):
    total = _add(total, tiles.times(p, (*lead, i, j), dtype))
  return total


def _matmul(pieces, tiles, lead, n_out, dtype):
  """``concat(pieces) @ W`` as its ``n_out`` column chunks."""
  return [_column(pieces, tiles, lead, j, dtype) for j in range(n_out)]


def _pick(pieces, j):
  """``pieces[j]``; for a traced ``j`` (a loop over chunks) one select per piece,
  since values cannot be indexed."""
  if isinstance(j, int):
    return pieces[j]
  out = pieces[0]
  for k in range(1, len(pieces)):
    out = jnp.where(j == k, pieces[k], out)
  return out


def _put(pieces, j, value):
  """``pieces`` with piece ``j`` replaced by ``value`` (see :func:`_pick`)."""
  if isinstance(j, int):
    return pieces[:j] + (value,) + pieces[j + 1:]
  return tuple(jnp.where(j == k, value, p) for k, p in enumerate(pieces))


def _empty(lay, n, width):
  """``n`` pieces ``width`` wide, to be :func:`_put` in a loop over chunks:
  unrolled nothing yet, rolled zeros (a loop's carry has one type)."""
  if not lay.rolled:
    return (None,) * n
  return tuple(jnp.zeros((lay.block, width), lay.state) for _ in range(n))


def _over_chunks(lay, chunk, acc):
  """``acc`` through ``chunk(j, acc)`` for each hidden chunk ``j``: unrolled
  (each chunk's code written out), or with ``lay.rolled`` a loop (one chunk's
  code: Triton took minutes to compile an unrolled kernel at ``H = 512``)."""
  if lay.rolled:
    return jax.lax.fori_loop(0, lay.nh, chunk, acc)
  for j in range(lay.nh):
    acc = chunk(j, acc)
  return acc


def _read(ref, lead, n, width, dtype):
  """``ref[lead]`` as ``n`` chunks of ``width`` columns (its last axis)."""
  return [ref[(*lead, pl.ds(j * width, width))].astype(dtype) for j in range(n)]


def _write(ref, lead, pieces, width):
  """``ref[lead]`` from its column chunks ``pieces``, each ``width`` wide."""
  for j, a in enumerate(pieces):
    ref[(*lead, pl.ds(j * width, width))] = a.astype(ref.dtype)


def _masks(steps_ref, t, lay, lengths):
  """``(valid, reset)`` of step ``t`` as ``(rows, 1)`` booleans (``reset`` is
  ``None`` without packed sequences). ``steps_ref``: the lengths ``(rows,)``,
  or per step ``(time, rows)``: 0 padding, 1 valid, 2 the first step of a
  segment after the row's first (it starts from zeros)."""
  if not lay.packed:
    return (t < lengths)[:, None], None
  flags = steps_ref[t]
  return (flags > 0)[:, None], (flags > 1)[:, None]


def _select(mask, new, old):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(mask, a, b), new, old)


def _carry_widths(lay, lstm: bool):
  """The chunk width of each carry leaf's pieces: ``c`` (``ch``), ``h`` (``cp``)."""
  return (lay.ch, lay.cp) if lstm else (lay.cp,)


def _load_carry(refs, lay, lstm: bool):
  return tuple(tuple(_read(r, (slice(None),), r.shape[-1] // w, w, lay.state))
               for r, w in zip(refs, _carry_widths(lay, lstm)))


def _store_carry(refs, carry, lay, lstm: bool):
  for r, pieces, w in zip(refs, carry, _carry_widths(lay, lstm)):
    _write(r, (slice(None),), pieces, w)


def _time_loop(lay, step, load, init):
  """``init`` through ``step(i, state, loaded)`` for each of the kernel's
  ``lay.time`` iterations ``i``. With ``settings.prefetch`` (and written-out
  chunks) ``loaded`` is ``load(i)``, issued during iteration ``i - 1`` before
  its work and carried over, so that the loads' latency overlaps that work
  (Triton's pipelining, ``num_stages > 1``, leaves loads that feed no ``dot``
  alone); the last iteration reloads its own (no read past the sequence).
  Otherwise ``loaded`` is ``None``: ``step`` loads what it needs itself."""
  if not (lay.settings.prefetch and not lay.rolled):
    return jax.lax.fori_loop(0, lay.time, lambda i, state: step(i, state, None), init)

  def body(i, both):
    state, loaded = both
    ahead = load(jnp.minimum(i + 1, lay.time - 1))
    return step(i, state, loaded), ahead

  return jax.lax.fori_loop(0, lay.time, body, (init, load(0)))[0]


def forward_kernel(*all_refs: Any, lay, lstm: bool, save: bool):
  """Inputs: steps, ``x W_i + b`` ``(time, rows, G, Hp)``, ``W_h``'s gate blocks
  ``(G, Pp, Hp)``, [float16 weights: each gate's scale ``(G,)``, padded], [GRU:
  ``b_hn``], [projection: ``W_hr`` ``(Hp, Pp)``], the initial carry; outputs:
  ``ys``, the final carry, [the residuals]."""
  refs = list(all_refs)
  steps_ref, xp_ref, w_ref = refs[:3]
  del refs[:3]
  w_scale = _float16.gate_scales(refs.pop(0), lay.gates) if lay.w16 else None
  bhn_ref = None if lstm else refs.pop(0)
  wr_ref = refs.pop(0) if lay.proj else None
  n_carry = 2 if lstm else 1
  carry_refs, refs = refs[:n_carry], refs[n_carry:]
  ys_ref, final_refs, res_refs = refs[0], refs[1: 1 + n_carry], refs[1 + n_carry:]
  lengths = None if lay.packed else steps_ref[...]
  budget = [0 if lay.rolled else lay.settings.hold_bytes]
  w = _Tiles(w_ref, lay.cp, lay.ch, budget, lay.fma)
  w_hr = None if wr_ref is None else _Tiles(wr_ref, lay.ch, lay.cp, budget, lay.fma)
  b_hn = None if bhn_ref is None else tuple(
    bhn_ref[pl.ds(j * lay.ch, lay.ch)].astype(lay.state)[None, :] for j in range(lay.nh))
  carry0 = _load_carry(carry_refs, lay, lstm)
  fits = _float16.fits(carry0[-1]) if lay.w16 else None  # h within float16's range

  def load_xp(t):  # step t's input projections: per hidden chunk, per gate
    return tuple(tuple(xp_ref[t, :, k, pl.ds(j * lay.ch, lay.ch)] for k in range(lay.gates))
                 for j in range(lay.nh))

  def step(t, carry, xps):
    """Step ``t`` from ``carry``; ``xps``: its input projections, loaded ahead
    (``settings.prefetch``), or ``None``: loaded here, per chunk."""
    valid, reset = _masks(steps_ref, t, lay, lengths)
    if reset is not None:  # a packed segment after the row's first starts from zeros
      carry = _select(reset, jax.tree_util.tree_map(jnp.zeros_like, carry), carry)
    h = carry[-1]
    h_op, unscale = _float16.operand(h, fits) if lay.w16 else (h, None)

    def chunk(j, new):  # the gates of hidden chunk j: its new c and h (m) pieces
      cols = pl.ds(j * lay.ch, lay.ch)
      xp = [(xp_ref[t, :, k, cols] if xps is None else xps[j][k]).astype(lay.state)
            for k in range(lay.gates)]
      hp = [_column(h_op, w, (k,), j, lay.state) for k in range(lay.gates)]
      if lay.w16:  # the float16 products scaled back, by gate and row
        hp = [p * (w_scale[k] * unscale) for k, p in enumerate(hp)]
      if lstm:
        c = _pick(carry[0], j)
        i, f, o = (jax.nn.sigmoid(xp[k] + hp[k]) for k in (0, 1, 3))
        zg = xp[2] + hp[2]
        new_c, m = lstm_update(c, i, f, zg, o, identity, jnp.tanh)
        new = (_put(new[0], j, new_c), _put(new[1], j, m))
        res = (i, f, jnp.tanh(zg), o, c)
      else:
        hn = hp[2] + _pick(b_hn, j)
        h_j = _pick(h, j)
        new_h, r, z, n = GRUMath.gate_step(h_j, *xp, hp[0], hp[1], hn)
        new = (_put(new[0], j, new_h),)
        res = (r, z, n, hn, h_j)
      if save and lay.rebuild:  # the LSTM's c alone, the rest rebuilt (Settings.residuals)
        res_refs[0][t, :, cols] = res[-1].astype(res_refs[0].dtype)
      elif save:
        for k, a in enumerate(res):
          res_refs[0][t, :, k, cols] = a.astype(res_refs[0].dtype)
      return new

    new = _over_chunks(lay, chunk, (_empty(lay, lay.nh, lay.ch),) * len(carry))
    outs = new[-1]
    if w_hr is not None:  # h = m W_hr
      outs = tuple(_matmul(outs, w_hr, (), lay.np, lay.state))
    _write(ys_ref, (t, slice(None)), [jnp.where(valid, a, 0) for a in outs], lay.cp)
    return _select(valid, new[:-1] + (outs,), carry)

  _store_carry(final_refs, _time_loop(lay, step, load_xp, carry0), lay, lstm)


def backward_kernel(*all_refs: Any, lay, lstm: bool):
  """Inputs: steps, the residuals, ``d ys``, ``W_h^T``'s gate blocks ``(G, Hp,
  Pp)``, [float16 weights: each gate's scale ``(G,)``, padded], [projection:
  ``W_hr^T`` ``(Pp, Hp)``], the final carry's cotangent;
  outputs: the gate gradients ``(time, rows, GRADS, Hp)`` (with ``residuals=
  'rebuilt'`` what they come from, ``(time, rows, 2 or 1, Hp)``), the initial carry's
  cotangent, [projection: each step's ``dh``, for ``dW_hr``]."""
  refs = list(all_refs)
  n_carry = 2 if lstm else 1
  steps_ref, res_ref, dys_ref, wt_ref = refs[:4]
  del refs[:4]
  w_scale = _float16.gate_scales(refs.pop(0), lay.gates) if lay.w16 else None
  wrt_ref = refs.pop(0) if lay.proj else None
  dfinal_refs, refs = refs[:n_carry], refs[n_carry:]
  dg_ref, dcarry0_refs, dh_ref = refs[0], refs[1: 1 + n_carry], refs[1 + n_carry:]
  lengths = None if lay.packed else steps_ref[...]
  budget = [0 if lay.rolled else lay.settings.hold_bytes]
  wt = _Tiles(wt_ref, lay.ch, lay.cp, budget, lay.fma)  # W_h's gate blocks, transposed
  w_hr_t = None if wrt_ref is None else _Tiles(wrt_ref, lay.cp, lay.ch, budget, lay.fma)

  def load_step(s):  # iteration s's step: its residuals per chunk, its d ys pieces
    t = lay.time - 1 - s
    res = tuple(tuple(res_ref[t, :, k, pl.ds(j * lay.ch, lay.ch)] for k in range(RESIDUALS))
                for j in range(lay.nh))
    return res, tuple(dys_ref[t, :, pl.ds(j * lay.cp, lay.cp)] for j in range(lay.np))

  def step(s, dcarry, loaded):
    """Iteration ``s`` (step ``time - 1 - s``); ``loaded``: its ``load_step``,
    loaded ahead (``settings.prefetch``), or ``None``: loaded here."""
    t = lay.time - 1 - s
    valid, reset = _masks(steps_ref, t, lay, lengths)
    dys = _read(dys_ref, (t, slice(None)), lay.np, lay.cp, lay.state) if loaded is None else \
      [a.astype(lay.state) for a in loaded[1]]
    dh = [a + d for a, d in zip(dcarry[-1], dys)]
    if dh_ref:
      _write(dh_ref[0], (t, slice(None)), [jnp.where(valid, a, 0) for a in dh], lay.cp)
    dm = tuple(dh if w_hr_t is None else _matmul(dh, w_hr_t, (), lay.nh, lay.state))

    def chunk(j, acc):  # hidden chunk j's gate gradients, and their dh_prev terms
      firsts, dh_prev = acc
      cols = pl.ds(j * lay.ch, lay.ch)
      res = [(res_ref[t, :, k, cols] if loaded is None else loaded[0][j][k]).astype(lay.state)
             for k in range(RESIDUALS)]
      seeds = (_pick(dcarry[0], j), _pick(dm, j)) if lstm else (_pick(dm, j),)
      if lstm:  # d of i, f, g, o's pre-activations, dc_prev
        *stored, first = LSTMMath.gate_step_bwd(*res, *seeds)
      else:  # d of r's, z's, of hn, of n's; dh_prev except via h W_h
        *stored, first = GRUMath.gate_step_bwd(*res, *seeds)
      stored = [jnp.where(valid, d, 0) for d in stored]
      # Settings.residuals='rebuilt': the gate math's dc and dh (the GRU's dh) instead of
      # the gate gradients, which XLA rebuilds from them
      for k, d in enumerate([jnp.where(valid, d, 0) for d in seeds] if lay.rebuild else stored):
        dg_ref[t, :, k, cols] = d.astype(dg_ref.dtype)
      if not lay.w16:
        for k in range(lay.gates):
          dh_prev = tuple(_add(p, wt.times(stored[k], (k, j, i), lay.state))
                          for i, p in enumerate(dh_prev))
        return _put(firsts, j, first), dh_prev
      # float16 operands: each gate's block of W_h^T was divided by its scale, so that
      # gate's gradients are multiplied by it; then each row is scaled into float16's
      # range, and the products scaled back
      weighted = [stored[k] * w_scale[k] for k in range(lay.gates)]
      scale = _float16.row_scale(weighted)
      scaled = [a / scale for a in weighted]
      terms = []
      for i in range(lay.np):
        total = None
        for k in range(lay.gates):
          total = _add(total, wt.times(scaled[k], (k, j, i), lay.state))
        terms.append(total * scale)
      return _put(firsts, j, first), tuple(_add(p, q) for p, q in zip(dh_prev, terms))

    firsts, dh_prev = _over_chunks(lay, chunk, (_empty(lay, lay.nh, lay.ch),
                                                _empty(lay, lay.np, lay.cp)))
    new = (firsts, dh_prev) if lstm else (tuple(a + b for a, b in zip(firsts, dh_prev)),)
    new = _select(valid, new, dcarry)
    if reset is None:
      return new
    # A later segment's first step read zeros: nothing flows on before it.
    return _select(reset, jax.tree_util.tree_map(jnp.zeros_like, new), new)

  state = _time_loop(lay, step, load_step, _load_carry(dfinal_refs, lay, lstm))
  _store_carry(dcarry0_refs, state, lay, lstm)
