"""The world renderer, caption grammar, identity split and dataset writer."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields, replace

import numpy as np
import pytest
from PIL import Image

from idfusion.world import (
    ATTRIBUTE_VALUES,
    HELDOUT_IDENTITIES,
    TRAIN_IDENTITIES,
    Attributes,
    caption,
    complete_attributes,
    degrade,
    identity_name,
    identity_seed,
    parse_caption,
    render,
    render_scene,
    sample_attributes,
    sample_identity,
    write_dataset,
)


def test_same_seeds_same_pixels_different_seeds_differ():
    a, b = render(5, 3), render(5, 3)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.faces[0].dense_landmarks, b.faces[0].dense_landmarks)
    assert a.caption == b.caption
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    for other in (render(5, 4), render(6, 3)):
        assert np.abs(other.image.astype(int) - a.image.astype(int)).mean() > 5
    # The same identity and attributes under another image seed: another pose, same face parameters.
    moved = render(5, 4, a.attributes)
    assert moved.attributes == a.attributes
    assert not np.allclose(moved.faces[0].landmarks, a.faces[0].landmarks)


def test_size_128_is_the_same_picture_at_twice_the_resolution():
    small, large = render(11, 2), render(11, 2, size=128)
    assert large.image.shape == (128, 128, 3)
    # Pixel centres: x_128 = 2 * (x_64 + 0.5) - 0.5.
    np.testing.assert_allclose(large.faces[0].landmarks, 2 * (small.faces[0].landmarks + 0.5) - 0.5, atol=1e-3)
    downsized = np.asarray(Image.fromarray(large.image).resize((64, 64), Image.Resampling.BOX), dtype=float)
    assert np.abs(downsized - small.image).mean() < 4  # only noise and anti-aliasing differ


def test_identity_parameters_are_fixed_and_overlap_across_identities():
    assert sample_identity(42) == sample_identity(42)
    assert sample_identity(42) != sample_identity(43)
    identities = [sample_identity(s) for s in range(1000)]
    # No single parameter separates identities: for every scalar one, most identities have a near twin.
    for name in ("head_top", "eye_spacing", "eye_size", "nose_length", "mouth_width", "hairline"):
        values = np.sort([getattr(i, name) for i in identities])
        gaps = np.diff(values) / (values[-1] - values[0])
        assert np.median(gaps) < 0.002, name
    skins = np.array([i.skin for i in identities])
    nearest = np.sort(np.linalg.norm(skins[:, None] - skins[None], axis=-1), axis=1)[:, 1]
    assert np.median(nearest) < 3  # skin colours a few RGB units apart
    assert len({i.hair_style for i in identities}) == 6


def test_train_and_heldout_identities_are_disjoint():
    assert set(TRAIN_IDENTITIES).isdisjoint(HELDOUT_IDENTITIES)
    assert identity_seed(identity_name(1_000_007)) == 1_000_007
    assert identity_name(3) == "world-0000003"


def test_caption_round_trip():
    rng = np.random.default_rng(0)
    for k in range(3000):
        attributes = replace(sample_attributes(rng), people=int(k % 3) + 1)
        text = caption(attributes)
        assert parse_caption(text) == attributes, text
    # Every value of every field, in every position, survives.
    base = sample_attributes(1)
    for name, values in ATTRIBUTE_VALUES.items():
        for value in values:
            attributes = replace(base, **{name: value})
            assert parse_caption(caption(attributes)) == attributes


def test_caption_grammar_examples_and_free_prompts():
    attributes = Attributes("blue", "striped", "red", "glasses", "green", "smiling", 1)
    assert caption(attributes) == (
        "a photo of a person wearing a red hat and glasses, in a green shirt, smiling, on a blue striped background"
    )
    plural = replace(attributes, people=2, hat="none", glasses="sunglasses", pattern="plain")
    assert caption(plural) == (
        "a photo of two people wearing sunglasses, in green shirts, smiling, on a plain blue background"
    )
    free = parse_caption("A man with sunglasses, frowning, on a red background")
    assert free == Attributes("red", "plain", "none", "sunglasses", None, "angry", 1)
    assert not free.complete
    filled = complete_attributes(free, 3)
    assert filled.complete and filled.background == "red" and filled.glasses == "sunglasses"
    assert parse_caption("portrait").specified() == {"hat": "none", "glasses": "none"}
    with pytest.raises(ValueError, match="hat must be one of"):
        Attributes(hat="pink")
    with pytest.raises(ValueError, match="complete"):
        caption(free)


def test_render_draws_the_requested_attributes():
    attributes = Attributes("green", "dotted", "none", "sunglasses", "red", "surprised", 1)
    result = render(9, 0, attributes)
    assert result.attributes == attributes
    assert parse_caption(result.caption) == attributes
    image = result.image.astype(float)
    corner = image[:6, :6].reshape(-1, 3).mean(0)
    assert corner[1] > corner[0] + 40 and corner[1] > corner[2] + 40  # a green background
    bottom = image[-3:, 20:44].reshape(-1, 3).mean(0)
    assert bottom[0] > bottom[1] + 60  # a red shirt
    with pytest.raises(ValueError, match="render_scene"):
        render(9, 0, replace(attributes, people=2))


def test_landmarks_lie_inside_the_box_and_in_arcface_order():
    for k in range(60):
        result = render(k, k, size=64 if k % 2 else 128)
        face = result.faces[0]
        x1, y1, x2, y2 = face.bbox
        lm = face.landmarks
        assert face.landmarks.shape == (5, 2) and face.dense_landmarks.shape == (68, 2)
        assert np.all((lm[:, 0] > x1) & (lm[:, 0] < x2) & (lm[:, 1] > y1) & (lm[:, 1] < y2))
        dense = face.dense_landmarks
        assert np.all((dense >= face.bbox[:2] - 1) & (dense <= face.bbox[2:] + 1))
        # ArcFace order: image-left eye, image-right eye, nose below the eyes, mouth corners below the nose.
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]
        assert lm[2, 1] > max(lm[0, 1], lm[1, 1]) - 1 and min(lm[3, 1], lm[4, 1]) > lm[2, 1] - 1
        # dlib layout: jaw runs left to right through the chin, brows above the eyes.
        assert dense[0, 0] < dense[8, 0] < dense[16, 0] and dense[8, 1] > lm[3, 1]
        assert dense[17:27, 1].mean() < dense[36:48, 1].mean()
        np.testing.assert_allclose(lm[0], dense[36:42].mean(0), atol=1e-4)
        # The face mask is inside the box and covers a good part of it.
        ys, xs = np.nonzero(result.mask)
        assert xs.min() >= x1 - 1 and xs.max() <= x2 + 1 and ys.max() <= y2 + 1
        assert len(xs) > 0.3 * (x2 - x1) * (y2 - y1)


@pytest.mark.parametrize("people", [2, 3])
def test_scenes_have_one_disjoint_face_per_person(people):
    for seed in range(10):
        ids = [seed * 3 + k for k in range(people)]
        result = render_scene(ids, seed)
        assert len(result.faces) == people
        assert [f.identity for f in result.faces] == ids
        assert result.attributes.people == people
        assert caption(result.attributes).startswith(f"a photo of {'two' if people == 2 else 'three'} people")
        boxes = [f.bbox for f in result.faces]
        for left, right in zip(boxes, boxes[1:], strict=False):
            assert left[2] < right[0]  # left to right, never overlapping
        for face in result.faces:
            assert np.all((face.landmarks >= face.bbox[:2]) & (face.landmarks <= face.bbox[2:]))
    with pytest.raises(ValueError, match="1 to 3"):
        render_scene([1, 2, 3, 4], 0)


def test_degrade_is_deterministic_and_changes_the_image():
    image = render(1, 1).image
    a, b = degrade(image, 7), degrade(image, 7)
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.uint8
    assert 2 < np.abs(a.astype(int) - image.astype(int)).mean() < 30


def test_write_dataset(tmp_path):
    metadata = write_dataset(tmp_path / "ds", [3, 4, 5], images_per_identity=2, scenes=2, seed=1, progress=False)
    records = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(records) == 8
    keys = {"image", "width", "height", "caption", "identity", "faces", "references", "mask", "attributes"}
    for record in records:
        assert set(record) == keys
        assert (metadata.parent / record["image"]).is_file() and (metadata.parent / record["mask"]).is_file()
        assert record["width"] == record["height"] == 64
        for face in record["faces"]:
            assert set(face) == {"bbox", "landmarks", "score"} and len(face["landmarks"]) == 5
        assert parse_caption(record["caption"]) == Attributes.from_dict(record["attributes"])
    first = records[0]
    assert first["identity"] == "world-0000003" and first["references"] == ["images/world-0000003/001.png"]
    # The PNG is exactly the render.
    again = render(3, 1_000_000)
    np.testing.assert_array_equal(np.asarray(Image.open(metadata.parent / first["image"])), again.image)
    assert first["faces"][0]["bbox"] == pytest.approx(again.faces[0].bbox, abs=1e-3)
    scenes = [r for r in records if "+" in r["identity"]]
    assert len(scenes) == 2 and all(len(r["faces"]) == r["identity"].count("+") + 1 for r in scenes)
    assert all(r["references"] == [] for r in scenes)
    assert {f.name for f in fields(Attributes)} == set(first["attributes"])
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path / "ds", [3, 4, 5], images_per_identity=2, scenes=2, seed=1, progress=False)
    write_dataset(tmp_path / "ds", [3], images_per_identity=1, seed=1, overwrite=True, progress=False)
    assert len(metadata.read_text().splitlines()) == 1


def test_importing_and_rendering_needs_no_torch():
    code = (
        "import sys, idfusion.world as w; w.render(1, 1); w.parse_caption('a person'); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
