"""PyTorch <-> nnx_recurrent: every conversion in one table.

PyTorch is optional: ``torch`` is imported inside the functions only, so
``import nnx_recurrent`` (and ``import nnx_recurrent.interop``) never loads it.

Modules::

  torch.nn.LSTM      <-> nr.LSTM               (fused layer; any num_layers, bidirectional)
  torch.nn.GRU       <-> nr.GRU
  torch.nn.RNN       <-> nr.RNN(nr.SimpleCell)  (1 layer)
                         nr.Bidirectional       (bidirectional, 1 layer)
                         nr.StackedRNN          (num_layers > 1)
  torch.nn.LSTMCell  <-> nr.OptimizedLSTMCell   (to_torch also takes nr.LSTMCell)
  torch.nn.GRUCell   <-> nr.GRUCell
  torch.nn.RNNCell   <-> nr.SimpleCell          (nonlinearity 'tanh' or 'relu')

``batch_first`` is ``not time_major``; ``dropout`` (between layers) is
``dropout_rate``. to_torch also accepts ``nr.RNN``, ``nr.Bidirectional`` and
``nr.StackedRNN`` over LSTM, GRU and simple cells.

Parameters (PyTorch stores ``W`` as ``(gates * H, in)``, rows in gate order;
nnx kernels are ``(in, gates * H)``, columns in the same order)::

  LSTM (gates i, f, g, o)
    dense_i.kernel = W_ih.T
    dense_h.kernel = W_hh.T
    dense_h.bias   = b_ih + b_hh          back: b_ih = dense_h.bias, b_hh = 0
    proj.kernel    = W_hr.T               (proj_size = proj_features = P: W_hr is
                                           weight_hr_l{k}, (P, H); W_hh is (4H, P))
  GRU (gates r, z, n)
    dense_i.kernel = W_ih.T
    dense_i.bias   = b_ih + (b_hr, b_hz, 0)
    dense_h.kernel = W_hh.T
    bias_hn        = b_hn                 back: b_ih = dense_i.bias, b_hh = (0, 0, bias_hn)
  RNN
    dense_i.kernel = W_ih.T
    dense_i.bias   = b_ih + b_hh          back: b_ih = dense_i.bias, b_hh = 0
    dense_h.kernel = W_hh.T

Every sum is exact in the forward direction up to float rounding: PyTorch adds
``b_ih`` and ``b_hh`` everywhere except GRU's ``b_hn``, which sits inside
``r * (W_hn h + b_hn)`` and so stays its own parameter. Modules built with
``bias=False`` convert with zero biases (trainable: leave them out of the
optimizer to keep them zero); ``to_torch(..., bias=False)`` exports them back
without biases.

LSTM projections (PyTorch's ``proj_size``, this package's ``proj_features``)
convert in both directions for layers: ``torch.nn.LSTM(..., proj_size=P)``
is ``nr.LSTM(..., proj_features=P)`` (any ``num_layers``, bidirectional).

Not convertible (``ValueError``): from_torch of ``dropout=1`` (``dropout_rate`` is
below 1; a one-layer ``torch.nn.RNN`` converts, without dropout); to_torch of a
projected LSTM cell alone (``torch.nn.LSTMCell`` has no projection: put it in an
``nr.RNN``) or of ``proj_features >= hidden_features`` (PyTorch requires
``proj_size < hidden_size``); cells whose ``gate_fn`` / ``activation_fn`` differ from
PyTorch's fixed ones (jax's functions: ``jax.nn.sigmoid``, ``jnp.tanh``,
``jax.nn.relu``, or their copies that cloudpickle rebuilds, are the same);
``SimpleCell(residual=True)``; parameters of several dtypes (a PyTorch module
has one); a reversed ``nr.RNN``, ``nr.LSTM`` or ``nr.GRU``; a
``Bidirectional`` with a custom ``merge_fn``; cells with zoneout (it changes
eval-mode outputs); layers that do not start from zeros as PyTorch's do
(``learn_initial_carry``, a cell's ``carry_init``; a cell alone converts,
since a PyTorch cell takes its state from the caller).
Cells without a PyTorch counterpart (MGU, the convolutional and the
layer-normalized cells) raise ``TypeError``; so do to_torch of a cell whose
``nnx.Linear`` projection was swapped (nnx's LoRA surgery: an
``nnx.LoRALinear``'s adapter would be left out) and from_torch of a subclass
of a torch module that redefines ``forward`` (the conversion computes the
built-in one). A torch module's forward hooks, and those registered for every
module (``register_module_forward_hook``), are not carried over, with a
warning; but for the pre-hooks of ``torch.nn.utils.weight_norm`` and ``prune``,
whose weights convert as the next forward computes them.
Variational (per-cell) dropout has no PyTorch counterpart and is not carried
over, with a warning (it does not change eval-mode outputs); nor is a
computation ``dtype`` other than the parameters' (PyTorch computes in its
parameters' dtype), with a warning.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import nnx_recurrent as nr
from nnx_recurrent import _base, _checks, _rnn

Params = dict[str, np.ndarray]  # 'dense_i.kernel' -> value
TorchWeights = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # w_ih, w_hh, b_ih, b_hh


# -- the table --------------------------------------------------------------------
def _lstm_to_nnx(w_ih, w_hh, b_ih, b_hh) -> Params:
  return {'dense_i.kernel': w_ih.T, 'dense_h.kernel': w_hh.T, 'dense_h.bias': b_ih + b_hh}


def _lstm_to_torch(p: Params) -> TorchWeights:
  b = p['dense_h.bias']
  return p['dense_i.kernel'].T, p['dense_h.kernel'].T, b, np.zeros_like(b)


def _proj_to_nnx(w_hr: np.ndarray) -> Params:
  return {'proj.kernel': w_hr.T}


def _proj_to_torch(p: Params) -> np.ndarray:
  return p['proj.kernel'].T


def _gru_to_nnx(w_ih, w_hh, b_ih, b_hh) -> Params:
  b_hr, b_hz, b_hn = np.split(b_hh, 3)
  return {
    'dense_i.kernel': w_ih.T,
    'dense_i.bias': b_ih + np.concatenate([b_hr, b_hz, np.zeros_like(b_hn)]),
    'dense_h.kernel': w_hh.T,
    'bias_hn': b_hn,
  }


def _gru_to_torch(p: Params) -> TorchWeights:
  b_hn = p['bias_hn']
  zero = np.zeros_like(b_hn)
  return (p['dense_i.kernel'].T, p['dense_h.kernel'].T, p['dense_i.bias'],
          np.concatenate([zero, zero, b_hn]))


def _rnn_to_nnx(w_ih, w_hh, b_ih, b_hh) -> Params:
  return {'dense_i.kernel': w_ih.T, 'dense_i.bias': b_ih + b_hh, 'dense_h.kernel': w_hh.T}


def _rnn_to_torch(p: Params) -> TorchWeights:
  b = p['dense_i.bias']
  return p['dense_i.kernel'].T, p['dense_h.kernel'].T, b, np.zeros_like(b)


class _Family(NamedTuple):
  torch_layer: str  # class name in torch.nn
  torch_cell: str
  make_cell: Callable[..., nr.RNNCellBase]  # (in, hidden, activation_fn, **kw) -> cell
  to_nnx: Callable[..., Params]  # torch weights -> nnx params
  to_torch: Callable[[Params], TorchWeights]
  fused: str | None  # the nr fused layer for the torch layer, or None (RNN / Bidirectional)


_FAMILIES = {
  'LSTM': _Family('LSTM', 'LSTMCell', lambda i, h, act, **kw: nr.OptimizedLSTMCell(i, h, **kw),
                  _lstm_to_nnx, _lstm_to_torch, 'LSTM'),
  'GRU': _Family('GRU', 'GRUCell', lambda i, h, act, **kw: nr.GRUCell(i, h, **kw),
                 _gru_to_nnx, _gru_to_torch, 'GRU'),
  'RNN': _Family('RNN', 'RNNCell',
                 # dtype inferred as for LSTM / GRU (SimpleCell's default is float32)
                 lambda i, h, act, **kw: nr.SimpleCell(i, h, activation_fn=act, dtype=None,
                                                       **kw),
                 _rnn_to_nnx, _rnn_to_torch, None),
}
_ACTIVATIONS = {'tanh': jax.nn.tanh, 'relu': jax.nn.relu}


# -- helpers ----------------------------------------------------------------------
def _import_torch():
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      'nnx_recurrent.interop needs PyTorch: pip install "nnx-recurrent[torch]".'
    ) from e
  return torch


def _numpy(t) -> np.ndarray:
  t = t.detach().cpu()
  if str(t.dtype) == 'torch.bfloat16':
    return t.float().numpy().astype(jnp.bfloat16)
  return t.numpy().copy()


def _variable(module: nnx.Module, path: str) -> nnx.Variable:
  obj: Any = module
  for name in path.split('.'):
    obj = getattr(obj, name)
  return obj


def _load(cell: nr.RNNCellBase, params: Params) -> nr.RNNCellBase:
  for path, value in params.items():
    var = _variable(cell, path)
    if tuple(var.shape) != tuple(value.shape):
      # The sizes come from the module's input_size / hidden_size / proj_size, its
      # weights from its tensors: they differ where a weight was replaced after the
      # module was built (torch's own forward then fails as well).
      _checks.fail('from_torch', 'module', 'weights of the shapes its input_size, hidden_size '
                   f'(and proj_size) give: {path} of shape {tuple(var.shape)} (this '
                   "package's layout)",
                   f'shape {tuple(value.shape)} (a weight replaced after the module was built?)')
    var[...] = jnp.asarray(np.asarray(value, var.dtype))
  return cell


def _hook_classes() -> tuple[type, ...]:
  """The pre-hook classes of ``torch.nn.utils.weight_norm`` and ``prune``, of those
  modules that are loaded (a hook of one that is not cannot exist): by module, as
  ``torch.nn.utils.weight_norm`` is the function, not its module."""
  names = (('torch.nn.utils.weight_norm', 'WeightNorm'), ('torch.nn.utils.prune',
                                                          'BasePruningMethod'))
  return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


def _weight_hooks(module) -> dict[str, Callable[[], Any]]:
  """The tensors that a forward pre-hook of ``torch.nn.utils.weight_norm`` or of
  ``torch.nn.utils.prune`` recomputes, by name, each with a function that gives its
  value as the next forward sees it. Such a hook writes the tensor at every forward:
  until then (a checkpoint's ``weight_g`` / ``weight_orig`` just loaded) the
  attribute holds the value of the last forward, or of the hook's registration."""
  computed: dict[str, Callable[[], Any]] = {}
  hooks: list[Any] = [h for h in getattr(module, '_forward_pre_hooks', {}).values()
                      if isinstance(h, _hook_classes())]
  for hook in hooks:  # in order: the last wins
    if hasattr(hook, 'compute_weight'):  # WeightNorm
      computed[hook.name] = functools.partial(hook.compute_weight, module)
    else:  # a pruning method, or a PruningContainer of several
      computed[hook._tensor_name] = functools.partial(hook.apply_mask, module)
  return computed


def _tensor(module, name: str):
  """``module``'s tensor ``name`` as its forward computes with it (see
  :func:`_weight_hooks`), ``None`` where it has none (``bias=False``)."""
  compute = _weight_hooks(module).get(name)
  if compute is None:
    return getattr(module, name, None)
  with _import_torch().no_grad():
    return compute()


def _torch_weights(module, suffix: str = '') -> TorchWeights:
  """``(w_ih, w_hh, b_ih, b_hh)`` of a torch cell (``suffix=''``) or one layer of a
  torch layer (``suffix='_l0'``, ``'_l1_reverse'``, ...); zeros when ``bias=False``."""
  w_ih = _numpy(_tensor(module, f'weight_ih{suffix}'))
  w_hh = _numpy(_tensor(module, f'weight_hh{suffix}'))
  b_ih = _tensor(module, f'bias_ih{suffix}')
  b_hh = _tensor(module, f'bias_hh{suffix}')
  zeros = np.zeros(w_ih.shape[:1], w_ih.dtype)
  return (w_ih, w_hh, zeros if b_ih is None else _numpy(b_ih),
          zeros if b_hh is None else _numpy(b_hh))


def _torch_family(torch, module) -> tuple[_Family, bool]:
  """The family of a torch module, and whether it is a cell."""
  for family in _FAMILIES.values():
    for name, is_cell in ((family.torch_layer, False), (family.torch_cell, True)):
      base = getattr(torch.nn, name)
      if isinstance(module, base):
        _check_torch_forward(module, base)
        return family, is_cell
  names = ', '.join(f'torch.nn.{n}' for f in _FAMILIES.values()
                    for n in (f.torch_layer, f.torch_cell))
  _checks.fail('from_torch', 'module', f'one of {names}',
               _type_name(module) + _not_a_module_hint(torch, module), TypeError)


def _type_name(module) -> str:
  """``module``'s class name for a message; qualified where it is one of torch.nn's
  names without being that class (``torch.ao``'s quantized or quantizable
  ``LSTM``), which "expected torch.nn.LSTM, got LSTM" would not tell apart."""
  cls = type(module)
  if any(cls.__name__ in (f.torch_layer, f.torch_cell) for f in _FAMILIES.values()):
    return f'{cls.__module__}.{cls.__qualname__}, not a subclass of torch.nn.{cls.__name__}'
  return cls.__name__


def _check_torch_forward(module, base) -> None:
  """Refuses a subclass of ``base`` (``torch.nn.GRU``...) that redefines
  ``forward``: the conversion copies the weights into the built-in
  computation, which would then differ from the module's."""
  if type(module).forward is not base.forward:
    _checks.fail('from_torch', 'module', f'a torch.nn.{base.__name__} computing as the built-in '
                 'one (a subclass may change __init__ or add members; the converted module '
                 "computes the built-in forward: to convert the weights alone, load the module's "
                 f'state_dict into a torch.nn.{base.__name__} of the same options)',
                 f'{type(module).__name__}, a subclass that redefines forward', TypeError)


def _warn_of_hooks(torch, module) -> None:
  """A forward hook (or pre-hook) may change the module's inputs or outputs:
  the converted module computes its forward alone, so say it is left out.
  The hooks of every module (``register_module_forward_hook``) too. Not the
  pre-hooks of weight_norm and pruning, whose weights are converted as they
  compute them (:func:`_weight_hooks`)."""
  registry = getattr(getattr(torch.nn.modules, 'module', None), '__dict__', {})
  pre_hooks = [h for h in getattr(module, '_forward_pre_hooks', {}).values()
               if not isinstance(h, _hook_classes())]
  hooks = [f'{len(d)} {name}' for name, d in (
    ("module's forward pre-hook(s)", pre_hooks),
    ("module's forward hook(s)", getattr(module, '_forward_hooks', {})),
    ('global forward pre-hook(s)', registry.get('_global_forward_pre_hooks', {})),
    ('global forward hook(s)', registry.get('_global_forward_hooks', {}))) if d]
  if hooks:
    _checks.warn(f"from_torch: the {' and '.join(hooks)} are not carried over (the "
                 'converted module computes its forward alone: a hook that changes its inputs '
                 "or outputs changes PyTorch's numbers, not these).")


def _not_a_module_hint(torch, module) -> str:
  """What to pass instead of a wrapper around a convertible module
  (``torch.compile``'s ``_orig_mod``, ``DataParallel``'s ``module``), a TorchScript
  one or a ``state_dict``; ``''`` for anything else."""
  classes = tuple(getattr(torch.nn, n) for f in _FAMILIES.values()
                  for n in (f.torch_layer, f.torch_cell))
  for attr in ('_orig_mod', 'module'):  # torch.compile's; DataParallel's, DDP's
    inner = getattr(module, attr, None)
    if isinstance(inner, classes):
      return f', a wrapper: pass the {type(inner).__name__} it wraps, its .{attr}'
  original = getattr(module, 'original_name', None)  # TorchScript's: the scripted class's name
  if isinstance(module, torch.jit.ScriptModule) and original in {
      n for f in _FAMILIES.values() for n in (f.torch_layer, f.torch_cell)}:
    return (f', a TorchScript {original}: load its state_dict() into a torch.nn.{original} '
            'of the same options and pass that')
  if isinstance(module, Mapping) and any('weight_ih' in str(k) for k in module):
    return (", a state_dict: load it into the torch module first (module.load_state_dict, a "
            "wrapper's key prefix stripped) and pass the module")
  return ''


def _torch_activation(module) -> Callable:
  nonlinearity = getattr(module, 'nonlinearity', 'tanh')
  if nonlinearity not in _ACTIVATIONS:  # pragma: no cover - torch validates it
    _checks.fail('from_torch', 'module.nonlinearity', "'tanh' or 'relu'", repr(nonlinearity))
  return _ACTIVATIONS[nonlinearity]


# -- from_torch -------------------------------------------------------------------
def from_torch(module: Any, *, rngs: nnx.Rngs | None = None) -> Any:
  """Returns the nnx_recurrent module equivalent to a PyTorch recurrent module.

  The weights are copied (see the module docstring for the table); the result
  gives PyTorch's outputs, and with ``seq_lengths`` the outputs and final
  state of PyTorch's packed sequences (``pack_padded_sequence`` /
  ``pad_packed_sequence``): padding outputs are zero on both sides and the
  carry is each row's state after its last valid step.

  Call conventions differ: PyTorch layers return ``(output, h_n)`` (LSTM:
  ``(output, (h_n, c_n))``) with states stacked over layers and directions;
  nnx layers return the outputs, or ``(carry, outputs)`` with
  ``return_carry=True``, where an LSTM carry is ``(c, h)``, and several
  layers / directions give a tuple over layers of ``carry`` or
  ``(carry_fwd, carry_bwd)``. A module in ``eval()`` mode converts to one in
  eval mode.

  Example::

    >>> import numpy as np, torch, jax.numpy as jnp
    >>> import nnx_recurrent as nr
    >>> _ = torch.manual_seed(0)
    >>> lstm = torch.nn.LSTMCell(3, 4)
    >>> cell = nr.interop.from_torch(lstm)
    >>> type(cell).__name__
    'OptimizedLSTMCell'
    >>> x = np.ones((2, 3), np.float32)
    >>> (c, h), y = cell(cell.initialize_carry(x.shape), jnp.asarray(x))
    >>> h_t, c_t = lstm(torch.from_numpy(x))
    >>> bool(np.allclose(h, h_t.detach().numpy(), atol=1e-6))
    True

  Args:
    module: ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``, ``GRUCell`` or
      ``RNNCell``.
    rngs: ``nnx.Rngs`` that builds the modules, as for any nnx module (a
      ``params`` or default stream, whose keys the parameters' zero
      initializers ignore: the weights are overwritten); its ``dropout`` (or
      default) stream seeds the between-layer dropout of layers with
      ``dropout > 0`` (default ``nnx.Rngs(0)``).

  Returns:
    The nnx module with the weights loaded, of the class the table gives for
    ``module``'s (typed ``Any``: an ``nnx.Module`` has none of the layers' attributes
    and calls, such as ``num_layers``, for type checkers).

  Raises:
    TypeError: for any other module (for a wrapper of one, ``torch.compile``'s
      or ``DataParallel``'s, a TorchScript one, or a ``state_dict``, saying what
      to pass), and for a subclass of one that redefines ``forward``.
    ValueError: for ``rngs`` without the streams above (a ``params`` or
      default one; a ``dropout`` or default one where the module has
      ``dropout > 0``), or a module on torch's ``meta`` device.
  """
  torch = _import_torch()
  family, is_cell = _torch_family(torch, module)
  rngs = nnx.Rngs(0) if rngs is None else rngs
  if not isinstance(rngs, nnx.Rngs):
    _checks.fail('from_torch', 'rngs', 'an nnx.Rngs (or None)', type(rngs).__name__, TypeError)
  if 'params' not in rngs and 'default' not in rngs:
    _checks.fail('from_torch', 'rngs', "an nnx.Rngs with a 'params' (or default) stream: the "
                 'modules are built as nnx modules are, then their parameters overwritten',
                 f'streams {tuple(rngs)}')
  # A layer's dropout between its layers is an nnx.Dropout, which forks the stream when
  # built: in a stack of torch.nn.RNN layers, and in the fused nr.LSTM / nr.GRU, which
  # keep the rate (and build it) even with one layer, where it is never applied.
  dropout = 0.0 if is_cell else float(module.dropout)
  keeps_dropout = not is_cell and (family.fused is not None or module.num_layers > 1)
  if keeps_dropout and dropout >= 1.0:  # PyTorch takes 1; dropout_rate is below 1
    _checks.fail('from_torch', 'module', 'dropout < 1 (the converted dropout_rate is in '
                 "[0, 1); PyTorch's dropout=1 zeroes the inputs of every layer but the first)",
                 f'{type(module).__name__} with dropout={dropout}')
  if dropout and keeps_dropout and not ('dropout' in rngs or 'default' in rngs):
    _checks.fail('from_torch', 'rngs', "an nnx.Rngs with a 'dropout' (or default) stream: the "
                 f"module's dropout={dropout} between layers draws from it",
                 f'streams {tuple(rngs)}')
  if any(p.is_meta for p in module.parameters()):
    _checks.fail('from_torch', 'module', 'a module whose parameters hold values',
                 "parameters on torch's 'meta' device, which hold none (materialise them "
                 "first: module.to_empty(device='cpu'), then load_state_dict)")
  _warn_of_hooks(torch, module)
  act = _torch_activation(module)
  w_ih = _tensor(module, 'weight_ih' if is_cell else 'weight_ih_l0')
  # Zero initializers: every parameter is overwritten, so draw no random numbers.
  zeros = nnx.initializers.zeros_init()
  kw = dict(kernel_init=zeros, recurrent_kernel_init=zeros, bias_init=zeros,
            param_dtype=_jax_dtype(_numpy(w_ih).dtype), rngs=rngs)
  result: nnx.Module
  if is_cell:
    cell = family.make_cell(module.input_size, module.hidden_size, act, **kw)
    result = _load(cell, family.to_nnx(*_torch_weights(module)))
  else:
    result = _from_torch_layer(family, module, act, kw)
  if not module.training:
    result.eval()
  return result


def _from_torch_layer(family: _Family, module, act, kw) -> nnx.Module:
  proj = getattr(module, 'proj_size', 0)  # torch.nn.LSTM's only
  num_layers, hidden = module.num_layers, module.hidden_size
  dirs = ('', '_reverse') if module.bidirectional else ('',)
  time_major = not module.batch_first

  def in_features(layer):
    return module.input_size if layer == 0 else hidden * len(dirs)

  def params(layer, d):
    suffix = f'_l{layer}{dirs[d]}'
    p = family.to_nnx(*_torch_weights(module, suffix))
    if proj:
      p.update(_proj_to_nnx(_numpy(_tensor(module, f'weight_hr{suffix}'))))
    return p

  if family.fused is not None:
    fused = getattr(nr, family.fused)
    options = dict(proj_features=proj, proj_kernel_init=kw['kernel_init']) if proj else {}
    model = fused(module.input_size, hidden, num_layers=num_layers,
                  bidirectional=module.bidirectional, dropout_rate=float(module.dropout),
                  time_major=time_major, **options, **kw)
    for layer in range(num_layers):
      for d, cells in enumerate((model.forward, model.backward)[: len(dirs)]):
        _load(cells[layer], params(layer, d))
    return model

  layers = []
  for layer in range(num_layers):
    rnns = [
      nr.RNN(_load(family.make_cell(in_features(layer), hidden, act, **kw), params(layer, d)),
             time_major=time_major)
      for d in range(len(dirs))
    ]
    layers.append(rnns[0] if len(rnns) == 1 else nr.Bidirectional(*rnns, time_major=time_major))
  if num_layers == 1:
    return layers[0]
  return nr.StackedRNN(*layers, dropout_rate=float(module.dropout), rngs=kw['rngs'])


# -- to_torch ---------------------------------------------------------------------
def _check_no_zoneout(cell) -> None:
  if cell.zoneout_rate:
    _checks.fail('to_torch', 'module', 'cells without zoneout (PyTorch has none, and it changes '
                 'eval-mode outputs)',
                 f'{type(cell).__name__} with zoneout_rate={cell.zoneout_rate}')


def _warn_what_is_dropped(cells: list[Any]) -> None:
  """What has no PyTorch counterpart is dropped with a warning (as
  compat.from_nnx does): variational dropout, since the torch module then
  trains without it; and a computation dtype other than the parameters'
  (PyTorch computes in its parameters' dtype), since its outputs then round
  otherwise."""
  rates = sorted({(c.dropout_rate, c.recurrent_dropout_rate) for c in cells
                  if c.dropout_rate or c.recurrent_dropout_rate})
  if rates:
    _checks.warn('to_torch: PyTorch has no variational dropout; the cells\' dropout_rate / '
                 f'recurrent_dropout_rate {", ".join(f"{d} / {r}" for d, r in rates)} are not '
                 'carried over (the parameters and the eval-mode outputs are).')
  dtypes = sorted({(jnp.dtype(c.dtype).name, jnp.dtype(c.param_dtype).name) for c in cells
                   if c.dtype is not None and jnp.dtype(c.dtype) != jnp.dtype(c.param_dtype)})
  if dtypes:
    _checks.warn("to_torch: PyTorch computes in its parameters' dtype; the cells' dtype "
                 f'{", ".join(f"{d} (parameters {p})" for d, p in dtypes)} is not carried '
                 'over (the parameters are, in their dtype).')


_JIT_WRAPPER = type(jax.jit(lambda x: x))  # jaxlib's PjitFunction


def _innermost(fn: Any) -> Any:
  """The Python function under jax's wrappers: ``jax.custom_jvp``'s (``relu``)
  and ``jax.jit``'s (``sigmoid``, ``tanh``), read from its pickled state: a
  jit wrapper that cloudpickle rebuilt by value (JAX's functions do not pickle
  by reference) has no ``__name__``, ``__module__`` or ``__wrapped__``."""
  inner: Any
  for _ in range(4):  # relu: custom_jvp over jit over the function
    if isinstance(fn, jax.custom_jvp):
      inner = fn.fun
    elif isinstance(fn, _JIT_WRAPPER):
      state = fn.__getstate__()
      inner = state.get('fun') if isinstance(state, dict) else None
    else:
      return fn
    if inner is None:
      return fn
    fn = inner
  return fn


def _same_function(fn: Any, ref: Callable) -> bool:
  """Whether ``fn`` is jax's ``ref``: the same object, or under jax's wrappers
  the same function, or one of jax's functions rebuilt by value (cloudpickle's
  copies: same module, name and code). Another function that computes the same
  (a user's sigmoid) is not, nor one that only copies the name (functools.wraps)."""
  if fn is ref:
    return True
  a, b = _innermost(fn), _innermost(ref)
  if a is b:
    return True
  key_a, key_b = ((getattr(f, '__module__', None), getattr(f, '__qualname__', None),
                   getattr(f, '__code__', None)) for f in (a, b))
  return None not in key_b and str(key_b[0]).split('.')[0] == 'jax' and key_a == key_b


def _function_name(fn: Any) -> str:
  """``fn``'s name for a message (``sigmoid``, also once rebuilt by cloudpickle),
  its repr when it has none."""
  name = getattr(fn, '__name__', None) or getattr(_innermost(fn), '__name__', None)
  return name if isinstance(name, str) else repr(fn)


def _cell_family(cell: Any) -> tuple[_Family, str | None]:
  """The family of an nnx cell and its torch ``nonlinearity`` (RNN family only)."""
  where = 'to_torch'
  _checks.check_computes_as_builtin(where, cell)
  _base.check_not_swapped(where, cell)
  if isinstance(cell, (nr.OptimizedLSTMCell, nr.LSTMCell, nr.GRUCell)):
    if not (_same_function(cell.gate_fn, jax.nn.sigmoid)
            and _same_function(cell.activation_fn, jax.nn.tanh)):
      _checks.fail(where, 'module', 'cells with gate_fn=sigmoid and activation_fn=tanh '
                   "(PyTorch's fixed nonlinearities)", f'{type(cell).__name__} with '
                   f'{_function_name(cell.gate_fn)}, {_function_name(cell.activation_fn)}')
    _check_no_zoneout(cell)
    return _FAMILIES['GRU' if isinstance(cell, nr.GRUCell) else 'LSTM'], None
  if isinstance(cell, nr.SimpleCell):
    _check_no_zoneout(cell)
    names = [n for n, f in _ACTIVATIONS.items() if _same_function(cell.activation_fn, f)]
    if not names or cell.residual:
      _checks.fail(where, 'module', 'a SimpleCell with activation_fn tanh or relu and '
                   'residual=False', f'activation_fn={_function_name(cell.activation_fn)}, '
                   f'residual={cell.residual}')
    return _FAMILIES['RNN'], names[0]
  _checks.fail(where, 'module', 'an OptimizedLSTMCell, LSTMCell, GRUCell or SimpleCell '
               '(or a layer of them)', type(cell).__name__, TypeError)


def _cell_params(cell) -> Params:
  """The cell's parameters by path; ``LSTMCell``'s per-gate layers are concatenated."""
  _checks.check_concrete('to_torch', 'module', nnx.state(cell, nnx.Param),
                         'restore or initialise them first',
                         'a module whose parameters hold values')
  if isinstance(cell, nr.LSTMCell):
    def cat(names, attr):
      parts = [np.asarray(getattr(getattr(cell, n), attr)[...]) for n in names]
      return np.concatenate(parts, axis=-1)

    params = {'dense_i.kernel': cat(('ii', 'if_', 'ig', 'io'), 'kernel'),
              'dense_h.kernel': cat(('hi', 'hf', 'hg', 'ho'), 'kernel'),
              'dense_h.bias': cat(('hi', 'hf', 'hg', 'ho'), 'bias')}
  else:
    paths = {'LSTM': ('dense_i.kernel', 'dense_h.kernel', 'dense_h.bias'),
             'GRU': ('dense_i.kernel', 'dense_i.bias', 'dense_h.kernel', 'bias_hn'),
             'RNN': ('dense_i.kernel', 'dense_i.bias', 'dense_h.kernel')}
    family = _cell_family(cell)[0].torch_layer
    no_hn = family == 'GRU' and cell.bias_hn is None  # use_bias_hn=False: b_hn = 0
    params = {p: np.asarray(_variable(cell, p)[...]) for p in paths[family]
              if not (no_hn and p == 'bias_hn')}
    if no_hn:
      params['bias_hn'] = np.zeros(cell.hidden_features, params['dense_i.bias'].dtype)
  if _proj_features(cell):
    params['proj.kernel'] = np.asarray(cell.proj.kernel[...])
  return params


def _proj_features(cell) -> int:
  """An LSTM cell's ``proj_features`` (PyTorch's ``proj_size``), 0 without one."""
  return getattr(cell, 'proj_features', None) or 0


def _check_zero_start(rnn) -> None:
  """An ``nr.RNN`` whose default carry is PyTorch's zeros."""
  why = ('learn_initial_carry=True' if rnn.initial_carry is not None
         else 'a cell with a carry_init' if getattr(rnn.cell, 'carry_init', None) is not None
         else None)
  if why:
    _checks.fail('to_torch', 'module', "an RNN starting from zeros (PyTorch's layers do)", why)


def _layer_cells(module) -> tuple[list[list[Any]], bool, float]:
  """``(cells[layer][direction], time_major, dropout)`` of an nnx sequence layer."""
  where = 'to_torch'
  _checks.check_computes_as_builtin(where, module)
  if isinstance(module, (nr.LSTM, nr.GRU)):
    if module.reverse:
      _checks.fail(where, 'module', f'an nr.{type(module).__name__} with reverse=False (PyTorch '
                   'has no reversed unidirectional layer)', 'reverse=True')
    cells = [module._cells(layer) for layer in range(module.num_layers)]  # [forward, backward]
    return cells, module.time_major, float(module.dropout_rate)
  if isinstance(module, nr.RNN):
    if module.reverse:
      _checks.fail(where, 'module', 'an RNN with reverse=False (PyTorch has no reversed '
                   'unidirectional layer)', 'reverse=True')
    _check_zero_start(module)
    return [[module.cell]], module.time_major, 0.0
  if isinstance(module, nr.Bidirectional):
    if module.merge_fn is not _rnn._concatenate:
      _checks.fail(where, 'module', 'a Bidirectional with the default merge_fn (concatenate)',
                   f'merge_fn={module.merge_fn}')
    rnns = (module.forward_rnn, module.backward_rnn)
    if not all(isinstance(r, nr.RNN) for r in rnns):
      _checks.fail(where, 'module', 'a Bidirectional of two nr.RNN layers',
                   ', '.join(type(r).__name__ for r in rnns), TypeError)
    for r in rnns:
      _check_zero_start(r)
    return [[r.cell for r in rnns]], module.time_major, 0.0
  if isinstance(module, nr.StackedRNN):
    # The stack passes its time_major to every layer. PyTorch has one dropout
    # rate between all its layers: the stack's between its layers, and a
    # nested multi-layer layer's between its own, must agree.
    parts = [_layer_cells(layer) for layer in module.layers]
    rates = {f"the stack's {float(module.dropout_rate)}": float(module.dropout_rate)} \
      if len(parts) > 1 else {}
    rates.update({f"layers[{i}]'s {rate}": rate for i, (cells, _, rate) in enumerate(parts)
                  if len(cells) > 1})
    if len(set(rates.values())) > 1:
      _checks.fail(where, 'module', 'a StackedRNN with one dropout rate between all its layers, '
                   "nested layers' included (PyTorch's dropout is one rate)",
                   'dropout_rate ' + ', '.join(rates))
    cells = [row for layer_cells, _, _ in parts for row in layer_cells]
    return cells, module.time_major, next(iter(rates.values()), float(module.dropout_rate))
  _checks.fail(where, 'module', 'an nnx_recurrent cell, RNN, Bidirectional, StackedRNN, '
               'LSTM or GRU', type(module).__name__, TypeError)


def to_torch(module: nnx.Module, *, bias: bool = True):
  """Returns the PyTorch module equivalent to an nnx_recurrent module.

  The reverse of :func:`from_torch` (see the module docstring for the table):
  cells become ``torch.nn.LSTMCell`` / ``GRUCell`` / ``RNNCell``; ``nr.LSTM``,
  ``nr.GRU`` and ``RNN`` / ``Bidirectional`` / ``StackedRNN`` layers of one
  cell family become ``torch.nn.LSTM`` / ``GRU`` / ``RNN`` with
  ``batch_first = not time_major`` and ``dropout`` = the stack's
  ``dropout_rate`` (a ``ValueError`` where nested multi-layer ``nr.LSTM`` /
  ``nr.GRU`` layers drop out at another rate between their own layers). The
  torch module is in training mode, as PyTorch creates it, unless ``module``
  is in eval mode (``.eval()``, or ``from_torch`` of an eval-mode module), so
  a round trip keeps the mode.

  ``bias=False`` builds PyTorch's ``bias=False`` module, for a model imported
  from one (whose biases, zero, stayed zero): the round trip then gives back
  the module's ``state_dict`` keys. Any non-zero bias raises.

  Example::

    >>> import numpy as np, torch
    >>> from flax import nnx
    >>> import nnx_recurrent as nr
    >>> rnn = nr.RNN(nr.GRUCell(3, 4, rngs=nnx.Rngs(0)))
    >>> gru = nr.interop.to_torch(rnn)
    >>> gru
    GRU(3, 4, batch_first=True)
    >>> x = np.ones((2, 5, 3), np.float32)
    >>> y_torch, h_n = gru(torch.from_numpy(x))
    >>> bool(np.allclose(rnn(x), y_torch.detach().numpy(), atol=1e-6))
    True

  Args:
    module: an ``OptimizedLSTMCell``, ``LSTMCell``, ``GRUCell``, ``SimpleCell``
      (tanh or relu), or ``nr.LSTM`` / ``nr.GRU`` / ``RNN`` / ``Bidirectional`` /
      ``StackedRNN`` over such cells.
    bias: build the PyTorch module with biases (PyTorch's default); ``False``
      for one without, when every bias of ``module`` is zero.

  Returns:
    The ``torch.nn`` module with the weights copied.

  Raises:
    TypeError: for modules without a PyTorch counterpart, or with abstract
      parameters (``nnx.eval_shape``'s, which hold no values).
    ValueError: for options PyTorch lacks (see the module docstring), or
      ``bias=False`` with a non-zero bias.
  """
  torch = _import_torch()
  where = 'to_torch'
  if not isinstance(bias, bool):
    _checks.fail(where, 'bias', 'a bool', repr(bias), TypeError)
  if isinstance(module, nr.RNNCellBase):
    family, nonlinearity = _cell_family(module)
    _warn_what_is_dropped([module])
    if _proj_features(module):
      _checks.fail(where, 'module', 'a cell without proj_features (torch.nn.LSTMCell has no '
                   'projection; an nr.RNN over the cell converts to torch.nn.LSTM(proj_size))',
                   f'{type(module).__name__} with proj_features={_proj_features(module)}')
    cell_params = _cell_params(module)
    dtype = _one_dtype({type(module).__name__: cell_params})
    cell_kw = {} if nonlinearity is None else {'nonlinearity': nonlinearity}
    weights = family.to_torch(cell_params)
    if not bias:
      _check_zero_biases(weights, type(module).__name__)
    result = getattr(torch.nn, family.torch_cell)(
      module.in_features, module.hidden_features, bias=bias, **cell_kw,
      dtype=_torch_dtype(torch, dtype))
    _copy_into(torch, result, weights, '')
    if _in_eval_mode(module, [module]):
      result.eval()
    return result

  cells, time_major, dropout = _layer_cells(module)
  families = {(_cell_family(c)[0].torch_layer, _cell_family(c)[1]) for row in cells for c in row}
  if len(families) != 1:
    _checks.fail(where, 'module', 'cells of one family (all LSTM, all GRU or all SimpleCell '
                 'with one activation)', sorted(str(f) for f in families))
  (name, nonlinearity), = families
  _warn_what_is_dropped([c for row in cells for c in row])
  family = _FAMILIES[name]
  num_dirs, hidden = len(cells[0]), cells[0][0].hidden_features
  proj = _proj_features(cells[0][0])
  for layer, row in enumerate(cells):
    expected_in = cells[0][0].in_features if layer == 0 else (proj or hidden) * num_dirs
    if (len(row) != num_dirs or any(c.hidden_features != hidden for c in row)
        or any(c.in_features != expected_in for c in row)
        or any(_proj_features(c) != proj for c in row)):
      _checks.fail(where, 'module', f'layers with {num_dirs} direction(s) of hidden size '
                   f'{hidden}' + (f' projected to {proj}' if proj else '') + f', layer {layer} '
                   f'taking {expected_in} features', f'layer {layer} with cells ' + ', '.join(
                     f'({c.in_features}->{c.hidden_features}'
                     + (f', proj {_proj_features(c)}' if _proj_features(c) else '') + ')'
                     for c in row))
  if proj >= hidden:
    _checks.fail(where, 'module', "proj_features < hidden_features (PyTorch's proj_size < "
                 'hidden_size)', f'proj_features={proj}, hidden_features={hidden}')
  params = [[_cell_params(c) for c in row] for row in cells]
  dtype = _one_dtype({f'layer {layer}' + (' (backward)' if d else ''): p
                      for layer, row in enumerate(params) for d, p in enumerate(row)})
  if not bias:
    for layer, row in enumerate(params):
      for d, p in enumerate(row):
        _check_zero_biases(family.to_torch(p), f'layer {layer}' + (' (backward)' if d else ''))
  kw: dict[str, Any] = {} if nonlinearity is None else {'nonlinearity': nonlinearity}
  if proj:
    kw['proj_size'] = proj
  result = getattr(torch.nn, family.torch_layer)(
    cells[0][0].in_features, hidden, num_layers=len(cells), batch_first=not time_major,
    dropout=dropout if len(cells) > 1 else 0.0, bidirectional=num_dirs == 2, bias=bias, **kw,
    dtype=_torch_dtype(torch, dtype))
  for layer, row in enumerate(params):
    for d, p in enumerate(row):
      suffix = f'_l{layer}' + ('_reverse' if d else '')
      _copy_into(torch, result, family.to_torch(p), suffix)
      if proj:
        _copy_param(torch, getattr(result, f'weight_hr{suffix}'), _proj_to_torch(p))
  if _in_eval_mode(module, [c for row in cells for c in row]):
    result.eval()
  return result


def _one_dtype(params: dict[str, Params]) -> np.dtype:
  """The one dtype of every parameter (``params``: by layer name): a PyTorch
  module has one, and copying others into it would round them silently."""
  dtypes = {name: sorted({np.dtype(v.dtype).name for v in p.values()})
            for name, p in params.items()}
  if len({d for names in dtypes.values() for d in names}) > 1:
    _checks.fail('to_torch', 'module', 'parameters of one dtype (a PyTorch module has one)',
                 ', '.join(f'{name} {" and ".join(d)}' for name, d in dtypes.items()))
  return next(iter(next(iter(params.values())).values())).dtype


def _in_eval_mode(module: nnx.Module, cells: list) -> bool:
  """Whether ``module`` is in eval mode: its between-layer dropout (``nr.LSTM``
  / ``GRU`` / ``StackedRNN``'s ``nnx.Dropout``) is off, or, without one, its
  cells' dropout is (``.eval()`` turns off both, ``from_torch`` of an
  eval-mode module gives them)."""
  drop = getattr(module, 'dropout', None)
  if isinstance(drop, nnx.Dropout):
    return bool(drop.deterministic)
  return all(getattr(cell, 'deterministic', False) for cell in cells)


def _jax_dtype(dtype):
  """The dtype JAX gives an array of ``dtype``: float64 is float32 unless
  ``jax_enable_x64`` (the parameters say what they hold)."""
  return jax.dtypes.canonicalize_dtype(dtype)


def _torch_dtype(torch, dtype):
  return torch.bfloat16 if dtype == jnp.bfloat16 else getattr(torch, np.dtype(dtype).name)


def _copy_into(torch, module, weights: TorchWeights, suffix: str) -> None:
  names = ('weight_ih', 'weight_hh', 'bias_ih', 'bias_hh')
  for name, value in zip(names, weights):
    if getattr(module, name + suffix, None) is None:  # bias=False: checked zero
      continue
    _copy_param(torch, getattr(module, name + suffix), value)


def _check_zero_biases(weights: TorchWeights, where: str) -> None:
  for name, value in zip(('bias_ih', 'bias_hh'), weights[2:]):
    value = np.asarray(value, np.float32)
    if value.any():
      _checks.fail('to_torch', 'bias', f'True: {where} has a non-zero {name} (bias=False '
                   'exports only modules whose biases are all zero)',
                   f'False (largest |{name}| = {float(np.abs(value).max()):.3g})')


def _copy_param(torch, param, value: np.ndarray) -> None:
  value = np.asarray(value, np.float32) if value.dtype == jnp.bfloat16 else value
  with torch.no_grad():
    param.copy_(torch.from_numpy(np.array(value)))
