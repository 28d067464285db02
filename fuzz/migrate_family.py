"""``compat.to_nnx`` / ``compat.from_nnx`` against flax.linen: "Linen
checkpoints load unchanged".

Each case draws a genuine flax.linen module -- a bare cell, an ``RNN`` or a
``Bidirectional`` (its ``merge_fn`` concatenation or a sum; at times its
backward direction another kind of cell) -- of any cell
``to_nnx`` takes, its fields drawn (``gate_fn`` / ``activation_fn``, dtypes,
``reset_gate``, ``residual``, ``carry_init``, ``ConvLSTMCell``'s ``kernel_size``,
``padding``, ``strides``, ``use_bias``, kernels and biases boxed by
``nn.with_partitioning`` (with a mesh or not) or ``nn.with_logical_partitioning``
(with rules or not)) and the layer's (``reverse``, ``keep_order``, ``time_major``,
``return_carry``, ``unroll``); sometimes the same built of compat's classes (a
flax.linen ``RNN`` over compat cells too), or of a user's subclass of the cell
that adds a field and changes the defaults (it converts) or that redefines
``__call__`` (``to_nnx`` must refuse it with a ``TypeError`` naming
``module``), or an ``RNN`` with parameters per step (``variable_axes={'params': 0}``:
refused with a ``ValueError`` naming ``module``). A bare Dense cell's ``features`` is at
times not its checkpoint's (flax.linen computes with the carry's size; the NNX cell
must be sized by the parameters: its ``initialize_carry`` is the checkpoint's).
flax.linen's ``init`` with a drawn key, every parameter then
moved off its initial value (a trained checkpoint: no zero biases), cast to
the drawn ``param_dtype``, gives the variables; at times the first of a
joined kernel's groups is then unboxed (``to_nnx`` must warn once per such cell
and leave the NNX kernel without ``out_sharding``; ``from_nnx`` gives every group
back unboxed). Then ``to_nnx``. Checks:

1. The NNX module against ``module.apply(variables, ...)``: outputs at valid
   steps and the final carry of rows of length > 0 within the tolerance; what
   docs/migrating_from_linen.md promises where they differ on purpose: zeros
   at padded steps (exactly), a length-0 row's carry the initial one (exactly),
   and nothing of NaN / inf in the padding reaching an output, carry or
   gradient (ours gets the garbage, flax.linen clean padding: its valid
   values do not read the padding). A bare cell's new carry keeps the given
   carry's dtype (docs/streaming.md), flax.linen's cast to it.
2. Parameter gradients of a loss of the valid outputs and carries: ours
   (``nnx.grad``) written into a copy of the NNX module and taken to
   flax.linen's layout by ``from_nnx`` (whose layout check 3 pins to the
   checkpoint's exactly), against ``jax.grad`` of flax.linen's loss.
3. ``from_nnx`` gives back the variables exactly (tree, names, the boxes and
   their metadata: names, mesh, rules, dtypes, values; loading them into the original
   flax.linen module then gives its outputs trivially), and the compat module
   it returns gives flax.linen's values (padding included; compat's own
   deliberate differences: a length-0 row's carry, each row's carry with two
   batch axes).
4. Any raise or warning of ``to_nnx`` / ``from_nnx`` on these modules fails the
   case, but the documented ``TypeError`` for a redefined method, ``ValueError`` for
   parameters per step and warning for groups boxed apart.

Where flax.linen's scan refuses a cell whose step changes the carry's dtype,
the reference is its RNN over the cell wrapped in ``CastBack`` (as ``linen``).
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta

from fuzz._common import (
  Precision,
  draw_conv_lstm,
  draw_lengths,
  draw_precision,
  garbage,
  reference_inputs,
  tree_rows,
  unflat,
  unwrap_cells,
  valid_steps,
  wrap_cells,
)
from fuzz._core import Case, Mismatch
from fuzz.linen_family import CastBack
from nnx_recurrent import compat

CELLS = ['LSTMCell', 'OptimizedLSTMCell', 'GRUCell', 'SimpleCell', 'MGUCell', 'ConvLSTMCell']
FNS = {'sigmoid': nn.sigmoid, 'hard_sigmoid': nn.hard_sigmoid, 'tanh': nn.tanh,
       'soft_sign': nn.soft_sign, 'relu': nn.relu}
GATES = [name for name in FNS if name != 'relu']
# flax.linen's per-gate input kernels that one NNX kernel joins (``dense_i``'s).
JOINED = {'OptimizedLSTMCell': ('ii', 'if', 'ig', 'io'), 'GRUCell': ('ir', 'iz', 'in'),
          'MGUCell': ('if', 'in')}


def summed(a: Any, b: Any) -> Any:
  """A ``merge_fn`` other than flax.linen's concatenation."""
  return a + b


