import numpy as np
import pytest
from PIL import Image

from eartalk.frame_sheet import GAP, GAP_VALUE, error_frame, frame_grid, save_frame_sheet


def _frame(v, h=4, w=6):
    return np.full((h, w, 3), v, np.uint8) + np.arange(3, dtype=np.uint8)


def test_frame_grid_places_every_tile_at_its_golden_offset_with_white_gaps():
    rows = [[_frame(10), _frame(20), _frame(30)], [_frame(40), _frame(50), _frame(60)]]
    g = frame_grid(rows)
    assert g.shape == (2 * 4 + GAP, 3 * 6 + 2 * GAP, 3) and g.dtype == np.uint8
    for r in range(2):
        for c in range(3):
            y, x = r * (4 + GAP), c * (6 + GAP)
            np.testing.assert_array_equal(g[y:y + 4, x:x + 6], rows[r][c])
    assert (g[4:4 + GAP] == GAP_VALUE).all()                    # between the rows
    assert (g[:, 6:6 + GAP] == GAP_VALUE).all() and (g[:, 14:14 + GAP] == GAP_VALUE).all()
    # the tiles and gaps account for every pixel
    assert g.size == 6 * _frame(0).size + (g == GAP_VALUE).all(-1).sum() * 3


def test_frame_grid_rejects_ragged_or_mismatched_input():
    with pytest.raises(ValueError, match="at least one"):
        frame_grid([])
    with pytest.raises(ValueError, match="row 1 has 1 frames; expected 2"):
        frame_grid([[_frame(0), _frame(0)], [_frame(0)]])
    with pytest.raises(ValueError, match=r"frame \(0, 1\) is uint8 \(5, 6, 3\)"):
        frame_grid([[_frame(0), _frame(0, h=5)]])
    with pytest.raises(ValueError, match="RGB"):
        frame_grid([[np.zeros((4, 6), np.uint8)]])


def test_error_frame_is_gain_times_the_mean_channel_difference():
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0] = (3, 6, 9)          # mean 6 -> 24 at gain 4
    b[1, 1] = (255, 255, 255)    # 1020 -> clipped to 255
    e = error_frame(a, b)
    np.testing.assert_array_equal(e[..., 0], [[24, 0], [0, 255]])
    assert (e[..., 0] == e[..., 1]).all() and (e[..., 0] == e[..., 2]).all()


def test_save_frame_sheet_writes_a_png_and_checks_its_labels(tmp_path):
    rows = [[_frame(10), _frame(20)], [_frame(30), _frame(40)]]
    p = save_frame_sheet(tmp_path / "s" / "sheet.png", rows, ["a", "b"], ["r0", "r1"], title="t")
    im = Image.open(p)
    assert im.format == "PNG" and im.size[0] > 2 * (2 * 6 + GAP)
    with pytest.raises(ValueError, match="1 column titles for 2 columns"):
        save_frame_sheet(tmp_path / "x.png", rows, ["a"])
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        save_frame_sheet(tmp_path / "x.png", rows, ["a", "b"], ["r0"])
