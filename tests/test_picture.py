"""Tests for dpcache_core.picture (Pillow): PACT heatmap, timeline, labelled image rows, PNG writer, ComfyUI image."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from dpcache_core import picture as P


def band_pact(T, band=4, seed=0):
    """A small synthetic PACT: finite only for a <= i < j <= i + band, growing with the hop."""
    rng = np.random.default_rng(seed)
    c = np.full((T, T + 1, T + 1), np.inf)
    for i in range(T):
        for j in range(i + 1, min(T, i + band) + 1):
            c[: i + 1, i, j] = (j - i) ** 2 * rng.uniform(1.0, 2.0, size=i + 1)
    return c


def components(mask):
    """4-connected components of a boolean mask: list of (ys, xs) arrays."""
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        out.append(np.array(pts))
    return out


def colour_mask(img, colour):
    return np.all(img == np.array(colour, dtype=np.uint8), axis=-1)


def decode_png(data):
    """The RGB pixels of a PNG file's bytes, read back with Pillow."""
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im).copy()


# ---------------------------------------------------------------- PACT heatmap


def test_pact_shape_dtype_and_width():
    c = band_pact(20)
    for width in (160, 300, 512, 777):
        img = P.render_pact_path(c, [0, 1, 2, 5, 9, 13, 17], width=width)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[1] == width
        assert 0.6 * width < img.shape[0] < 1.6 * width  # the cost's unit wraps to 3 lines at 160 px


def test_pact_does_not_modify_input():
    c = band_pact(12)
    c[3, 5, 6] = np.nan
    before = c.copy()
    P.render_pact_path(c, [0, 2, 5, 8])
    assert np.array_equal(np.isnan(before), np.isnan(c))
    assert np.array_equal(np.nan_to_num(before, posinf=-1), np.nan_to_num(c, posinf=-1))


def test_pact_markers_on_diagonal_at_key_steps():
    T, keys = 12, [0, 2, 5, 8, 10]
    img = P.render_pact_path(band_pact(T), keys)
    comps = components(colour_mask(img, P.KEY))
    comps.sort(key=lambda p: p[:, 0].mean())
    markers = comps[:-1]  # the lowest one is the legend's disk
    assert comps[-1][:, 0].mean() > max(m[:, 0].max() for m in markers)
    assert len(markers) == len(keys)
    ys = np.array([m[:, 0].mean() for m in markers])
    xs = np.array([m[:, 1].mean() for m in markers])
    # Centres lie on the diagonal (y - x constant) and evenly spaced in step units.
    assert np.ptp(ys - xs) < 1.5
    slope, intercept = np.polyfit(keys, xs, 1)
    assert slope > 10  # cell size in pixels at width 512 for T = 12
    assert np.max(np.abs(slope * np.array(keys) + intercept - xs)) < 1.5
    # The staircase: horizontal run on row k_m, vertical drop on column k_{m+1}.
    for m in range(len(keys) - 1):
        if keys[m + 1] - keys[m] >= 2:
            y, x_mid = int(round(ys[m])), int(round((xs[m] + xs[m + 1]) / 2))
            assert tuple(img[y, x_mid]) == P.PATH
            x, y_mid = int(round(xs[m + 1])), int(round((ys[m] + ys[m + 1]) / 2))
            assert tuple(img[y_mid, x]) == P.PATH
    # A cell that is +inf and far from the path is the neutral grey: row 0, column T.
    y, x = int(round(ys[0])), int(round(intercept + slope * T))
    assert tuple(img[y, x]) == P.UNDEFINED
    # The sentinel T is marked in the path colour.
    yT, xT = int(round(ys[0] + slope * T)), int(round(intercept + slope * T))
    assert tuple(img[yT, xT]) == P.PATH


def test_pact_key_marker_moves_with_the_schedule():
    c = band_pact(12)
    a = colour_mask(P.render_pact_path(c, [0, 2, 5, 8, 10]), P.KEY)
    b = colour_mask(P.render_pact_path(c, [0, 2, 6, 8, 10]), P.KEY)
    assert a.shape == b.shape and (a != b).any()


