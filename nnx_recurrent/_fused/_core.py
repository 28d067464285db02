"""The machinery of the fused layers: construction, the call, and the one place
that picks a backend.

:meth:`_FusedBase._run_layer` turns one layer (one or both directions) into
``(final_carries, outputs)``: through cuDNN (:mod:`._cudnn`) with
``implementation='cudnn'``, otherwise, and by default (``'auto'``: cuDNN through
JAX measured slower than the scans on an H200), the XLA scans (:mod:`._xla`)
or the Pallas kernels (:mod:`._pallas`) one direction at a time (the kernels
both directions in one launch, vmapped over them), the backward
direction on each row's valid part (each packed segment) reversed
(:func:`_scan.reverse_indices` / :func:`_scan.take_time`, the same core as
``RNN`` and ``Bidirectional``; validation, layout and the padding and reset
masks through :func:`_scan.prepare`). Dropout between layers is this module's
in every case. :class:`~nnx_recurrent.LSTM` and :class:`~nnx_recurrent.GRU`
(:mod:`._layers`) only name their cell and its math.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from nnx_recurrent import _checks, _scan
from nnx_recurrent._base import (
  _NO_METADATA,
  Array,
  ArrayOrNumPy,
  RngsLike,
  default_bias_init,
  default_kernel_init,
  default_recurrent_kernel_init,
  swapped_submodules,
)
from nnx_recurrent._fused import _cudnn, _pallas, _plans, _xla

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')


def _avals(tree) -> tuple:
  """``tree``'s structure and its leaves' shapes and dtypes."""
  leaves, structure = jax.tree_util.tree_flatten(tree)
  return structure, [(jnp.shape(a), jnp.result_type(a)) for a in leaves]


def _beams(given: Any, default: Any, torch_rows: int | None) -> bool:
  """Whether every leaf of ``given`` is its ``default`` leaf with leading axes
  added (a carry of beams over shared inputs, which ``nr.RNN`` broadcasts),
  other than one axis of ``torch_rows`` (PyTorch's ``h_0``, which
  :func:`_checks.hint_torch_carry` names)."""
  pairs = list(zip(jax.tree_util.tree_leaves(given), jax.tree_util.tree_leaves(default)))
  return bool(pairs) and all(
    jnp.ndim(g) > jnp.ndim(d) and tuple(jnp.shape(g)[-jnp.ndim(d):]) == tuple(jnp.shape(d))
    and tuple(jnp.shape(g)[:-jnp.ndim(d)]) != (torch_rows,) for g, d in pairs)


class _FusedBase(nnx.Module):
  _cell_type: type
  _math: Any
  _cudnn: bool  # has a cuDNN path (_cudnn.layer)
  _carry_doc: str  # the cell's carry, for messages

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout_rate: float = 0.0,
    time_major: bool = False,
    return_carry: bool = False,
    reverse: bool = False,
    keep_order: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Initializer = default_kernel_init,
    recurrent_kernel_init: Initializer = default_recurrent_kernel_init,
    bias_init: Initializer = default_bias_init,
    kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    recurrent_kernel_metadata: Mapping[str, Any] = _NO_METADATA,
    bias_metadata: Mapping[str, Any] = _NO_METADATA,
    implementation: str = 'auto',
    rngs: nnx.Rngs,
  ):
    where = type(self).__name__
    self.implementation = implementation  # checked below, with the options (_check_options)
    self.in_features = _checks.check_positive_int(where, 'in_features', in_features)
    self.hidden_features = _checks.check_positive_int(where, 'hidden_features', hidden_features)
    self.num_layers = _checks.check_positive_int(where, 'num_layers', num_layers)
    self.dropout_rate = _checks.check_rate(where, 'dropout_rate', dropout_rate)
    _checks.check_dtype(where, 'dtype', dtype, allow_none=True)
    _checks.check_dtype(where, 'param_dtype', param_dtype)
    _checks.check_callables(where, kernel_init=kernel_init,
                            recurrent_kernel_init=recurrent_kernel_init, bias_init=bias_init)
    if not isinstance(rngs, nnx.Rngs):
      _checks.fail(where, 'rngs', 'an nnx.Rngs', type(rngs).__name__, TypeError)
    # The size of each direction's h and outputs: proj_features (an LSTM's, set
    # before this runs), else hidden_features.
    self.out_features: int = getattr(self, 'proj_features', None) or self.hidden_features
    self._check_options(implementation, packed=False)
    self.bidirectional = _checks.check_bool(where, 'bidirectional', bidirectional)
    self.time_major = _checks.check_bool(where, 'time_major', time_major)
    self.return_carry = _checks.check_bool(where, 'return_carry', return_carry)
    self.reverse = _checks.check_bool(where, 'reverse', reverse)
    self.keep_order = _checks.check_bool(where, 'keep_order', keep_order)
    self._check_reverse(self.reverse)
    kw = dict(kernel_init=kernel_init, recurrent_kernel_init=recurrent_kernel_init,
              bias_init=bias_init, dtype=dtype, param_dtype=param_dtype,
              kernel_metadata=kernel_metadata, recurrent_kernel_metadata=recurrent_kernel_metadata,
              bias_metadata=bias_metadata, rngs=rngs, **self._cell_options())
    width = self.out_features * self.num_directions
    forward, backward = [], []
    for layer in range(self.num_layers):
      n_in = self.in_features if layer == 0 else width
      forward.append(self._cell_type(n_in, self.hidden_features, **kw))
      if self.bidirectional:
        backward.append(self._cell_type(n_in, self.hidden_features, **kw))
    self.forward = nnx.List(forward)
    self.backward = nnx.List(backward) if self.bidirectional else nnx.data(None)
    # Between layers only; no PRNG state unless it is needed.
    if self.dropout_rate:
      _checks.check_stream(type(self).__name__, rngs, 'dropout',
                           f'for dropout_rate={self.dropout_rate}')
    self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs if self.dropout_rate else None)

  def _cell_options(self) -> Mapping[str, Any]:
    """Options of the cells beyond the shared ones (the LSTM's projection)."""
    return {}

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  def _check_reverse(self, reverse: bool):
    if reverse and self.bidirectional:
      _checks.fail(type(self).__name__, 'reverse', 'False for a bidirectional layer (it runs '
                   'both directions already)', repr(reverse))

  def _check_implementation(self, implementation: Any) -> None:
    supported = IMPLEMENTATIONS if self._cudnn else ('auto', 'xla', 'pallas')
    if implementation not in supported:
      why = '' if self._cudnn else ' (jax.experimental.rnn has a cuDNN LSTM only)'
      _checks.fail(type(self).__name__, 'implementation', ' or '.join(map(repr, supported)) + why,
                   repr(implementation))

  def _check_options(self, implementation: str, packed: bool):
    """``implementation`` (set when built, or since); cuDNN (jax.experimental.rnn)
    has neither projections nor packed sequences."""
    self._check_implementation(implementation)
    if implementation != 'cudnn':
      return
    what, why = (('proj_features', 'has no projection') if getattr(self, 'proj_features', None)
                 else ('segment_ids', 'takes seq_lengths only') if packed else (None, None))
    if what is not None:
      _checks.fail(type(self).__name__, 'implementation', f"'auto', 'xla' or 'pallas' with "
                   f"{what} (jax.experimental.rnn's cuDNN LSTM {why})", repr(implementation))

  def _cells(self, layer: int) -> list:
    backward = self.backward
    return [self.forward[layer]] + ([backward[layer]] if backward is not None else [])

  def _check_cells(self) -> None:
    """Each cell is one this layer could have built: it reads the cells'
    kernels and biases and runs its own step, so a cell changed since (another
    cell type, or a projection swapped for ``nnx.LoRALinear`` by LoRA surgery:
    :func:`_base.swapped_submodules`) would be run as the built-in one,
    silently: a ``TypeError`` names it instead."""
    cell_type = self._cell_type.__name__
    for layer in range(self.num_layers):
      for direction, cell in zip(('forward', 'backward'), self._cells(layer)):
        if type(cell) is not self._cell_type:
          got = f'cell type {type(cell).__name__}'
        elif swapped := swapped_submodules(cell):
          got = f'{cell_type} with {", ".join(swapped)}'
        else:
          continue
        _checks.fail(type(self).__name__, f'{direction}[{layer}]',
                     f"the layer's own {cell_type}, of nnx.Linear projections (the layer reads "
                     'their parameters and runs its own fused step; run cells changed '
                     'otherwise, e.g. by LoRA, as nr.StackedRNN of nr.RNN or nr.Bidirectional '
                     'over them)', got, TypeError)

  def _default_carry(self, batch_shape: tuple[int, ...]):
    per_layer = []
    for layer in range(self.num_layers):
      carries = [cell.initialize_carry(batch_shape + (cell.in_features,))
                 for cell in self._cells(layer)]
      per_layer.append(carries[0] if len(carries) == 1 else tuple(carries))
    return self._public_carry(per_layer)

  def _initial_carry(self, where: str, initial_carry: Any, batch_shape: tuple[int, ...]) -> list:
    """``initial_carry`` as the layers run it: one tuple per layer with one
    carry per direction, each checked against the cell's default carry.

    It takes what the equivalent ``RNN`` / ``Bidirectional`` / ``StackedRNN``
    take (the class docstring): a list wherever a tuple goes (the per-layer
    tuple, a direction pair, an LSTM's ``(c, h)``), and ``None`` for the whole
    carry, a layer's or a direction's: that part's default (zeros).
    """
    default = self._default_carry(batch_shape)
    n, single = self.num_layers, self.num_layers == 1 and not self.bidirectional
    if single:
      initial_carry, default = (initial_carry,), (default,)
    elif initial_carry is not None and (
        not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != n):
      _checks.fail(where, 'initial_carry', f'a tuple of {n} carr{"y" if n == 1 else "ies"} '
                   '(one per layer, None for the default)', _checks.kind(initial_carry))
    per_layer = []
    for layer in range(n):
      given = None if initial_carry is None else initial_carry[layer]
      arg = 'initial_carry' if single else f'initial_carry[{layer}]'
      if not self.bidirectional:
        per_layer.append((self._cell_carry(where, arg, given, default[layer]),))
        continue
      pair = _checks.carry_pair(where, given, arg)
      per_layer.append(tuple(self._cell_carry(where, f'{arg}[{d}]', pair[d], default[layer][d])
                             for d in range(2)))
    return per_layer

  def _cell_carry(self, where: str, arg: str, given: Any, default: Any) -> Any:
    """One direction's carry of one layer: ``given``, the cell's carry (a list
    for a tuple, as ``RNN`` reads it), or ``default`` where ``None``."""
    if given is None:
      return default
    if isinstance(given, list) and isinstance(default, tuple):
      given = tuple(given)
    for leaf in jax.tree_util.tree_leaves(given):
      _checks.check_not_foreign(where, arg, leaf)
    structure: Any = jax.tree_util.tree_structure(given)  # jax's PyTreeDef (untyped for mypy)
    if structure != jax.tree_util.tree_structure(default):
      _checks.fail(where, arg, f"the cell's carry, {self._carry_doc}", _checks.structure(given))
    try:
      _checks.check_tree_matches(where, arg, given, default)
    except ValueError as e:
      if _beams(given, default, _checks.torch_rows(self)):
        _checks.reword(e, f'{str(e)[:-1]} (one carry row per input row: the fused layers take '
                          'no beams over shared inputs, a carry with leading axes the inputs '
                          'lack; repeat the inputs per beam, or, without seq_lengths, use '
                          'nr.RNN, which broadcasts them as flax.nnx does).')
      raise
    return given

  def _public_carry(self, per_layer: list):
    if self.num_layers == 1 and not self.bidirectional:
      return per_layer[0]
    return tuple(per_layer)

  def _dtype(self, cell, xs: Array, carry):
    """The cell's computation dtype: ``dtype``, or nnx.Linear's promotion of
    the inputs, the parameters and the carry (as the cell's own step promotes
    ``h W_h``: a float64 ``initial_carry`` under x64 gives float64 outputs)."""
    if cell.dtype:
      return cell.dtype
    leaves = jax.tree_util.tree_leaves((self._math.params(cell), carry))
    return jnp.result_type(xs.dtype, *leaves)

  def _backend(self, dtype, xs: Array, packed: bool) -> str:
    """The one place that picks a layer's backend: 'xla', 'cudnn' or 'pallas'.

    'auto' is the XLA scans, but where the Pallas kernels measured faster on
    this GPU (``_plans.pallas_measured_faster``). Through
    jax.experimental.rnn, cuDNN measured slower than the scans on an H200 at
    three of the four benchmark shapes and at most 13% faster at the fourth
    (benchmarks/RESULTS.md, "GPU"): only 'cudnn' picks it.
    """
    where, chosen = type(self).__name__, self.implementation
    self._check_options(chosen, packed)
    reason = {'cudnn': lambda: _cudnn.unsupported(dtype), 'pallas': _pallas.unsupported}.get(
      chosen, lambda: None)()
    if reason is not None:
      name = {'cudnn': 'cuDNN', 'pallas': 'Pallas'}[chosen]
      usable = "'auto', 'xla' or 'pallas'" if chosen == 'cudnn' and _pallas.unsupported() is None \
        else "'auto' or 'xla'"
      _checks.fail(where, 'implementation', f'{usable} here ({name} {reason})', repr(chosen))
    # Calls the kernels cannot take (where 'auto' keeps the scans, measured faster or not).
    refusal = None
    if not all(isinstance(d, int) for d in xs.shape):
      refusal = ("'auto' or 'xla' for a symbolic batch or time size (jax.export): the Pallas "
                 "kernels' blocks are fixed when traced")
    elif _scan.varying_axes(xs):
      refusal = ("'auto' or 'xla' inside jax.shard_map with check_vma=True ('pallas' runs "
                 "there with check_vma=False)")
    elif _scan.explicit_mesh(xs):
      refusal = ("'auto' or 'xla' under a mesh of Explicit axes (jax.set_mesh with "
                 "AxisType.Explicit: the Pallas kernels index unsharded arrays only); for "
                 "'pallas' call the layer inside jax.shard_map over the batch, with "
                 "check_vma=False")
    if chosen == 'pallas' and refusal is not None:
      _checks.fail(where, 'implementation', refusal, repr(chosen))
    if chosen == 'auto':
      faster = refusal is None and _plans.pallas_measured_faster(
        self._math, math.prod(xs.shape[1:-1]), self.hidden_features)
      return 'pallas' if faster and _pallas.unsupported() is None else 'xla'
    return chosen

  def _run_layer(self, layer: int, xs: Array, carries, masks: _scan.StepMasks, idx,
                 seq_lengths):
    """One layer over time-major ``xs``: ``(finals, ys)``, one final carry per
    direction, through the backend :meth:`_backend` picks."""
    cells = self._cells(layer)
    dtype = self._dtype(cells[0], xs, carries)
    packed = masks.reset is not None
    backend = self._backend(dtype, xs, packed) if xs.size else 'xla'
    if backend == 'cudnn':  # both directions in one call
      try:
        return _cudnn.layer(cells, xs, carries, seq_lengths, dtype)
      except NotImplementedError as e:  # jax.vmap: the primitives have no batching rule
        if 'Batching rule' not in str(e):
          raise
        _checks.fail(type(self).__name__, 'implementation',
                     "'auto' or 'xla' under jax.vmap (jax.experimental.rnn's cuDNN "
                     'primitives have no batching rule)', "'cudnn'")
    # The backward direction: each row (each segment) reversed; the masks stay as they are.
    inputs = [(self._math.params(cell), xs if d == 0 else _scan.take_time(xs, idx), carries[d])
              for d, cell in enumerate(cells)]
    dtypes = [self._dtype(cell, xs, carries[d]) for d, cell in enumerate(cells)]
    if backend == 'pallas' and len(inputs) == 2 and dtypes[0] == dtypes[1] and \
        _avals(inputs[0]) == _avals(inputs[1]):
      # Both directions in one kernel launch per pass: vmapped over the direction,
      # each pallas_call gains a grid axis (the direction), so a GPU runs the two
      # at once, where two calls ran one after the other (on an H200 the second
      # direction added 3-18% to the forward, 16-29% to the training step).
      stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *inputs)
      outs = jax.vmap(lambda p, x, c: self._run_direction(p, x, c, masks, seq_lengths, backend,
                                                          dtypes[0]))(*stacked)
      outs = [jax.tree_util.tree_map(lambda a, d=d: a[d], outs) for d in range(2)]
    else:
      outs = [self._run_direction(p, x, c, masks, seq_lengths, backend, dt)
              for (p, x, c), dt in zip(inputs, dtypes)]
    finals = [final for final, _ in outs]
    ys = [y if d == 0 else _scan.take_time(y, idx) for d, (_, y) in enumerate(outs)]
    return finals, (ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1))

  def _run_direction(self, params, xs: Array, carry, masks: _scan.StepMasks,
                     seq_lengths: Array | None, backend: str, dtype):
    """One direction over time-major ``xs``, given its cell's parameters
    (``self._math.params``) and computation dtype (:meth:`_dtype`):
    ``(final_carry, ys)`` with the XLA scans or the Pallas kernels."""
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    carry_in = jax.tree_util.tree_map(lambda a: a.astype(dtype), carry)
    # shard_map (check_vma): replicated parameters enter the custom VJP varying
    # like the inputs, so the transpose of the cast sums their gradients over the mesh.
    params = _scan.vary_like(params, xs)
    time = xs.shape[0]
    if time == 0:  # nothing to scan: the carry passes through
      return carry, jnp.zeros(xs.shape[:-1] + (self.out_features,), dtype)
    xs = xs.astype(dtype)
    if backend == 'pallas':
      valid, reset = masks
      if valid is not None and reset is not None:  # per step: 0 padding, 1 valid, 2 reset
        steps = valid.astype(jnp.int32) + reset.astype(jnp.int32)
      else:  # as the scans treat unchecked lengths
        steps = (jnp.full(xs.shape[1:-1], time, jnp.int32) if seq_lengths is None
                 else jnp.clip(seq_lengths, 0, time))
      final, ys = _pallas.recurrence(self._math, reset is not None, params, xs, carry_in, steps)
    else:
      plan = _plans.plan_for_call(self._math, params, xs)
      if _scan.explicit_mesh(xs):  # parameters split over the mesh split the carry too
        _scan.check_gate_split(type(self).__name__, 'hidden_features', self.hidden_features,
                               params, str(self.hidden_features))
        carry_in = _xla.settled_carry(self._math, plan.primal, params, xs, carry_in)
      if plan.custom_vjp:
        final, ys = _xla.recurrence(self._math, plan, params, xs, carry_in, *masks)
      else:  # JAX differentiates the forward scan (its unused residuals are dropped)
        with jax.named_scope(f'nr.{self._math.name}/forward'):
          final, ys, _ = _xla.forward_scan(self._math, plan.primal, params, xs, carry_in,
                                           *masks)
    final = _scan.in_dtypes_of(carry, final)
    return final, ys

  @_checks.named_errors
  def __call__(
    self,
    inputs: ArrayOrNumPy,
    *,
    initial_carry: Any = None,
    seq_lengths: ArrayOrNumPy | None = None,
    segment_ids: ArrayOrNumPy | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    rngs: RngsLike = None,
  ):
    """Runs the stack over ``inputs``.

    Args:
      inputs: ``(*batch, time, in_features)`` (or time first).
      initial_carry: in the structure described in the class docstring
        (lists for tuples, ``None`` for a layer's or a direction's zeros);
        default zeros.
      seq_lengths: integer ``(*batch)`` lengths; steps at or past a row's
        length are padding (zero outputs, carry unchanged; whatever the
        inputs hold there reaches no output and no gradient).
      segment_ids: packed sequences, as for ``nr.RNN``: integer ids shaped
        like the batch and time axes, ``0`` = padding; every layer and
        direction starts a row's first segment from its initial carry and
        every later one from zeros, and the backward direction reverses each
        segment within its span. Not together with ``seq_lengths``.
      return_carry, time_major, reverse, keep_order: override the attributes.
      rngs: dropout RNG (an ``nnx.Rngs``, ``RngStream`` or key), overriding
        the one given at construction; a key is split, one per gap between
        layers.

    Returns:
      ``outputs``, or ``(final_carry, outputs)`` with ``return_carry``.
    """
    where = type(self).__name__
    _checks.check_rngs(where, rngs)
    # Before any array work: `implementation` may have been set since construction,
    # and the cells changed.
    self._check_options(self.implementation, packed=segment_ids is not None)
    self._check_cells()
    return_carry, time_major, reverse, keep_order = _checks.call_flags(
      where, self, return_carry=return_carry, time_major=time_major, reverse=reverse,
      keep_order=keep_order)
    self._check_reverse(reverse)
    seq = _scan.prepare(where, inputs, num_feature_axes=1, in_features=self.in_features,
                        time_major=time_major, seq_lengths=seq_lengths, segment_ids=segment_ids)
    _checks.check_real_for(where, seq.xs, self.forward[0].param_dtype)
    with _checks.hint_torch_carry(initial_carry, self, seq.batch_shape):
      per_layer = self._initial_carry(where, initial_carry, seq.batch_shape)
    initial_carry = _scan.like_inputs(per_layer, seq.xs, len(seq.batch_shape), seq.masks)
    idx = None
    if self.bidirectional or reverse:
      idx = _scan.reverse_indices(seq.time, seq.batch_shape, seq.seq_lengths, seq.segment_ids)
    # Zeros at padding, once: the projections and steps there then compute on
    # zeros, whose values carry selection discards and whose gradients are 0
    # (garbage would give NaN * 0 = NaN). Later layers read outputs that are 0
    # at padding (and dropout keeps them 0).
    xs = _scan.clean_padding(seq.xs, seq.masks.valid)  # as nr.RNN's scan does
    if reverse:  # each row (segment) from its last valid step to its first; padding stays
      xs = _scan.take_time(xs, idx)
    training = not getattr(self.dropout, 'deterministic', False)
    if self.num_layers > 1 and self.dropout_rate and training:
      _checks.check_stream(type(self).__name__, rngs, 'dropout', 'for the dropout between layers')
    dropout_rngs = _scan.per_use_rngs(rngs, self.num_layers - 1)  # one per gap between layers
    finals = []
    for layer in range(self.num_layers):
      if layer:
        xs = self.dropout(xs, rngs=dropout_rngs[layer - 1])
      final, xs = self._run_layer(layer, xs, initial_carry[layer], seq.masks, idx,
                                  seq.seq_lengths)
      finals.append(tuple(final) if self.bidirectional else final[0])
    if reverse and keep_order:
      xs = _scan.take_time(xs, idx)
    ys = _scan.restore_layout(xs, time_major, len(seq.batch_shape))
    return (self._public_carry(finals), ys) if return_carry else ys
