"""flax.linen <-> nnx_recurrent parameters: the one place that knows both layouts.

Every compat cell, :func:`~nnx_recurrent.compat.to_nnx` and
:func:`~nnx_recurrent.compat.from_nnx` go through this module. A flax.linen
cell stores one ``Dense`` (or ``Conv``) parameter group per gate, named as in
the table; the nnx_recurrent cell of the same name stores what its math uses.
``[a | b]`` is concatenation on the last axis (``in`` = input features,
``H`` = ``features``, ``k`` = ``kernel_size``)::

  LSTMCell           linen  ii, if, ig, io: kernel (in, H); hi, hf, hg, ho: kernel (H, H), bias
                     nnx    the same groups; ``if`` is spelled ``if_``
  OptimizedLSTMCell  linen  as LSTMCell
                     nnx    dense_i.kernel = [ii | if | ig | io]             (in, 4H)
                            dense_h.kernel = [hi | hf | hg | ho]             (H, 4H)
                            dense_h.bias   = [hi | hf | hg | ho].bias        (4H,)
  GRUCell            linen  ir, iz, in: kernel (in, H), bias; hr, hz: kernel (H, H);
                            hn: kernel (H, H), bias
                     nnx    dense_i.kernel = [ir | iz | in], dense_i.bias = [ir | iz | in].bias
                            dense_h.kernel = [hr | hz | hn]                  (H, 3H)
                            bias_hn = hn.bias
  MGUCell            linen  if, in: kernel (in, H), bias; hf: kernel (H, H);
                            hn: kernel (H, H), and a bias only with reset_gate
                     nnx    dense_i.kernel = [if | in], dense_i.bias = [if | in].bias
                            dense_h.kernel = [hf | hn]                       (H, 2H)
                            bias_hn = hn.bias (only with reset_gate)
  SimpleCell         linen  i: kernel (in, H), bias; h: kernel (H, H)
                     nnx    dense_i = i, dense_h = h
  ConvLSTMCell       linen  ih: kernel (*k, in, 4H), hh: kernel (*k, H, 4H), each with a bias
                            (4H,) when use_bias; gate order i, g, f, o
                     nnx    the same
  RNN                both   cell/...
  Bidirectional      both   forward_rnn/cell/..., backward_rnn/cell/...

flax.linen creates each group's ``kernel`` and then its ``bias`` inside a
submodule of that name, and derives a submodule's PRNG key from its name, so
declaring the same groups (``Layout.groups``) reproduces flax.linen's initial
values exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta
from flax.typing import Initializer

from nnx_recurrent import _checks
from nnx_recurrent._conv_lstm import ConvLSTMCell as _NnxConvLSTMCell
from nnx_recurrent._gru import GRUCell as _NnxGRUCell
from nnx_recurrent._lstm import LSTMCell as _NnxLSTMCell
from nnx_recurrent._lstm import OptimizedLSTMCell as _NnxOptimizedLSTMCell
from nnx_recurrent._mgu import MGUCell as _NnxMGUCell
from nnx_recurrent._simple import SimpleCell as _NnxSimpleCell

Path = tuple[str, ...]


class Group(NamedTuple):
  """One flax.linen ``Dense``/``Conv`` parameter group of a cell."""

  name: str  # the linen submodule name: 'ii', 'hn', 'ih', ...
  reads: str  # 'input' or 'hidden': what the kernel multiplies
  kernel_init: Initializer
  bias_init: Initializer | None  # None: the group has no bias


class Layout(NamedTuple):
  """How one cell family is stored by flax.linen and by nnx_recurrent."""

  name: str  # the class name shared by flax.linen, compat and nnx_recurrent
  nnx_cls: type
  math_fields: tuple[str, ...]  # module fields the nnx constructor takes as they are
  conv: bool  # kernels are (*kernel_size, C, 4H) instead of (C, H)
  groups: Callable[[Any], tuple[Group, ...]]
  rules: Callable[[Any], tuple[tuple[Path, tuple[Path, ...]], ...]]  # nnx leaf <- linen leaves


def _cat(nnx_path: Path, names: tuple[str, ...], leaf: str):
  return (nnx_path, tuple((n, leaf) for n in names))


_LSTM_I, _LSTM_H = ('ii', 'if', 'ig', 'io'), ('hi', 'hf', 'hg', 'ho')


def _lstm_groups(m):
  # In flax.linen's order of creation: ii, hi, if, hf, ig, hg, io, ho.
  return tuple(
    g for i, h in zip(_LSTM_I, _LSTM_H)
    for g in (Group(i, 'input', m.kernel_init, None),
              Group(h, 'hidden', m.recurrent_kernel_init, m.bias_init))
  )


def _lstm_rules(m):
  # nnx spells the gate `if_` (a keyword in Python).
  rules = tuple(_cat(('if_' if n == 'if' else n, 'kernel'), (n,), 'kernel') for n in _LSTM_I)
  return rules + tuple(
    _cat((n, leaf), (n,), leaf) for n in _LSTM_H for leaf in ('kernel', 'bias')
  )


def _optimized_lstm_rules(m):
  return (
    _cat(('dense_i', 'kernel'), _LSTM_I, 'kernel'),
    _cat(('dense_h', 'kernel'), _LSTM_H, 'kernel'),
    _cat(('dense_h', 'bias'), _LSTM_H, 'bias'),
  )


def _gru_groups(m):
  return (
    Group('ir', 'input', m.kernel_init, m.bias_init),
    Group('hr', 'hidden', m.recurrent_kernel_init, None),
    Group('iz', 'input', m.kernel_init, m.bias_init),
    Group('hz', 'hidden', m.recurrent_kernel_init, None),
    Group('in', 'input', m.kernel_init, m.bias_init),
    Group('hn', 'hidden', m.recurrent_kernel_init, m.bias_init),
  )


def _gru_rules(m):
  return (
    _cat(('dense_i', 'kernel'), ('ir', 'iz', 'in'), 'kernel'),
    _cat(('dense_i', 'bias'), ('ir', 'iz', 'in'), 'bias'),
    _cat(('dense_h', 'kernel'), ('hr', 'hz', 'hn'), 'kernel'),
    _cat(('bias_hn',), ('hn',), 'bias'),
  )


def _mgu_groups(m):
  return (
    Group('if', 'input', m.kernel_init, m.forget_bias_init),
    Group('hf', 'hidden', m.recurrent_kernel_init, None),
    Group('hn', 'hidden', m.recurrent_kernel_init,
          m.activation_bias_init if m.reset_gate else None),
    Group('in', 'input', m.kernel_init, m.activation_bias_init),
  )


def _mgu_rules(m):
  rules = (
    _cat(('dense_i', 'kernel'), ('if', 'in'), 'kernel'),
    _cat(('dense_i', 'bias'), ('if', 'in'), 'bias'),
    _cat(('dense_h', 'kernel'), ('hf', 'hn'), 'kernel'),
  )
  return rules + ((_cat(('bias_hn',), ('hn',), 'bias'),) if m.reset_gate else ())


def _simple_groups(m):
  return (
    Group('i', 'input', m.kernel_init, m.bias_init),
    Group('h', 'hidden', m.recurrent_kernel_init, None),
  )


def _simple_rules(m):
  return (
    _cat(('dense_i', 'kernel'), ('i',), 'kernel'),
    _cat(('dense_i', 'bias'), ('i',), 'bias'),
    _cat(('dense_h', 'kernel'), ('h',), 'kernel'),
  )


# flax.linen's ConvLSTMCell uses Conv's default initializers.
_CONV_KERNEL_INIT = nn.initializers.lecun_normal()
_CONV_BIAS_INIT = nn.initializers.zeros_init()


def _conv_lstm_groups(m):
  bias = _CONV_BIAS_INIT if m.use_bias else None
  return (Group('ih', 'input', _CONV_KERNEL_INIT, bias),
          Group('hh', 'hidden', _CONV_KERNEL_INIT, bias))


def _conv_lstm_rules(m):
  leaves = ('kernel', 'bias') if m.use_bias else ('kernel',)
  return tuple(_cat((n, leaf), (n,), leaf) for n in ('ih', 'hh') for leaf in leaves)


_GATED = ('gate_fn', 'activation_fn', 'dtype', 'param_dtype')

LAYOUTS: dict[str, Layout] = {
  layout.name: layout
  for layout in (
    Layout('LSTMCell', _NnxLSTMCell, _GATED, False, _lstm_groups, _lstm_rules),
    Layout('OptimizedLSTMCell', _NnxOptimizedLSTMCell, _GATED, False, _lstm_groups,
           _optimized_lstm_rules),
    Layout('GRUCell', _NnxGRUCell, _GATED, False, _gru_groups, _gru_rules),
    Layout('MGUCell', _NnxMGUCell, (*_GATED, 'reset_gate'), False, _mgu_groups, _mgu_rules),
    Layout('SimpleCell', _NnxSimpleCell, ('activation_fn', 'residual', 'dtype', 'param_dtype'),
           False, _simple_groups, _simple_rules),
    Layout('ConvLSTMCell', _NnxConvLSTMCell,
           ('kernel_size', 'strides', 'padding', 'use_bias', 'dtype', 'param_dtype'),
           True, _conv_lstm_groups, _conv_lstm_rules),
  )
}


# -- which layout -------------------------------------------------------------------
def layout_of(module: Any) -> Layout | None:
  """The layout of a compat cell or of a genuine flax.linen cell, else ``None``."""
  name = getattr(type(module), '_layout_name', None)
  if name is None:
    name = next((n for n in LAYOUTS if isinstance(module, getattr(nn, n))), None)
  return None if name is None else LAYOUTS[name]


def layout_of_nnx(module: Any) -> Layout | None:
  """The layout of an nnx_recurrent cell, else ``None``."""
  return next((lay for lay in LAYOUTS.values() if isinstance(module, lay.nnx_cls)), None)


# -- shapes ------------------------------------------------------------------------
def kernel_shape(layout: Layout, module: Any, group: Group, in_features: int) -> tuple[int, ...]:
  """The flax.linen kernel shape of ``group``."""
  rows = in_features if group.reads == 'input' else module.features
  if layout.conv:
    return (*tuple(module.kernel_size), rows, 4 * module.features)
  return (rows, module.features)


def expected_shapes(layout: Layout, module: Any, in_features: int) -> dict[str, dict]:
  """``{group: {'kernel': shape, 'bias': shape}}`` of the flax.linen parameters."""
  out = {}
  for g in layout.groups(module):
    k = kernel_shape(layout, module, g, in_features)
    out[g.name] = {'kernel': k} if g.bias_init is None else {'kernel': k, 'bias': (k[-1],)}
  return out


def _describe(module: Any, in_features: int) -> str:
  return f'in_features={in_features}, features={module.features}'


def check_params(where: str, layout: Layout, module: Any, params: Mapping, in_features: int,
                 *, allow_extra: bool = False, allow_missing: bool = False) -> None:
  """Checks linen ``params`` against the layout: names and shapes.

  With ``allow_extra`` groups beyond the layout's pass (a subclass's own
  submodules, as flax.linen allows); with ``allow_missing`` missing groups and
  leaves pass (a cell applied with ``params`` mutable: its layers create them,
  as flax.linen's do), and those present are checked.
  """
  expected = expected_shapes(layout, module, in_features)
  if not isinstance(params, Mapping):
    _checks.fail(where, 'params', 'a mapping of parameter groups', type(params).__name__,
                 TypeError)
  missing = [] if allow_missing else sorted(set(expected) - set(params))
  extra = [] if allow_extra else sorted(set(params) - set(expected))
  if missing or extra:  # flax.linen's error class where one is missing
    _checks.fail(where, 'params', f'the groups {sorted(expected)} of a {layout.name}',
                 f'missing {missing}, unexpected {extra}',
                 _checks.ParamNotFoundError if missing else ValueError)
  for name, leaves in expected.items():
    if name not in params:  # allowed missing
      continue
    group = params[name]
    complete = isinstance(group, Mapping) and (
      set(group) <= set(leaves) if allow_missing else set(group) == set(leaves))
    if not complete:
      got = sorted(group) if isinstance(group, Mapping) else type(group).__name__
      missing_leaf = not isinstance(group, Mapping) or not set(leaves) <= set(group)
      _checks.fail(where, 'params', f"'{name}' with leaves {sorted(leaves)}", got,
                   _checks.ParamNotFoundError if missing_leaf else ValueError)
    for leaf, shape in leaves.items():
      if leaf not in group:  # allowed missing
        continue
      got_shape = tuple(getattr(group[leaf], 'shape', ()))
      if got_shape != tuple(shape):
        _checks.fail(where, 'params',
                     f"'{name}/{leaf}' of shape {tuple(shape)} ({_describe(module, in_features)})",
                     f'shape {got_shape}', _checks.ParamShapeError)


def in_features_from(where: str, layout: Layout, module: Any, params: Mapping) -> int:
  """Reads the input feature size off the first input kernel of ``params``."""
  name = next(g.name for g in layout.groups(module) if g.reads == 'input')
  expected = f"a {layout.name} checkpoint with '{name}/kernel'"
  if not isinstance(params, Mapping):
    _checks.fail(where, 'params', expected, type(params).__name__, TypeError)
  if name not in params:
    _checks.fail(where, 'params', expected, f'the groups {sorted(params)}')
  group = params[name]
  if not isinstance(group, Mapping) or 'kernel' not in group:
    got = (f"'{name}' with the leaves {sorted(group)}" if isinstance(group, Mapping)
           else f"'{name}' of type {type(group).__name__}")
    _checks.fail(where, 'params', f"{expected} ('{name}' a mapping with a 'kernel')", got)
  shape = getattr(group['kernel'], 'shape', None)
  if shape is None:
    _checks.fail(where, 'params', f"{expected}, an array",
                 f"'{name}/kernel' of type {type(group['kernel']).__name__}")
  if len(shape) < 2:
    _checks.fail(where, 'params', f"'{name}/kernel' with at least 2 axes", f'shape {shape}')
  return int(shape[-2])


def sized_by_params(layout: Layout, module: Any, params: Mapping) -> Any:
  """``module`` with the hidden size its ``params`` hold (after ``in_features_from``).

  flax.linen's ``Dense`` cells compute with the carry's size, not ``features``
  (which only sizes ``initialize_carry``), so their parameters may hold
  another; ``ConvLSTMCell``'s convolutions are sized by ``features``.
  """
  if layout.conv:
    return module
  name = next(g.name for g in layout.groups(module) if g.reads == 'input')
  hidden = int(params[name]['kernel'].shape[-1])
  return module if hidden == module.features else module.clone(parent=None, features=hidden)


# -- conversions -------------------------------------------------------------------
def _get(tree: Mapping, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def linen_to_nnx(layout: Layout, module: Any, params: Mapping) -> dict:
  """flax.linen cell params -> the nnx cell's pure param dict (``nnx.to_pure_dict``)."""
  out: dict = {}
  for nnx_path, linen_paths in layout.rules(module):
    parts = [jnp.asarray(_get(params, p)) for p in linen_paths]
    _set(out, nnx_path, parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1))
  return out


