"""``idfusion prepare``: real photos (and broken files) to a training set that every reader takes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from idfusion.training.data import DataError, read_jsonl, read_records
from idfusion.training.prepare import (
    CROP_KINDS,
    DEFAULT_BLUR,
    METADATA_FILE,
    PrepareError,
    check_dataset,
    identity_from_stem,
    prepare_dataset,
)

# input file (relative to the photo folder) -> why it is skipped (None: kept)
EXPECTED = {
    "obama/obama.jpg": None,
    "obama/obama_partial_face.jpg": None,
    "obama/obama_rgba.png": None,
    "obama/blurred.jpg": "blurry",
    "obama/small.jpg": "face-too-small",
    "crowd/group_six_faces.jpg": "several-faces",
    "tom_hanks/tom_hanks_aligned_112.png": "too-few-photos",
    "broken/empty.jpg": "unreadable",
    "broken/text.png": "unreadable",
    "broken/truncated.jpg": "unreadable",
}


def tree_hash(folder: Path) -> str:
    """Names, bytes and modification times of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def write_photos(root: Path, faces: Path) -> Path:
    for name in ("obama.jpg", "obama_partial_face.jpg", "obama_rgba.png"):
        (root / "obama").mkdir(parents=True, exist_ok=True)
        shutil.copy(faces / name, root / "obama" / name)
    pixels = cv2.imread(str(faces / "obama.jpg"))
    cv2.imwrite(str(root / "obama" / "blurred.jpg"), cv2.GaussianBlur(pixels, (0, 0), 6))  # sharpness 17
    small = cv2.resize(pixels, None, fx=0.15, fy=0.15, interpolation=cv2.INTER_AREA)  # a 36 px face
    cv2.imwrite(str(root / "obama" / "small.jpg"), small)
    (root / "obama" / "obama.txt").write_text("a photo of a man in a suit\n", encoding="utf-8")
    for folder, name in (("crowd", "group_six_faces.jpg"), ("tom_hanks", "tom_hanks_aligned_112.png")):
        (root / folder).mkdir()
        shutil.copy(faces / name, root / folder / name)
    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.jpg").write_bytes(b"")
    (broken / "text.png").write_text("not an image\n", encoding="utf-8")
    (broken / "truncated.jpg").write_bytes((faces / "obama.jpg").read_bytes()[:60_000])
    (root / "notes.md").write_text("not a photo, not a sidecar\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory, faces_dir):
    root = write_photos(tmp_path_factory.mktemp("prepare") / "photos", faces_dir)
    return root, tree_hash(root)


@pytest.fixture(scope="module")
def prepared(photos):
    root, _ = photos
    out = root.parent / "out"
    summary = prepare_dataset(root, out, progress=False)
    return summary, out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def copy_out(out: Path, name: str) -> Path:
    """A copy of a prepared folder beside it (the same relative paths to the photos, its state reusable)."""
    target = out.parent / name
    shutil.copytree(out, target)
    return target


# -- the training set -----------------------------------------------------------------------------------------------


def test_every_record_carries_the_schema(prepared, photos):
    summary, out = prepared
    root, _ = photos
    records = lines(out / METADATA_FILE)
    kept = sorted(name for name, reason in EXPECTED.items() if reason is None)
    assert sorted(Path(r["attributes"]["source"]).relative_to(root).as_posix() for r in records) == kept
    assert summary.kept == 3 and summary.identities == {"obama": 3}

    own = {"image", "width", "height", "caption", "identity", "faces", "references", "mask", "head_mask"}
    own |= {"crops", "reference_crops", "embeddings", "attributes"}
    foreign = {"path", "size", "ref", "mask_path", "square_bbox", "bbox"}  # open FlashFace, FeedFace
    by_image = {(out / r["image"]).resolve(): r for r in records}
    for record in records:
        assert set(record) == own | foreign
        image = (out / record["image"]).resolve()
        assert image.is_file() and Image.open(image).size == (record["width"], record["height"])
        assert record["identity"] == "obama" and isinstance(record["caption"], str)
        (face,) = record["faces"]
        x1, y1, x2, y2 = face["bbox"]
        assert len(face["landmarks"]) == 5 and isinstance(face["score"], float)
        assert all(x1 <= x <= x2 and y1 <= y <= y2 for x, y in face["landmarks"])
        (left_eye, right_eye, nose, left_mouth, right_mouth) = face["landmarks"]  # ArcFace order
        assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0] and left_eye[1] < nose[1] < left_mouth[1]
        # references: the identity's other photos, never the record itself, each with its own crops listed
        references = [(out / p).resolve() for p in record["references"]]
        assert len(references) == 2 and image not in references
        assert all(by_image[p]["identity"] == record["identity"] for p in references)
        assert list(record["crops"]) == list(CROP_KINDS) and list(record["reference_crops"]) == list(CROP_KINDS)
        for kind, side in CROP_KINDS.items():
            assert Image.open(out / record["crops"][kind]).size == (side, side)
            assert record["reference_crops"][kind] == [by_image[p]["crops"][kind] for p in references]
        for key in ("mask", "head_mask"):
            mask = np.asarray(Image.open(out / record[key]))
            assert mask.shape == (record["height"], record["width"]) and set(np.unique(mask)) == {0, 255}
        face_area = np.asarray(Image.open(out / record["mask"])) > 0
        head_area = np.asarray(Image.open(out / record["head_mask"])) > 0
        assert head_area[face_area].all() and head_area.sum() > face_area.sum()
        assert record["embeddings"] == {}  # no recognizer asked for
        assert record["attributes"]["blur"] >= DEFAULT_BLUR and record["attributes"]["faces_found"] == 1
        # the foreign keys are copies of the own ones
        assert record["path"] == record["image"] and record["size"] == [record["width"], record["height"]]
        assert record["ref"] == record["reference_crops"]["open-flashface"]
        assert record["mask_path"] == record["head_mask"] and record["bbox"] == face["bbox"]
        sx1, sy1, sx2, sy2 = record["square_bbox"]
        assert sx2 - sx1 == sy2 - sy1 == int(1.1 * max(int(x2) - int(x1), int(y2) - int(y1)))

    by_name = {Path(r["attributes"]["source"]).name: r for r in records}
    assert by_name["obama.jpg"]["caption"] == "a photo of a man in a suit"  # the sidecar
    assert by_name["obama.jpg"]["attributes"]["caption_source"] == "sidecar"
    assert by_name["obama_partial_face.jpg"]["caption"] == ""
    # photos are referenced where they are, except those other readers would decode differently (RGBA here)
    assert by_name["obama.jpg"]["image"] == "../photos/obama/obama.jpg"
    copy = out / by_name["obama_rgba.png"]["image"]
    assert copy.parent.parent.name == "images" and Image.open(copy).mode == "RGB"
    assert check_dataset(out / METADATA_FILE)


