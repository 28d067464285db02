"""Float16 operands for the Pallas kernels' recurrent products
(``Settings.recurrent_weights='float16'``).

Float16 has TF32's 10 mantissa bits but ends at 65504, so no operand is
rounded as it stands: it is first divided by a power of two that brings it
within 2 (exact), and the product is multiplied back.

* ``W_h``: each gate's block, once, outside the kernels (:func:`scaled_weights`).
* The backward's gate gradients: each row, at every step (:func:`row_scale`).
* The forward's ``h``: as it stands while the kernel program's initial carry is
  within range, since ``h`` then stays within range (an LSTM's within 1, a
  GRU's ``(1 - z) n + z h`` within the larger of 1 and the initial carry's);
  otherwise each row at every step (:func:`operand`).

A value smaller than ``2**-14`` of the largest it is scaled with becomes a
float16 subnormal: it loses at most ``2**-25`` of that largest, where TF32
loses up to ``2**-11`` of the largest on the largest itself. The backward's
rows span every gate: a gate whose gradients are that much below another's in
the row keeps only that absolute precision (docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

MAX = 65504.0  # float16's largest finite value


def power_at_or_below(top):
  """The power of two at or below each of ``top``'s (non-negative float32)
  entries, 1 where an entry is 0 (or subnormal): dividing by it is exact and
  brings the entry within ``[1, 2)``."""
  bits = jax.lax.bitcast_convert_type(top, jnp.int32) & 0x7F800000  # the exponent alone
  power = jax.lax.bitcast_convert_type(bits, top.dtype)
  return jnp.where(power > 0, power, jnp.ones_like(power))


def row_scale(pieces):
  """The power of two at or below each row's largest ``|value|`` over ``pieces``
  (``(rows, 1)``; 1 for a row of zeros)."""
  return power_at_or_below(jnp.max(functools.reduce(jnp.maximum, [jnp.abs(p) for p in pieces]),
                                   axis=1, keepdims=True))


def scaled_weights(w):
  """``W_h``'s gate blocks ``(G, ., .)`` in float16, each divided by its
  :func:`power_at_or_below` its largest magnitude, and those powers ``(G,)``."""
  scale = power_at_or_below(jnp.max(jnp.abs(w), axis=(1, 2)))
  return (w / scale[:, None, None]).astype(jnp.float16), scale


def gate_scales(ref, gates: int):
  """:func:`scaled_weights`' powers as the kernels read them: a scalar a gate,
  loaded once."""
  return tuple(ref[k] for k in range(gates))


def fits(carry_pieces):
  """Whether ``h`` stays within float16's range in a kernel program whose
  initial ``h`` is ``carry_pieces`` (false for a NaN). One axis at a time: jax
  0.12's Triton lowering of a reduction over both axes of a ``(rows, chunk)``
  value fails ("Length of sharding.spec (2) must be equal to aval's ndim (1)")."""
  return functools.reduce(jnp.maximum, [jnp.max(jnp.max(jnp.abs(p), axis=1), axis=0)
                                        for p in carry_pieces]) <= MAX


def operand(h, within: bool):
  """The forward's products' left operand: ``h``'s pieces as they are while
  ``within`` (:func:`fits`), else divided by :func:`row_scale`; and what the
  products are multiplied by after (1, or that scale). ``within`` is one value
  for the program: a branch (Triton's ``scf.if``), not a select, so the scale
  costs nothing while the initial carry is within range."""
  def scaled(pieces):
    scale = row_scale(pieces)
    return tuple(p / scale for p in pieces), scale

  return jax.lax.cond(within, lambda pieces: (pieces, jnp.ones_like(pieces[0][:, :1])), scaled,
                      tuple(h))
