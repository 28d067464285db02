"""nr.LSTM and nr.GRU, converted from torch.nn.LSTM / GRU by
``nnx_recurrent.interop.from_torch``, against PyTorch itself: outputs, final
states and the gradients of the inputs, the initial states and the
parameters, plain and packed (``pack_padded_sequence``; lengths >= 1, as
PyTorch cannot pack an empty row). Some cases run the Pallas kernels
(``implementation='pallas'``, interpret mode on a CPU) at small shapes.

The parameter gradients come back in PyTorch's layout through
``to_torch`` (a layout map; the values are jax's). Our one summed bias is
exported as ``b_ih``, whose gradient is PyTorch's ``b_ih`` gradient; ``b_hh``
holds only GRU's ``b_hn`` (our ``bias_hn``), compared in its ``n`` part.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch.nn.utils import rnn as torch_rnn

from fuzz._common import draw_pallas_settings, scan_plan
from fuzz._core import Case
from nnx_recurrent import interop
from nnx_recurrent._fused import internal

# PyTorch's note that proj_size runs without oneDNN, once per process.
warnings.filterwarnings('ignore', 'LSTM with projections is not supported with oneDNN')


def _torch_run(module: Any, x: np.ndarray, lengths: np.ndarray | None, state: Any,
               weights: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
  """PyTorch's outputs and final states, and the gradients of their weighted sum."""
  xt = torch.tensor(x, requires_grad=True)
  init = [torch.tensor(s, requires_grad=True) for s in state] if state else []
  packed = xt if lengths is None else torch_rnn.pack_padded_sequence(
    xt, torch.from_numpy(lengths), batch_first=module.batch_first, enforce_sorted=False)
  args = () if not init else ((init[0], init[1]) if len(init) == 2 else init[0],)
  out, final = module(packed, *args)
  if lengths is not None:
    out, _ = torch_rnn.pad_packed_sequence(out, batch_first=module.batch_first,
                                           total_length=x.shape[1 if module.batch_first else 0])
  results = [out, *(final if isinstance(final, tuple) else (final,))]
  loss = sum((r * torch.from_numpy(w)).sum() for r, w in zip(results, weights))
  loss.backward()
  grads = {'inputs': xt.grad.numpy()}
  grads.update({f'state{i}': s.grad.numpy() for i, s in enumerate(init)})
  grads.update({f'param {k}': p.grad.numpy() for k, p in module.named_parameters()})
  return [r.detach().numpy() for r in results], grads


def _carry(model: Any, x: np.ndarray, state: list[np.ndarray], lstm: bool) -> Any:
  """PyTorch's stacked ``(h0, c0)`` as our carry: leaves in layer-major,
  direction-minor order, an LSTM cell's carry being ``(c, h)``."""
  structure = jax.tree.structure(nnx.eval_shape(lambda m, x: m(x, return_carry=True)[0], model,
                                                jnp.asarray(x)))
  h0 = list(state[0])
  leaves = [a for pair in zip(state[1], h0) for a in pair] if lstm else h0
  return jax.tree.unflatten(structure, [jnp.asarray(a) for a in leaves])


def _stacked(carry: Any, lstm: bool) -> list[Any]:
  """Our carry as PyTorch's stacked ``(h_n, c_n)`` (or ``h_n``): ``_carry``'s inverse."""
  leaves = jax.tree.leaves(carry)
  return [jnp.stack(leaves[1::2]), jnp.stack(leaves[0::2])] if lstm else [jnp.stack(leaves)]