def test_readers_take_the_output_as_it_is(prepared):
    _, out = prepared
    records = read_records([out / METADATA_FILE])
    assert len(records) == 3
    record = records[0]
    assert record.identity == "obama" and len(record.faces[0].landmarks) == 5
    assert set(record.crops) == set(CROP_KINDS) and all(p.is_file() for p in record.crops.values())
    assert all(len(crops) == len(record.references) == 2 for crops in record.reference_crops.values())
    assert record.mask.is_file() and record.head_mask.is_file()
    # what open FlashFace's train.py and FeedFace's PeopleDataset read, resolved from the output folder
    line = lines(out / METADATA_FILE)[0]
    image = Image.open(out / line["path"])
    assert list(image.size) == line["size"] and all((out / p).is_file() for p in line["ref"])
    detect = image.convert("RGB").crop(line["square_bbox"])
    assert detect.size[0] == detect.size[1] and Image.open(out / line["mask_path"]).size == image.size
    # and idfusion's image dataset loads it
    from idfusion.training.data import ImageCaptionDataset

    pixels, _ = ImageCaptionDataset(records, 64).load(0, 0)
    assert pixels.shape == (64, 64, 3)


def test_filters_skip_and_list_every_photo_with_its_reason(prepared, photos):
    summary, out = prepared
    root, _ = photos
    skipped = lines(out / "skipped.jsonl")
    listed = {Path(s["input"]).relative_to(root).as_posix(): s["reason"] for s in skipped}
    assert listed == {name: reason for name, reason in EXPECTED.items() if reason is not None}
    assert summary.skipped == {
        "blurry": 1,
        "face-too-small": 1,
        "several-faces": 1,
        "too-few-photos": 1,
        "unreadable": 3,
    }
    assert summary.inputs == 10 and summary.processed == 10 and summary.reused == 0 and summary.ignored == 1
    by_reason = {s["reason"]: s for s in skipped}
    assert by_reason["several-faces"]["faces"] == 6
    assert by_reason["blurry"]["blur"] < DEFAULT_BLUR
    assert by_reason["face-too-small"]["face_size"] < 64
    assert all(s["message"] for s in skipped)
    text = summary.format()
    for expected in ("kept 3 photo(s) of 1 identity", "unreadable      3", "min face size 64 px", "blur >= 100"):
        assert expected in text
    assert "min photos 2" in text and "exactly one" in text
    assert json.loads((out / "summary.json").read_text())["skipped"] == summary.skipped


