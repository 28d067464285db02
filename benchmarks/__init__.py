"""Benchmarks against flax.nnx, flax.linen and PyTorch: ``python -m benchmarks.run``."""

import json
import os
import statistics
import time


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` to ``path`` whole or not at all: through ``path + '.tmp'`` and a
  rename, so a run cut off by a time limit while writing leaves the previous file
  (``gpu.sh`` removes the ``.tmp``)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(path + '.tmp', path)


def median_ms(fn, *args, rounds: int, n: int) -> float:
  """Milliseconds a call of ``fn(*args)``, waited for (``jax.block_until_ready``,
  which returns anything else as it is): one call to warm up, then ``rounds``
  samples of ``n`` calls each, the median of their means."""
  import jax

  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(n):
      jax.block_until_ready(fn(*args))
    samples.append((time.perf_counter() - t0) / n * 1e3)
  return statistics.median(samples)