def _box_metadata(box: Any) -> dict | None:
  """A Linen box's (``nn.Partitioned``, ``nn.LogicallyPartitioned``, any
  ``meta.AxisMetadata``) metadata as an ``nnx.Variable`` holds it: what flax's
  own bridge (``nnx.bridge.to_nnx_var``) keeps, names as ``out_sharding``,
  rules as ``sharding_rules``, the mesh, and ``linen_meta_type``, the box's
  class, for the way back. ``None`` for an unboxed array."""
  if not isinstance(box, meta.AxisMetadata):
    return None
  # A copy: flax's LogicallyPartitioned.to_nnx_metadata pops `names` off the box itself.
  box = copy.copy(box)
  metadata = dict(box.to_nnx_metadata() if hasattr(box, 'to_nnx_metadata') else vars(box))
  metadata.pop('value', None)
  return {**metadata, 'linen_meta_type': type(box)}


def partition_metadata(where: str, layout: Layout, module: Any, boxed: Mapping) -> dict:
  """``{nnx path: metadata}`` of the parameters whose flax.linen groups are
  boxes (``nn.with_partitioning``'s ``nn.Partitioned``,
  ``nn.with_logical_partitioning``'s ``nn.LogicallyPartitioned``), for the nnx
  Variable (:func:`_box_metadata`). A parameter joined from groups boxed
  otherwise (other names, rules, mesh or box) has none (a warning says so)."""
  out = {}
  for nnx_path, linen_paths in layout.rules(module):
    found = [_box_metadata(_get(boxed, p)) for p in linen_paths]
    if all(m is None for m in found):
      continue
    if any(m != found[0] for m in found):
      described = sorted({_describe_box(m) for m in found})
      _checks.warn(f'{where}: the flax.linen parameters {["/".join(p) for p in linen_paths]} '
                   f'have different partitioning {described}; the NNX parameter '
                   f'{".".join(nnx_path)} that joins them is left without out_sharding.')
    else:
      out[nnx_path] = found[0]
  return out