def test_min_photos_drops_or_keeps_an_identity_without_reprocessing(prepared):
    _, out = prepared
    copy = copy_out(out, "out-min-photos")
    summary = prepare_dataset(copy.parent / "photos", copy, min_photos=1, progress=False)
    assert summary.processed == 0 and summary.identities == {"obama": 3, "tom_hanks": 1}
    (hanks,) = [r for r in lines(copy / METADATA_FILE) if r["identity"] == "tom_hanks"]
    assert hanks["references"] == [] and hanks["ref"] == [] and hanks["reference_crops"]["arcface"] == []
    summary = prepare_dataset(copy.parent / "photos", copy, min_photos=4, progress=False)
    assert summary.kept == 0 and summary.skipped["too-few-photos"] == 4


def test_keep_largest_takes_the_largest_face_of_a_group(tmp_path, faces_dir):
    (tmp_path / "photos" / "crowd").mkdir(parents=True)
    shutil.copy(faces_dir / "group_six_faces.jpg", tmp_path / "photos" / "crowd" / "group.jpg")
    summary = prepare_dataset(tmp_path / "photos", tmp_path / "out", keep_largest=True, min_photos=1, progress=False)
    (record,) = lines(summary.metadata)
    assert record["attributes"]["faces_found"] == 6
    x1, y1, x2, y2 = record["faces"][0]["bbox"]
    assert round(x2 - x1) == 125  # the largest of the six (87-125 px)


def test_no_face_bad_landmarks_and_unexpected_errors_are_listed_and_the_run_goes_on(tmp_path, monkeypatch):
    from idfusion.errors import NoFaceError
    from idfusion.faces import Face
    from idfusion.training import prepare

    class Stub:  # the photo's width says what the "detector" does
        def analyze(self, pixels, name):
            width = pixels.shape[1]
            if width == 100:
                raise NoFaceError(name, "no face found by the stub detector")
            if width == 102:
                raise RuntimeError("boom")
            box = np.array([10, 10, 90, 90], np.float32)
            inside = np.array([[35, 40], [65, 40], [50, 55], [38, 70], [62, 70]], np.float32)
            landmarks = inside if width == 103 else inside + [0, 45]  # 101: the mouth falls below the box
            return [Face(bbox=box, det_score=0.9, landmarks=landmarks, detector="stub")]

    monkeypatch.setattr(prepare, "_analyzer", lambda settings: Stub())
    rng = np.random.default_rng(0)
    (tmp_path / "photos" / "p").mkdir(parents=True)
    for width in (100, 101, 102, 103, 103):
        name = f"{width}-{len(list((tmp_path / 'photos' / 'p').iterdir()))}.png"
        Image.fromarray(rng.integers(0, 256, (100, width, 3), dtype=np.uint8)).save(tmp_path / "photos" / "p" / name)
    summary = prepare_dataset(tmp_path / "photos", tmp_path / "out", progress=False)
    assert summary.skipped == {"bad-landmarks": 1, "error": 1, "no-face": 1} and summary.kept == 2
    messages = {s["reason"]: s["message"] for s in lines(tmp_path / "out" / "skipped.jsonl")}
    assert messages["error"] == "RuntimeError: boom" and "outside the face box" in messages["bad-landmarks"]
    assert check_dataset(summary.metadata)


# -- resuming, workers, inputs --------------------------------------------------------------------------------------


def test_a_rerun_reuses_everything_and_writes_the_same_files(prepared):
    _, out = prepared
    copy = copy_out(out, "out-rerun")
    summary = prepare_dataset(copy.parent / "photos", copy, progress=False)
    assert summary.processed == 0 and summary.reused == 10
    for name in (METADATA_FILE, "skipped.jsonl"):
        assert (copy / name).read_bytes() == (out / name).read_bytes()
    # an output file gone: that photo (only) is processed again
    record = lines(copy / METADATA_FILE)[0]
    (copy / record["crops"]["fact"]).unlink()
    summary = prepare_dataset(copy.parent / "photos", copy, progress=False)
    assert summary.processed == 1 and (copy / record["crops"]["fact"]).is_file()
    assert (copy / METADATA_FILE).read_bytes() == (out / METADATA_FILE).read_bytes()