def _redefined_call(self: Any, carry: Any, inputs: Any) -> Any:
  return super(type(self), self).__call__(carry, inputs)


def _draw_cell(case: Case) -> tuple[str, dict[str, Any], tuple[int, ...]]:
  """A cell kind, its fields past ``features`` and the spatial shape of its steps."""
  kind = case.pick('cell', CELLS)
  if kind == 'ConvLSTMCell':  # (its initializers are Conv's, not fields)
    kw, spatial = draw_conv_lstm(case)
    kw.update(strides=case.pick('strides', [None, 1]),
              use_bias=case.pick('use_bias', [True, False]))
  else:
    spatial = ()
    kw = {'activation_fn': FNS[case.pick('activation_fn', ['tanh', 'tanh', *FNS])]}
    if kind != 'SimpleCell':
      # bounded gates: relu's (with relu activations) overflowed flax.linen's own
      # bfloat16 GRU in 6 steps, a reference that tests no conversion
      kw['gate_fn'] = FNS[case.pick('gate_fn', ['sigmoid', 'sigmoid', *GATES])]
    if kind == 'SimpleCell':
      kw['residual'] = case.pick('residual', [False, True])
    if kind == 'MGUCell':
      kw['reset_gate'] = case.pick('reset_gate', [True, False])
    names = case.pick('partition_names', [None, None, ('data', 'model'), (None, 'model')])
    if names is not None:  # the NNX parameters joining groups join groups of the same names
      box = _partitioning(case)
      kw['kernel_init'] = box(nn.initializers.lecun_normal(), names)
      kw['recurrent_kernel_init'] = box(nn.initializers.orthogonal(), names[::-1])
      if case.pick('partitioned_biases', [False, True]):
        for field in (('forget_bias_init', 'activation_bias_init') if kind == 'MGUCell'
                      else ('bias_init',)):
          kw[field] = box(nn.initializers.zeros_init(), (names[1],))
  if case.pick('carry_init', ['zeros', 'zeros', 'ones']) == 'ones':
    kw['carry_init'] = nn.initializers.ones
  return kind, kw, spatial


def _partitioning(case: Case) -> Any:
  """``nn.with_partitioning`` (its box with a mesh or not) or
  ``nn.with_logical_partitioning`` (the box's own rules or none): the round trip
  must give the same box back, its metadata (static: the tree's structure) included."""
  box = case.pick('partition_box', ['names', 'names', 'mesh', 'logical', 'logical rules'])
  if box == 'mesh':  # a classic (Auto) mesh over one device: no constraint changes a value
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
    return lambda init, names: nn.with_partitioning(init, names, mesh=mesh)
  if box.startswith('logical'):
    rules = (('data', None), ('model', None)) if box == 'logical rules' else None
    return lambda init, names: nn.with_logical_partitioning(init, names, rules=rules)
  return nn.with_partitioning


def _cell_class(case: Case, kind: str, kw: dict[str, Any]) -> tuple[type, dict[str, Any], str]:
  """flax.linen's cell class (or compat's, or a user's subclass of flax.linen's),
  the fields still to give it, and which it is."""
  how = case.pick('cell_class', ['flax', 'flax', 'flax', 'compat', 'subclass', 'redefines'])
  base = getattr(compat if how == 'compat' else nn, kind)
  if how == 'subclass':  # a field more, the drawn fields as its defaults
    body = {'__module__': __name__, '__annotations__': {'note': str, **dict.fromkeys(kw, Any)},
            'note': 'user', **kw}
    return type(f'User{kind}', (base,), body), {}, how
  if how == 'redefines':
    return type(f'Redefining{kind}', (base,), {'__module__': __name__,
                                               '__call__': _redefined_call}), kw, how
  return base, kw, how


