import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import elpv_dataset
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin, features

from imagesieve.data import (
    ImageLoadError,
    SkippedFile,
    fit_shorter_side,
    load_image,
    read_image_bytes,
    scan_image_folder,
)

ELPV_IMAGES = Path(elpv_dataset.__file__).parent / "data" / "images"

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _pixels(path, **kwargs) -> np.ndarray:
    """Decode with load_image and return the (h, w, 3) uint8 array, checking it is RGB."""
    decoded = load_image(path, **kwargs)
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def _save(im: Image.Image, path: Path, **kwargs) -> Path:
    im.save(path, **kwargs)
    return path


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A real 1x1 1-bit PNG whose IHDR is rewritten to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _load_error(source, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as excinfo:
        load_image(source, **kwargs)
    return excinfo.value


# ---------------------------------------------------------------- load_image: every mode -> RGB


def test_load_image__grayscale_L_copies_value_to_all_channels(tmp_path):
    a = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    path = _save(Image.fromarray(a), tmp_path / "l.png")
    assert Image.open(path).mode == "L"
    px = _pixels(path)
    for c in range(3):
        np.testing.assert_array_equal(px[..., c], a)


def test_load_image__LA_composites_alpha_onto_white(tmp_path):
    lum = Image.fromarray(np.array([[50, 50, 0]], dtype=np.uint8))
    alpha = Image.fromarray(np.array([[0, 255, 128]], dtype=np.uint8))
    path = _save(Image.merge("LA", (lum, alpha)), tmp_path / "la.png")
    assert Image.open(path).mode == "LA"
    px = _pixels(path)
    assert tuple(px[0, 0]) == WHITE  # fully transparent -> white, not its grey value
    assert tuple(px[0, 1]) == (50, 50, 50)  # opaque -> unchanged
    np.testing.assert_allclose(px[0, 2], 127, atol=1)  # half-transparent black over white


def test_load_image__palette_maps_indices_to_colours(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([*RED, *GREEN, *BLUE])
    im.putdata([2, 0, 1])
    path = _save(im, tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    assert [tuple(p) for p in _pixels(path)[0]] == [BLUE, RED, GREEN]


def test_load_image__palette_transparency_becomes_white(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([*RED, *GREEN, *BLUE])
    im.putdata([0, 1, 2])
    path = _save(im, tmp_path / "pt.png", transparency=1)
    assert "transparency" in Image.open(path).info
    assert [tuple(p) for p in _pixels(path)[0]] == [RED, WHITE, BLUE]


@pytest.mark.parametrize("mode, key, other", [("L", 100, 0), ("RGB", (10, 20, 30), (0, 0, 0))])
def test_load_image__png_colour_key_transparency_becomes_white(tmp_path, mode, key, other):
    im = Image.new(mode, (2, 1))
    im.putdata([other, key])
    path = _save(im, tmp_path / "trns.png", transparency=key)
    opened = Image.open(path)
    assert (opened.mode, opened.info["transparency"]) == (mode, key)
    px = _pixels(path)
    assert tuple(px[0, 0]) == ((other,) * 3 if mode == "L" else other)
    assert tuple(px[0, 1]) == WHITE


def test_load_image__RGBA_composites_alpha_onto_white(tmp_path):
    a = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    path = _save(Image.fromarray(a), tmp_path / "rgba.png")
    assert Image.open(path).mode == "RGBA"
    px = _pixels(path)
    assert tuple(px[0, 0]) == WHITE
    assert tuple(px[0, 1]) == RED
    np.testing.assert_allclose(px[0, 2], 127, atol=1)


@pytest.mark.parametrize("ext", ["jpg", "tif"])
def test_load_image__CMYK_converts_to_rgb(tmp_path, ext):
    im = Image.new("CMYK", (24, 8), (0, 0, 0, 0))  # white
    im.paste((255, 0, 0, 0), (0, 0, 8, 8))  # full cyan
    im.paste((0, 0, 0, 255), (8, 0, 16, 8))  # full black
    path = _save(im, tmp_path / f"cmyk.{ext}", **({"quality": 95} if ext == "jpg" else {}))
    assert Image.open(path).mode == "CMYK"
    px = _pixels(path).astype(int)
    np.testing.assert_allclose(px[4, 4], (0, 255, 255), atol=3)
    np.testing.assert_allclose(px[4, 12], BLACK, atol=3)
    np.testing.assert_allclose(px[4, 20], WHITE, atol=3)


def test_load_image__1bit_gives_black_and_white(tmp_path):
    bits = np.array([[True, False], [False, True]])
    path = _save(Image.fromarray(bits), tmp_path / "bits.png")
    assert Image.open(path).mode == "1"
    px = _pixels(path)
    np.testing.assert_array_equal(px[..., 0], np.where(bits, 255, 0))
    assert (px == px[..., :1]).all()


def test_load_image__16bit_png_scales_full_range_to_8bit(tmp_path):
    a = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
    path = _save(Image.fromarray(a), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I;16")
    px = _pixels(path)
    np.testing.assert_array_equal(px[0, :, 0], [0, 255, 128, 1])
    assert (px == px[..., :1]).all()


def test_load_image__32bit_int_tiff_scales_16bit_range(tmp_path):
    a = np.array([[0, 65535, 32896, -5]], dtype=np.int32)
    path = _save(Image.fromarray(a), tmp_path / "int.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_pixels(path)[0, :, 0], [0, 255, 128, 0])


def test_load_image__32bit_int_tiff_in_8bit_range_is_kept(tmp_path):
    a = np.array([[0, 100, 255]], dtype=np.int32)
    path = _save(Image.fromarray(a), tmp_path / "int8.tif")
    assert Image.open(path).mode == "I"
    np.testing.assert_array_equal(_pixels(path)[0, :, 0], [0, 100, 255])


def test_load_image__float_tiff_in_unit_range_scales_to_255(tmp_path):
    a = np.array([[0.0, 1.0, 0.5, np.nan]], dtype=np.float32)
    path = _save(Image.fromarray(a), tmp_path / "float.tif")
    assert Image.open(path).mode == "F"
    np.testing.assert_array_equal(_pixels(path)[0, :, 0], [0, 255, 127, 0])


@pytest.mark.parametrize(
    "ext, kwargs",
    [
        ("gif", {}),
        pytest.param(
            "webp",
            {"lossless": True},
            marks=pytest.mark.skipif(not features.check("webp"), reason="no WebP support"),
        ),
        ("png", {}),  # APNG
    ],
)
def test_load_image__animated_uses_first_frame(tmp_path, ext, kwargs):
    frames = [Image.new("RGB", (8, 6), colour) for colour in (RED, BLUE, GREEN)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    opened = Image.open(path)
    assert opened.is_animated and opened.n_frames == 3
    decoded = load_image(path)
    assert (decoded.width, decoded.height) == (8, 6)
    assert (np.asarray(decoded.image) == RED).all()


def test_load_image__elpv_cell_is_grey_rgb():
    path = ELPV_IMAGES / "cell0001.png"
    original = np.asarray(Image.open(path))
    decoded = load_image(path)
    assert (decoded.width, decoded.height, decoded.image.size) == (300, 300, (300, 300))
    assert decoded.source == os.fspath(path)
    assert decoded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for c in range(3):
        np.testing.assert_array_equal(np.asarray(decoded.image)[..., c], original)


@pytest.mark.parametrize("name", ["cell0001.png", "cell0002.png", "cell0100.png"])
def test_load_image__elpv_cell_resized_to_min_side(name):
    decoded = load_image(ELPV_IMAGES / name, min_side=224)
    assert decoded.image.size == (224, 224)
    assert (decoded.width, decoded.height) == (300, 300)


# ---------------------------------------------------------------- load_image: min_side, EXIF, draft


@pytest.mark.parametrize("mode", ["L", "RGB", "LA", "RGBA", "P", "1", "I;16", "CMYK"])
def test_load_image__min_side_applies_to_every_mode(tmp_path, mode):
    path = _save(Image.new(mode, (40, 30)), tmp_path / ("m.tif" if mode == "CMYK" else "m.png"))
    decoded = load_image(path, min_side=16)
    assert decoded.image.size == (21, 16)
    assert (decoded.width, decoded.height) == (40, 30)
    assert load_image(path, min_side=60).image.size == (80, 60)  # small images are enlarged


@pytest.mark.parametrize(
    "orientation, size, red_at",
    [
        (1, (40, 20), (3, 3)),  # as stored: red block top-left
        (3, (40, 20), (36, 16)),  # 180 degrees: bottom-right
        (6, (20, 40), (16, 3)),  # 90 degrees clockwise: top-right
        (8, (20, 40), (3, 36)),  # 90 degrees counter-clockwise: bottom-left
    ],
)
def test_load_image__exif_orientation_is_applied(tmp_path, orientation, size, red_at):
    im = Image.new("RGB", (40, 20), (128, 128, 128))
    im.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(im, tmp_path / "exif.jpg", exif=exif, quality=95)
    decoded = load_image(path)
    assert (decoded.width, decoded.height) == size
    assert decoded.image.size == size
    px = np.asarray(decoded.image).astype(int)
    x, y = red_at
    np.testing.assert_allclose(px[y, x], RED, atol=20)
    red = (px[..., 0] > 200) & (px[..., 1] < 60)
    assert 50 <= red.sum() <= 80  # the 8x8 block, nowhere else


def test_load_image__exif_orientation_6_with_min_side_keeps_original_size(tmp_path):
    im = Image.new("RGB", (40, 20), (128, 128, 128))
    im.paste(RED, (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(im, tmp_path / "exif.jpg", exif=exif, quality=95)
    decoded = load_image(path, min_side=10)
    assert decoded.image.size == (10, 20)
    assert (decoded.width, decoded.height) == (20, 40)
    np.testing.assert_allclose(np.asarray(decoded.image)[1, 8].astype(int), RED, atol=40)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    """4000x3000 JPEG: red rises left to right, green top to bottom, blue is 128."""
    a = np.empty((3000, 4000, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 4000)[None, :]
    a[..., 1] = np.linspace(0, 255, 3000)[:, None]
    a[..., 2] = 128
    return _save(Image.fromarray(a), tmp_path_factory.mktemp("big") / "big.jpg", quality=85)


def test_load_image__large_jpeg_is_drafted_to_min_side(big_jpeg):
    decoded = load_image(big_jpeg, min_side=224)
    assert decoded.image.size == (299, 224)  # 4000 * 224 / 3000 = 298.7
    assert (decoded.width, decoded.height) == (4000, 3000)
    px = np.asarray(decoded.image).astype(int)
    np.testing.assert_allclose(px[112, 149], (128, 128, 128), atol=6)  # centre of the gradients
    np.testing.assert_allclose(px[0, 0], (0, 0, 128), atol=6)
    np.testing.assert_allclose(px[-1, -1], (255, 255, 128), atol=6)


def test_load_image__large_jpeg_uses_draft(big_jpeg, monkeypatch):
    requested = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requested.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    load_image(big_jpeg, min_side=224)
    assert requested == [(299, 224)]


# ---------------------------------------------------------------- load_image: broken inputs


def test_load_image__empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = _load_error(path)
    assert err.kind == "empty"
    assert str(err) == f"{path}: file is empty"


def test_load_image__text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    err = _load_error(path)
    assert err.kind == "not_image"
    assert str(err) == f"{path}: not a recognised image format"


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_load_image__truncated_file(tmp_path, ext):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = _save(Image.fromarray(noise), tmp_path / f"whole.{ext}")
    path = tmp_path / f"cut.{ext}"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = _load_error(path)
    assert err.kind in ("truncated", "corrupt")
    assert str(err).startswith(f"{path}: {err.kind} image data (")


def test_load_image__missing_file(tmp_path):
    path = tmp_path / "nowhere.png"
    err = _load_error(path)
    assert err.kind == "missing"
    assert str(err) == f"{path}: file not found"


def test_load_image__directory(tmp_path):
    path = tmp_path / "folder.png"
    path.mkdir()
    err = _load_error(path)
    assert err.kind == "unreadable"
    assert str(err) == f"{path}: is a directory, not an image file"


@pytest.mark.parametrize("max_pixels", [None, 1000])
def test_load_image__decompression_bomb(tmp_path, max_pixels):
    path = _png_claiming_size(tmp_path / "bomb.png", 20000, 20000)
    assert struct.unpack(">II", path.read_bytes()[16:24]) == (20000, 20000)
    err = _load_error(path, **({} if max_pixels is None else {"max_pixels": max_pixels}))
    assert err.kind == "too_large"
    assert str(err).startswith(f"{path}: ")
    assert "decompression bomb refused" in str(err) or "-pixel limit" in str(err)


def test_load_image__over_max_pixels(tmp_path):
    path = _save(Image.new("L", (100, 100)), tmp_path / "hundred.png")
    err = _load_error(path, max_pixels=1000)
    assert err.kind == "too_large"
    assert str(err) == f"{path}: image is 100x100 = 10,000 pixels, over the 1,000-pixel limit"
    assert load_image(path, max_pixels=10_000).image.size == (100, 100)


def test_load_image__max_pixels_above_pil_warning_threshold_is_honoured(tmp_path, monkeypatch):
    # PIL warns above MAX_IMAGE_PIXELS (~89 MP) and raises above twice that; between the two,
    # max_pixels (default 150 MP) decides. Scaled down here so the test stays tiny.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    path = _save(Image.new("L", (90, 90)), tmp_path / "ninety.png")  # 8,100 pixels
    assert load_image(path, max_pixels=10_000).image.size == (90, 90)
    assert _load_error(path, max_pixels=8000).kind == "too_large"


def test_load_image__file_over_max_bytes(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    path = _save(Image.fromarray(noise), tmp_path / "bulky.png")
    size = path.stat().st_size
    assert size > 100
    err = _load_error(path, max_bytes=100)
    assert err.kind == "too_large"
    assert str(err) == f"{path}: file is {size:,} bytes, over the 100-byte limit"


@pytest.mark.parametrize("wrap", [bytes, io.BytesIO])
def test_load_image__bytes_and_stream_over_max_bytes(wrap):
    err = _load_error(wrap(b"\0" * 101), max_bytes=100, name="blob.png")
    assert err.kind == "too_large"
    assert str(err) == "blob.png: file is over the 100-byte limit"


# ---------------------------------------------------------------- load_image: bytes and uploads


@pytest.fixture
def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), GREEN).save(buf, "PNG")
    return buf.getvalue()


def test_load_image__bytes(png_bytes):
    decoded = load_image(png_bytes)
    assert decoded.source == "<bytes>"
    assert (decoded.width, decoded.height) == (6, 4)
    assert (np.asarray(decoded.image) == GREEN).all()
    assert decoded.sha256 == hashlib.sha256(png_bytes).hexdigest()


def test_load_image__file_object_uses_its_name(png_bytes):
    upload = io.BytesIO(png_bytes)
    upload.name = "upload.png"
    decoded = load_image(upload)
    assert decoded.source == "upload.png"
    assert decoded.sha256 == hashlib.sha256(png_bytes).hexdigest()
    assert (np.asarray(decoded.image) == GREEN).all()

    broken = io.BytesIO(b"GIF89a but not really")
    broken.name = "upload.gif"
    err = _load_error(broken)
    assert (err.kind, err.source) == ("not_image", "upload.gif")
    assert str(err) == "upload.gif: not a recognised image format"


def test_load_image__open_file_on_disk(tmp_path, png_bytes):
    path = tmp_path / "disk.png"
    path.write_bytes(png_bytes)
    with open(path, "rb") as f:
        decoded = load_image(f)
    assert decoded.source == str(path)
    assert decoded.sha256 == hashlib.sha256(png_bytes).hexdigest()


def test_load_image__name_overrides_source_in_result_and_errors(tmp_path, png_bytes):
    assert load_image(png_bytes, name="form-field.png").source == "form-field.png"
    err = _load_error(b"", name="form-field.jpg")
    assert (err.kind, err.source) == ("empty", "form-field.jpg")
    assert str(err) == "form-field.jpg: file is empty"
    err = _load_error(tmp_path / "gone.png", name="shown.png")
    assert str(err) == "shown.png: file not found"


def test_load_image__sha256_of_path_matches_file_bytes(tmp_path):
    path = _save(Image.new("RGB", (5, 5), BLUE), tmp_path / "blue.jpg")
    assert load_image(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_image(path, min_side=2).sha256 == load_image(path).sha256


# ---------------------------------------------------------------- fit_shorter_side


@pytest.mark.parametrize(
    "size, side, expected",
    [((300, 200), 100, (150, 100)), ((200, 300), 100, (100, 150)), ((10, 20), 100, (100, 200))],
)
def test_fit_shorter_side__resizes_shorter_side(size, side, expected):
    assert fit_shorter_side(Image.new("RGB", size), side).size == expected


def test_fit_shorter_side__already_right_size_returns_same_object():
    im = Image.new("RGB", (150, 100))
    assert fit_shorter_side(im, 100) is im


# ---------------------------------------------------------------- scan_image_folder


def _touch_image(path: Path, colour=RED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path) -> Path:
    root = tmp_path / "data"
    _touch_image(root / "cats" / "a.jpg")
    _touch_image(root / "cats" / "B.PNG")
    _touch_image(root / "cats" / "nested" / "deeper" / "c.png")
    _touch_image(root / "cats" / ".thumbs" / "hidden.jpg")
    _touch_image(root / "dogs" / "d.jpg")
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / "dogs" / "README").write_text("no extension")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0")
    _touch_image(root / ".trash" / "e.jpg")
    return root


def test_scan_image_folder__class_subfolders(class_folder):
    folder = scan_image_folder(class_folder)
    assert folder.root == class_folder
    assert not folder.presplit
    assert folder.classes == ["cats", "dogs"]
    found = {
        (s.path.relative_to(class_folder).as_posix(), s.label, s.split) for s in folder.samples
    }
    assert found == {
        ("cats/B.PNG", "cats", None),
        ("cats/a.jpg", "cats", None),
        ("cats/nested/deeper/c.png", "cats", None),
        ("dogs/d.jpg", "dogs", None),
    }
    assert folder.counts() == {"cats": 3, "dogs": 1}


def test_scan_image_folder__hidden_ignored_and_non_images_skipped(class_folder):
    folder = scan_image_folder(class_folder)
    assert not any("/." in s.path.as_posix() for s in folder.samples)
    assert sorted(folder.skipped, key=lambda s: s.path) == [
        SkippedFile(class_folder / "dogs" / "README", "not an image file extension (none)"),
        SkippedFile(class_folder / "dogs" / "notes.txt", "not an image file extension (.txt)"),
    ]


def test_scan_image_folder__samples_decode(class_folder):
    for sample in scan_image_folder(class_folder).samples:
        assert load_image(sample.path).image.size == (4, 4)


def test_scan_image_folder__presplit(tmp_path):
    root = tmp_path / "split"
    for rel in [
        "train/cats/1.png",
        "train/cats/2.png",
        "train/dogs/3.png",
        "val/cats/4.png",
        "test/dogs/5.png",
        "test/dogs/sub/6.png",
    ]:
        _touch_image(root / rel)
    folder = scan_image_folder(root)
    assert folder.presplit
    assert folder.classes == ["cats", "dogs"]
    found = {(s.path.relative_to(root).as_posix(), s.label, s.split) for s in folder.samples}
    assert found == {
        ("train/cats/1.png", "cats", "train"),
        ("train/cats/2.png", "cats", "train"),
        ("train/dogs/3.png", "dogs", "train"),
        ("val/cats/4.png", "cats", "val"),
        ("test/dogs/5.png", "dogs", "test"),
        ("test/dogs/sub/6.png", "dogs", "test"),
    }
    assert folder.counts() == {"cats": 3, "dogs": 3}
    assert folder.skipped == []


def test_scan_image_folder__presplit_class_missing_from_train(tmp_path):
    root = tmp_path / "split"
    _touch_image(root / "train" / "cats" / "1.png")
    _touch_image(root / "test" / "dogs" / "2.png")
    _touch_image(root / "val" / "birds" / "3.png")
    with pytest.raises(ValueError) as excinfo:
        scan_image_folder(root)
    assert str(excinfo.value) == (
        f"classes birds, dogs have no images under {root / 'train'}; "
        "every class needs training images"
    )


@pytest.mark.parametrize("content", ["nothing", "only_text", "only_hidden"])
def test_scan_image_folder__no_images_explains_layout(tmp_path, content):
    root = tmp_path / "empty"
    root.mkdir()
    if content == "only_text":
        (root / "cats").mkdir()
        (root / "cats" / "notes.txt").write_text("x")
    elif content == "only_hidden":
        _touch_image(root / ".cache" / "a.png")
    with pytest.raises(ValueError) as excinfo:
        scan_image_folder(root)
    assert str(excinfo.value) == (
        f"no images found in {root}: expected one sub-folder per class (e.g. {root}/cats/*.jpg), "
        "or train/ val/ test/ folders holding class sub-folders"
    )


def test_scan_image_folder__missing_folder(tmp_path):
    missing = tmp_path / "x"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data folder not found: {missing}")):
        scan_image_folder(missing)


def test_scan_image_folder__file_instead_of_folder(tmp_path):
    path = _touch_image(tmp_path / "one.png")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data folder not found: {path}")):
        scan_image_folder(path)


def test_scan_image_folder__fingerprint_stable_until_a_file_is_added(class_folder):
    before = scan_image_folder(class_folder).fingerprint()
    assert scan_image_folder(str(class_folder)).fingerprint() == before
    assert re.fullmatch("[0-9a-f]{64}", before)
    _touch_image(class_folder / "dogs" / "new.png")
    after = scan_image_folder(class_folder).fingerprint()
    assert after != before
    assert scan_image_folder(class_folder).fingerprint() == after


def test_scan_image_folder__fingerprint_ignores_skipped_files(class_folder):
    before = scan_image_folder(class_folder).fingerprint()
    (class_folder / "cats" / "more-notes.txt").write_text("still not an image")
    assert scan_image_folder(class_folder).fingerprint() == before


def test_scan_image_folder__elpv_cells(tmp_path):
    root = tmp_path / "elpv"
    for label, names in {"good": ["cell0001.png", "cell0002.png"], "bad": ["cell0100.png"]}.items():
        (root / label).mkdir(parents=True)
        for name in names:
            shutil.copyfile(ELPV_IMAGES / name, root / label / name)
    folder = scan_image_folder(root)
    assert folder.counts() == {"bad": 1, "good": 2}
    for sample in folder.samples:
        decoded = load_image(sample.path, min_side=224)
        assert decoded.image.size == (224, 224)
        original = (ELPV_IMAGES / sample.path.name).read_bytes()
        assert decoded.sha256 == hashlib.sha256(original).hexdigest()


# -- hostile files ------------------------------------------------------------------------------


def _bmp_claiming_size(path: Path, width: int, height: int) -> Path:
    """A 54-byte 24-bit BMP header that declares ``width`` x ``height`` pixels and holds none."""
    header = struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    path.write_bytes(header)
    return path


def layered_psd(w: int = 8, h: int = 6, layers: int = 2) -> bytes:
    """A minimal valid RGB PSD with ``layers`` raw layers and a raw composite image."""
    out = io.BytesIO()
    out.write(b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3))
    out.write(struct.pack(">II", 0, 0))  # colour mode data, image resources
    records, channel_data = b"", b""
    for n in range(layers):
        rec = struct.pack(">iiiiH", 0, 0, h, w, 3)
        for c in range(3):
            rec += struct.pack(">hI", c, 2 + w * h)
            channel_data += struct.pack(">H", 0) + bytes([(40 * n + 80 * c) % 256]) * (w * h)
        name = f"layer{n}".encode()
        pascal = bytes([len(name)]) + name
        pascal += b"\0" * (-len(pascal) % 4)
        extra = struct.pack(">II", 0, 0) + pascal
        rec += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
        records += rec
    info = struct.pack(">h", layers) + records + channel_data
    info += b"\0" * (len(info) % 2)
    block = struct.pack(">I", len(info)) + info + struct.pack(">I", 0)
    out.write(struct.pack(">I", len(block)) + block)
    composite = bytes([10]) * (w * h) + bytes([20]) * (w * h) + bytes([30]) * (w * h)
    out.write(struct.pack(">H", 0) + composite)  # raw, planar
    return out.getvalue()


def test_load_image__layered_psd_gives_its_composite():
    data = layered_psd()
    assert Image.open(io.BytesIO(data)).n_frames == 2  # layered: its first frame is 1
    decoded = load_image(data, name="art.psd")
    assert decoded.image.size == (8, 6) and decoded.image.getpixel((3, 2)) == (10, 20, 30)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_load_image__device_refused_without_reading_it():
    err = _load_error("/dev/zero")
    assert err.kind == "unreadable"
    assert str(err) == "/dev/zero: not a regular file (device, pipe or socket)"


def test_load_image__fifo_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    err = _load_error(fifo)
    assert str(err) == f"{fifo}: not a regular file (device, pipe or socket)"


def test_read_image_bytes__reads_at_most_the_cap_whatever_stat_says(tmp_path, monkeypatch):
    path = tmp_path / "grows.png"
    path.write_bytes(b"x" * 5000)
    real = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real(fd)[:6], 10, *real(fd)[7:])))
    with pytest.raises(ImageLoadError, match="over the 1,000-byte limit"):
        read_image_bytes(path, "grows.png", max_bytes=1000)


def test_load_image__declared_pixels_over_the_decode_budget_refused_before_allocating(tmp_path):
    path = _bmp_claiming_size(tmp_path / "huge.bmp", 10_000, 8_000)  # 80 MP < max_pixels
    err = _load_error(path)
    assert err.kind == "too_large"
    assert str(err) == (
        f"{path}: image is 10000x8000 RGB: decoding needs 305 MB, over the 256 MB limit"
    )
    # nothing was allocated for it: a fresh process stays far below the 305 MB it declares
    code = (  # VmHWM, not ru_maxrss: that one is carried over from the parent across exec
        "from imagesieve.data import load_image, ImageLoadError\n"
        f"try: load_image({str(path)!r})\n"
        "except ImageLoadError: pass\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 200 * 1024, out.stdout  # KiB


def test_engine_prepare__a_failed_item_keeps_no_frames_alive(trained, tmp_path):
    """A failed item waits in the pipeline with its error: the error must not hold the
    failed decode's frames (and so its buffers) through a traceback or a chained exception."""
    from imagesieve.classifier import Predictor

    _, result = trained
    engine = Predictor(result.version).engine
    path = _bmp_claiming_size(tmp_path / "lying.bmp", 300, 200)  # declares pixels it lacks
    for skip in (None, lambda sha: False):
        res, x = engine.prepare(str(path), skip)
        err = res.error
        assert x is None and err.kind == "truncated"
        assert err.__traceback__ is None and err.__context__ is None and err.__cause__ is None


def test_load_image__tall_image_counts_pillows_row_pointers(tmp_path):
    path = tmp_path / "tall.pgm"
    path.write_bytes(b"P5\n1 80000000\n255\n" + bytes(16))  # 80 MB of pixels, 640 MB of rows
    err = _load_error(path)
    assert err.kind == "too_large" and "decoding needs 687 MB" in err.reason


def test_load_image__icon_declaring_a_huge_png_refused_before_pillow_decodes_it(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, "PNG")
    inner = bytearray(png.getvalue())
    struct.pack_into(">II", inner, 16, 1, 80_000_000)  # the IHDR now declares 1 x 80,000,000
    struct.pack_into(">I", inner, 29, zlib.crc32(bytes(inner[12:29])))
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 22)
    path = tmp_path / "bomb.ico"
    path.write_bytes(ico + bytes(inner))
    err = _load_error(path)
    assert err.kind == "too_large"
    assert err.reason == "icon declares an image that needs 916 MB to decode, over the 256 MB limit"
    good = tmp_path / "good.ico"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, sizes=[(32, 32)])
    assert load_image(good).image.getpixel((5, 5)) == (200, 10, 10)