def test_adding_a_photo_processes_only_it(tmp_path, faces_dir):
    root = tmp_path / "photos"
    (root / "obama").mkdir(parents=True)
    for name in ("obama.jpg", "obama_rgba.png"):
        shutil.copy(faces_dir / name, root / "obama" / name)
    out = tmp_path / "out"
    assert prepare_dataset(root, out, progress=False).processed == 2
    shutil.copy(faces_dir / "obama_partial_face.jpg", root / "obama" / "partial.jpg")
    summary = prepare_dataset(root, out, progress=False)
    assert summary.processed == 1 and summary.reused == 2 and summary.kept == 3
    assert all(len(r["references"]) == 2 for r in lines(out / METADATA_FILE))
    # a changed photo (new size and time) is processed again
    (root / "obama" / "partial.jpg").write_bytes((faces_dir / "tom_hanks_aligned_112.png").read_bytes())
    summary = prepare_dataset(root, out, progress=False)
    assert summary.processed == 1 and summary.reused == 2


def test_two_workers_write_what_one_writes(prepared, photos):
    summary, out = prepared
    root, _ = photos
    second = root.parent / "out-workers"
    parallel = prepare_dataset(root, second, workers=2, progress=False)
    assert parallel.processed == 10 and parallel.skipped == summary.skipped
    for name in (METADATA_FILE, "skipped.jsonl"):
        assert (second / name).read_bytes() == (out / name).read_bytes()


# -- identities, lists, captions ------------------------------------------------------------------------------------


def test_identity_rules_for_flat_folders_and_list_files(tmp_path, faces_dir):
    assert [identity_from_stem(s) for s in ("alice_01", "alice-2", "alice 3", "tom_hanks_112", "1234", "bob")] == [
        "alice",
        "alice",
        "alice",
        "tom_hanks",
        "1234",
        "bob",
    ]
    flat = tmp_path / "flat"
    flat.mkdir()
    hanks = faces_dir / "tom_hanks_aligned_112.png"
    pixels = np.asarray(Image.open(hanks))
    Image.fromarray(pixels).save(flat / "hanks_1.png")
    Image.fromarray(pixels[:, ::-1]).save(flat / "hanks_2.png")
    Image.fromarray(pixels).save(flat / "mystery.png")
    (flat / "mystery.json").write_text(json.dumps({"identity": "hanks"}), encoding="utf-8")
    summary = prepare_dataset(flat, tmp_path / "out-flat", progress=False)
    assert summary.identities == {"hanks": 3} and summary.ignored == 0  # the .json is a sidecar, not ignored

    listing = tmp_path / "photos.txt"
    listing.write_text(
        "# photos of one person\n"
        "flat/hanks_1.png\tTom Hanks\n"
        "\n"
        "flat/hanks_2.png\tTom Hanks\n"
        "flat/hanks_2.png\tTom Hanks\n"
        "flat/mystery.png\n"
        "flat/missing.png\tTom Hanks\n",
        encoding="utf-8",
    )
    summary = prepare_dataset(None, tmp_path / "out-list", list_file=listing, min_score=0.5, progress=False)
    assert summary.identities == {"Tom Hanks": 2}
    assert summary.skipped == {"duplicate": 1, "too-few-photos": 1, "unreadable": 1}
    # a list file as INPUT works the same, and a score threshold above every face skips them all
    summary = prepare_dataset(listing, tmp_path / "out-list2", min_score=5.0, progress=False)
    assert summary.kept == 0 and summary.skipped["low-score"] == 3


def test_captions_from_a_model_fill_only_what_sidecars_leave(prepared, monkeypatch, capsys):
    from idfusion.cli.main import main
    from idfusion.training import prepare

    _, out = prepared
    copy = copy_out(out, "out-captions")
    seen = []

    def fake_captioner(name):
        assert name == "fake/captioner"

        def caption(image):
            seen.append(image.size)
            return "  a man   speaking "

        return caption

    monkeypatch.setattr(prepare, "load_captioner", fake_captioner)
    argv = ["prepare", str(copy.parent / "photos"), "--out", str(copy), "--caption-model", "fake/captioner"]
    assert main(argv) == 0
    assert "kept 3 photo(s)" in capsys.readouterr().out
    captions = {Path(r["attributes"]["source"]).name: r["caption"] for r in lines(copy / METADATA_FILE)}
    assert captions == {
        "obama.jpg": "a photo of a man in a suit",
        "obama_partial_face.jpg": "a man speaking",
        "obama_rgba.png": "a man speaking",
    }
    assert len(seen) == 2
    assert main(argv) == 0 and len(seen) == 2  # stored: not captioned again


