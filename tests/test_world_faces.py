"""The shipped world face models: detector, conditioning recognizer, judge, and their FaceAnalyzer backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idfusion.errors import NoFaceError
from idfusion.faces import FaceAnalyzer
from idfusion.world import HELDOUT_IDENTITIES, WorldDetector, WorldRecognizer, render, render_scene, weights_dir
from idfusion.world.evaluate import evaluate_recognizers, faceless_images, match_detections
from idfusion.world.train_faces import measure


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((weights_dir() / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def detector() -> WorldDetector:
    return WorldDetector()


@pytest.fixture(scope="module")
def recognizers() -> dict[str, WorldRecognizer]:
    return {"world": WorldRecognizer("world"), "world-judge": WorldRecognizer("world-judge")}


@pytest.fixture(scope="module")
def verification(recognizers) -> dict:
    # 600 held-out pairs, both recognizers on the same renders, thresholds as shipped (chosen on training identities).
    thresholds = {name: r.threshold for name, r in recognizers.items()}
    return evaluate_recognizers(recognizers, 600, seed=0, thresholds=thresholds)


def test_detector_finds_no_face_in_plain_images_or_noise(detector):
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 255
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert detector.detect(blue) == []
    assert detector.detect(noise) == []
    assert sum(len(d) for d in detector.detect_batch(faceless_images(100, seed=5))) == 0
    # FaceAnalyzer also retries with a black border; still nothing.
    with pytest.raises(NoFaceError):
        FaceAnalyzer("world", None).analyze(blue)


def test_detector_finds_every_face_in_scenes(detector):
    ids = np.asarray(HELDOUT_IDENTITIES)
    rng = np.random.default_rng(1)
    scenes = [
        render_scene(
            [int(i) for i in rng.choice(ids, 2 + k % 2, replace=False)], 7_000 + k, size=64 + 64 * (k % 3 == 0)
        )
        for k in range(30)
    ]
    for result, found in zip(scenes, detector.detect_batch([s.image for s in scenes]), strict=True):
        assert len(found) == len(result.faces)
        assert len(match_detections(result.faces, found)) == len(result.faces)
    assert len(detector.detect(scenes[1].image)) == 3


def test_detector_landmarks_are_close_to_the_truth(detector):
    results = [render(int(HELDOUT_IDENTITIES[k]), 100 + k) for k in range(40)]
    errors = []
    for result, found in zip(results, detector.detect_batch([r.image for r in results]), strict=True):
        (face,) = found
        truth = result.faces[0]
        iod = np.linalg.norm(truth.landmarks[0] - truth.landmarks[1])
        errors.append(np.linalg.norm(face.landmarks - truth.landmarks, axis=1).mean() / iod)
        assert face.dense_landmarks.shape == (68, 2)
    # Observed: 0.11 of the inter-ocular distance over 600 held-out renders (eyes ~0.5 px, mouth corners ~1 px
    # at 64x64: the corners' tips are thinner than a pixel).
    assert np.mean(errors) < 0.15


def test_face_analyzer_world_backend_returns_512d_embeddings():
    result = render(int(HELDOUT_IDENTITIES[3]), 5)
    analyzer = FaceAnalyzer("world", "world", dense_landmarks=True)
    assert analyzer.min_face_size == 8  # read from the detector: world faces are smaller than 32 px
    face = analyzer.get(result.image)
    assert face.embedding.shape == (512,) and face.embedding_model == "world-arcface"
    assert face.detector == "world-detector" and face.dense_landmarks.shape == (68, 2)
    assert np.abs(face.landmarks - result.faces[0].landmarks).mean() < 1.5
    assert face.crops["arcface"].shape == (112, 112, 3)
    # Same identity, another image: the embedding agrees with the recognizer's own threshold.
    other = analyzer.get(render(int(HELDOUT_IDENTITIES[3]), 6).image)
    assert float(face.normed_embedding @ other.normed_embedding) > analyzer.recognizer.threshold
    scene = render_scene([int(i) for i in HELDOUT_IDENTITIES[10:13]], 3)
    faces = analyzer.analyze(scene.image)
    assert len(faces) == 3 and all(f.embedding.shape == (512,) for f in faces)
    # Other backends keep their minimum face size.
    assert FaceAnalyzer("hog", None).min_face_size == 32
    assert FaceAnalyzer("world", None, min_face_size=20).min_face_size == 20


def test_judge_is_a_different_embedding_space(recognizers):
    results = [render(int(HELDOUT_IDENTITIES[k]), k) for k in range(40)]
    crops = {
        name: np.stack([r.preprocess(x.image, x.faces[0].landmarks) for x in results])
        for name, r in recognizers.items()
    }
    assert crops["world"].shape[1:] != crops["world-judge"].shape[1:]  # different input crops
    embeddings = {name: r.embed_crops(crops[name]) for name, r in recognizers.items()}
    normed = {name: e / np.linalg.norm(e, axis=1, keepdims=True) for name, e in embeddings.items()}
    # The same face's two embeddings are unrelated (independent 512-d spaces give |cos| around 0.04)...
    assert np.abs(np.sum(normed["world"] * normed["world-judge"], axis=1)).mean() < 0.15
    # ...though both spaces tell these 40 identities apart.
    for n in normed.values():
        sims = n @ n.T
        assert sims[np.triu_indices(40, 1)].mean() < 0.2
    assert recognizers["world"].name != recognizers["world-judge"].name
    assert recognizers["world"]._net.config != recognizers["world-judge"]._net.config


def test_verification_accuracy_on_heldout_pairs(verification):
    # Observed on these 600 pairs with the shipped weights: world 0.993, world-judge 0.992 (on 6,000 pairs:
    # 0.9945 and 0.9913, see the manifest). The bar leaves room for float differences, not for a broken model.
    assert verification["world"]["accuracy"] >= 0.97
    assert verification["world-judge"]["accuracy"] >= 0.97
    for result in verification.values():
        assert result["same_mean"] > result["different_mean"] + 0.3


def test_shipped_recognizers_reproduce_their_recorded_metrics(manifest, verification):
    for name, file in (("world", "recognizer.safetensors"), ("world-judge", "judge.safetensors")):
        recorded = manifest["files"][file]["check"]
        assert verification[name]["accuracy"] == pytest.approx(recorded["accuracy"], abs=0.01)
        assert verification[name]["same_mean"] == pytest.approx(recorded["same_mean"], abs=0.01)


def test_shipped_detector_reproduces_its_recorded_metrics(manifest):
    recorded = manifest["files"]["detector.safetensors"]["check"]
    measured = measure("detector", weights_dir(), full=False)
    assert measured["faceless_false_positives"] == recorded["faceless_false_positives"] == 0
    for key, value in recorded.items():
        tolerance = 0.01 if key.endswith(("recall", "precision")) else 0.005 if "nme" in key else 0.05
        assert measured[key] == pytest.approx(value, abs=tolerance), key


def test_weights_are_small_and_match_the_manifest(manifest):
    import hashlib

    for file, entry in manifest["files"].items():
        if file.startswith("base/"):
            continue  # the base model's files: test_world_base.py
        path = weights_dir() / file
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"] and "seed" in entry
        if file.startswith("methods/"):
            # a method's world weights: UNet and ReferenceNet ~8.6 MB each; Arc2Face's UNet 10.7 MB (its cross-attention
            # reads a 512-wide ID encoder)
            assert path.stat().st_size < 11_000_000
            assert entry["command"].startswith("python -m idfusion.world.train_method")
        else:
            assert path.stat().st_size < 4_000_000
            assert entry["command"].startswith("python -m idfusion.world.train_faces")
