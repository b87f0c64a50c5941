"""Generated-image files: metadata round trip, A1111 parameters text, safe names, contact sheets, hashing."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from idfusion.errors import ImageReadError, NotAnImageError
from idfusion.outputs import (
    METADATA_KEY,
    MetadataError,
    contact_sheet,
    decode_array,
    encode_array,
    file_sha256,
    next_output_index,
    parameters_text,
    read_generation_metadata,
    save_generated_image,
)

UNET_SHA = "abcdef0123456789" + "0" * 48


def _metadata(**extra) -> dict:
    meta = {
        "method": "arc2face",
        "model": "FoivosPar/Arc2Face",
        "base_model": "runwayml/stable-diffusion-v1-5",
        "model_files": {"arc2face/config.json": "1" * 64, "arc2face/diffusion_pytorch_model.safetensors": UNET_SHA},
        "prompt": "photo of a person, smiling",
        "negative_prompt": "blurry",
        "seed": 42,
        "steps": 25,
        "guidance_scale": 3.0,
        "scheduler": "dpm++",
        "width": 512,
        "height": 512,
        "scales": {"id": 1.0},
        "idfusion_version": "0.1.0",
    }
    meta.update(extra)
    return meta


def test_parameters_text_is_a1111_format():
    meta = _metadata(
        loras=[{"name": "film", "weight": 0.8, "sha256": "fedcba9876" + "0" * 54}],
        note="a: b",
        id_embeds=encode_array(np.zeros(512, np.float32)),
    )
    expected = (
        "photo of a person, smiling\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, CFG scale: 3.0, Seed: 42, Size: 512x512, Model hash: abcdef0123, "
        'Model: FoivosPar/Arc2Face, Method: arc2face, Base model: runwayml/stable-diffusion-v1-5, Scales: "id: 1.0", '
        'Lora hashes: "film: fedcba9876", Lora weights: "film: 0.8", Note: "a: b", Version: idfusion 0.1.0'
    )
    assert parameters_text(meta) == expected


def test_parameters_text_minimal_and_sampler_names():
    assert parameters_text({"steps": 4, "scheduler": "euler-a"}).startswith("Steps: 4, Sampler: Euler a, ")
    text = parameters_text({"scheduler": "lcm", "model": "C:\\models\\x", "idfusion_version": "9.9"})
    assert text == 'Sampler: LCM, Model: "C:\\\\models\\\\x", Version: idfusion 9.9'
    assert "Sampler: my-sampler" in parameters_text({"scheduler": "my-sampler"})


def test_metadata_round_trip_with_exact_embedding(tmp_path):
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal(512).astype(np.float32)
    meta = _metadata(id_embeds=encode_array(embedding), prompt="café ☕, «quotes»")
    image = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    path = save_generated_image(tmp_path / "out" / "img.png", image, meta)

    assert path == tmp_path / "out" / "img.png"
    assert read_generation_metadata(path) == meta
    np.testing.assert_array_equal(decode_array(read_generation_metadata(path)["id_embeds"]), embedding)
    with Image.open(path) as reread:
        np.testing.assert_array_equal(np.asarray(reread), np.asarray(image))
        assert reread.text["parameters"] == parameters_text(meta)
        assert json.loads(reread.text[METADATA_KEY]) == meta
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]  # atomic write left no temp file


def test_parameters_chunk_is_plain_text(tmp_path):
    path = save_generated_image(tmp_path / "a.png", Image.new("RGB", (8, 8)), _metadata())
    data = path.read_bytes()
    assert b"tEXtparameters\x00photo of a person, smiling\nNegative prompt: blurry\nSteps: 25" in data
    assert b"iTXtidfusion\x00\x01\x00" in data  # compressed iTXt


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "img.png"
    save_generated_image(path, Image.new("RGB", (8, 8), "red"), _metadata(seed=1))
    save_generated_image(path, Image.new("RGB", (8, 8), "blue"), _metadata(seed=2))
    assert read_generation_metadata(path)["seed"] == 2
    assert os.listdir(tmp_path) == ["img.png"]


def test_unserialisable_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_generated_image(tmp_path / "x.png", Image.new("RGB", (8, 8)), {"bad": object()})
    with pytest.raises(ValueError, match="JSON"):
        save_generated_image(tmp_path / "x.png", Image.new("RGB", (8, 8)), {"bad": float("nan")})
    assert not any(tmp_path.iterdir())
    # numpy scalars are fine
    path = save_generated_image(tmp_path / "y.png", Image.new("RGB", (8, 8)), {"seed": np.int64(3)})
    assert read_generation_metadata(path) == {"seed": 3}


def test_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(MetadataError, match="was not written by idfusion, or its metadata was stripped") as info:
        read_generation_metadata(path)
    assert str(path) in str(info.value)


def test_not_an_image_or_not_a_png(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(NotAnImageError) as info:
        read_generation_metadata(text)
    assert str(text) in str(info.value)

    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    with pytest.raises(NotAnImageError, match="not a PNG") as info:
        read_generation_metadata(jpeg)
    assert str(jpeg) in str(info.value)

    with pytest.raises(ImageReadError, match="file not found"):
        read_generation_metadata(tmp_path / "missing.png")
    (tmp_path / "empty.png").touch()
    with pytest.raises(ImageReadError, match="empty"):
        read_generation_metadata(tmp_path / "empty.png")


def test_corrupt_metadata_json(tmp_path):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, "{not json", zip=True)
    path = tmp_path / "bad.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with pytest.raises(MetadataError, match="not valid JSON"):
        read_generation_metadata(path)


def test_encode_decode_array_exact():
    rng = np.random.default_rng(1)
    for array in (rng.standard_normal((2, 512)).astype(np.float32), np.float32(1.5), np.array([np.inf, -0.0])):
        decoded = decode_array(encode_array(array))
        assert decoded.dtype == np.float32 and decoded.shape == np.shape(array) and decoded.flags.writeable
        np.testing.assert_array_equal(decoded, np.asarray(array, np.float32))
    assert encode_array(np.zeros((1, 2), np.float32)).startswith("1x2:")
    for bad in ("no colon", "3:AAAA", "x:AAAA", "2:!!!!"):
        with pytest.raises(MetadataError):
            decode_array(bad)


def test_next_output_index_continues_after_every_index_in_use(tmp_path):
    assert next_output_index(tmp_path / "new", "img") == 0
    for name in ("img_0000.png", "img_0007.png", "img_0003.jpg", "other_0042.png", "img_x.png", "img.png"):
        (tmp_path / name).write_bytes(b"old")
    assert next_output_index(tmp_path, "img") == 8
    (tmp_path / "img_0012_sheet.png").write_bytes(b"old")  # a contact sheet beside deleted images
    assert next_output_index(tmp_path, "img") == 13
    with pytest.raises(ValueError):
        next_output_index(tmp_path, "a/b")


def test_contact_sheet_layout():
    red = Image.new("RGB", (100, 50), (255, 0, 0))  # wide: letterboxed with white above and below
    green = np.full((40, 40, 3), (0, 255, 0), dtype=np.uint8)
    outputs = [Image.new("RGB", (64, 64), (0, 0, 255 - i)) for i in range(5)]
    sheet = contact_sheet([red, green], outputs, cell=64, labels=[f"seed {i}" for i in range(5)])
    gap = 2
    assert sheet.mode == "RGB" and sheet.width == gap + 4 * (64 + gap)

    assert sheet.getpixel((gap + 32, gap + 32)) == (255, 0, 0)  # centre of the red reference
    assert sheet.getpixel((gap + 32, gap + 2)) == (255, 255, 255)  # letterbox band above it
    assert sheet.getpixel((gap + 66 + 32, gap + 32)) == (0, 255, 0)  # second reference
    assert sheet.getpixel((gap + 2 * 66 + 32, gap + 32)) == (255, 255, 255)  # no third reference

    separator_y = gap + 64 + gap
    assert sheet.getpixel((10, separator_y)) == (160, 160, 160)
    first_row = separator_y + 2 + gap
    assert sheet.getpixel((gap + 32, first_row + 32)) == (0, 0, 255)
    assert sheet.getpixel((gap + 3 * 66 + 32, first_row + 32)) == (0, 0, 252)
    # the label under an output has dark pixels
    label_band = np.asarray(sheet)[first_row + 64 : first_row + 64 + 12, gap : gap + 64]
    assert label_band.min() < 128
    # the fifth output starts a second row
    row_height = (sheet.height - first_row) // 2
    assert sheet.getpixel((gap + 32, first_row + row_height + 32)) == (0, 0, 251)

    again = contact_sheet([red, green], outputs, cell=64, labels=[f"seed {i}" for i in range(5)])
    assert again.tobytes() == sheet.tobytes()


def test_contact_sheet_without_references_or_labels():
    sheet = contact_sheet([], [Image.new("RGB", (10, 20), (0, 0, 0))], cell=32)
    assert sheet.size == (2 + 34, 2 + 34)
    assert sheet.getpixel((2 + 16, 2 + 16)) == (0, 0, 0) and sheet.getpixel((2 + 2, 2 + 16)) == (255, 255, 255)
    with pytest.raises(ValueError):
        contact_sheet([], [], cell=32)
    with pytest.raises(ValueError, match="labels"):
        contact_sheet([], [Image.new("RGB", (4, 4))], labels=["a", "b"])


def test_file_sha256_and_cache(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_sha256(path, chunk=7) == hashlib.sha256(b"abc" * 1000).hexdigest()

    # same size and mtime: the cached hash is returned without reading the file
    stat = path.stat()
    path.write_bytes(b"xyz" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(path) == hashlib.sha256(b"abc" * 1000).hexdigest()

    # a changed file is hashed again
    path.write_bytes(b"new contents")
    assert file_sha256(path) == hashlib.sha256(b"new contents").hexdigest()