def test_pact_inf_nan_and_all_inf():
    T = 30
    img = P.render_pact_path(np.full((T, T + 1, T + 1), np.inf), [0, 1, 2, 10, 20])
    assert colour_mask(img, P.UNDEFINED).sum() > 0.2 * img.shape[0] * img.shape[1]
    c = band_pact(T)
    c[:, 3, 5] = np.nan
    img = P.render_pact_path(c, list(range(0, T, 4)), title="nan treated as inf")
    assert img.shape[1] == 512


def test_pact_many_steps_and_zero_costs():
    T = 200
    c = band_pact(T, band=30)
    c[:, :3] = np.where(np.isfinite(c[:, :3]), 0.0, np.inf)
    img = P.render_pact_path(c, list(range(0, T, 9)))
    assert img.shape[1] == 512
    img = P.render_pact_path(np.full((1, 2, 2), 1.0), [0])
    assert img.shape[1] == 512


def test_pact_title_changes_picture():
    c = band_pact(10)
    a = P.render_pact_path(c, [0, 3, 6])
    b = P.render_pact_path(c, [0, 3, 6], title="my pact")
    assert b.shape[0] > a.shape[0]  # one more text line


@pytest.mark.parametrize(
    "keys, match",
    [
        ([0, 5, 12], r"out of range.*0\.\.11"),
        ([-1, 3], "out of range"),
        ([0, 5, 3], "strictly increasing"),
        ([0, 3, 3], "strictly increasing"),
        ([], "empty"),
        ([0, 2.5], "integers"),
    ],
)
def test_pact_bad_key_steps(keys, match):
    with pytest.raises(ValueError, match=match):
        P.render_pact_path(band_pact(12), keys)


@pytest.mark.parametrize("shape", [(12, 12, 12), (12, 13), (12, 13, 14), (0, 1, 1)])
def test_pact_bad_shape(shape):
    with pytest.raises(ValueError, match=r"shape \(T, T\+1, T\+1\)"):
        P.render_pact_path(np.zeros(shape), [0])
    with pytest.raises(ValueError, match="numeric array"):
        P.render_pact_path("not a pact", [0])


@pytest.mark.parametrize("width", [10, 100000, 512.0, "512"])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        P.render_pact_path(band_pact(8), [0, 4], width=width)
    with pytest.raises(ValueError, match="width"):
        P.render_timeline(8, [0, 4], width=width)


# ---------------------------------------------------------------- timeline


def cells_of_strip(img):
    """Colours of the strip's cells, left to right, read on the row with the most key pixels."""
    key = colour_mask(img, P.KEY)
    pred = colour_mask(img, P.PREDICTED)
    row = int(np.argmax(key.sum(1) + pred.sum(1)))
    out, prev = [], None
    for x in range(img.shape[1]):
        here = "K" if key[row, x] else ("P" if pred[row, x] else None)
        if here is not None and prev is None:
            out.append(here)
        prev = here
    return out


@pytest.mark.parametrize("width", [200, 512, 640])
def test_timeline_cells(width):
    T, keys = 50, [0, 1, 2, 4, 7, 10, 14, 19, 23, 28, 34, 40, 45]
    img = P.render_timeline(T, keys, width=width)
    assert img.dtype == np.uint8 and img.shape[1] == width and img.shape[2] == 3
    if width >= 4 * T + 20:  # cells wide enough to have gaps between them
        assert cells_of_strip(img) == ["K" if t in keys else "P" for t in range(T)]


def test_timeline_many_steps_and_title():
    img = P.render_timeline(1000, list(range(0, 1000, 3)), title="a long manual schedule title " * 3)
    assert img.shape[1] == 512
    assert colour_mask(img, P.KEY).any() and colour_mask(img, P.PREDICTED).any()


def test_timeline_bad_inputs():
    with pytest.raises(ValueError, match="num_evals"):
        P.render_timeline(0, [0])
    with pytest.raises(ValueError, match="num_evals"):
        P.render_timeline(10.5, [0])
    with pytest.raises(ValueError, match="out of range"):
        P.render_timeline(10, [0, 10])


