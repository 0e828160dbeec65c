"""AttentionMaskVisualizer and `neoxja visualize-mask`: the grid is the model's mask (causal, left padding, explicit
masks; checked against the reference's mask builder), the printed rows equal the reference's, SVG and PNG files are
valid, and bad input fails with one clear error."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from abeja_fixtures import abeja_checkpoint, rinna_model_checkpoint  # noqa: F401  (fixtures)
from neoxja import AttentionMaskVisualizer
from neoxja.cli import main
from neoxja.errors import CheckpointError, InputError

ANSI = re.compile(r"\033\[[0-9;]*m")
# A grid row: the token's repr, padding, ": ", the row index, the cells.
ROW = re.compile(r"^('.*?') *: +(\d+) ([■⬚ ]+?)(?:    \|    )?$")
CAT = "吾輩は猫である🐯。"
CAT_TOKENS = ["吾", "輩", "は", "猫", "であ", "る", "<|emoji4|>", "。"]
T, F = True, False


@pytest.fixture(scope="module")
def abeja(abeja_checkpoint) -> AttentionMaskVisualizer:  # noqa: F811
    return AttentionMaskVisualizer(abeja_checkpoint)


def rows_of(printed: str) -> list[tuple[str, int, str]]:
    """(label, index, cells) of every grid row in printed text, ANSI codes removed."""
    found = [ROW.match(line) for line in ANSI.sub("", printed).splitlines()]
    return [(m[1], int(m[2]), m[3]) for m in found if m]


def reference_mask(checkpoint: Path, attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference's mask builder (what its visualizer and its eager attention use), as booleans."""
    import transformers
    from transformers.masking_utils import create_causal_mask

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    config._attn_implementation = "eager"
    batch, length = attention_mask.shape
    additive = create_causal_mask(config=config, inputs_embeds=torch.zeros(batch, length, config.hidden_size),
                                  attention_mask=attention_mask, past_key_values=None)
    return (additive == 0)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
def test_causal_grid(abeja):
    assert abeja.encode(CAT)[0] == [CAT_TOKENS]
    grid = abeja.mask_grid(CAT)
    assert grid.dtype == torch.bool and grid.shape == (8, 8)
    assert torch.equal(grid, torch.ones(8, 8, dtype=torch.bool).tril())


def test_left_padding_and_explicit_masks(abeja, abeja_checkpoint):  # noqa: F811
    tokens, mask = abeja.encode("吾輩", pad_to=4)
    assert tokens == [["<|endoftext|>", "<|endoftext|>", "吾", "輩"]] and mask.tolist() == [[0, 0, 1, 1]]
    assert abeja.mask_grid("吾輩", pad_to=4).tolist() == [[F, F, F, F],
                                                           [F, F, F, F],
                                                           [F, F, T, F],
                                                           [F, F, T, T]]
    # an explicit mask: key 1 is hidden from every query; query 1 still sees key 0
    assert abeja.mask_grid("吾輩は猫", attention_mask=[1, 0, 1, 1]).tolist() == [[T, F, F, F],
                                                                             [T, F, F, F],
                                                                             [T, F, T, F],
                                                                             [T, F, T, T]]
    batch = ["吾輩は", CAT]
    tokens, mask = abeja.encode(batch)
    assert tokens[1] == CAT_TOKENS and tokens[0][5:] == ["吾", "輩", "は"] and mask.sum(1).tolist() == [3, 8]
    grid = abeja.mask_grid(batch)
    assert grid.shape == (2, 8, 8)
    assert torch.equal(grid, reference_mask(abeja_checkpoint, mask))
    explicit = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1], [1, 1, 0, 1, 1, 1, 0, 1]])
    assert torch.equal(abeja.mask_grid(batch, attention_mask=explicit), reference_mask(abeja_checkpoint, explicit))


