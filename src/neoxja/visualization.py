"""Which tokens each token may attend to: `AttentionMaskVisualizer` (the reference's
`transformers.utils.attention_visualizer`) and the `neoxja visualize-mask` command.

The grid is the model's own mask, modeling.causal_mask (the one attention applies), built from the config and the
tokenizer alone: no weights are loaded. It prints as the reference prints it (one row per token, ■ where the token
may attend, ⬚ where it may not, the diagonal green) and saves as SVG (written here, no dependency) or PNG
(matplotlib, the `plot` extra).

Differences from the reference, on purpose: the column-index header lines hold the indices (the reference prints
them empty); labels are padded to their display width so that Japanese rows line up; rows do not end in the
sliding-window panel's "    |    " (these models have no sliding window, so the panel is always empty); the legend
explains ■ and ⬚ instead of the image-token colour, which text models never use; and a batch of texts, `pad_to` or
an explicit attention mask shows left padding, whose keys (and queries) are masked."""
from __future__ import annotations

import argparse
import io
import os
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Sequence
from xml.sax.saxutils import escape

import torch
from torch import Tensor

from .errors import InputError, NeoxjaError
from .files import write_atomic
from .modeling import MODEL_CLASSES, causal_mask

GREEN, BOLD, RESET = "\033[92m", "\033[1m", "\033[0m"
ATTEND, MASKED = "■", "⬚"
# Families tried after DejaVu Sans for the PNG's token labels; matplotlib falls back glyph by glyph.
JAPANESE_FONTS = ("Noto Sans CJK JP", "Noto Sans JP", "Source Han Sans JP", "IPAexGothic", "IPAGothic",
                  "TakaoGothic", "Hiragino Sans", "Yu Gothic", "MS Gothic", "Droid Sans Fallback")
IMAGE_SUFFIXES = (".svg", ".png")
FILLS = {"masked": "#ffffff", "attend": "#303030", "diagonal": "#2ca02c"}  # cell colours of both image formats

Texts = str | Sequence[str]


