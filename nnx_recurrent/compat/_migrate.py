"""Migration both ways: flax.linen / compat modules <-> nnx_recurrent modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.linen.recurrent as linen_recurrent
import jax.numpy as jnp
from flax import nnx
from flax.core import meta, unfreeze
from flax.core.scope import in_filter

from nnx_recurrent import _base, _checks
from nnx_recurrent._rnn import RNN as _NnxRNN
from nnx_recurrent._rnn import Bidirectional as _NnxBidirectional
from nnx_recurrent._rnn import _concatenate
from nnx_recurrent.compat import _convert
from nnx_recurrent.compat._cells import CELLS
from nnx_recurrent.compat._rnn import RNN, Bidirectional

_KNOWN = ('LSTMCell, OptimizedLSTMCell, GRUCell, MGUCell, SimpleCell, ConvLSTMCell, RNN or '
          'Bidirectional')


def _params_of(where: str, variables: Any) -> tuple[dict, dict]:
  """The checkpoint's parameters, unboxed, and as given (``nn.Partitioned`` boxes)."""
  if not isinstance(variables, Mapping):
    _checks.fail(where, 'variables', "a dict with a 'params' collection (what init returns)",
                 type(variables).__name__, TypeError)
  if set(variables) != {'params'}:
    _checks.fail(where, 'variables', "exactly one collection, 'params'", sorted(variables))
  boxed = unfreeze(variables['params'])
  params = meta.unbox(boxed)
  _checks.check_concrete(where, 'variables', params, 'restore them first, or convert '
                         'abstractly: nnx.eval_shape(lambda v: compat.to_nnx(module, v), '
                         'variables)')
  return params, boxed


def _sub(where: str, params: Mapping, name: str, owner: str) -> Mapping:
  if not isinstance(params, Mapping) or name not in params:
    got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
    _checks.fail(where, 'variables', f"'{name}' in the parameters of the {owner}", got)
  return params[name]


# What flax.linen's dataclass transform puts in every Module subclass's body.
_LINEN_PLUMBING = frozenset({
  '__dataclass_fields__', '__dataclass_params__', '__eq__', '__hash__', '__match_args__',
  '__post_init__', '_compact_name_scope_methods', '_parent_ref', '_state', 'name', 'parent',
  'scope',
})


def _check_computes_as_builtin(where: str, module: Any) -> None:
  """Refuses a subclass of a flax.linen or compat module that redefines a
  method (``__call__``, ``initialize_carry``, ...): the conversion builds the
  built-in module's computation. New fields and members, and other field
  defaults, are fine (the fields' values are read off the instance)."""
  builtins = {*CELLS.values(), *(getattr(nn, name) for name in CELLS), RNN, nn.RNN,
              Bidirectional, nn.Bidirectional}
  builtin = next((k for k in type(module).__mro__ if k in builtins), None)
  fields = frozenset(f.name for f in dataclasses.fields(builtin)) if builtin else frozenset()
  _checks.check_computes_as_builtin(
    where, module, builtins, ignore=fields | _LINEN_PLUMBING,
    allowed='a subclass may add fields or members: the conversion builds the built-in '
    'computation')


def _to_nnx(module: Any, params: Mapping, where: str, boxed: Mapping):
  _check_computes_as_builtin(where, module)
  layout = _convert.layout_of(module)
  if layout is not None:
    in_features = _convert.in_features_from(f'{where} ({layout.name})', layout, module, params)
    module = _convert.sized_by_params(layout, module, params)
    _convert.check_params(f'{where} ({layout.name})', layout, module, params, in_features)
    cell = _convert.build_nnx(layout, module, in_features, params)
    if module.carry_init is not nn.initializers.zeros:  # the default: the nnx cells' too
      # As a constructor argument it warns (flax.nnx's deprecation); as
      # flax.linen's it sizes initialize_carry (from_nnx carries it back).
      cell.carry_init = module.carry_init
    for path, metadata in _convert.partition_metadata(where, layout, module, boxed).items():
      _convert.variable(cell, path).set_metadata(**metadata)
    return cell
  if isinstance(module, (RNN, nn.RNN)):
    per_step = any(in_filter(f, 'params') for f in module.variable_axes)
    if per_step or not in_filter(module.variable_broadcast, 'params'):
      _checks.fail(where, 'module', "an RNN whose 'params' are broadcast over time "
                   "(variable_broadcast='params', the default): nnx_recurrent.RNN shares one "
                   'set of parameters across steps',
                   f'variable_axes={dict(module.variable_axes)}, '
                   f'variable_broadcast={module.variable_broadcast!r}')
    cell = _to_nnx(module.cell, _sub(where, params, 'cell', 'RNN'), where, boxed['cell'])
    return _NnxRNN(cell, time_major=module.time_major, return_carry=module.return_carry,
                   reverse=module.reverse, keep_order=module.keep_order, unroll=module.unroll)
  if isinstance(module, (Bidirectional, nn.Bidirectional)):
    fwd, bwd = (_to_nnx(getattr(module, name), _sub(where, params, name, 'Bidirectional'),
                        where, boxed[name]) for name in ('forward_rnn', 'backward_rnn'))
    # flax.linen's default merge is its own concatenation: the package's default is
    # the same function, which to_torch, StackedRNN's size checks and the merge's
    # shape check know as the default.
    merge_fn = _concatenate if module.merge_fn is linen_recurrent._concatenate \
      else module.merge_fn
    return _NnxBidirectional(
      fwd, bwd,
      merge_fn=merge_fn, time_major=module.time_major, return_carry=module.return_carry,
    )
  _checks.fail(where, 'module', f'a flax.linen or compat {_KNOWN}', _checks.public_name(module),
               TypeError)