def _dtypes(precision: Precision) -> dict[str, Any]:
  return {} if precision.plain else dict(dtype=precision.dtype, param_dtype=precision.param_dtype)


def _convert(what: str, fn: Any, *args: Any, warns: int = 0) -> Any:
  """``fn(*args)``; any raise is a failure, and any warning but ``warns`` of the
  documented one for groups of a joined parameter boxed apart (none other is
  documented for these modules)."""
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      out = fn(*args)
  except Exception as e:
    raise AssertionError(f'{what} raised on a module flax.linen runs: '
                         f'{type(e).__name__}: {e}') from e
  said = [str(w.message) for w in caught]
  if len(said) != warns or not all('have different partitioning' in m for m in said):
    raise AssertionError(f'{what} warned {said}; expected {warns} warning(s) of '
                         'parameters with different partitioning')
  return out


def _refused(case: Case, module: Any, variables: Any, error: type[Exception], expected: str,
             what: str) -> None:
  """``to_nnx`` must refuse ``module`` with ``error``, its message
  ``to_nnx: `module` `` then ``expected`` (a regular expression)."""
  try:
    with warnings.catch_warnings():  # (a wrong conversion's warnings: boxes apart)
      warnings.simplefilter('ignore')
      compat.to_nnx(module, variables)
  except error as e:
    if not re.match(f'to_nnx: `module` {expected}', str(e), re.DOTALL):
      raise
    case.config['to_nnx'] = 'refused'
    return
  raise AssertionError(f'to_nnx converted {what}')


def _unbox_groups(tree: Any, groups: tuple[str, ...], leaf: str,
                  first_only: bool) -> tuple[Any, int]:
  """A copy of the variables with the ``leaf`` of every cell's ``groups`` (the first
  only, or all of them) unboxed (the cells: the dicts holding all of ``groups``), and
  how many cells' first group was boxed."""
  if not isinstance(tree, dict):
    return tree, 0
  pairs = {k: _unbox_groups(v, groups, leaf, first_only) for k, v in tree.items()}
  out, boxed = {k: v for k, (v, _) in pairs.items()}, sum(n for _, n in pairs.values())
  if all(isinstance(out.get(g), dict) and leaf in out[g] for g in groups):
    boxed += isinstance(out[groups[0]][leaf], meta.AxisMetadata)
    for g in groups[:1] if first_only else groups:
      out[g] = {**out[g], leaf: meta.unbox(out[g][leaf])}
  return out, boxed


def _same_variables(case: Case, back: Any, variables: Any) -> None:
  """Check 3: the same tree (``nn.Partitioned`` boxes and names included), dtypes
  and values, exactly."""
  ours, theirs = jax.tree.structure(back), jax.tree.structure(variables)
  if ours != theirs:
    raise Mismatch(f'from_nnx variables: structure {ours} != {theirs}')
  case.same_dtypes('from_nnx variables', back, variables)
  case.close('from_nnx variables (exactly)', back, variables, atol=0, rtol=0)


def _linen_grads(case: Case, rnn: Any, grads: Any) -> Any:
  """Our gradients in flax.linen's layout: written into a copy of the NNX module, through
  ``from_nnx``."""
  copy = nnx.clone(rnn)
  nnx.update(copy, grads)
  return meta.unbox(_convert('from_nnx', compat.from_nnx, copy)[1])


