"""PNG files through Pillow and ortho-slice previews: orientation, letters, centring, body crop."""

import ast
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alice3d.viz import png as png_mod
from alice3d.viz.mosaic import mosaic
from alice3d.viz.ortho import (
    body_box,
    label_colors,
    label_comparison,
    letter_gutters,
    ortho_slices,
    ortho_views,
    save_preview,
    save_volume_panels,
    to_uint8,
    volume_panels,
)
from alice3d.viz.png import read_png, write_png

VIZ = Path(__file__).resolve().parents[2] / "alice3d" / "viz"


def _chunks(data: bytes):
    """(kind, body) of every chunk, checking each CRC independently of Pillow."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        out.append((kind, body))
        pos += 12 + n
    return out


@pytest.mark.parametrize("shape,ctype", [((7, 13), 0), ((5, 9, 3), 2), ((4, 6, 4), 6), ((1, 1), 0)])
def test_png_round_trip(tmp_path, shape, ctype):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_png(tmp_path / "x" / "a.png", a)
    chunks = _chunks(path.read_bytes())
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    assert (h, w, depth, colour) == (shape[0], shape[1], 8, ctype)
    back = read_png(path)
    assert back.dtype == np.uint8 and np.array_equal(back, a)


def test_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "f.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_png(tmp_path / "f.png", np.zeros((4, 4, 2), np.uint8))
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(ValueError, match="t.png: not a PNG"):
        read_png(tmp_path / "t.png")
    Image.fromarray(np.zeros((3, 3), np.uint16) + 999).save(tmp_path / "deep.png")
    with pytest.raises(ValueError, match="deep.png: expected an 8-bit"):
        read_png(tmp_path / "deep.png")


def test_write_png_is_atomic(tmp_path, monkeypatch):
    target = write_png(tmp_path / "p.png", np.full((3, 4), 7, np.uint8))
    before = target.read_bytes()

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(png_mod.Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_png(target, np.zeros((3, 4), np.uint8))
    assert target.read_bytes() == before  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # and no temporary is left behind


def test_read_png_converts_palette_and_grey_alpha(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png")
    assert read_png(tmp_path / "pal.png").tolist() == [[[10, 20, 30], [200, 100, 0]]]
    Image.fromarray(np.array([[[50, 128]]], np.uint8), mode="LA").save(tmp_path / "la.png")
    assert read_png(tmp_path / "la.png").tolist() == [[[50, 50, 50, 128]]]


def test_label_colors_fixed_per_btcv_id():
    c = label_colors()
    assert c.shape == (256, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (0, 0, 0)
    assert len({tuple(x) for x in c[1:14]}) == 13  # distinct organ colours
    assert np.array_equal(c, label_colors())


def test_mosaic_centres_panels_in_their_cells():
    a = np.full((10, 20), 200, np.uint8)
    b = np.zeros((6, 8, 3), np.uint8)
    b[..., 0] = 255
    m = mosaic([[a, b], [b]], pad=2)
    assert m.shape == (10 + 2 + 6, 20 + 2 + 8, 3)
    assert np.all(m[0, 0] == 200) and np.all(m[9, 19] == 200)
    red = np.argwhere(np.all(m == (255, 0, 0), axis=-1))
    top, bottom = red[red[:, 0] < 10], red[red[:, 0] >= 12]
    # row 0: the 6-high panel sits 2 px down in its 10-high cell; row 1: 6 px in from its 20-wide cell
    assert (top.min(0).tolist(), top.max(0).tolist()) == ([2, 22], [7, 29])
    assert (bottom.min(0).tolist(), bottom.max(0).tolist()) == ([12, 6], [17, 13])


def test_mosaic_titles_are_drawn_in_strips():
    a = np.full((30, 40), 90, np.uint8)
    plain = mosaic([[a, a]])
    titled = mosaic([[a, a]], col_titles=["input", "masked"], row_titles=["axial"])
    strip = titled.shape[0] - plain.shape[0]
    assert titled.shape[1] == plain.shape[1] and strip > 2 * 10
    assert np.array_equal(titled[-30:], plain)  # the panels are untouched below the strips
    header = titled[:strip]
    for col in (slice(0, 40), slice(44, 84)):
        assert header[:, col].max() > 150 and (header[:, col] == 0).any()  # white text on black


def _phantom(shape=(48, 40, 32), offset=(0, 0, 0)):
    """Ellipsoid body (40 HU in air) with a bright labelled blob on its right-anterior-superior side."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    c = np.asarray(shape) / 2 + np.asarray(offset)
    body = ((x - c[0]) / 14) ** 2 + ((y - c[1]) / 10) ** 2 + ((z - c[2]) / 9) ** 2 < 1
    vol = np.where(body, 40.0, -1000.0).astype(np.float32)
    lab = np.zeros(shape, np.uint8)
    blob = (slice(int(c[0]) + 6, int(c[0]) + 10), slice(int(c[1]) + 4, int(c[1]) + 7), slice(int(c[2]) + 3, int(c[2]) + 6))
    vol[blob], lab[blob] = 200.0, 6
    centre = [(s.start + s.stop - 1) / 2 for s in blob]
    return vol, lab, centre