def test_a_caption_model_that_cannot_load_is_one_error_line_before_any_work(photos, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from idfusion.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, _ = photos
    model = tmp_path / "not-a-model"  # a local folder without a model: fails the same way offline, without waiting
    model.mkdir()
    out = tmp_path / "out"
    code = main(["prepare", str(root), "--out", str(out), "--caption-model", str(model)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"idfusion prepare: error: cannot load the caption model '{model}'")
    assert not (out / "state").exists()  # nothing was analysed


# -- bad input ----------------------------------------------------------------------------------------------------


def test_bad_input_is_one_clear_error_line(photos, tmp_path, capsys):
    from idfusion.cli.main import main

    root, _ = photos
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    cases = [
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "o1")], "input folder not found"),
        ([str(tmp_path / "empty"), "--out", str(tmp_path / "o2")], "has no photos"),
        ([str(root), "--out", str(tmp_path / "a-file" / "out")], "cannot create the output folder"),
        ([str(root), "--out", str(root / "out")], "must not be inside the input folder"),
        (["--out", str(tmp_path / "o3")], "give an input folder"),
        (["--list", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o4")], "list file not found"),
        (
            [str(root), "--out", str(tmp_path / "o6"), "--detector", "onnx", "--model-dir", str(tmp_path / "none")],
            "face model folder not found",
        ),
    ]
    for argv, message in cases:
        assert main(["prepare", *argv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("idfusion prepare: error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(PrepareError, match="workers must be at least 1"):
        prepare_dataset(root, tmp_path / "o5", workers=0)


def test_combined_records_must_agree_with_themselves(tmp_path, faces_dir):
    shutil.copy(faces_dir / "tom_hanks_aligned_112.png", tmp_path / "a.png")
    good = {"image": "a.png", "width": 112, "height": 112, "caption": "", "path": "a.png", "size": [112, 112]}
    cases = [
        (dict(good, path="b.png"), "path: file not found"),
        (dict(good, size=[112, 100]), "size: expected [width, height] = [112, 112]"),
        (dict(good, square_bbox=[5, 5, 1, 1]), "square_bbox: expected x2 > x1"),
        ({k: v for k, v in good.items() if k not in ("path", "size")} | {"bbox": [0, 0, 1, 1]}, "bbox: unknown field"),
    ]
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert read_jsonl(tmp_path / "ok.jsonl")[0].width == 112
    for record, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(record) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_jsonl(path)


# -- the world, the methods' crops ----------------------------------------------------------------------------------


def test_world_datasets_pass_the_same_schema_check(tmp_path):
    from idfusion.world import dataset, write_dataset

    assert dataset.METADATA_FILE == METADATA_FILE
    metadata = write_dataset(tmp_path, range(3), 3, scenes=2, progress=False)
    records = check_dataset(metadata)
    assert len(records) == 11 and all(r.mask is not None for r in records)


def test_the_crops_are_the_methods_own(faces_dir, dlib_analyzer):
    """The crops are re-implemented without torch; they must stay what the methods compute."""
    from idfusion.faces import align_face
    from idfusion.faces.masks import head_mask
    from idfusion.images import load_image
    from idfusion.methods import fact, feedface
    from idfusion.pipelines.pipeline_flashface import reference_crop
    from idfusion.training import prepare

    for name in ("obama_partial_face.jpg", "tom_hanks_aligned_112.png"):
        pixels = load_image(faces_dir / name).array
        face = dlib_analyzer.get(pixels)
        head = head_mask(face, pixels.shape[:2])
        crops = prepare._face_crops(pixels, face, head, CROP_KINDS)
        np.testing.assert_array_equal(crops["flashface"], np.asarray(reference_crop(pixels, face, 224)))
        np.testing.assert_array_equal(crops["feedface"], feedface.face_crop(pixels, face.bbox))
        np.testing.assert_array_equal(crops["fact"], fact.face_crop(pixels, face.landmarks, head))
        np.testing.assert_array_equal(crops["arcface"], face.crops["arcface"])
        np.testing.assert_array_equal(crops["open-flashface"], align_face(pixels, face.landmarks, size=256))


def test_inputs_are_never_changed(prepared, photos):
    """Last in the file: every run above read these photos."""
    root, before = photos
    assert tree_hash(root) == before
