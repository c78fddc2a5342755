"""PNG writer (decoded independently with zlib) and preview mosaics."""

import struct
import zlib

import numpy as np
import pytest

from alice3d.analysis.png import encode_png, read_png, write_png
from alice3d.analysis.previews import label_colors, mosaic, ortho_slices, save_preview, to_uint8


def _decode(data: bytes):
    """Independent minimal PNG decoder for filter-0 rows; checks every chunk CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header, kinds = 8, b"", None, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        kinds.append(kind)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, ctype = header[:4]
    ch = {0: 1, 2: 3, 6: 4}[ctype]
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * ch)
    assert depth == 8 and np.all(raw[:, 0] == 0)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    px = raw[:, 1:].reshape(h, w, ch)
    return px[:, :, 0] if ch == 1 else px


@pytest.mark.parametrize("shape", [(7, 13), (5, 9, 3), (4, 6, 4), (1, 1)])
def test_png_round_trip(tmp_path, shape):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_png(tmp_path / "x" / "a.png", a)
    data = path.read_bytes()
    assert np.array_equal(_decode(data), a)
    assert np.array_equal(read_png(path), a)


def test_png_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 2), np.uint8))


def test_read_png_undoes_all_filters(tmp_path):
    # rows written with filters 1 (sub), 2 (up), 3 (average), 4 (Paeth): encode by hand
    img = np.random.default_rng(1).integers(0, 256, size=(4, 5, 3)).astype(np.int32)
    bpp, rows, prev = 3, [], np.zeros(15, np.int32)
    for r, f in enumerate((1, 2, 3, 4)):
        cur = img[r].reshape(-1)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        if f == 1:
            pred = left
        elif f == 2:
            pred = prev
        elif f == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - ul
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        rows.append(bytes([f]) + ((cur - pred) & 255).astype(np.uint8).tobytes())
        prev = cur

    def chunk(k, b):
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 4, 8, 2, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b"")
    (tmp_path / "f.png").write_bytes(data)
    assert np.array_equal(read_png(tmp_path / "f.png"), img.astype(np.uint8))


def test_label_colors_fixed_per_btcv_id():
    c = label_colors()
    assert c.shape == (256, 3) and c.dtype == np.uint8
    assert tuple(c[0]) == (0, 0, 0)
    assert len({tuple(x) for x in c[1:14]}) == 13  # distinct organ colours
    assert np.array_equal(c, label_colors())


def test_mosaic_pads_panels():
    a = np.full((10, 20), 200, np.uint8)
    b = np.zeros((6, 8, 3), np.uint8)
    b[..., 0] = 255
    m = mosaic([[a, b], [b]], pad=2)
    assert m.shape == (10 + 2 + 6, 20 + 2 + 8, 3)
    assert np.all(m[0, 0] == 200) and np.all(m[0, 22] == (255, 0, 0)) and np.all(m[8, 25] == 0)


def test_ortho_slices_orientation_overlay_and_marker():
    vol = np.full((40, 30, 20), -1000.0, np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    vol[30:36, 10:16, 8:12] = 60.0  # a block on the patient's right (high x in RAS)
    lab[30:36, 10:16, 8:12] = 6
    rgb = ortho_slices(vol, lab, point_vox=(33, 13, 10), spacing=(1.0, 1.0, 2.0), max_px=80)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3
    axial = rgb[:, :80]
    tinted = np.argwhere((axial[..., 2] > axial[..., 1] + 20))  # liver colour is purple
    assert tinted.size and tinted[:, 1].mean() < 40  # patient's right is drawn on the image left
    assert np.any(np.all(rgb == (255, 255, 0), axis=-1))  # cross-hair
    # physical aspect: 40 mm x 30 mm axial panel, 40 mm wide x 40 mm tall coronal panel
    assert rgb.shape[0] == 80 and np.all(rgb[61:, :80] == 0)
    # the same picture from an LPS-stored copy with its affine
    aff = np.diag([-1.0, -1.0, 2.0, 1.0])
    aff[:3, 3] = (39.0, 29.0, 0.0)
    ras_aff = np.diag([1.0, 1.0, 2.0, 1.0])
    same = ortho_slices(vol[::-1, ::-1], lab[::-1, ::-1], affine=aff, point_vox=(6, 16, 10), max_px=80)
    assert np.array_equal(same, ortho_slices(vol, lab, affine=ras_aff, point_vox=(33, 13, 10), max_px=80))


def test_save_preview_of_volume(tmp_path):
    from alice3d.data.io import Volume

    v = Volume(np.linspace(-200, 300, 6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8), np.eye(4),
               label=np.ones((6, 7, 8), np.int16))
    p = save_preview(tmp_path / "p.png", v)
    img = read_png(p)
    assert img.shape[2] == 3 and img.shape[0] > 8
    assert np.array_equal(to_uint8(np.array([-175.0, 37.5, 250.0])), [0, 127, 255])


@pytest.mark.parametrize("shape", [(24, 20), (24, 20, 12)])
def test_volume_panels_2d_and_3d(tmp_path, shape):
    from alice3d.analysis.previews import save_volume_panels, volume_panels

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=shape).astype(np.float32)
    masked = x.copy()
    masked[: shape[0] // 2] = 0.0
    scores = rng.uniform(50, 90, size=shape).astype(np.float32)  # a panel on a different scale
    img = volume_panels({"input": x, "masked": masked, "attention": scores}, max_px=48)
    n_rows = 1 if len(shape) == 2 else 3
    assert img.dtype == np.uint8 and img.ndim == 3
    # three columns separated by padding: 2-D panels are shown as (H, W) = 48 x 40 px, the
    # axial view of a 3-D panel as (Y, X) = 40 x 48 px
    w = 40 if len(shape) == 2 else 48
    assert img.shape[1] == 3 * w + 2 * 4
    assert img.shape[0] >= n_rows * 20
    first_row = img[: 48 if len(shape) == 2 else 40]
    black = lambda a: float((a == 0).all(-1).mean())  # noqa: E731
    assert black(first_row[:, w + 4:2 * w + 4]) > 0.4 and black(first_row[:, :w]) < 0.05  # masked half is black
    assert img[:, :w].max() > 200
    # the attention panel got its own window instead of saturating at white
    att = img[:, 2 * (w + 4):]
    assert 0 < np.median(att[att > 0]) < 255
    p = save_volume_panels([x, masked], tmp_path / "v.png", max_px=48)
    assert read_png(p).shape[1] == 2 * w + 4
    with pytest.raises(ValueError, match="2-D or all 3-D"):
        volume_panels([x, x[..., None]])
