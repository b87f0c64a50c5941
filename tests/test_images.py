"""Image input: every source type, colour modes, EXIF orientation, limits and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from idfusion.errors import ImageReadError, ImageTooLargeError, NotAnImageError
from idfusion.images import atomic_write_bytes, load_image, save_image


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def test_all_source_types_give_the_same_pixels(faces_dir):
    path = faces_dir / "obama.jpg"
    from_path = load_image(path)
    from_str = load_image(str(path))
    from_bytes = load_image(path.read_bytes())
    from_pil = load_image(Image.open(path))
    from_array = load_image(from_path.array)
    for other in (from_str, from_bytes, from_pil, from_array):
        np.testing.assert_array_equal(other.array, from_path.array)
    assert from_path.array.dtype == np.uint8 and from_path.array.shape == (1137, 910, 3)
    assert from_path.name == str(path) and from_bytes.name == "<bytes>" and from_array.name == "<array>"


def test_exif_orientation_is_applied():
    # 40 wide x 20 high, left half red, right half blue; orientation 6 means "rotate 90 degrees clockwise to view".
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    loaded = load_image(buffer.getvalue()).array
    assert loaded.shape == (40, 20, 3)  # portrait after rotation
    top, bottom = loaded[5, 10], loaded[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_is_composited_over_white(faces_dir):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    loaded = load_image(_png_bytes(Image.fromarray(rgba, "RGBA"))).array
    np.testing.assert_array_equal(loaded[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(loaded[3, 0], [255, 255, 255])
    real = load_image(faces_dir / "obama_rgba.png").array
    assert real.shape == (1200, 626, 3)


def test_grayscale_palette_cmyk_and_16_bit():
    gray = load_image(_png_bytes(Image.new("L", (3, 3), 77))).array
    np.testing.assert_array_equal(gray[0, 0], [77, 77, 77])

    palette = Image.new("P", (3, 3), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    np.testing.assert_array_equal(load_image(_png_bytes(palette)).array[1, 1], [10, 20, 30])

    palette.info["transparency"] = 1
    np.testing.assert_array_equal(load_image(_png_bytes(palette, transparency=1)).array[1, 1], [255, 255, 255])

    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, format="JPEG", quality=100)
    red = load_image(buffer.getvalue()).array[4, 4].astype(int)
    assert red[0] > 230 and red[1] < 30 and red[2] < 30

    sixteen = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    np.testing.assert_array_equal(load_image(_png_bytes(sixteen)).array[0, :, 0], [0, 128, 255])

    np.testing.assert_array_equal(load_image(np.array([[65535, 0]], dtype=np.uint16)).array[0, :, 0], [255, 0])
    np.testing.assert_array_equal(load_image(np.array([[1.0, 0.5]])).array[0, :, 0], [255, 128])


def test_bad_arrays_are_refused():
    with pytest.raises(NotAnImageError, match="float arrays"):
        load_image(np.array([[2.0]]))
    with pytest.raises(NotAnImageError, match=r"shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(NotAnImageError, match="dtype"):
        load_image(np.zeros((4, 4, 3), dtype=np.int64))


def test_pixel_limit_rejects_before_decoding(tmp_path):
    # A 72-megapixel 1-bit PNG is a few kilobytes on disk: the classic decompression bomb.
    bomb = tmp_path / "bomb.png"
    Image.new("1", (9000, 8000)).save(bomb)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: image is 9000x8000 = 72,000,000 pixels"):
        load_image(bomb)
    with pytest.raises(ImageTooLargeError, match="limit is 100 pixels"):
        load_image(np.zeros((20, 20, 3), dtype=np.uint8), max_pixels=100)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        (None, ImageReadError, "file not found"),
        (b"", ImageReadError, "file is empty"),
        (b"this is plain text, not a picture", NotAnImageError, "not an image"),
        ("truncated", ImageReadError, "corrupt or truncated"),
    ],
)
def test_bad_files_name_the_file(tmp_path, faces_dir, content, error, message):
    path = tmp_path / "input.jpg"
    if content == "truncated":
        path.write_bytes((faces_dir / "obama.jpg").read_bytes()[:4000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="is a directory"):
        load_image(tmp_path)


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "sub" / "out.png"
    save_image(target, np.zeros((4, 4, 3), dtype=np.uint8), parameters="a prompt")
    assert Image.open(target).text["parameters"] == "a prompt"
    atomic_write_bytes(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.png"]
