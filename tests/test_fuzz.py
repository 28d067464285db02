"""The differential fuzzer (fuzz/, ``make fuzz``): every family runs a few
cases clean, and the harness catches a planted bug with a seed that replays it.
The campaigns themselves run outside the suite (``make fuzz``)."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx

from fuzz import (
  _core,
  errors_family,
  layers_family,
  linen_family,
  nnx_family,
  state_family,
  streaming_family,
)
from fuzz.__main__ import main
from nnx_recurrent import _base, _checks, _scan


def _seeds(n, seed=0):
  return [_core.case_seed(seed, i) for i in range(n)]


@pytest.mark.parametrize('family', [nnx_family, linen_family, errors_family],
                         ids=['nnx', 'linen', 'errors'])
def test_families_run_clean(family):
  report = _core.run_cases('smoke', family.run, _seeds(3))
  assert report['cases'] == 3
  assert report['failures'] == []
  if family is not errors_family:  # the differential families compared numbers
    assert report['largest_abs_error'], report
    assert max(report['largest_abs_error'].values()) < 1e-4


def test_fused_layers_against_flax_stacks_run_clean():
  report = _core.run_cases('fused', nnx_family.fused_case, _seeds(2))
  assert report['failures'] == []
  assert 'forward layer 0 gradients' in report['largest_abs_error']


# Packed rows of 4 steps: segments, padding between them, a stack of layers.
SMALL = dict(masking='segments', batch_axes=1, batch0=2, time=4)


def test_nested_layers_against_step_loops_run_clean():
  report = _core.run_cases('layers', layers_family.run, _seeds(1),
                           force={**SMALL, 'top.kind': 'stacked'})
  assert report['failures'] == []
  assert report['largest_abs_error']['input gradients at padding (zeros)'] == 0
  assert {'outputs (segments)', 'carry', 'cell 0 gradients'} <= set(report['largest_abs_error'])


def test_streamed_layers_against_step_loops_run_clean():
  report = _core.run_cases('streaming', streaming_family.run, _seeds(1),
                           force={**SMALL, 'initial_carry': 1, 'cuts': 2})
  assert report['failures'] == []
  assert {'outputs (segments)', 'carry', 'cell 0 gradients'} <= set(report['largest_abs_error'])


def test_compat_packed_against_linen_loops_runs_clean():
  report = _core.run_cases('packed', linen_family.packed_case, _seeds(1),
                           force=dict(batch_axes=1, batch0=2, time=4))
  assert report['failures'] == []
  assert set(report['largest_abs_error']) == {
    'packed outputs (zeros at padding)', 'packed carry', 'packed gradients'}


def test_a_carry_leaking_into_the_next_segment_is_found(monkeypatch):
  # No resets: a row's later segments go on from the carry of the one before.
  monkeypatch.setattr(_scan, 'segments_to_masks', lambda ids: _scan.StepMasks(
    ids != 0, jnp.zeros_like(ids, bool)))
  force = {**SMALL, 'batch0': 3, 'time': 6, 'top.kind': 'rnn'}
  report = _core.run_cases('layers', layers_family.run, _seeds(2), force=force)
  assert len(report['failures']) == 2, report
  # (The carry, where the outputs cannot show it: a layer-normalized cell of one unit.)
  assert all(f['error'].startswith(('Mismatch: outputs (segments)', 'Mismatch: carry'))
             for f in report['failures'])


def test_stateful_user_cells_against_flax_nnx_run_clean():
  report = _core.run_cases('state', state_family.run, _seeds(2),
                           force=dict(counter=True, running_mean=True, call='grad'))
  assert report['failures'] == []
  assert report['largest_abs_error']['call 1: cell 0 state'] < 1e-6  # compared, to rounding


def test_a_dropout_stream_not_held_over_the_steps_is_found(monkeypatch):
  # broadcast_rngs ignored: the cell's nnx.Dropout draws a new mask at every
  # step where flax.nnx holds one per call.
  monkeypatch.setattr(_scan, 'nnx_state_axes', lambda state_axes=None, broadcast_rngs=None:
                      nnx.StateAxes(state_axes or {...: nnx.Carry}))
  force = dict(dropout_rate=0.5, broadcast_rngs=True, bidirectional=False, call='eager',
               batch_axes=1, time=4)
  report = _core.run_cases('state', state_family.run, _seeds(2), force=force)
  assert len(report['failures']) == 2, report
  assert all(f['error'].startswith('Mismatch: call 0: outputs at valid steps')
             for f in report['failures'])


def test_torch_family_runs_clean():
  pytest.importorskip('torch')
  from fuzz import torch_family

  report = _core.run_cases('torch', torch_family.run, _seeds(2, seed=1))
  assert report['failures'] == []
  assert 'gradient of weight_ih' in report['largest_abs_error']


def _off_by(delta):
  """A cell step whose output is ``delta`` off: a bug to be found."""
  call = _base.RNNCellBase._call

  def wrong(self, carry, inputs, options, keep_carry_dtype):
    carry, y = call(self, carry, inputs, options, keep_carry_dtype)
    return carry, y + delta

  return wrong


def test_a_wrong_output_is_found_and_replays(monkeypatch):
  monkeypatch.setattr(_base.RNNCellBase, '_call', _off_by(1e-3))
  report = _core.run_cases('nnx', nnx_family.cell_case, _seeds(2))
  assert len(report['failures']) == 2
  failure = report['failures'][0]
  assert failure['error'].startswith('Mismatch: ') and 'step' in failure['error']
  assert 'cell' in failure['config'] and 'hidden' in failure['config']
  replay = _core.run_cases('nnx', nnx_family.cell_case, [failure['seed']])
  assert replay['failures'][0]['config'] == failure['config']  # the same case again
  monkeypatch.undo()
  assert _core.run_cases('nnx', nnx_family.cell_case, [failure['seed']])['failures'] == []


def test_an_unchecked_argument_is_found(monkeypatch, tmp_path, capsys):
  # seq_lengths and segment_ids unchecked: bad ones reach jax (or run), which the
  # family reports.
  monkeypatch.setattr(_checks, 'check_integer_array', lambda where, arg, x, *a, **k:
                      jnp.asarray(x))
  out = tmp_path / 'sub' / 'report.json'
  code = main(['--family', 'errors', '--cases', '40', '--seed', '0', '--out', str(out)])
  assert code == 1
  [report] = json.loads(out.read_text())
  assert report['failures'], report
  assert {f['config']['argument'] for f in report['failures']} <= {"'seq_lengths'",
                                                                   "'segment_ids'"}
  printed = capsys.readouterr().out
  assert f"python -m fuzz --family errors --replay {report['failures'][0]['seed']}" in printed