def _tinted(cell):
    r, g, b = np.moveaxis(cell.astype(int), -1, 0)
    return np.argwhere((b > g + 20) & (r > g + 20))  # liver colour is purple


def _letter_pixels(cell):
    r, g, b = np.moveaxis(cell.astype(int), -1, 0)
    return (b > r + 40) & (g > r)  # the light blue of the orientation letters


def _edge_regions(cell):
    """What lies beyond the image's (left, right, top, bottom) edges of a cell, full length."""
    lo, hi = _grey_box(cell)
    return cell[:, :lo[1]], cell[:, hi[1] + 1:], cell[:lo[0]], cell[hi[0] + 1:]


def _read_letters(vol, monkeypatch):
    """Per view, the letter drawn at each edge, recognised by its pixels: the glyph a render with
    that one letter on every edge puts in the same strip."""
    from alice3d.viz import ortho

    shown = [[_letter_pixels(r) for r in _edge_regions(c)] for c in ortho_views(vol, max_px=96)]
    read = {}
    for v, view in enumerate(("axial", "coronal", "sagittal")):
        found = []
        for edge in range(4):
            matches = []
            for letter in "RLAPSI":
                with monkeypatch.context() as m:
                    m.setitem(ortho.EDGE_LETTERS, view, (letter,) * 4)
                    cell = ortho_views(vol, max_px=96)[v]
                if np.array_equal(_letter_pixels(_edge_regions(cell)[edge]), shown[v][edge]):
                    matches.append(letter)
            assert len(matches) == 1, (view, edge, matches)
            found.append(matches[0])
        read[view] = "".join(found)
    return read


