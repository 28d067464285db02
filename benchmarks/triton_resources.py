"""Compile the Pallas kernels (``implementation='pallas'``) with Triton for an
H200 on a machine WITHOUT a GPU, and report what each needs of the chip.

JAX lowers a ``pallas_call`` to Triton IR and hands it to XLA, whose Triton
compiler runs only where a GPU is. This script exports a training step of
``nr.LSTM`` / ``nr.GRU`` for CUDA on the CPU (``internal.triton_lowering``),
captures each kernel's Triton IR as JAX lowers it, and compiles that IR with
the ``triton`` package's own compiler for ``sm_90a`` (Hopper, the H100/H200),
then ``ptxas -v``. Per kernel it prints the shared memory it needs (a Hopper
block has at most 227 KiB: more fails at launch), its registers per thread
(255 at most) and the bytes it spills to local memory, or the compiler's error,
and what one step of its time loop executes per thread, from the PTX: its
instructions, barriers (each exchange of values between warps through shared
memory takes one or two) and shared-memory loads and stores. It says nothing
of speed, but compares kernel forms: on 2026-12-04 the LSTM forward kernel's
step at ``(1, ., 32, 64)`` was 573 instructions and 22 barriers with ``dot``,
282 and 18 with ``--settings matmul=fma``, 534 and 2 with
``matmul=fma,num_warps=2``. Triton here is the pip package, not the Triton
that jaxlib bundles, so expect small differences on a GPU; it found the
kernels' first form needing 520 KiB of shared memory and failing ``ptxas`` at
``H = 512``, which led to their column chunks (``_fused/_pallas_kernels.py``).

``triton`` is a 1 GB package, kept out of the test environment: give its
interpreter with ``--triton-python`` (``make triton-check`` makes
``.venv-triton`` and runs this)::

  python -m benchmarks.triton_resources --triton-python .venv-triton/bin/python \\
      [--shapes 1x32x64,8x64x128] [--settings chunk=64,hold_bytes=180224] [--json out.json] \\
      [--dump DIR]

A shape is ``batch x input x hidden``; the default is the benchmark suite's
four in float32 (at ``H = 512`` the kernels loop over their column chunks:
written out, one took Triton 12 minutes to compile on 2 cores), and
``8x64x128`` in bfloat16 and with an LSTM projection (64) and packed
sequences.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from jax import export

import nnx_recurrent as nr
from benchmarks import gpu_plans
from nnx_recurrent._fused import internal

SHARED_LIMIT = 227 * 1024  # bytes of shared memory a Hopper block may have
TIME = 8  # the loop bound is a constant in the kernels: their code is the same for any length

DEFAULT_CASES = [
  # (layer, batch, input, hidden, dtype, projection, packed)
  *[(cls, b, i, h, 'float32', None, False) for b, i, h in ((1, 32, 64), (8, 64, 128),
                                                          (64, 128, 256), (256, 256, 512))
    for cls in ('LSTM', 'GRU')],
  ('LSTM', 8, 64, 128, 'bfloat16', None, False),
  ('GRU', 8, 64, 128, 'bfloat16', None, False),
  ('LSTM', 8, 64, 128, 'float32', 64, True),
]


@contextlib.contextmanager
def _captured_triton_ir():
  """Every Pallas kernel lowered to Triton inside the block, as MLIR text.
  (Reads jax's private lowering function: jax 0.10 and 0.11.)"""
  from jax._src.pallas.triton import pallas_call_registration as registration

  modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = lower(*args, **kwargs)
    modules.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  registration.lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    registration.lowering.lower_jaxpr_to_triton_module = lower


def case_name(cls, batch, inputs, hidden, dtype, proj, packed):
  extra = (f'_proj{proj}' if proj else '') + ('_packed' if packed else '')
  return f'{cls}_B{batch}_I{inputs}_H{hidden}_{dtype}{extra}'


def triton_ir(cls, batch, inputs, hidden, dtype, proj, packed):
  """``{'forward': text, 'backward': text}``: the kernels of one direction's
  training step."""
  return triton_kernels(cls, batch, inputs, hidden, dtype, proj, packed)[0]


def triton_kernels(cls, batch, inputs, hidden, dtype, proj, packed):
  """:func:`triton_ir`'s kernels and the warps they launch with, as the exported
  calls say (the layout's: ``matmul='auto'`` picks its own, whatever the
  ``num_warps`` setting)."""
  kw = dict(proj_features=proj) if proj else {}
  layer = getattr(nr, cls)(inputs, hidden, implementation='pallas', dtype=jnp.dtype(dtype),
                           rngs=nnx.Rngs(0), **kw)
  graphdef, params = nnx.split(layer)
  masks = (dict(segment_ids=jnp.ones((batch, TIME), jnp.int32)) if packed
           else dict(seq_lengths=jnp.full((batch,), TIME)))

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x, **masks)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  unchecked = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')]
  x = jnp.ones((batch, TIME, inputs))  # outside: no eager computation for an abstract GPU
  with _captured_triton_ir() as modules, internal.triton_lowering():
    exported = export.export(jax.jit(jax.grad(loss)), platforms=['cuda'],
                             disabled_checks=unchecked)(params, x)
  if len(modules) != 2:
    raise RuntimeError(f'expected a forward and a backward kernel, captured {len(modules)}')
  warps = set(re.findall(r'num_warps = (\d+) : i32', exported.mlir_module()))
  if len(warps) != 1:
    raise RuntimeError(f'expected one num_warps for both kernels, found {sorted(warps)}')
  return dict(zip(('forward', 'backward'), modules)), int(warps.pop())