def test_rinna_without_weights(rinna_model_checkpoint, tmp_path):  # noqa: F811
    # only config.json and the tokenizer are read: a directory without weights works
    for file in rinna_model_checkpoint.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    visualizer = AttentionMaskVisualizer(tmp_path)
    tokens, _ = visualizer.encode(["吾輩は猫である", "猫"])
    assert tokens[0] == ["吾", "輩", "は", "猫", "である"]  # no "</s>": the grid shows what the model is given
    assert tokens[1] == ["[PAD]"] * 4 + ["猫"]
    assert visualizer.mask_grid(["吾輩は猫である", "猫"])[1].sum().item() == 1
    printed = visualizer.render("吾輩は猫である", color=False)
    assert "gpt_neox:" in printed and "GPTNeoXModel" in printed
    assert [r[0] for r in rows_of(printed)] == ["'吾'", "'輩'", "'は'", "'猫'", "'である'"]


def test_printed_grid(abeja, capsys):
    text = CAT + "吾輩は"  # 11 tokens: two lines of column indices
    assert abeja(text) is None
    printed = capsys.readouterr().out
    assert printed.count("\033[92m■\033[0m") == 11 + 1  # the diagonal, and the legend
    plain = ANSI.sub("", printed)
    assert plain == "\n" + abeja.render(text, color=False) + "\n"  # a blank line first, as the reference
    rows = rows_of(plain)
    assert [label for label, _, _ in rows] == [repr(t) for t in CAT_TOKENS + ["吾", "輩", "は"]]
    for i, (_, index, cells) in enumerate(rows):
        assert index == i and cells.split(" ") == ["■"] * (i + 1) + ["⬚"] * (10 - i)
    lines = plain.splitlines()
    header = lines.index(next(line for line in lines if line.strip() == "Attention Matrix"))
    tens, units = lines[header + 1], lines[header + 2]
    assert tens.split() == ["1"] and units.split() == [str(i % 10) for i in range(11)]
    first_row = lines[header + 3]
    first_cell = _columns(first_row[:first_row.index("■")])  # terminal column of the first cell ('吾' is 2 wide)
    assert units.index("0") == first_cell and tens.index("1") == first_cell + 2 * 10  # indices above their cells
    # labels are padded to their display width: the cells of every row start in the same terminal column
    assert len({_columns(line[:line.index(": ")]) for line in lines[header + 3:header + 14]}) == 1


def _columns(s: str) -> int:
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def test_printed_padded_batch(abeja):
    printed = abeja.render(["吾輩", "吾輩は猫"], color=False)
    assert "Attention Matrix (sequence 1 of 2)" in printed and "Attention Matrix (sequence 2 of 2)" in printed
    rows = rows_of(printed)
    assert [(label, cells) for label, _, cells in rows[:4]] == [
        ("'<|endoftext|>'", "⬚ ⬚ ⬚ ⬚"), ("'<|endoftext|>'", "⬚ ⬚ ⬚ ⬚"), ("'吾'", "⬚ ⬚ ■ ⬚"), ("'輩'", "⬚ ⬚ ■ ■")]
    assert [cells.count("■") for _, _, cells in rows[4:]] == [1, 2, 3, 4]


@pytest.mark.parametrize("text", [CAT, "<img>What is shown in this image?"])
def test_rows_equal_the_references(abeja, abeja_checkpoint, capsys, text):  # noqa: F811
    from transformers.utils.attention_visualizer import AttentionMaskVisualizer as Reference

    Reference(str(abeja_checkpoint))(text)
    expected = rows_of(capsys.readouterr().out)
    assert len(expected) == len(abeja.encode(text)[0][0]) > 0
    abeja(text)
    assert rows_of(capsys.readouterr().out) == expected