class AttentionMaskVisualizer:
    """`AttentionMaskVisualizer(model)(text)` prints the attention mask of `text` as the model would apply it.

    `model` is a checkpoint directory or hub id; only its config.json and tokenizer are read. Every method takes
    one text or a list of texts (a batch, left-padded to its longest text or to `pad_to` tokens, as generation
    pads), and optionally an explicit `attention_mask` ([T] or [B, T] of 0/1, T the padded length) in place of
    the padding one."""

    def __init__(self, model_name_or_path: str | os.PathLike) -> None:
        from .config import AutoConfig
        from .tokenization import AutoTokenizer

        self.repo_id = str(model_name_or_path)
        self.config = AutoConfig.from_pretrained(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model_class = MODEL_CLASSES[self.config.model_type]

    def __call__(self, sentence: Texts, suffix: str = "", *, attention_mask: Any = None,
                 pad_to: int | None = None) -> None:
        """Print the grid (with ANSI colours) and return None, as the reference does. `suffix` is accepted for
        compatibility: the reference hands it to multimodal processors only, so text models ignore it."""
        print()
        print(self.render(sentence, attention_mask=attention_mask, pad_to=pad_to))

    # ----------------------------------------------------------------------------------------------------------
    # The mask
    def encode(self, text: Texts, pad_to: int | None = None) -> tuple[list[list[str]], Tensor]:
        """Each text's tokens as the tokenizer splits them, left-padded with the pad token to a common length (the
        longest text's, or `pad_to`), and the [B, T] attention mask (1 = token, 0 = padding).

        No special tokens are added: the grid shows the text the model is given, and the same tokens as the
        reference's grid."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("give a text, or a non-empty list of texts")
        rows = [self.tokenizer.tokenize(t) for t in texts]
        empty = [i for i, row in enumerate(rows) if not row]
        if empty:
            which = "the text" if isinstance(text, str) else f"text {empty[0] + 1}"
            raise InputError(f"{which} gives no tokens: nothing to visualize (is it empty?)")
        longest = max(map(len, rows))
        length = longest if pad_to is None else pad_to
        if not isinstance(length, int) or length < longest:
            raise InputError(f"pad-to must be an integer of at least {longest} (the longest text's tokens), "
                             f"got {pad_to!r}")
        pad = self.tokenizer.pad_token or ""
        tokens = [[pad] * (length - len(row)) + row for row in rows]
        mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
        return tokens, mask

    def mask_grid(self, text: Texts, *, attention_mask: Any = None, pad_to: int | None = None) -> Tensor:
        """Boolean grid, True where query token i may attend to key token j: [T, T] for one text, [B, T, T] for a
        list of texts."""
        _, grid = self._grids(text, attention_mask, pad_to)
        return grid[0] if isinstance(text, str) else grid

    def _grids(self, text: Texts, attention_mask: Any, pad_to: int | None) -> tuple[list[list[str]], Tensor]:
        tokens, mask = self.encode(text, pad_to)
        if attention_mask is not None:
            mask = _checked_mask(attention_mask, tuple(mask.shape))
        length = mask.shape[1]
        additive = causal_mask(length, length, mask, torch.float32, torch.device("cpu"))
        return tokens, (additive == 0)[:, 0]

    # ----------------------------------------------------------------------------------------------------------
    # Text
    def render(self, text: Texts, *, attention_mask: Any = None, pad_to: int | None = None,
               color: bool = True) -> str:
        """The printed grid as a string; `color=False` leaves out the ANSI escape codes."""
        tokens, grid = self._grids(text, attention_mask, pad_to)

        def paint(code: str, s: str) -> str:
            return f"{code}{s}{RESET}" if color else s

        name = f"{self.config.model_type}:{self.repo_id}"
        border = "#" * (_width(self._title()) + 12)
        lines = [border,
                 f"##    {self._title().replace(name, paint(BOLD, name), 1)}    ##",
                 border,
                 f" {paint(GREEN, ATTEND)}: i == j (diagonal)   {ATTEND}: can attend   {MASKED}: masked"]
        name_width = max(_width(repr(t)) for row in tokens for t in row)  # one width: a batch's grids line up
        for b, (labels, rows) in enumerate(zip(tokens, grid)):
            heading = "Attention Matrix" + (f" (sequence {b + 1} of {len(tokens)})" if len(tokens) > 1 else "")
            if b:
                lines.append("")
            lines.extend(_matrix_lines(labels, rows, heading, name_width, paint))
        lines.append(border)
        return "\n".join(lines)

    # ----------------------------------------------------------------------------------------------------------
    # Images
    def save(self, path: str | os.PathLike, text: Texts, *, attention_mask: Any = None,
             pad_to: int | None = None) -> Path:
        """Write the grid as an image, SVG or PNG as `path`'s suffix says; returns the path."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in IMAGE_SUFFIXES:
            raise InputError(f"{path}: the image format comes from the file name; use {' or '.join(IMAGE_SUFFIXES)}")
        if not path.parent.is_dir():
            raise InputError(f"{path}: directory {path.parent} does not exist")
        make = self.to_svg if suffix == ".svg" else self.to_png
        return write_atomic(path, make(text, attention_mask=attention_mask, pad_to=pad_to))

    def to_svg(self, text: Texts, *, attention_mask: Any = None, pad_to: int | None = None) -> str:
        """The grid as SVG text (one grid per sequence, side by side). Cells are <rect>s of class "diagonal",
        "attend" or "masked"; labels are <text>, drawn in the viewer's fonts."""
        tokens, grid = self._grids(text, attention_mask, pad_to)
        cell, font = 16, 12
        n = grid.shape[-1]
        label_width = max(_width(f"{t!r} {n - 1}") for row in tokens for t in row) * font * 0.62 + 8
        panel_width = label_width + n * cell + 24
        top = 2 * font + 4 + len(str(n - 1)) * font * 0.7 + 8
        width = max(panel_width * len(tokens), _width(self._title()) * font * 0.62) + 16
        height = top + n * cell + 8
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
               f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="DejaVu Sans Mono, monospace" '
               f'font-size="{font}">',
               '<rect width="100%" height="100%" fill="#ffffff"/>',
               f'<text x="8" y="{font + 4}" font-weight="bold">{escape(self._title())}</text>']
        for b, (labels, rows) in enumerate(zip(tokens, grid)):
            x0 = 8 + b * panel_width + label_width
            out.append(f'<g class="sequence" transform="translate({x0:.1f} {top:.1f})">')
            for j in range(n):  # column indices, rotated so that any number of digits fits above its cell
                x = j * cell + cell / 2 + 4
                out.append(f'<text x="{x:.1f}" y="-4" font-size="{font * 0.7:.1f}" '
                           f'transform="rotate(-90 {x:.1f} -4)">{j}</text>')
            for i, label in enumerate(labels):
                y = i * cell
                out.append(f'<text x="-6" y="{y + cell - 4}" text-anchor="end">{escape(f"{label!r} {i}")}</text>')
                for j in range(n):
                    kind = "masked" if not rows[i, j] else "diagonal" if i == j else "attend"
                    out.append(f'<rect class="{kind}" x="{j * cell + 1}" y="{y + 1}" width="{cell - 2}" '
                               f'height="{cell - 2}" fill="{FILLS[kind]}" stroke="#999999" stroke-width="0.5"/>')
            out.append("</g>")
        out.append("</svg>")
        return "\n".join(out) + "\n"

    def to_png(self, text: Texts, *, attention_mask: Any = None, pad_to: int | None = None) -> bytes:
        """The grid as PNG bytes (matplotlib; one grid per sequence, side by side). Token labels need a font with
        their glyphs: a Japanese font such as Noto Sans CJK JP if one is installed, else they show as boxes (with
        a warning); SVG has no such problem, as the viewer draws the text."""
        Figure, font_manager, rc_context = _matplotlib()
        tokens, grid = self._grids(text, attention_mask, pad_to)
        n = grid.shape[-1]
        installed = {f.name for f in font_manager.fontManager.ttflist}
        families = ["DejaVu Sans", *(f for f in JAPANESE_FONTS if f in installed)]
        colours = torch.tensor([[int(FILLS[kind][k:k + 2], 16) / 255 for k in (1, 3, 5)]
                                for kind in ("masked", "attend", "diagonal")])
        side = 1.2 + n * 0.28
        with rc_context({"font.family": families}), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fig = Figure(figsize=(side * len(tokens) + 1.5, side + 0.6), dpi=100)
            fig.suptitle(self._title(), fontsize=9)
            axes = fig.subplots(1, len(tokens), squeeze=False)[0]
            for ax, labels, rows in zip(axes, tokens, grid):
                which = rows.long() + (rows & torch.eye(n, dtype=torch.bool)).long()  # 0 masked, 1 attend, 2 diagonal
                ax.imshow(colours[which].numpy(), interpolation="nearest")
                ax.set_xticks(range(n), [str(j) for j in range(n)], fontsize=7)
                ax.set_yticks(range(n), [f"{t!r} {i}" for i, t in enumerate(labels)], fontsize=8)
                ax.xaxis.tick_top()
                ax.set_xticks([j - 0.5 for j in range(1, n)], minor=True)
                ax.set_yticks([j - 0.5 for j in range(1, n)], minor=True)
                ax.grid(which="minor", color="#999999", linewidth=0.5)
                ax.tick_params(which="minor", length=0)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
        missing = [str(w.message) for w in caught if "missing from font" in str(w.message)]
        for w in caught:
            if "missing from font" not in str(w.message):
                warnings.warn(w.message, w.category, stacklevel=2)
        if missing:
            warnings.warn(f"no installed font has the glyphs of some token labels ({missing[0]}), so they show as "
                          f"boxes in the PNG: install a Japanese font (e.g. Noto Sans CJK JP), or save as .svg",
                          UserWarning, stacklevel=2)
        return buffer.getvalue()

    def _title(self) -> str:
        return f"Attention visualization for {self.config.model_type}:{self.repo_id} {self.model_class.__name__}"


