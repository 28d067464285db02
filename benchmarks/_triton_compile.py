"""Child of ``benchmarks/triton_resources.py``: compiles Triton IR files with
Triton's own compiler for a Hopper GPU (no GPU needed) and prints one JSON
line per file: shared memory, registers and spilled bytes (from ``ptxas -v``),
what one iteration of the kernel's time loop executes (:func:`loop_stats`), or
the error. Runs in an environment with the ``triton`` package::

  python benchmarks/_triton_compile.py NUM_WARPS NUM_STAGES FILE.ttir ...
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time


def loop_stats(ptx: str) -> dict[str, int] | None:
  """What one pass through the PTX's longest loop holds (the kernels' time
  loop; a loop over column chunks inside it counts once): instructions,
  barriers (``bar.sync``: each exchange of values between warps through shared
  memory takes one or two), shared-memory loads (``ld.shared``; ``ldmatrix``,
  which loads 16-bit ``mma`` operands, apart) and stores, global loads (from
  L2 or memory) and tensor-core ``mma`` instructions. A static count per
  thread, for comparing kernel forms on a CPU, not a time; ``None`` without a
  loop."""
  lines = [line.split('//')[0].strip() for line in ptx.splitlines()]
  labels = {m.group(1): i for i, line in enumerate(lines)
            if (m := re.match(r'^(\$L__BB\d+_\d+):', line))}
  loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
           if (m := re.search(r'\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);', line))
           and labels.get(m.group(1), i) < i]
  if not loops:
    return None
  start, end = max(loops, key=lambda span: span[1] - span[0])
  body = [line for line in lines[start:end + 1] if line.endswith(';') and not
          line.startswith('.')]

  def count(pattern):
    return sum(1 for line in body if re.search(pattern, line))

  return dict(instructions=len(body), barriers=count(r'\bbar\.sync\b|\bbarrier\.sync\b'),
              shared_loads=count(r'\bld\.shared'), shared_stores=count(r'\bst\.shared'),
              ldmatrix=count(r'\bldmatrix\.'), global_loads=count(r'\bld\.global'),
              mma=count(r'\b(?:w?mma|wgmma)\.'))


def main(argv):
  os.environ.setdefault('TRITON_DEFAULT_FP_FUSION', '1')  # Triton 3.9's default, silenced
  import triton
  from triton.backends.compiler import GPUTarget

  num_warps, num_stages, files = int(argv[0]), int(argv[1]), argv[2:]
  bin_dir = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')
  ptxas = next(os.path.join(bin_dir, name) for name in ('ptxas-blackwell', 'ptxas')
               if os.path.exists(os.path.join(bin_dir, name)))
  for path in files:
    start, row = time.perf_counter(), {'file': os.path.basename(path)}
    noise = io.StringIO()  # Triton prints a whole reproducer on a failure
    try:
      with contextlib.redirect_stdout(noise):
        kernel = triton.compile(path, target=GPUTarget('cuda', 90, 32),
                                options=dict(num_warps=num_warps, num_stages=num_stages))
      ptx = path[:-len('.ttir')] + '.ptx'
      with open(ptx, 'w') as f:
        f.write(kernel.asm['ptx'])
      with open(path[:-len('.ttir')] + '.ttgir', 'w') as f:  # after Triton's layout passes
        f.write(kernel.asm['ttgir'])
      log = subprocess.run([ptxas, '-arch=sm_90a', '-v', ptx, '-o', os.devnull],
                           capture_output=True, text=True).stderr
      row.update(ok=True, shared=kernel.metadata.shared,
                 registers=int(re.findall(r'Used (\d+) registers', log)[-1]),
                 spill_bytes=int(re.findall(r'(\d+) bytes spill stores', log)[-1]),
                 loop=loop_stats(kernel.asm['ptx']))
    except Exception as e:  # noqa: BLE001 - any compiler failure is a result here
      lines = [x for x in str(e).splitlines() if 'fatal' in x or 'rror' in x]
      row.update(ok=False, error=f'{type(e).__name__}: ' + ' | '.join(lines[:2])[:300])
    row['seconds'] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