def test_blob_appears_on_the_side_its_letter_names(monkeypatch):
    vol, lab, centre = _phantom()
    # (left, right, top, bottom) patient directions; axial and coronal in radiological convention
    letters = _read_letters(vol, monkeypatch)
    assert letters == {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
    cells = ortho_views(vol, lab, point_vox=centre, max_px=96)
    assert [c.shape for c in cells] == [(96, 96, 3)] * 3
    for view, cell in zip(("axial", "coronal", "sagittal"), cells):
        rows, cols = _tinted(cell).T
        assert rows.size, view
        # the blob is at the patient's right, anterior, superior: in every view that is the
        # upper left, which is where the letters read off the image say R / A / S
        assert cols.mean() < 48 and rows.mean() < 48, view
        left, _, top, _ = letters[view]
        assert left in "RAS" and top in "RAS", view
        assert np.any(np.all(cell == (255, 255, 0), axis=-1)), view  # cross-hair on the point


def test_affine_reorients_before_display():
    vol, lab, centre = _phantom()
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    lps[:3, 3] = (47.0, 39.0, 0.0)
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    flipped = (vol.shape[0] - 1 - centre[0], vol.shape[1] - 1 - centre[1], centre[2])
    same = ortho_slices(vol[::-1, ::-1], lab[::-1, ::-1], affine=lps, point_vox=flipped, max_px=96)
    assert np.array_equal(same, ortho_slices(vol, lab, affine=ras, point_vox=centre, max_px=96))


def test_letters_are_drawn_beside_the_image_edges():
    vol, _, _ = _phantom()
    size, gh, gw = letter_gutters(96)
    with_letters = ortho_views(vol, max_px=96)
    without = ortho_views(vol, max_px=96, letters=False)
    for cell, bare in zip(with_letters, without):
        lo, hi = _grey_box(cell)
        # the image keeps clear of the letter strips
        assert lo[0] >= gh and hi[0] < 96 - gh and lo[1] >= gw and hi[1] < 96 - gw
        mr, mc = (lo + hi) // 2
        rows, cols = slice(mr - size // 2, mr + size // 2), slice(mc - size // 2, mc + size // 2)
        beside = {"left": cell[rows, lo[1] - gw:lo[1]], "right": cell[rows, hi[1] + 1:hi[1] + 1 + gw],
                  "top": cell[lo[0] - gh:lo[0], cols], "bottom": cell[hi[0] + 1:hi[0] + 1 + gh, cols]}
        for side, region in beside.items():
            assert region.max() > 100 and region.min() == 0, side  # a letter: not uniform
            assert _letter_pixels(region).any(), side
        assert not _letter_pixels(bare).any()  # letters=False draws none


def test_each_letter_goes_to_its_own_edge(monkeypatch):
    from alice3d.viz import ortho

    vol, _, _ = _phantom()
    for k, side in enumerate(("left", "right", "top", "bottom")):
        only = tuple("W" if i == k else "" for i in range(4))
        monkeypatch.setitem(ortho.EDGE_LETTERS, "axial", only)
        cell = ortho_views(vol, max_px=96)[0]
        lo, hi = _grey_box(cell)
        rows, cols = np.nonzero(_letter_pixels(cell))
        assert rows.size, side
        assert {"left": cols.max() < lo[1], "right": cols.min() > hi[1],
                "top": rows.max() < lo[0], "bottom": rows.min() > hi[0]}[side], side


def _grey_box(cell):
    """Bounding box (row, col) min and max of the image's grey pixels (text is coloured or near black)."""
    grey = np.argwhere((cell.max(-1) > 20) & (np.ptp(cell.astype(int), axis=-1) == 0))
    return grey.min(0), grey.max(0)


def test_body_is_centred_and_cropped():
    offset = (-14, 12, -6)
    vol, _, _ = _phantom(shape=(72, 60, 40), offset=offset)  # body off-centre in a lot of air
    centre = np.array([72, 60, 40]) / 2 + offset
    cropped = ortho_views(vol, max_px=96, letters=False)
    full = ortho_views(vol, point_vox=centre, max_px=96, letters=False, crop=False)
    for c, f in zip(cropped, full):
        lo, hi = _grey_box(c)
        assert np.all(np.abs((lo + hi) / 2 - 47.5) <= 1.0)  # the body sits in the middle of its cell
        flo, fhi = _grey_box(f)
        assert np.all(hi - lo >= fhi - flo) and np.any(hi - lo > 1.3 * (fhi - flo))  # the body is drawn larger
        assert (c.max(-1) == 0).mean() < (f.max(-1) == 0).mean()  # less black around it


def test_body_box_hand_computed():
    a = np.zeros((40, 40, 30), np.float32)
    a[10:30, 5:25, 4:24] = 1.0
    a[39, 39, 0] = 1.0  # one stray voxel does not stretch the box
    lo, hi = body_box(a, 0.5)
    assert lo.tolist() == [9, 4, 3] and hi.tolist() == [31, 26, 25]  # grown by ceil(5 % of 20 mm) = 1 voxel
    lo, hi = body_box(a, 0.5, spacing=(1.0, 1.0, 2.0))  # largest extent 40 mm -> 2 mm margin
    assert lo.tolist() == [8, 3, 3] and hi.tolist() == [32, 27, 25]
    lo, hi = body_box(np.zeros((3, 4)), 0.5)
    assert lo.tolist() == [0, 0] and hi.tolist() == [3, 4]


def test_save_preview_of_volume(tmp_path):
    from alice3d.data.io import Volume

    v = Volume(np.linspace(-200, 300, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), np.eye(4),
               label=np.ones((6, 7, 8), np.int16))
    p = save_preview(tmp_path / "p.png", v, max_px=64)
    img = read_png(p)
    assert img.shape == (64, 3 * 64 + 2 * 4, 3)
    assert np.array_equal(to_uint8(np.array([-175.0, 37.5, 250.0])), [0, 127, 255])
    with pytest.raises(ValueError, match="max_px=20"):
        ortho_views(v.array, max_px=20)


def test_label_comparison_rows_share_the_view():
    vol, lab, centre = _phantom()
    img = label_comparison(vol, {"ground truth": lab, "prediction": np.zeros_like(lab)}, point_vox=centre, max_px=96)
    strip = (img.shape[0] - 2 * 96 - 4) // 2
    top, bottom = img[strip:strip + 96], img[-96:]
    assert top.shape[1] == bottom.shape[1] == 3 * 96 + 8
    assert _tinted(top).size and not _tinted(bottom).size  # only the ground truth row is coloured
    assert np.array_equal(top.max(-1) > 0, bottom.max(-1) > 0)  # the same region and slices


def test_prediction_preview_writes_two_titled_rows(tmp_path):
    from alice3d.finetune.prediction_preview import save_prediction_preview

    vol, lab, _ = _phantom()
    image = np.clip((vol + 175) / 425, 0, 1)
    p = save_prediction_preview(image, lab, lab, tmp_path / "case.png", spacing=(1.0, 1.0, 1.0))
    img = read_png(p)
    assert img.shape[1] == 3 * 320 + 8 and img.shape[0] > 2 * 320
    with pytest.raises(ValueError, match="case.png"):
        save_prediction_preview(image, lab, lab[:-1], tmp_path / "case.png")


@pytest.mark.parametrize("shape", [(24, 20), (24, 20, 12)])
def test_volume_panels_2d_and_3d(tmp_path, shape):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=shape).astype(np.float32)
    masked = x.copy()
    masked[: shape[0] // 2] = 0.0
    scores = rng.uniform(50, 90, size=shape).astype(np.float32)  # a panel on a different scale
    cell = 96
    img = volume_panels({"input": x, "masked": masked, "attention": scores}, max_px=cell)
    n_rows = 1 if len(shape) == 2 else 3
    assert img.dtype == np.uint8 and img.ndim == 3
    assert img.shape[1] == 3 * cell + 2 * 4  # one square cell per panel, padded
    strip = img.shape[0] - n_rows * cell - (n_rows - 1) * 4
    assert 10 < strip < 30  # the column titles
    assert img[:strip, :cell].max() > 150  # "input" is written above its column
    first = img[strip:strip + cell]
    lo, hi = _grey_box(first[:, :cell])
    inside = (slice(lo[0], hi[0] + 1), slice(lo[1], hi[1] + 1))
    black = lambda a: float((a == 0).all(-1).mean())  # noqa: E731
    masked_cell = first[:, cell + 4:2 * cell + 4]
    assert black(masked_cell[inside]) > 0.4 and black(first[:, :cell][inside]) < 0.05  # masked half is black
    assert img[strip:, :cell].max() > 200
    # the attention panel got its own window instead of saturating at white
    att = img[strip:, 2 * (cell + 4):][inside]
    assert 0 < np.median(att[att > 0]) < 255
    p = save_volume_panels([x, masked], tmp_path / "v.png", max_px=cell)
    assert read_png(p).shape[1] == 2 * cell + 4
    with pytest.raises(ValueError, match="2-D or all 3-D"):
        volume_panels([x, x[..., None]])


def test_volume_panels_crop_follows_the_first_panel():
    x = np.zeros((40, 40, 40), np.float32)
    x[10:20, 10:20, 10:20] = 1.0
    # bright everywhere, so its own box would be the whole array; its grey level tells the x shown
    recon = np.broadcast_to(np.linspace(0.05, 1.0, 40, dtype=np.float32)[:, None, None], x.shape)
    img = volume_panels({"input": x, "reconstruction": recon}, window=(0.0, 1.0), max_px=96)
    axial = img[img.shape[0] - 3 * 96 - 8:][:96, 100:196]
    shown = axial[(axial.max(-1) > 20) & (np.ptp(axial.astype(int), axis=-1) == 0)][:, 0] / 255.0  # image greys
    assert shown.min() > 0.15 and shown.max() < 0.6  # x = 9..20 of 40, the input's body box
    alone = volume_panels({"reconstruction": recon}, window=(0.0, 1.0), max_px=96)
    assert alone.max() == 255


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_viz_is_a_bottom_layer():
    allowed = {"numpy", "matplotlib", "PIL", "nibabel"} | set(sys.stdlib_module_names)
    for path in sorted(VIZ.glob("*.py")):
        for name in _imported_modules(path):
            top = name.split(".")[0]
            assert top in allowed or name == "alice3d.core" or name.startswith("alice3d.core."), (path.name, name)


def test_viz_does_not_touch_pyplot():
    code = ("import sys, numpy as np, alice3d.viz, alice3d.viz.ortho, alice3d.viz.plots as p\n"
            "p.render_line_plot({'a': ([0, 1], [0, 1])})\n"
            "alice3d.viz.ortho.ortho_slices(np.zeros((8, 8, 8)), max_px=64)\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
