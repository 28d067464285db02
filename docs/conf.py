"""Sphinx configuration: MyST markdown pages plus autodoc of the public API.

Build with ``make docs`` (``sphinx -W``: warnings are errors). Every ``>>>``
example in the pages is a doctest that ``make test`` runs
(``--doctest-glob='*.md'``); blocks without prompts (shell commands, scripts) are
not run.
"""

import inspect
import re
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

from flax import nnx  # noqa: E402

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
# Defaults as written in the source (``nnx.sigmoid``, not ``<PjitFunction ...>``).
autodoc_preserve_defaults = True
# No default 'members': with one, Sphinx ignores a directive's own ``:members:`` list
# (sphinx-doc/sphinx#9709) and documents every member, and 'show-inheritance': False
# counts as the flag given (private bases such as ``_Cell`` were shown); api.md names
# what each entry documents.
autodoc_default_options: dict = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Attributes sections as fields: flax.linen modules (compat) also get their dataclass
# fields documented by autodoc, and two attribute entries would collide.
napoleon_use_ivar = True

html_theme = 'alabaster'
html_static_path = ['_static']
html_theme_options = {'description': 'Recurrent layers for Flax NNX', 'page_width': '1100px'}


BENCHMARK_RECORDS = ('RESULTS.md', 'PACKING.md', 'REMAT.md', 'HISTORY.md')  # in benchmarks/
# RESULTS.md links to sections of HISTORY.md (its archive) by GitHub's heading anchors; on the
# one generated page those links become references to labels set before HISTORY.md's headings.
LINKED_RECORD = 'HISTORY.md'


def _demote_headings(text: str) -> str:
  """``# Title`` -> ``## Title`` outside code fences (the page has its own title)."""
  lines, fenced = [], False
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
    lines.append('#' + line if not fenced and line.startswith('#') else line)
  return '\n'.join(lines) + '\n'


def _slug(title: str) -> str:
  """GitHub's (and MyST's) anchor for a heading."""
  return re.sub(r'[^\w\- ]', '', title.strip().lower()).replace(' ', '-')


def _label_headings(text: str, prefix: str) -> str:
  """Puts a MyST label ``(prefix-<anchor>)=`` before each heading outside code fences."""
  lines, fenced = [], False
  for line in text.splitlines():
    if line.lstrip().startswith('```'):
      fenced = not fenced
    if not fenced and line.startswith('#'):
      lines.append(f'({prefix}-{_slug(line.lstrip("#"))})=')
    lines.append(line)
  return '\n'.join(lines) + '\n'


def _link_record(text: str, name: str, prefix: str, top: str) -> str:
  """``](NAME#anchor)`` -> ``](prefix-anchor)`` and ``](NAME)`` -> ``](top)``."""
  text = re.sub(rf'\]\({re.escape(name)}#([\w-]+)\)', rf']({prefix}-\1)', text)
  return text.replace(f']({name})', f']({top})')


def _benchmark_page(app) -> None:
  """Writes ``_build/generated/benchmarks.md``, which performance.md includes.

  It holds the records in benchmarks/ (RESULTS.md, PACKING.md, REMAT.md, HISTORY.md) and
  the plots next to them when the benchmarks have been run and recorded, and a
  note saying how to run them otherwise, so the site builds either way.
  """
  out = DOCS / '_build' / 'generated'  # ignored by git with the rest of _build
  out.mkdir(parents=True, exist_ok=True)
  bench = ROOT / 'benchmarks'
  parts = []
  for png in sorted(bench.glob('*.png')):
    shutil.copy(png, out / png.name)
  prefix, top = 'record-' + _slug(Path(LINKED_RECORD).stem), None
  for name in BENCHMARK_RECORDS:
    if (bench / name).exists():
      record = (bench / name).read_text()
      if name == LINKED_RECORD:
        title = next(line for line in record.splitlines() if line.startswith('#'))
        top = f'{prefix}-{_slug(title.lstrip("#"))}'
        record = _label_headings(record, prefix)
      parts.append(_demote_headings(record))
  text = '\n'.join(parts)
  if top:
    text = _link_record(text, LINKED_RECORD, prefix, top)
  for png in sorted(bench.glob('*.png')):
    if png.name not in text:
      text += f'\n![{png.stem}]({png.name})\n'
  if not parts:
    text = ('*No recorded results in this checkout: run `make bench` (or '
            '`python -m benchmarks.run --plot`) and record them in '
            '`benchmarks/RESULTS.md`.*\n')
  (out / 'benchmarks.md').write_text(text)


def _public_default(param: inspect.Parameter, namespace: dict) -> inspect.Parameter:
  """A default written as a private name (``_NO_METADATA``) shown as its value."""
  from sphinx.ext.autodoc.preserve_defaults import DefaultValue

  text = str(param.default)
  if isinstance(param.default, DefaultValue) and text.startswith('_') and text in namespace:
    return param.replace(default=namespace[text])
  return param


def _module_signature(app, what, name, obj, options, signature, return_annotation):
  """An ``nnx.Module`` class's signature and parameter types from its ``__init__``.

  autodoc takes a class's signature from its metaclass's ``__call__`` when there
  is one, and flax's (``PytreeMeta.__call__(*args, **kwargs)``) would make every
  module ``Class(*args, **kwargs)`` with ``args (Any)`` and ``kwargs (Any)`` as
  its parameters. This replaces both with ``__init__``'s, less ``self``. (Setting
  ``__signature__`` on the classes instead would change
  ``inspect.signature(module)``, which must stay ``__call__``'s: ``nnx.scan(cell,
  ...)`` reads it.) Sphinx is imported here, at build time: the test suite
  imports this file without it.
  """
  from sphinx.ext.autodoc.preserve_defaults import update_defvalue
  from sphinx.util.inspect import signature as sphinx_signature
  from sphinx.util.inspect import stringify_signature
  from sphinx.util.typing import stringify_annotation

  if what != 'class' or not (isinstance(obj, type) and issubclass(obj, nnx.Module)):
    return None
  init = obj.__init__
  if init is object.__init__:  # no __init__ of its own (RNNCellBase)
    sig = inspect.Signature()
  else:
    update_defvalue(app, init, False)  # autodoc_preserve_defaults for __init__ too
    sig = sphinx_signature(init, bound_method=True, type_aliases=app.config.autodoc_type_aliases)
    params = [_public_default(p, init.__globals__) for p in sig.parameters.values()]
    sig = sig.replace(parameters=params)
  short = app.config.autodoc_typehints_format == 'short'
  try:
    recorded = app.env.current_document.autodoc_annotations
  except AttributeError:  # Sphinx < 8.2 keeps them here
    recorded = app.env.temp_data.setdefault('annotations', {})
  annotations = recorded[name] = {}
  for param in sig.parameters.values():
    if param.annotation is not param.empty:
      annotations[param.name] = stringify_annotation(
        param.annotation, 'smart' if short else 'fully-qualified'
      )
  args = stringify_signature(
    sig,
    show_annotation=app.config.autodoc_typehints not in ('none', 'description'),
    show_return_annotation=False,
    unqualified_typehints=short,
  )
  return args, None


def setup(app):
  # At build time only: importing this file (pytest collects docs/) writes nothing.
  app.connect('builder-inited', _benchmark_page)
  app.connect('autodoc-process-signature', _module_signature)