def _describe_box(metadata: dict | None) -> str:
  if metadata is None:
    return 'unboxed'
  fields = ', '.join(f'{k}={v!r}' for k, v in metadata.items() if k != 'linen_meta_type')
  return f'{metadata["linen_meta_type"].__name__}({fields})'


def linen_box(metadata: Mapping, value: Any) -> Any:
  """The Linen box of an NNX parameter ``value`` with Variable ``metadata``
  (the inverse of :func:`_box_metadata`, as flax's ``nnx.bridge.to_linen_var``):
  the box ``linen_meta_type`` names; for an NNX-born ``out_sharding``,
  ``nn.LogicallyPartitioned`` where ``sharding_rules`` map its names (as
  ``nnx.get_partition_spec`` maps them), else ``nn.Partitioned``; the bare
  value without either."""
  metadata = dict(metadata)
  box = metadata.pop('linen_meta_type', None)
  if box is None:
    if not metadata.get('out_sharding'):
      return value
    box = nn.LogicallyPartitioned if metadata.get('sharding_rules') else nn.Partitioned
  if hasattr(box, 'from_nnx_metadata'):
    return box.from_nnx_metadata({**metadata, 'value': value})
  fields = {f.name for f in dataclasses.fields(box)}
  return box(**{k: v for k, v in metadata.items() if k in fields}, value=value)


