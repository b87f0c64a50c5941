"""The shipped attribute checker: prompt-controlled attributes read back from renders, clean and degraded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idfusion.world import HELDOUT_IDENTITIES, AttributeChecker, Attributes, degrade, render, render_scene, weights_dir
from idfusion.world.train_faces import measure


@pytest.fixture(scope="module")
def checker() -> AttributeChecker:
    return AttributeChecker()


@pytest.fixture(scope="module")
def check_metrics() -> dict:
    return measure("attributes", weights_dir(), full=False)


def test_checker_reads_back_the_caption_of_clean_renders(checker):
    results = [render(int(HELDOUT_IDENTITIES[100 + k]), 500 + k) for k in range(40)]
    verdict = checker.check(results[0].image, results[0].caption)
    assert set(verdict) == {"background", "pattern", "hat", "glasses", "clothing", "expression", "people"}
    reports = checker.predict_batch([r.image for r in results])
    hits = [
        getattr(rep.attributes, name) == value
        for r, rep in zip(results, reports, strict=True)
        for name, value in r.attributes.specified().items()
    ]
    assert np.mean(hits) > 0.95
    assert [rep.attributes for rep in checker.predict_batch([results[0].image])] == [
        checker.predict(results[0].image).attributes
    ]


def test_checker_tells_attribute_values_apart(checker):
    base = Attributes("blue", "plain", "none", "none", "white", "neutral", 1)
    for change in (
        {"hat": "red"},
        {"glasses": "sunglasses"},
        {"background": "yellow", "pattern": "checkered"},
        {"clothing": "green"},
        {"expression": "surprised"},
    ):
        wanted = Attributes(**{**base.to_dict(), **change})
        for seed in range(3):
            image = render(int(HELDOUT_IDENTITIES[7]), seed, wanted).image
            report = checker.predict(image)
            for name, value in change.items():
                assert getattr(report.attributes, name) == value, (change, seed)


def test_checker_on_scenes_reports_every_person(checker):
    result = render_scene([int(i) for i in HELDOUT_IDENTITIES[20:23]], 11)
    report = checker.predict(result.image)
    assert report.attributes.people == 3 and len(report.faces) == 3 and len(report.boxes) == 3
    # Given faces (the ground truth here) are used as they are, no detection.
    given = checker.predict(result.image, faces=result.faces[:2])
    assert len(given.faces) == 2 and given.attributes.people == 2


def test_checker_accuracy_clean_and_degraded(check_metrics):
    # Observed with the shipped weights on this check set (150 renders + 30 scenes of held-out identities): clean
    # >= 0.994 for every attribute but expression 0.937; degraded (blur 0.8 px, noise 6, JPEG 50) >= 0.995 but
    # glasses 0.950 and expression 0.688 (0.807 on single faces, 0.437 on 2-3 person scenes). The bars leave a
    # margin for float differences across machines, not for a broken model.
    clean, degraded = check_metrics["clean"]["all"], check_metrics["degraded"]["all"]
    for name in ("background", "pattern", "hat", "glasses", "clothing"):
        assert clean[name] >= 0.97, name
    assert clean["expression"] >= 0.9
    for name in ("background", "pattern", "hat", "clothing"):
        assert degraded[name] >= 0.97, name
    assert degraded["glasses"] >= 0.9
    assert degraded["expression"] >= 0.6
    assert check_metrics["degraded"]["single"]["expression"] >= 0.75


def test_shipped_checker_reproduces_its_recorded_metrics(check_metrics):
    manifest = json.loads((weights_dir() / "MANIFEST.json").read_text())
    recorded = manifest["files"]["attributes.safetensors"]["check"]
    for split in ("clean", "degraded"):
        for group, values in recorded[split].items():
            for name, value in values.items():
                assert check_metrics[split][group][name] == pytest.approx(value, abs=0.01), (split, group, name)


def test_degraded_images_still_read(checker):
    result = render(int(HELDOUT_IDENTITIES[50]), 3)
    verdict = checker.check(degrade(result.image, 0), result.attributes)
    assert sum(verdict.values()) >= len(verdict) - 1