# ---------------------------------------------------------------- text and labelled rows


def text_rows(img, top, bottom):
    """Rows between top and bottom that hold light text pixels."""
    light = img[top:bottom].min(axis=-1) > 120
    return np.nonzero(light.any(axis=1))[0] + top


def test_text_is_legible_at_the_node_size():
    """At the node's 512 px the title's capitals and descenders span at least 12 pixel rows."""
    img = P.render_timeline(50, [0, 1, 2, 20, 40], title="Kg")
    rows = text_rows(img, 0, 30)
    assert rows.size and rows.max() - rows.min() + 1 >= 12
    small = P.render_timeline(50, [0, 1, 2, 20, 40], title="Kg", width=160)
    rows = text_rows(small, 0, 20)
    assert rows.size and rows.max() - rows.min() + 1 >= 8  # the 10 px floor of the font


def test_summary_line_says_ideal_speed_up():
    assert "ideal speed-up" in P._title_lines(P.font(14), None, "K=13 of T=50 \u00b7 ideal speed-up 3.85x", 512, 8)[0][0]


def test_image_rows_are_labelled_and_laid_out():
    a = np.full((8, 10, 3), 200, np.uint8)
    b = np.full((8, 10, 3), 50, np.uint8)
    plain = P.render_image_rows([("", [a, a]), ("", [b, b])], scale=3)
    out = P.render_image_rows([("full", [a, a]), ("DPCache", [b, b])], scale=3)
    assert out.shape[0] == plain.shape[0] and out.shape[1] > plain.shape[1]  # room for the labels
    label_w = int(np.nonzero((out == 200).all(axis=-1).any(axis=0))[0][0])  # where the images start
    assert label_w > out.shape[1] - plain.shape[1]
    assert (out[:, :label_w].min(axis=-1) > 120).sum() > 20  # label text drawn left of the images
    first = out[:, label_w + 5]
    assert (first == 200).all(axis=-1).sum() == 24 and (first == 50).all(axis=-1).sum() == 24  # 8 rows x 3
    assert (out == 200).all(axis=-1).any(axis=0).sum() == 60  # two images of 10 columns x 3 in each row
    with pytest.raises(ValueError, match="one size"):
        P.render_image_rows([("x", [a, np.zeros((4, 4, 3), np.uint8)])])
    with pytest.raises(ValueError, match="at least one row"):
        P.render_image_rows([])


# ---------------------------------------------------------------- PNG and ComfyUI image


def test_write_png_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(7, 13, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    P.write_png(path, rgb)
    assert np.array_equal(decode_png(path.read_bytes()), rgb)
    big = P.render_timeline(20, [0, 5, 10])
    P.write_png(str(path), big)  # overwrite, str path
    assert np.array_equal(decode_png(path.read_bytes()), big)
    assert sorted(os.listdir(tmp_path)) == ["x.png"]  # no temp file left behind


def test_write_png_failure_leaves_nothing(tmp_path):
    target = tmp_path / "d.png"
    target.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        P.write_png(target, np.zeros((2, 2, 3), np.uint8))
    assert sorted(os.listdir(tmp_path)) == ["d.png"]
    P.write_png(tmp_path / "new" / "x.png", np.zeros((2, 2, 3), np.uint8))  # the folder is made
    assert os.path.getsize(tmp_path / "new" / "x.png") > 0


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3)), np.zeros((4, 4), np.uint8),
                                 np.zeros((4, 4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_bad_images(bad, tmp_path):
    with pytest.raises(ValueError, match="uint8 image"):
        P.write_png(tmp_path / "x.png", bad)
    with pytest.raises(ValueError, match="uint8 image"):
        P.to_comfy_image(bad)


def test_to_comfy_image():
    torch = pytest.importorskip("torch")
    rgb = P.render_timeline(10, [0, 3, 6])
    t = P.to_comfy_image(rgb)
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32 and tuple(t.shape) == (1,) + rgb.shape
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert torch.allclose(t[0] * 255.0, torch.from_numpy(rgb).float(), atol=1e-3)