# ---------------------------------------------------------------------------------------------------------------
def test_svg(abeja, tmp_path):
    path = abeja.save(tmp_path / "mask.svg", ["吾輩", "吾輩は猫"])
    assert path == tmp_path / "mask.svg"
    root = ET.parse(path).getroot()
    svg = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{svg}svg"
    kinds = [rect.get("class") for rect in root.iter(f"{svg}rect") if rect.get("class")]
    grid = abeja.mask_grid(["吾輩", "吾輩は猫"])
    diagonal = int(grid.diagonal(dim1=1, dim2=2).sum())
    assert kinds.count("diagonal") == diagonal and kinds.count("attend") == int(grid.sum()) - diagonal
    assert kinds.count("masked") == int((~grid).sum())
    labels = [t.text for t in root.iter(f"{svg}text")]
    assert "'<|endoftext|>' 0" in labels and "'猫' 3" in labels and any("gpt_neox_japanese" in t for t in labels)


def test_png(abeja, tmp_path):
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        abeja.save(tmp_path / "mask.png", "What is shown?")  # ASCII labels: every font has them
    assert not caught
    with Image.open(tmp_path / "mask.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
        assert {(44, 160, 44), (48, 48, 48)} <= colours  # the green diagonal, the dark cells that may attend
    with warnings.catch_warnings(record=True) as caught:  # Japanese labels: boxes and one warning without a font
        warnings.simplefilter("always")
        data = abeja.to_png(CAT)
    assert data.startswith(b"\x89PNG") and all("save as .svg" in str(w.message) for w in caught) and len(caught) <= 1


def test_bad_input(abeja, tmp_path):
    with pytest.raises(InputError, match="no tokens"):
        abeja.mask_grid("")
    with pytest.raises(InputError, match="text 2 gives no tokens"):
        abeja.render(["吾輩", ""])
    with pytest.raises(InputError, match="pad-to"):
        abeja.mask_grid(CAT, pad_to=3)
    with pytest.raises(InputError, match=r"shape \[1, 8\]"):
        abeja.mask_grid(CAT, attention_mask=[1, 1])
    with pytest.raises(InputError, match="only 0"):
        abeja.mask_grid("吾輩", attention_mask=[2, 1])
    with pytest.raises(InputError, match=".svg or .png"):
        abeja.save(tmp_path / "mask.jpg", CAT)
    with pytest.raises(InputError, match="does not exist"):
        abeja.save(tmp_path / "missing" / "mask.svg", CAT)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        AttentionMaskVisualizer(tmp_path / "nothing-here")


def test_import_path_of_the_reference():
    from neoxja.utils.attention_visualizer import AttentionMaskVisualizer as Shimmed

    assert Shimmed is AttentionMaskVisualizer


# ---------------------------------------------------------------------------------------------------------------
def test_cli(abeja_checkpoint, tmp_path, capsys):  # noqa: F811
    # the installed command, as users run it: stdout is a pipe, so no colours
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(Path(sys.executable).parent / "neoxja"), "visualize-mask", "--model",
                           str(abeja_checkpoint), "吾輩", "吾輩は猫"], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "\033[" not in done.stdout and len(rows_of(done.stdout)) == 8

    assert main(["visualize-mask", "-m", str(abeja_checkpoint), CAT, "--pad-to", "10", "--no-color"]) == 0
    rows = rows_of(capsys.readouterr().out)
    assert len(rows) == 10 and rows[0][2] == "⬚ " * 9 + "⬚"
    assert main(["visualize-mask", "-m", str(abeja_checkpoint), CAT, "-o", str(tmp_path / "m.svg")]) == 0
    assert f"wrote {tmp_path / 'm.svg'}" in capsys.readouterr().out
    assert ET.parse(tmp_path / "m.svg").getroot().tag.endswith("svg")

    def error(*args: str) -> str:
        assert main(["visualize-mask", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("neoxja visualize-mask: error: ")
        return err

    assert "no tokens" in error("-m", str(abeja_checkpoint), "")
    assert "no such checkpoint directory" in error("-m", str(tmp_path / "nothing-here"), CAT)
    assert "pad-to" in error("-m", str(abeja_checkpoint), CAT, "--pad-to", "2")
    assert ".svg or .png" in error("-m", str(abeja_checkpoint), CAT, "-o", str(tmp_path / "m.gif"))
