"""The evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from idfusion.eval.metrics import (
    angle,
    attribute_fidelity,
    clip_score,
    copy_geo,
    cosine,
    diversity,
    match_faces,
    paste_scores,
)


def _unit(degrees: float) -> np.ndarray:
    """A 2-d unit vector at ``degrees`` from the x axis (angles between them are exact by construction)."""
    r = math.radians(degrees)
    return np.array([math.cos(r), math.sin(r)])


def test_cosine_and_angle_normalise_and_broadcast():
    a = np.array([[3.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(cosine(a, [1.0, 1.0]), [[1 / math.sqrt(2)], [1 / math.sqrt(2)]])
    np.testing.assert_allclose(angle(_unit(0), _unit(60)), [[math.radians(60)]])
    with pytest.raises(ValueError, match="non-zero"):
        cosine([0.0, 0.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        cosine(np.zeros((2, 2, 2)), [1.0, 0.0])


def test_flashface_paste_is_simref_minus_simtarget():
    generated = _unit(10)
    references = np.stack([_unit(0), _unit(90)])  # closest reference: 10 degrees away
    targets = np.stack([_unit(40), _unit(70)])  # 30 and 60 degrees away
    scores = paste_scores(generated, references, targets)
    assert scores.sim_ref == pytest.approx(math.cos(math.radians(10)))
    assert scores.sim_target == pytest.approx((math.cos(math.radians(30)) + math.cos(math.radians(60))) / 2)
    assert scores.paste == pytest.approx(scores.sim_ref - scores.sim_target)


@pytest.mark.parametrize(
    ("generated", "expected"),
    [(0.0, 1.0), (90.0, -1.0), (45.0, 0.0), (30.0, (60 - 30) / 90), (120.0, (30 - 120) / 90)],
)
def test_copy_geo_on_the_triangle(generated, expected):
    # reference at 0 degrees, ground truth at 90: on the reference 1, on the ground truth -1, half-way 0
    assert copy_geo(_unit(generated), _unit(90), _unit(0)) == pytest.approx(expected)


def test_copy_geo_refuses_a_reference_equal_to_the_ground_truth():
    with pytest.raises(ValueError, match="undefined"):
        copy_geo(_unit(5), _unit(0), _unit(0))


def test_hungarian_matching_beats_greedy():
    wanted = np.stack([_unit(0), _unit(90)])
    generated = np.stack([_unit(25), _unit(0)])
    # greedy from generated 0 takes wanted 0 (cos 25 = 0.906) and leaves generated 1 with wanted 1 (cos 90 = 0):
    # 0.906 in all; the optimum pairs 0-1 and 1-0: sin 25 + 1 = 1.423
    assert match_faces(generated, wanted) == [(0, 1), (1, 0)]
    assert match_faces(generated[:1], wanted) == [(0, 0)]  # fewer generated faces: the rest stay unmatched


def test_diversity_is_the_mean_pairwise_cosine_distance():
    faces = np.stack([_unit(0), _unit(60), _unit(90)])
    expected = np.mean([1 - math.cos(math.radians(d)) for d in (60, 90, 30)])
    assert diversity(faces) == pytest.approx(expected)
    assert diversity(np.stack([_unit(7)] * 3)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="two"):
        diversity(_unit(0))


def test_attribute_fidelity_counts_the_wanted_attributes_shown():
    wanted = {"background": "red", "hat": "none", "glasses": "sunglasses", "people": 1}
    seen = {"background": "red", "hat": "blue", "glasses": "sunglasses", "people": 1, "clothing": "green"}
    assert attribute_fidelity(wanted, seen) == pytest.approx(3 / 4)  # clothing was not asked for
    assert attribute_fidelity(wanted, {"background": "red"}) == pytest.approx(1 / 4)  # no face: person fields wrong
    with pytest.raises(ValueError, match="at least one"):
        attribute_fidelity({}, seen)


def test_clip_score_is_100_times_the_clipped_cosine_per_row():
    images = np.stack([_unit(0), _unit(0), 3 * _unit(10)])
    texts = np.stack([_unit(60), _unit(120), _unit(10)])
    # cos 60 = 0.5; cos 120 < 0 clips to 0; lengths do not matter
    np.testing.assert_allclose(clip_score(images, texts), [50.0, 0.0, 100.0], atol=1e-9)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, texts[:2])