def run(case: Case) -> None:
  kind, kw, spatial = _draw_cell(case)
  cls, kw, how = _cell_class(case, kind, kw)
  layer = case.pick('layer', ['cell', 'rnn', 'rnn', 'bidirectional'])
  lib = compat if how == 'compat' and case.pick('rnn_lib', ['compat', 'flax']) == 'compat' else nn
  in_f, hidden = case.integer('in_features', 1, 5), case.integer('hidden', 1, 6)
  # A bare Dense cell whose `features` is not its checkpoint's: flax.linen's compute
  # with the carry's size (`features` sizes initialize_carry only); to_nnx sizes the
  # NNX cell by the parameters.
  features = hidden + (layer == 'cell' and kind != 'ConvLSTMCell'
                       and case.pick('features_off', [0, 0, 0, 0, 0, 1, 2]))
  low = 0 if layer == 'cell' and kind != 'ConvLSTMCell' else 1
  batch = tuple(case.integer(f'batch{i}', 1, 3)
                for i in range(case.pick('batch_axes', [low, 1, 1, 1, 2])))
  precision = draw_precision(case)
  layer_kw: dict[str, Any] = {}
  # An RNN with a set of parameters per step: to_nnx must refuse it (a ValueError).
  # (Not of boxed parameters: flax.linen's RNN has no scan metadata_params to name
  # their new axis.)
  per_step = layer == 'rnn' and not case.config.get('partition_names') and case.pick(
    'params_per_step', [False] * 11 + [True])
  if layer == 'rnn':
    layer_kw = dict(reverse=case.pick('reverse', [False, True]),
                    keep_order=case.pick('keep_order', [False, True]),
                    unroll=case.pick('unroll', [1, 1, 2, 3]))
    if per_step:
      layer_kw.update(variable_axes={'params': 0}, variable_broadcast=False,
                      split_rngs={'params': True})
  if layer != 'cell':
    layer_kw.update(time_major=case.pick('time_major', [False, True]),
                    return_carry=case.pick('return_carry', [True, True, False]))
  if layer == 'bidirectional':
    layer_kw['merge_fn'] = {'concatenate': nn.Bidirectional.merge_fn, 'sum': summed}[
      case.pick('merge_fn', ['concatenate', 'sum'])]
  # at times a backward direction of another kind (flax.linen's, its defaults)
  other = layer == 'bidirectional' and kind != 'ConvLSTMCell' and case.pick(
    'backward_cell', ['same', 'same', *(c for c in CELLS if c != 'ConvLSTMCell')])

  def make(wrap: Any = None, size: int = hidden, **dtypes: Any) -> Any:
    def cell(backward: bool = False) -> Any:
      if backward and other and other != 'same':
        made = getattr(nn, other)(hidden, **dtypes)
      else:
        made = cls(size, **kw, **dtypes)
      return made if wrap is None else wrap(made)
    if layer == 'cell':
      return cell()
    if layer == 'rnn':
      return lib.RNN(cell(), **layer_kw)
    return lib.Bidirectional(lib.RNN(cell()), lib.RNN(cell(backward=True)), **layer_kw)

  step = (*spatial, in_f)
  key = jax.random.key(case.integer('init_seed', 0, 9))
  module = make(size=features, **_dtypes(precision))
  sized = make(**_dtypes(precision))  # the checkpoint's features
  cells = [sized] if layer == 'cell' else [sized.cell] if layer == 'rnn' else \
      [sized.forward_rnn.cell, sized.backward_rnn.cell]

  def initial(shape: tuple[int, ...]) -> Any:  # the cells' own initial carries
    carries = [c.initialize_carry(jax.random.key(0), shape) for c in cells]
    return tuple(carries) if layer == 'bidirectional' else carries[0]

  def random_carry(shape: tuple[int, ...]) -> Any:
    return jax.tree.map(lambda a: jnp.asarray(case.normal(a.shape), a.dtype), initial(shape))

  if layer == 'cell':
    carry, x = random_carry((*batch, *step)), case.normal((*batch, *step))
    init_args: tuple = (jax.tree.map(lambda a: a.astype(jnp.float32), carry), x)
  else:
    time = case.integer('time', 1, 7)
    time_major = layer_kw['time_major']
    x = case.normal((time, *batch, *step) if time_major else (*batch, time, *step))
    init_args = (x,)
  # flax.linen's checkpoint: init in float32 (its orthogonal kernel has no QR in
  # half precision on the CPU), trained (moved off the initial values), cast.
  variables = jax.jit(make().init)(key, *init_args)
  variables = jax.tree.map(lambda a: (a + case.normal(a.shape, 0.3)).astype(precision.param_dtype),
                           variables)
  if per_step:  # documented: a ValueError naming `module`
    return _refused(case, module, variables, ValueError, "expected an RNN whose 'params' are "
                    'broadcast over time', 'an RNN with parameters per step')
  # At times the first of a joined kernel's groups unboxed in the checkpoint (boxes
  # edited by hand, a checkpoint of older code): to_nnx warns once per such cell and
  # leaves the joined NNX kernel without partitioning; from_nnx gives all its
  # groups back unboxed.
  warns, expected = 0, variables
  if kind in JOINED and 'partition_names' in case.config and case.config['partition_names'] \
      and case.pick('boxes_apart', [False, False, False, True]):
    variables, warns = _unbox_groups(variables, JOINED[kind], 'kernel', first_only=True)
    expected, _ = _unbox_groups(variables, JOINED[kind], 'kernel', first_only=False)
  if how == 'redefines':  # documented: a TypeError naming `module`
    return _refused(case, module, variables, TypeError, 'expected .*redefines __call__',
                    'a subclass that redefines __call__')
  ours = _convert('to_nnx', compat.to_nnx, module, variables, warns=warns)
  if warns:
    for path, var in nnx.graph.iter_graph(ours):
      if isinstance(var, nnx.Param) and path[-2:] == ('dense_i', 'kernel') \
          and 'out_sharding' in var.get_metadata():
        raise Mismatch(f'{path}: a kernel joined from groups boxed apart has out_sharding')
  if layer == 'cell':
    case.close('initialize_carry (the checkpoint\'s features)',
               ours.initialize_carry((*batch, *step), rngs=nnx.Rngs(0)),
               sized.initialize_carry(jax.random.key(0), (*batch, *step)), atol=0, rtol=0)
    cell_checks(case, module, ours, variables, expected, precision, carry, x)
  else:
    rnn_checks(case, module, ours, variables, expected, precision, x, batch, step, layer_kw,
               make, initial, random_carry)