def to_nnx(module: nn.Module, variables: Mapping[str, Any]):
  """Converts a flax.linen (or compat) recurrent module and its variables to NNX.

  ``module`` is a compat module or a genuine ``flax.linen`` one: a cell,
  ``RNN`` or ``Bidirectional`` (nested as you like); ``variables`` is what its
  ``init`` returned (``{'params': ...}``), e.g. a restored Linen checkpoint.
  The result is the ``nnx_recurrent`` module of the same name holding those
  parameters (converted as in :mod:`nnx_recurrent.compat._convert`), with
  ``in_features`` read off the kernels; its outputs equal flax.linen's at every
  valid step (with ``seq_lengths``, ``nr.RNN`` gives zeros at padded steps
  where Linen's keeps computing, and a length-0 row's carry is the initial one).

  A parameter's Linen box (``nn.with_partitioning``, ``nn.with_logical_partitioning``)
  becomes its metadata as in flax's own bridge: ``out_sharding`` (the names),
  ``sharding_rules``, ``mesh`` and the box's class. A cell's ``carry_init`` is
  carried over: the NNX cell's ``initialize_carry``
  uses it (a random one draws from the NNX cell's ``rngs``, so its values are
  not flax.linen's). Not carried over: ``kernel_init``-style initializers
  (only used to create parameters); of ``RNN``'s scan options
  ``variable_axes``, ``variable_broadcast``, ``variable_carry`` and
  ``split_rngs`` (``unroll`` is).

  Example::

    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> from nnx_recurrent import compat
    >>> x = jnp.ones((2, 5, 3))
    >>> linen_rnn = nn.RNN(nn.GRUCell(4))
    >>> variables = linen_rnn.init(jax.random.key(0), x)
    >>> rnn = compat.to_nnx(linen_rnn, variables)
    >>> type(rnn).__name__, type(rnn.cell).__name__, rnn.cell.in_features
    ('RNN', 'GRUCell', 3)
    >>> bool(jnp.allclose(rnn(x), linen_rnn.apply(variables, x), atol=1e-6))
    True

  Args:
    module: the Linen-side module.
    variables: its variables, ``{'params': ...}``.

  Returns:
    An ``nnx_recurrent`` cell, ``RNN`` or ``Bidirectional``.

  Raises:
    TypeError: ``module`` is not a recurrent module this knows, or is a
      subclass of one that redefines a method (``__call__``,
      ``initialize_carry``, ...): the NNX module would compute the built-in
      one. A subclass's new fields and members, and other defaults, convert.
    ValueError: the variables do not fit the module (names, shapes), or the
      RNN has per-step parameters.
  """
  params, boxed = _params_of('to_nnx', variables)
  return _to_nnx(module, params, 'to_nnx', boxed)


