"""Which crops a cascade runs: the pure rules, by tables."""

from __future__ import annotations

import math

import pytest

from agent.cascade_rules import CascadeRules, Crop, crop_box, plan_crops
from agent.runtime.adapters import Detection

W, H = 640, 480


def det(label: str, score: float, box: tuple[float, float, float, float]) -> Detection:
    return Detection(0, label, score, box)


PERSON = det("person", 0.9, (100, 100, 200, 300))  # 100 x 200
CAR = det("car", 0.8, (300, 200, 500, 300))  # 200 x 100
DOG = det("dog", 0.6, (10, 10, 60, 40))  # 50 x 30
TINY = det("person", 0.95, (400, 400, 410, 412))  # 10 x 12
EDGE = det("person", 0.7, (600, 0, 640, 100))  # touches the right and top edges


@pytest.mark.parametrize(
    ("box", "padding", "expected"),
    [
        ((100, 100, 200, 300), 0.0, (100, 100, 200, 300)),
        ((100, 100, 200, 300), 0.1, (90, 80, 210, 320)),  # 10 % of 100 and of 200 each side
        ((100.4, 100.6, 199.2, 299.9), 0.0, (100, 100, 200, 300)),  # outwards to whole pixels
        ((600, 0, 640, 100), 0.5, (580, 0, 640, 150)),  # clipped to the frame
        ((-50, -50, 700, 900), 0.0, (0, 0, 640, 480)),
        ((700, 500, 800, 600), 0.0, (640, 480, 640, 480)),  # outside: empty
        ((math.nan, 0, 10, 10), 0.0, None),
        ((0, 0, math.inf, 10), 0.0, None),
    ],
)
def test_crop_box_pads_clips_and_rounds_outwards(
    box: tuple[float, float, float, float],
    padding: float,
    expected: tuple[int, int, int, int] | None,
) -> None:
    assert crop_box(box, W, H, padding) == expected


@pytest.mark.parametrize(
    ("detections", "rules", "indices", "over_limit", "too_small"),
    [
        # every label, best first, the tiny one skipped by min_size
        ([DOG, PERSON, CAR, TINY], CascadeRules(), [1, 2, 0], 0, 1),
        # label filter
        ([DOG, PERSON, CAR], CascadeRules(labels=frozenset({"person", "dog"})), [1, 0], 0, 0),
        ([DOG, CAR], CascadeRules(labels=frozenset({"person"})), [], 0, 0),
        # min_score
        ([DOG, PERSON, CAR], CascadeRules(min_score=0.7), [1, 2], 0, 0),
        ([DOG, PERSON, CAR], CascadeRules(min_score=0.95), [], 0, 0),
        # max_crops: the best scores, the rest counted
        ([DOG, PERSON, CAR, EDGE], CascadeRules(max_crops=2), [1, 2], 2, 0),
        ([DOG, PERSON, CAR, EDGE], CascadeRules(max_crops=1), [1], 3, 0),
        # min_size counts before the limit: a tiny box takes no place
        ([TINY, DOG], CascadeRules(max_crops=1), [1], 0, 1),
        # min_size on either side: the dog is 50 x 30
        ([DOG], CascadeRules(min_size=31), [], 0, 1),
        ([DOG], CascadeRules(min_size=30), [0], 0, 0),
        # padding makes a small box big enough: 10 x 12 grows to 20 x 24
        ([TINY], CascadeRules(padding=0.5, min_size=20), [0], 0, 0),
        # a NaN score or box is never cropped
        ([det("person", math.nan, (0, 0, 50, 50)), PERSON], CascadeRules(), [1], 0, 0),
        ([det("person", 0.9, (0, 0, math.nan, 50))], CascadeRules(), [], 0, 0),
        # ties keep the detections' order
        (
            [det("a", 0.5, (0, 0, 50, 50)), det("b", 0.5, (50, 50, 99, 99))],
            CascadeRules(),
            [0, 1],
            0,
            0,
        ),
        ([], CascadeRules(), [], 0, 0),
    ],
)
def test_plan_crops(
    detections: list[Detection],
    rules: CascadeRules,
    indices: list[int],
    over_limit: int,
    too_small: int,
) -> None:
    plan = plan_crops(W, H, detections, rules)
    assert [crop.index for crop in plan.crops] == indices
    assert (plan.over_limit, plan.too_small) == (over_limit, too_small)


def test_a_planned_crop_is_the_padded_clipped_box() -> None:
    plan = plan_crops(W, H, [EDGE], CascadeRules(padding=0.25))
    assert plan.crops == (Crop(0, 590, 0, 640, 125),)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_crops": 0}, "max_crops is 0: it must be 1..32"),
        ({"max_crops": 33}, "max_crops is 33: it must be 1..32"),
        ({"min_score": 1.5}, "min_score is 1.5: it must be 0..1"),
        ({"padding": -0.1}, "padding is -0.1: it must be 0..1"),
        ({"min_size": 0}, "min_size is 0: it must be at least 1 pixel"),
    ],
)
def test_rules_out_of_range_are_refused_with_the_fix(
    values: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        CascadeRules(**values)  # type: ignore[arg-type]


def test_labels_given_as_a_list_become_a_frozenset() -> None:
    rules = CascadeRules(labels=["person"])  # type: ignore[arg-type]
    assert rules.labels == frozenset({"person"})
    hash(rules)  # frozen and hashable