def variable(module: Any, path: Path) -> nnx.Variable:
  """The Variable of ``module`` at a pure-dict ``path``."""
  return functools.reduce(getattr, path, module)


def nnx_to_linen(layout: Layout, module: Any, pure: Mapping) -> dict:
  """The nnx cell's pure param dict -> flax.linen cell params (inverse of the above)."""
  out: dict = {}
  for nnx_path, linen_paths in layout.rules(module):
    value = jnp.asarray(_get(pure, nnx_path))
    parts = jnp.split(value, len(linen_paths), axis=-1) if len(linen_paths) > 1 else [value]
    for p, part in zip(linen_paths, parts):
      _set(out, p, part)
  return {g.name: out[g.name] for g in layout.groups(module)}  # flax.linen's order


def nnx_kwargs(layout: Layout, module: Any) -> dict:
  """The nnx constructor's keyword arguments from a linen/compat module's fields."""
  kwargs = {f: getattr(module, f) for f in layout.math_fields}
  if layout.conv:
    kwargs['kernel_size'] = tuple(kwargs['kernel_size'])
    if kwargs['strides'] is not None and not isinstance(kwargs['strides'], int):
      kwargs['strides'] = tuple(kwargs['strides'])
    if not isinstance(kwargs['padding'], (str, int)) and kwargs['padding'] is not None:
      kwargs['padding'] = tuple(
        tuple(p) if isinstance(p, (list, tuple)) else p for p in kwargs['padding']
      )
  return kwargs