def _matplotlib() -> tuple[Any, Any, Any]:
    """matplotlib's Figure (no pyplot: the caller's backend stays as it is), font manager and rc_context."""
    try:
        from matplotlib import font_manager, rc_context
        from matplotlib.figure import Figure
    except ImportError:
        raise NeoxjaError("saving a PNG needs matplotlib: pip install 'neoxja[plot]' (or save as .svg, which needs "
                          "nothing)") from None
    return Figure, font_manager, rc_context


def _checked_mask(attention_mask: Any, shape: tuple[int, int]) -> Tensor:
    """An explicit attention mask as a [B, T] 0/1 tensor of the encoded texts' shape, or an InputError."""
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError):
        raise InputError("attention_mask must be a tensor or nested list of 0/1") from None
    if mask.dim() == 1:
        mask = mask[None]
    if tuple(mask.shape) != shape:
        raise InputError(f"attention_mask must have shape {list(shape)} (texts × padded tokens), "
                         f"got {list(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
    return mask.long()


def _width(s: str) -> int:
    """Columns `s` takes in a terminal: East Asian wide and full-width characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _matrix_lines(labels: list[str], rows: Tensor, heading: str, name_width: int, paint: Any) -> list[str]:
    """One sequence's grid: heading, column-index lines (one per digit), one row per token, its label (the token's
    repr, as the reference prints it) padded to name_width columns."""
    n = len(labels)
    names = [repr(t) for t in labels]
    index_width = max(2, len(str(n - 1)))
    indent = " " * (name_width + index_width + 3)  # what precedes the first cell of a row
    digits = [str(j).rjust(len(str(n - 1))) for j in range(n)]
    lines = [indent + heading]
    lines += [indent + " ".join(d[k] for d in digits) for k in range(len(str(n - 1)))]
    for i, name in enumerate(names):
        cells = " ".join(paint(GREEN, ATTEND) if i == j and rows[i, j] else ATTEND if rows[i, j] else MASKED
                         for j in range(n))
        lines.append(f"{name}{' ' * (name_width - _width(name))}: {str(i).rjust(index_width)} {cells}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# CLI
def add_cli_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("texts", nargs="+", metavar="TEXT",
                        help="text to tokenize; several texts form a batch, left-padded to the longest")
    parser.add_argument("--model", "-m", help="checkpoint directory or hub id: its config and tokenizer are read, "
                                              "not its weights (default: the bundled demo model)")
    parser.add_argument("--pad-to", type=int, metavar="N", help="left-pad every text to N tokens")
    parser.add_argument("--output", "-o", metavar="FILE", help="write the grid as an image instead of printing "
                                                               "it: FILE.svg, or FILE.png (needs matplotlib)")
    parser.add_argument("--no-color", action="store_true",
                        help="no ANSI colours (they are left out anyway when stdout is not a terminal)")


def cli_main(args: argparse.Namespace, name: str) -> int:
    from .pipelines import default_model_path

    visualizer = AttentionMaskVisualizer(args.model or default_model_path())
    text = args.texts[0] if len(args.texts) == 1 else args.texts
    if args.output:
        print(f"wrote {visualizer.save(args.output, text, pad_to=args.pad_to)}")
    else:
        color = not args.no_color and sys.stdout.isatty()
        print(visualizer.render(text, pad_to=args.pad_to, color=color))
    return 0
