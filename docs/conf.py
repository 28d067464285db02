"""Sphinx configuration: MyST markdown pages plus autodoc of the public API.

Build with ``make docs`` (``sphinx -W``: warnings are errors). Every code block
in the pages is a doctest that ``make test`` runs (``--doctest-glob='*.md'``).
"""

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import nnx_recurrent  # noqa: E402

project = 'nnx_recurrent'
author = 'nnx_recurrent contributors'
copyright = '2025, nnx_recurrent contributors'  # noqa: A001
release = version = nnx_recurrent.__version__

extensions = [
  'myst_parser',
  'sphinx.ext.autodoc',
  'sphinx.ext.napoleon',
  'sphinx.ext.mathjax',
  'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
exclude_patterns = ['_build', '_scripts', 'Thumbs.db', '.DS_Store']
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3

autodoc_member_order = 'bysource'
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes sections as fields: flax.linen modules (compat) also get their dataclass
# fields documented by autodoc, and two attribute entries would collide.
napoleon_use_ivar = True

html_theme = 'alabaster'
html_static_path = ['_static']
html_theme_options = {'description': 'Recurrent layers for Flax NNX', 'page_width': '1100px'}


BENCHMARK_RECORDS = ('RESULTS.md', 'PACKING.md', 'REMAT.md')  # in benchmarks/


def _demote_headings(text: str) -> str:
  """``# Title`` -> ``## Title`` outside code fences (the page has its own title)."""
  lines, fenced = [], False
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
    lines.append('#' + line if not fenced and line.startswith('#') else line)
  return '\n'.join(lines) + '\n'


def _benchmark_page(app) -> None:
  """Writes ``_build/generated/benchmarks.md``, which performance.md includes.

  It holds the records in benchmarks/ (RESULTS.md, PACKING.md, REMAT.md) and
  the plots next to them when the benchmarks have been run and recorded, and a
  note saying how to run them otherwise, so the site builds either way.
  """
  out = DOCS / '_build' / 'generated'  # ignored by git with the rest of _build
  out.mkdir(parents=True, exist_ok=True)
  bench = ROOT / 'benchmarks'
  parts = []
  for png in sorted(bench.glob('*.png')):
    shutil.copy(png, out / png.name)
  for name in BENCHMARK_RECORDS:
    if (bench / name).exists():
      parts.append(_demote_headings((bench / name).read_text()))
  text = '\n'.join(parts)
  for png in sorted(bench.glob('*.png')):
    if png.name not in text:
      text += f'\n![{png.stem}]({png.name})\n'
  if not parts:
    text = ('*No recorded results in this checkout: run `make bench` (or '
            '`python -m benchmarks.run --plot`) and record them in '
            '`benchmarks/RESULTS.md`.*\n')
  (out / 'benchmarks.md').write_text(text)


def setup(app):
  # At build time only: importing this file (pytest collects docs/) writes nothing.
  app.connect('builder-inited', _benchmark_page)