def cell_checks(case: Case, module: Any, ours: Any, variables: Any, expected: Any,
                precision: Precision, carry: Any, x: np.ndarray) -> None:
  x = jnp.asarray(x, precision.inputs)  # (the carry in the cell's dtype: random_carry)
  out_shape = jax.eval_shape(module.apply, variables, carry, x)
  w = [jnp.asarray(case.normal(a.shape)) for a in jax.tree.leaves(out_shape)]

  def with_loss(out: Any) -> tuple[Any, Any]:
    return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(out), w)), out

  def flax_step(v: Any) -> Any:  # flax.linen's new carry in the given carry's dtype
    new_carry, y = module.apply(v, carry, x)
    return jax.tree.map(lambda n, c: n.astype(c.dtype), new_carry, carry), y

  g_theirs, theirs = jax.jit(jax.grad(lambda v: with_loss(flax_step(v)), has_aux=True))(
    variables)
  g_ours, step = nnx.grad(lambda m: with_loss(m(carry, x)), has_aux=True)(ours)
  precision.close(case, 'cell step', step, theirs)
  precision.close(case, 'parameter gradients', _linen_grads(case, ours, g_ours),
                  meta.unbox(g_theirs), atol=1e-4, rtol=1e-4, sums=True)
  layer, back = _convert('from_nnx', compat.from_nnx, ours)
  _same_variables(case, back, expected)
  precision.close(case, 'from_nnx module (compat) step', jax.jit(layer.apply)(back, carry, x),
                  jax.jit(module.apply)(variables, carry, x))


