"""Benchmarks against flax.nnx, flax.linen and PyTorch: ``python -m benchmarks.run``."""

import json
import os


def write_json(path: str, payload: dict) -> None:
  """Writes ``payload`` to ``path`` whole or not at all: through ``path + '.tmp'`` and a
  rename, so a run cut off by a time limit while writing leaves the previous file
  (``gpu.sh`` removes the ``.tmp``)."""
  with open(path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=1)
  os.replace(path + '.tmp', path)