def run(case: Case) -> None:
  kind = case.pick('layer', ['LSTM', 'GRU'])
  lstm = kind == 'LSTM'
  pallas = case.pick('implementation', ['xla', 'xla', 'pallas']) == 'pallas'
  settings = draw_pallas_settings(case) if pallas else {}
  small = 2 if pallas else 3
  # With 16-wide chunks, hidden sizes of several chunks (20 is padded to 32: 2 chunks).
  in_f = case.integer('in_features', 1, 5)
  hidden = case.integer('hidden', 2, 20 if settings.get('chunk') else 6)
  layers, batch = case.integer('num_layers', 1, small), case.integer('batch', 1, small + 1)
  time = case.integer('time', 1, 4 if pallas else 6)
  bidirectional = bool(case.pick('bidirectional', [False, True]))
  batch_first = bool(case.pick('batch_first', [True, False]))
  bias = bool(case.pick('bias', [True, True, False]))
  proj = case.integer('proj_size', 0, hidden - 1) if lstm and case.pick('proj', [0, 1]) else 0
  torch.manual_seed(case.seed % 2**31)
  kw = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
  module = (torch.nn.LSTM(in_f, hidden, proj_size=proj, **kw) if lstm
            else torch.nn.GRU(in_f, hidden, **kw))
  model = interop.from_torch(module)
  model.implementation = 'pallas' if pallas else 'xla'
  lengths = None
  if case.pick('packed', [False, True]):
    lengths = case.rng.integers(1, time + 1, size=batch).astype(np.int64)
    case.config['lengths'] = lengths.tolist()
  x = case.normal((batch, time, in_f) if batch_first else (time, batch, in_f))
  d = 1 + bidirectional
  state = []
  if case.pick('initial_state', [False, True]):
    state = [case.normal((layers * d, batch, proj or hidden))]
    state += [case.normal((layers * d, batch, hidden))] if lstm else []
  out_shape = x.shape[:-1] + (d * (proj or hidden),)
  shapes = [out_shape, (layers * d, batch, proj or hidden)] + (
    [(layers * d, batch, hidden)] if lstm else [])
  weights = [case.normal(s) for s in shapes]
  results, grads = _torch_run(module, x, lengths, state, weights)

  carry = _carry(model, x, state, lstm) if state else None

  def loss(model, x, carry):
    kw = {} if lengths is None else {'seq_lengths': jnp.asarray(lengths, jnp.int32)}
    new_carry, y = model(x, initial_carry=carry, return_carry=True, **kw)
    ours = [y, *_stacked(new_carry, lstm)]
    return sum(jnp.sum(r * w) for r, w in zip(ours, weights)), ours

  plan = contextlib.nullcontext() if pallas else scan_plan(case, type(model), batch)
  with internal.pallas_settings(**settings), plan:  # read while the layer is traced
    (_, ours), (g_model, g_x, g_carry) = _value_and_grads(loss, model, jnp.asarray(x), carry)
  for name, o, t in zip(['outputs', 'h_n', 'c_n'], ours, results):
    case.close(name, o, t)
  case.close('gradient of the inputs', g_x, grads['inputs'], atol=1e-4, rtol=1e-4)
  if state:
    for i, s in enumerate(_stacked(g_carry, lstm)):
      case.close(f'gradient of {"hc"[i]}0', s, grads[f'state{i}'], atol=1e-4, rtol=1e-4)
  exported = nnx.clone(model)
  nnx.update(exported, g_model)
  g_ours = {n: p.detach().numpy() for n, p in interop.to_torch(exported).named_parameters()}
  for name, value in g_ours.items():
    if f'param {name}' not in grads:  # PyTorch's bias=False: our biases are zeros, trainable
      continue
    if name.startswith('bias_hh'):
      # Our one summed bias is exported as b_ih (its gradient checked here);
      # b_hh holds only GRU's bias_hn, in its n part: PyTorch's b_hn gradient.
      if not lstm:
        case.close('gradient of bias_hn', value[2 * hidden:],
                   grads[f'param {name}'][2 * hidden:], atol=1e-4, rtol=1e-4)
      continue
    case.close(f'gradient of {name.split("_l")[0]}', value, grads[f'param {name}'],
               atol=1e-4, rtol=1e-4)


def _value_and_grads(loss, model, x, carry):
  return nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(model, x, carry)