def rnn_checks(case: Case, module: Any, ours: Any, variables: Any, expected: Any,
               precision: Precision, x: np.ndarray, batch: tuple[int, ...], step: tuple[int, ...],
               layer_kw: dict[str, Any], make: Any, initial: Any, random_carry: Any) -> None:
  time_major, return_carry = layer_kw['time_major'], layer_kw['return_carry']
  time_axis, lead = (0, 1) if time_major else (len(batch), 0)
  time = x.shape[time_axis]
  x = x.astype(precision.inputs)
  lengths = draw_lengths(case, batch, time)
  valid = valid_steps(lengths, batch, time)
  ends = valid[..., 0]
  x_ours = x if lengths is None or not case.pick('garbage_in_padding', [False, True]) \
      else garbage(case, x, valid, time_axis, len(step))
  carry = random_carry((*batch, *step)) if case.pick('initial_carry', [False, True]) else None
  start = carry if carry is not None else initial((*batch, *step))
  x_t, carry_t, lengths_t, merge = reference_inputs(x, carry, lengths, batch, time, time_major)
  extra = (1,) * (len(step))
  at_valid, at_ends = valid.reshape(valid.shape + extra), ends.reshape(ends.shape + extra)

  def results(out: Any, unmerge: bool = False) -> tuple[Any, Any]:
    carry, y = out if return_carry else (None, out)
    if unmerge:
      carry, y = unflat(carry, 0, batch), unflat(y, lead, batch)
    return carry, jnp.moveaxis(y, time_axis, len(batch))  # (*batch, time, *spatial, out)

  def flax_run(model: Any, v: Any) -> tuple[Any, Any]:
    kw = {} if lengths_t is None else {'seq_lengths': jnp.asarray(lengths_t)}
    return results(model.apply(v, jnp.asarray(x_t), initial_carry=carry_t, **kw), merge)

  theirs, v_theirs, wrapped = module, variables, False
  try:
    shapes = jax.eval_shape(lambda v: flax_run(theirs, v), v_theirs)
  except TypeError as e:  # flax.linen's scan refuses a changed carry dtype: CastBack
    if precision.plain or 'must have equal types' not in str(e):
      raise
    case.config['flax.linen'] = 'refuses the carry dtype: CastBack'
    theirs, v_theirs, wrapped = make(CastBack, **_dtypes(precision)), wrap_cells(variables), True
    shapes = jax.eval_shape(lambda v: flax_run(theirs, v), v_theirs)
  w_c = [jnp.asarray(case.normal(a.shape)) for a in jax.tree.leaves(shapes[0])]
  w_y = jnp.asarray(case.normal(shapes[1].shape))

  def with_loss(out: tuple[Any, Any]) -> tuple[Any, tuple[Any, Any]]:
    c, y = out
    total = jnp.sum(jnp.where(at_valid, y * w_y, 0))
    return total + sum(jnp.sum(jnp.where(at_ends, a * b, 0))
                       for a, b in zip(jax.tree.leaves(c), w_c)), out

  g_theirs, (c_theirs, y_theirs) = jax.jit(jax.grad(
    lambda v: with_loss(flax_run(theirs, v)), has_aux=True))(v_theirs)
  g_theirs = meta.unbox(g_theirs)
  g_theirs = unwrap_cells(g_theirs) if wrapped else g_theirs
  ours_kw = {} if lengths is None else {'seq_lengths': jnp.asarray(lengths)}

  def ours_run(m: Any) -> tuple[Any, Any]:
    return results(m(jnp.asarray(x_ours), initial_carry=carry, **ours_kw))

  g_ours, (c_ours, y_ours) = nnx.grad(lambda m: with_loss(ours_run(m)), has_aux=True)(ours)
  pad = ~np.broadcast_to(at_valid, y_ours.shape)
  precision.close(case, 'outputs at valid steps', jnp.where(pad, 0, y_ours),
                  jnp.where(pad, 0, y_theirs))
  case.close('outputs at padding (zeros)', np.asarray(y_ours)[pad],
             np.zeros(int(pad.sum())), atol=0, rtol=0)
  if return_carry:
    precision.close(case, 'carry (rows of length > 0)', tree_rows(c_ours, ends),
                    tree_rows(c_theirs, ends))
    case.close('carry (rows of length 0: the initial carry)', tree_rows(c_ours, ~ends),
               tree_rows(start, ~ends), atol=0, rtol=0)
  precision.close(case, 'parameter gradients', _linen_grads(case, ours, g_ours), g_theirs,
                  atol=1e-4, rtol=1e-4, sums=True)
  # 3: back to flax.linen's variables, and compat's module over them.
  layer, back = _convert('from_nnx', compat.from_nnx, ours)
  _same_variables(case, back, expected)
  c_back, y_back = results(jax.jit(lambda v: layer.apply(v, jnp.asarray(x), initial_carry=carry,
                                                         **ours_kw))(back))
  precision.close(case, 'from_nnx module (compat): outputs (padding included)', y_back,
                  y_theirs)
  if return_carry:
    precision.close(case, 'from_nnx module (compat): carry (rows of length > 0)',
                    tree_rows(c_back, ends), tree_rows(c_theirs, ends))
    case.close('from_nnx module (compat): carry (rows of length 0)', tree_rows(c_back, ~ends),
               tree_rows(start, ~ends), atol=0, rtol=0)