def _abstract(nnx_cls: type, in_features: int, features: int, kwargs: tuple):
  cell = nnx.eval_shape(lambda: nnx_cls(in_features, features, **dict(kwargs),
                                        rngs=nnx.Rngs(0)))
  return nnx.split(cell, nnx.Param, ...)


_abstract_cached = functools.lru_cache(maxsize=256)(_abstract)


def build_nnx(layout: Layout, module: Any, in_features: int, params: Mapping | None = None):
  """The nnx_recurrent cell of ``module``'s configuration holding linen ``params``.

  The cell's structure comes from ``nnx.eval_shape`` (cached per
  configuration), so nothing is initialised; ``params=None`` fills zeros (for
  shape queries such as ``initialize_carry``).
  """
  kwargs = tuple(sorted(nnx_kwargs(layout, module).items()))
  args = (layout.nnx_cls, int(in_features), int(module.features), kwargs)
  try:
    graphdef, abstract, rest = _abstract_cached(*args)
  except TypeError:  # an unhashable field value: build without the cache
    graphdef, abstract, rest = _abstract(*args)
  if params is None:
    pure = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(abstract))
  else:
    pure = linen_to_nnx(layout, module, meta.unbox(params))
  state = jax.tree.map(lambda v: v, abstract)  # a fresh State to fill
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state, rest)
