"""`chat --show-merge OUT.png` and VisionChat.show_merge: the picture is written at the
image's own size and shows the merge (kept rows outlined, groups tinted); a bad path is one
line and exit code 2, checked before any model loads."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightkv_edge import cli, embed_mode
from lightkv_edge.errors import InputError
from lightkv_edge.merge_picture import check_output_path, draw_merge

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A non-square image of another size than the model's 128x128: a red disc on grey."""
    yy, xx = np.mgrid[0:150, 0:200]
    rgb = np.full((150, 200, 3), 120, np.uint8)
    rgb[(yy - 60) ** 2 + (xx - 140) ** 2 < 30 ** 2] = (220, 30, 30)
    p = tmp_path_factory.mktemp("img") / "disc.png"
    Image.fromarray(rgb).save(p)
    return p


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lightkv_edge", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def test_cli_writes_the_picture_at_the_image_size(photo, tmp_path):
    out = tmp_path / "merge.png"
    r = _cli("chat", str(photo), "-p", "what colour is the circle?", "--keep", "0.25",
             "-n", "3", "-t", "2", "--show-merge", str(out))
    assert r.returncode == 0, r.stderr
    pic = Image.open(out)
    assert pic.size == (200, 150)
    # the merge is drawn over it: not the image itself, and the tints vary
    a = np.asarray(pic.convert("RGB"), np.int16)
    orig = np.asarray(Image.open(photo).convert("RGB"), np.int16)
    assert np.abs(a - orig).mean() > 5
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 10


def test_api_show_merge_writes_one_picture_per_image(photo, tmp_path):
    from lightkv_edge.engine import VisionChat
    with VisionChat(keep=0.35, max_tokens=2, n_threads=2) as chat:
        with pytest.raises(InputError, match="no merge"):
            chat.show_merge(tmp_path / "none.png")          # no turn yet
        chat.ask("how many shapes are there?", [photo, photo])
        paths = chat.show_merge(tmp_path / "m.png")
        assert [p.name for p in paths] == ["m.png", "m-2.png"]
        for p in paths:
            assert Image.open(p).size == (200, 150)
        (im, merged), _ = chat.last_merges
        assert len(merged.kept) == int(np.ceil(0.35 * merged.n_in))
        assert merged.assign.shape == (merged.n_in,) and merged.scores is not None
        with pytest.raises(InputError, match="show_merge"):
            chat.show_merge(tmp_path / "nodir" / "m.png")


@pytest.mark.parametrize("bad", ["{tmp}/no/such/dir/out.png", "{tmp}/file.txt/out.png",
                                 "{tmp}/out.gif", "{tmp}"])
def test_bad_path_is_one_line_exit_2_before_the_model_loads(photo, tmp_path, monkeypatch,
                                                            capsys, bad):
    (tmp_path / "file.txt").write_text("x")

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before --show-merge was checked")
    monkeypatch.setattr("lightkv_edge.engine.VisionChat", no_model)
    rc = cli.main(["chat", str(photo), "-p", "hi", "--show-merge", bad.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--show-merge" in err


def test_show_merge_needs_embed_mode(photo, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("lightkv_edge.engine.VisionChat", None)
    for extra in (["--mode", "off"], ["--mode", "layer"], ["--keep", "1"]):
        rc = cli.main(["chat", str(photo), "-p", "hi", "--show-merge",
                       str(tmp_path / "o.png"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "--show-merge" in err


def test_bad_method_is_one_line_exit_2():
    r = _cli("chat", "x.png", "-p", "hi", "--method", "lightkv")   # the old name is gone
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lightkv-protect" in r.stderr and "Traceback" not in r.stderr


def test_draw_merge_marks_groups_kept_rows_and_windows():
    """Pure drawing: a 4x4 grid in 2x2 windows, two groups; the cells of one group share
    their tint, the kept cells carry the white outline, the windows' black lines cross."""
    rgb = np.full((80, 80, 3), 128, np.uint8)
    assign = np.array([0] * 8 + [1] * 8)
    merged = embed_mode.MergedImage(np.zeros((2, 1), np.float32), np.array([0, 15]), 16, 0.0,
                                    assign=assign, scores=None, grid=(4, 4), windows=2)
    a = np.asarray(draw_merge(rgb, merged), np.int16)
    assert a.shape == (80, 80, 3)
    assert np.array_equal(a[10, 30], a[30, 10])          # same group, same tint (no line)
    assert not np.array_equal(a[10, 30], a[70, 50])      # the other group
    assert tuple(a[0, 5]) == (255, 255, 255)             # kept token 0's outline
    assert tuple(a[40, 5]) == (0, 0, 0)                  # the windows' horizontal line


def test_draw_merge_puts_tokens_on_their_cells():
    """Tokens that are no raster of the grid (LLaVA: patches 1..15, then the class token,
    families.row_cells) are drawn on their own cells: token 0 (patch 1) at cell (0, 1),
    the class token (token 15, kept) at the free cell (0, 0)."""
    from lightkv_edge.families import row_cells
    rgb = np.full((80, 80, 3), 128, np.uint8)
    assign = np.full(16, -1)
    assign[[0, 15]] = [0, 1]                             # every other token dropped
    merged = embed_mode.MergedImage(np.zeros((2, 1), np.float32), np.array([0, 15]), 16, 0.0,
                                    assign=assign, scores=None, grid=(4, 4),
                                    cells=row_cells("mlp", 16, True))
    a = np.asarray(draw_merge(rgb, merged), np.int16)
    grey = tuple(a[70, 70])                               # a dropped cell (3, 3)
    assert tuple(a[10, 30]) != grey and tuple(a[10, 10]) != grey   # cells (0, 1), (0, 0)
    assert tuple(a[10, 50]) == grey                      # cell (0, 2): token 1, dropped
    assert tuple(a[0, 25]) == (255, 255, 255)            # kept token 0's outline at (0, 1)
    raster = embed_mode.MergedImage(np.zeros((2, 1), np.float32), np.array([0, 15]), 16, 0.0,
                                    assign=assign, scores=None, grid=(4, 4))
    b = np.asarray(draw_merge(rgb, raster), np.int16)
    assert tuple(b[10, 30]) == grey                      # read as a raster: one cell off


def test_check_output_path(tmp_path):
    assert check_output_path(tmp_path / "a.PNG") == tmp_path / "a.PNG"
    for bad in (tmp_path / "a.txt", tmp_path, tmp_path / "x" / "a.png", ""):
        with pytest.raises(InputError) as e:
            check_output_path(bad)
        assert e.value.param == "show_merge" and "\n" not in str(e.value)