def _from_nnx(module: Any, where: str):
  _checks.check_computes_as_builtin(where, module)  # a user's subclass may compute otherwise
  if isinstance(module, _NnxRNN):
    if module.initial_carry is not None:
      _checks.fail(where, 'module', 'an RNN without learn_initial_carry (flax.linen has no '
                   'learned initial carry)', 'an RNN with learn_initial_carry=True')
    cell, params = _from_nnx(module.cell, where)
    rnn = RNN(cell, time_major=module.time_major, return_carry=module.return_carry,
              reverse=module.reverse, keep_order=module.keep_order, unroll=module.unroll)
    return rnn, {'cell': params}
  if isinstance(module, _NnxBidirectional):
    fwd, p_fwd = _from_nnx(module.forward_rnn, where)
    bwd, p_bwd = _from_nnx(module.backward_rnn, where)
    bi = Bidirectional(fwd, bwd, merge_fn=module.merge_fn, time_major=module.time_major,
                       return_carry=module.return_carry)
    return bi, {'forward_rnn': p_fwd, 'backward_rnn': p_bwd}
  layout = _convert.layout_of_nnx(module)
  if layout is None:
    got = _checks.public_name(module)
    if got in ('nr.LSTM', 'nr.GRU'):
      got += " (a fused layer: convert its cells, layer.forward[i] and layer.backward[i])"
    _checks.fail(where, 'module', f'an nnx_recurrent {_KNOWN}', got, TypeError)
  _base.check_not_swapped(where, module)
  # What flax.linen's cells cannot compute is refused; dropout (no-op in
  # evaluation) is dropped with a warning; carry_init is a compat field.
  if getattr(module, 'zoneout_rate', 0.0):
    _checks.fail(where, 'module', 'a cell without zoneout (flax.linen cells have none, and '
                 'zoneout changes evaluation-mode outputs too)',
                 f'a {layout.name} with zoneout_rate={module.zoneout_rate}')
  if getattr(module, 'proj_features', None) is not None:
    _checks.fail(where, 'module', 'a cell without proj_features (flax.linen has no projected '
                 'LSTM)', f'a {layout.name} with proj_features={module.proj_features}')
  if getattr(module, 'dropout_rate', 0.0) or getattr(module, 'recurrent_dropout_rate', 0.0):
    _checks.warn(f'{where}: flax.linen cells have no dropout; the dropout rates of the '
                 f'{layout.name} are not carried over (the parameters and the '
                 'evaluation-mode outputs are).')
  kwargs = {f: getattr(module, f) for f in layout.math_fields}
  if getattr(module, 'carry_init', None) is not None:
    kwargs['carry_init'] = module.carry_init
  cell = CELLS[layout.name](features=module.hidden_features, **kwargs)
  pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  _checks.check_concrete(where, 'module', pure, 'a module built by nnx.eval_shape holds no '
                         'parameters to convert (restore or initialise them first)',
                         'a module whose parameters hold values')
  if layout.name == 'GRUCell' and module.bias_hn is None:  # use_bias_hn=False: b_hn = 0
    pure['bias_hn'] = jnp.zeros(module.hidden_features, pure['dense_i']['bias'].dtype)
  params = _convert.nnx_to_linen(layout, cell, pure)
  for nnx_path, linen_paths in layout.rules(cell):  # the Linen boxes (nn.Partitioned, ...)
    variable = _convert.variable(module, nnx_path)  # None: a GRUCell's absent bias_hn
    metadata = variable.get_metadata() if isinstance(variable, nnx.Variable) else {}
    for group, leaf in linen_paths:  # the parts of a joined kernel share its box
      params[group][leaf] = _convert.linen_box(metadata, params[group][leaf])
  return cell, params


def from_nnx(module: nnx.Module) -> tuple[nn.Module, dict]:
  """Converts an ``nnx_recurrent`` module to a compat module and Linen variables.

  Returns ``(compat_module, variables)``; ``compat_module.apply(variables, ...)``
  computes what ``module(...)`` does in evaluation mode (except at padded steps:
  Linen's ``RNN`` keeps its outputs there, ``nr.RNN`` gives zeros), and
  ``variables`` also load into flax.linen's own module of that name
  (``flax.linen.LSTMCell`` for a ``LSTMCell``, ...). A cell's ``carry_init``
  is carried over, and so is its parameters' partitioning: the boxes
  :func:`to_nnx` read (``nn.Partitioned``, ``nn.LogicallyPartitioned`` with its
  rules and mesh); for ``out_sharding`` set in NNX, ``nn.LogicallyPartitioned``
  where ``sharding_rules`` map its names, else ``nn.Partitioned``; dropout rates (Linen
  cells have none; a warning says so) and ``RNN.remat`` are not; initializers
  are the defaults.

  Example::

    >>> import flax.linen as nn
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> from nnx_recurrent import compat
    >>> cell = nr.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(0))
    >>> layer, variables = compat.from_nnx(cell)
    >>> type(layer).__module__, type(layer).__name__, layer.features
    ('nnx_recurrent.compat._cells', 'OptimizedLSTMCell', 4)
    >>> jax.tree.map(jnp.shape, variables['params']['hi'])  # flax.linen's layout
    {'bias': (4,), 'kernel': (4, 4)}
    >>> x = jnp.ones((2, 3))
    >>> carry = cell.initialize_carry(x.shape)
    >>> _, y_linen = nn.OptimizedLSTMCell(4).apply(variables, carry, x)
    >>> bool(jnp.allclose(cell(carry, x)[1], y_linen, atol=1e-6))
    True

  Args:
    module: an ``nnx_recurrent`` cell, ``RNN`` (of such a cell) or
      ``Bidirectional`` (of two such RNNs).

  Returns:
    ``(compat_module, {'params': ...})``.

  Raises:
    TypeError: ``module`` is not one of those, or a cell whose ``nnx.Linear``
      projection was swapped (nnx's LoRA surgery: an adapter would be left out).
    ValueError: it computes what flax.linen cannot: a cell with
      ``zoneout_rate`` or ``proj_features``, an RNN with ``learn_initial_carry``.
  """
  compat_module, params = _from_nnx(module, 'from_nnx')
  return compat_module, {'params': params}