def parse_shapes(text):
  cases = []
  for shape in text.split(','):
    b, i, h = (int(n) for n in shape.split('x'))
    cases += [(cls, b, i, h, 'float32', None, False) for cls in ('LSTM', 'GRU')]
  return cases


parse_settings = gpu_plans.parse_settings


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--triton-python', default=sys.executable,
                      help='a Python with the triton package (default: this one)')
  parser.add_argument('--shapes', help='batch x input x hidden, comma-separated (float32)')
  parser.add_argument('--settings', default='',
                      help='changes to internal.PallasSettings, e.g. chunk=32,num_warps=4')
  parser.add_argument('--json', help='write the results here')
  parser.add_argument('--dump', metavar='DIR',
                      help="keep each kernel's Triton IR (.ttir), its form after Triton's "
                           'layout passes (.ttgir) and its PTX (.ptx) in DIR')
  args = parser.parse_args(argv)
  cases = parse_shapes(args.shapes) if args.shapes else DEFAULT_CASES
  child = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_triton_compile.py')
  rows = []
  if args.dump:
    os.makedirs(args.dump, exist_ok=True)
  with internal.pallas_settings(**parse_settings(args.settings)) as settings, \
       tempfile.TemporaryDirectory() as scratch:
    tmp = args.dump or scratch
    print(f'settings: {settings._asdict()}', flush=True)
    print(f'{"kernel":52s} {"shared KiB":>10s} {"regs":>5s} {"spill B":>8s} {"compile s":>9s}'
          f' {"step: instr":>11s} {"bar":>4s} {"ld.sh":>5s} {"st.sh":>5s} {"ldmat":>5s}'
          f' {"ld.gl":>5s} {"warps":>5s}')
    for case in cases:
      name = case_name(*case)
      paths = []
      kernels, warps = triton_kernels(*case)
      for kernel, text in kernels.items():
        paths.append(os.path.join(tmp, f'{name}_{kernel}.ttir'))
        with open(paths[-1], 'w') as f:
          f.write(text)
      env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(scratch, 'cache'))  # compiled afresh
      done = subprocess.run([args.triton_python, child, str(warps),
                             str(settings.num_stages), *paths], capture_output=True, text=True,
                            env=env)
      results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{')]
      if not results:
        raise RuntimeError(f'the Triton compiler child failed:\n{done.stderr[-2000:]}')
      # One line a file, as it goes: a child killed on a file (an LLVM ERROR aborts it)
      # left that file and the next without one, failures (not left out of the report).
      tail = (done.stderr.strip().splitlines() or [''])[-1][:300]
      results += [dict(file=os.path.basename(path), ok=False, seconds=0.0,
                       error=f'no result: the compiler child exited with {done.returncode}: {tail}')
                  for path in paths[len(results):]]
      for r in results:
        r['kernel'], r['num_warps'] = r.pop('file')[:-len('.ttir')], warps
        r['fits'] = r['ok'] and r['shared'] <= SHARED_LIMIT
        if r['ok']:
          flag = '' if r['fits'] else '  OVER THE 227 KiB LIMIT'
          loop = r.get('loop') or {}
          step = ' '.join(f'{loop.get(k, "-"):>{w}}' for k, w in (
            ('instructions', 11), ('barriers', 4), ('shared_loads', 5), ('shared_stores', 5),
            ('ldmatrix', 5), ('global_loads', 5)))
          print(f'{r["kernel"]:52s} {r["shared"] / 1024:10.0f} {r["registers"]:5d} '
                f'{r["spill_bytes"]:8d} {r["seconds"]:9.1f} {step} {warps:5d}{flag}', flush=True)
        else:
          print(f'{r["kernel"]:52s} FAILED: {r["error"]}', flush=True)
      rows += results
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(settings=settings._asdict(), jax=jax.__version__, target='sm_90a',
                     shared_limit=SHARED_LIMIT, kernels=rows), f, indent=1)
  return 0 if all(r['fits'] for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
