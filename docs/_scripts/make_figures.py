"""Draws the figures of the documentation into docs/_static/.

Run from the repository root after changing a figure, and commit the PNG::

  python docs/_scripts/make_figures.py

Importing this file draws nothing (pytest collects docs/).
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).resolve().parents[1] / '_static'

VALID, PAD, RESET = '#cfe2f3', '#e6e6e6', '#f9cb9c'
S = 1.4  # distance between time steps
INIT = r'$h_{\mathrm{init}}$'  # the initial carry; h_t is the carry after step t


def _box(ax, x, y, text, color, w=0.8, h=0.6, **kw):
  from matplotlib.patches import FancyBboxPatch

  ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle='round,pad=0.02',
                              fc=color, ec='#555555', lw=1))
  ax.text(x, y, text, ha='center', va='center', fontsize=9, **kw)


def _arrow(ax, x0, x1, y, kept, label=None):
  """The carry from the box at ``x0`` to the box at ``x1``; grey and dashed when kept."""
  if label:
    ax.text((x0 + x1) / 2, y + 0.2, label, ha='center', va='bottom', fontsize=8,
            color='#1f4e79' if not kept else '#777777')
  ax.annotate('', xy=(x1 - 0.42, y), xytext=(x0 + 0.42, y),
              arrowprops=dict(arrowstyle='->', lw=1.6 if not kept else 1.2,
                              color='#1f4e79' if not kept else '#999999',
                              linestyle='-' if not kept else (0, (3, 2))))


def carry_over_padding(path: Path) -> None:
  """Two panels: padding with ``seq_lengths``, packing with ``segment_ids``."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  T = 7
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.0),
                                    gridspec_kw=dict(height_ratios=[3.2, 1.6]))

  # (a) padding: rows of lengths 7, 4, 2; the carry passes over padding unchanged.
  lengths = [7, 4, 2]
  for r, length in enumerate(lengths):
    y = -1.6 * r
    _box(top, -S, y, INIT, 'white')
    for t in range(T):
      valid = t < length
      _box(top, t * S, y, f'$x_{t}$' if valid else 'pad', VALID if valid else PAD)
      top.text(t * S, y - 0.5, f'$y_{t}$' if valid else f'$y_{t} = 0$', ha='center',
               va='top', fontsize=8, color='#1f4e79' if valid else '#888888')
      held = min(t, length) - 1
      _arrow(top, (t - 1) * S, t * S, y, kept=not valid,
             label=f'$h_{held}$' if held >= 0 else None)
    last = f'$h_{length - 1}$' if length else INIT
    top.annotate('', xy=(T * S - 0.1, y), xytext=((T - 1) * S + 0.42, y),
                 arrowprops=dict(arrowstyle='->', lw=1.2, color='#999999'))
    top.text(T * S - 0.05, y, f'final carry = {last}', va='center', fontsize=9)
    top.text(-1.9 * S, y, f'L = {length}', ha='right', va='center', fontsize=9)
  top.set_title('seq_lengths: at a padding step the carry is kept (grey) and the output is 0',
                fontsize=10, loc='left')

  # (b) packing: segment ids 1 1 1 2 2 3 0; the carry resets at each later segment's start.
  ids = [1, 1, 1, 2, 2, 3, 0]
  _box(bottom, -S, 0, INIT, 'white')
  for t, s in enumerate(ids):
    start = s and (t == 0 or ids[t - 1] != s)
    color = PAD if s == 0 else (RESET if start else VALID)
    _box(bottom, t * S, 0, f'seg {s}' if s else 'pad', color)
    if start and t:
      bottom.annotate('$0$', xy=(t * S - 0.3, 0.32), xytext=(t * S - 1.0, 0.95), fontsize=8,
                      arrowprops=dict(arrowstyle='->', color='#b45f06', lw=1.2))
    elif t or start:
      _arrow(bottom, (t - 1) * S, t * S, 0, kept=s == 0)
  bottom.text(-1.9 * S, 0, 'packed row', ha='right', va='center', fontsize=9)
  bottom.set_title("segment_ids: a row's first segment starts from the initial carry, each "
                   'later one from the default, zeros (orange)', fontsize=10, loc='left')

  for ax in (top, bottom):
    ax.set_xlim(-2.6 * S, T * S + 1.9)
    ax.set_aspect('equal')
    ax.axis('off')
  top.set_ylim(-4.0, 0.7)
  bottom.set_ylim(-0.6, 1.2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  STATIC.mkdir(exist_ok=True)
  carry_over_padding(STATIC / 'carry_over_padding.png')
  print(f'wrote {STATIC / "carry_over_padding.png"}')


if __name__ == '__main__':
  main()
