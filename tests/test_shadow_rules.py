"""Pure rules of shadow runs (agent/shadow/): agreement, sampling, the CPU bound,
promotion, output statistics, the instruction's parsing. Tables, no I/O."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from agent.desired import sign_desired
from agent.frames import Item, Result
from agent.runtime.adapters import Detection, Output
from agent.shadow.agreement import (
    Agreement,
    CpuBudget,
    iou,
    match_boxes,
    metric_of,
    sampled,
    should_promote,
)
from agent.shadow.instruction import Promote, parse_shadow, winner
from agent.shadow.outputs import OutputStats, bin_of
from agent.verify import KeyRing, generate_keypair, load_private_key


def cls(*labels: str) -> Output:
    return Output(
        "classification", classes=[(i, lab, 0.9 - 0.1 * i) for i, lab in enumerate(labels)]
    )


def det(*boxes: tuple[str, tuple[float, float, float, float]]) -> Output:
    return Output("detection", detections=[Detection(0, lab, 0.8, box) for lab, box in boxes])


A = (0.0, 0.0, 10.0, 10.0)
A_SHIFTED = (1.0, 0.0, 11.0, 10.0)  # IoU 9/11 with A
A_FAR = (6.0, 0.0, 16.0, 10.0)  # IoU 4/16 with A


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(A, A, 1.0), (A, A_SHIFTED, 90 / 110), (A, A_FAR, 40 / 160), (A, (20, 20, 30, 30), 0.0)],
)
def test_iou(a: Any, b: Any, expected: float) -> None:
    assert iou(a, b) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("active", "candidate", "expected"),
    [
        ([("person", A)], [("person", A_SHIFTED)], (1, 0, 0)),
        ([("person", A)], [("car", A)], (0, 1, 1)),  # same box, other label
        ([("person", A)], [("person", A_FAR)], (0, 1, 1)),  # IoU below 0.5
        ([("person", A)], [], (0, 0, 1)),
        ([], [("person", A)], (0, 1, 0)),
        ([("person", A)], [("person", A), ("person", A_SHIFTED)], (1, 1, 0)),  # matched once
    ],
)
def test_match_boxes(active: Any, candidate: Any, expected: tuple[int, int, int]) -> None:
    assert match_boxes(det(*active).detections, det(*candidate).detections) == expected


@pytest.mark.parametrize(
    ("pairs", "metric", "value"),
    [
        ([(cls("red", "blue"), cls("red", "green"))] * 3, "top1", 1.0),
        ([(cls("red"), cls("red")), (cls("red"), cls("blue"))], "top1", 0.5),
        ([(cls("red"), cls("blue"))] * 4, "top1", 0.0),
        ([(det(("p", A)), det(("p", A_SHIFTED)))], "f1", 1.0),
        ([(det(("p", A)), det(("p", A_FAR)))], "f1", 0.0),
        ([(det(("p", A), ("c", A)), det(("p", A)))], "f1", 2 / 3),
        ([(det(), det())], "f1", 1.0),  # neither found anything: they agree
        (
            [(Output("regression", values=[1.0, 2.0]), Output("regression", values=[1.5, 1.0]))],
            "mean_error",
            0.75,
        ),
        (
            [
                (
                    Output("raw", values=[{"values": [1, 2]}]),
                    Output("raw", values=[{"values": [1, 4]}]),
                )
            ],
            "mean_error",
            1.0,
        ),
    ],
)
def test_agreement(pairs: list[tuple[Output, Output]], metric: str, value: float) -> None:
    agreement = Agreement(metric_of(pairs[0][0].task))
    assert agreement.metric == metric
    assert agreement.value is None
    for active, candidate in pairs:
        agreement.add(active, candidate)
    assert agreement.value == pytest.approx(value)
    assert agreement.doc()["frames"] == len(pairs)


@pytest.mark.parametrize(("pct", "taken"), [(100, 100), (10, 10), (25, 25), (1, 1), (33, 33)])
def test_sampled_is_even_and_exact(pct: int, taken: int) -> None:
    picks = [i for i in range(100) if sampled(i, pct)]
    assert len(picks) == taken
    gaps = {b - a for a, b in itertools.pairwise(picks)}
    assert max(gaps, default=0) - min(gaps, default=0) <= 1  # evenly spread


def test_sampled_ten_percent_takes_every_tenth() -> None:
    assert [i for i in range(40) if sampled(i, 10)] == [9, 19, 29, 39]


def test_cpu_budget_skips_once_the_share_is_spent() -> None:
    budget = CpuBudget(25, window_s=10.0)
    now, decisions = 0.0, []
    for _ in range(100):  # an invoke of 0.05 s offered every 0.1 s: 50 % wanted
        allowed = budget.allows(now)
        decisions.append(allowed)
        if allowed:
            budget.spent(now + 0.05, 0.05)
        now += 0.1
    share = sum(decisions) * 0.05 / 10.0
    assert 0.2 <= share <= 0.3  # held near the bound of 25 %
    assert decisions[0] is True


def test_cpu_budget_forgets_old_spending() -> None:
    budget = CpuBudget(10, window_s=2.0)
    budget.allows(0.0)
    budget.spent(0.5, 0.5)  # 25 % of the window at once
    assert not budget.allows(1.0)
    assert budget.allows(3.0)  # out of the window


@pytest.mark.parametrize(
    ("frames", "errors", "value", "metric", "expected"),
    [
        (500, 0, 0.96, "top1", True),
        (499, 0, 0.99, "top1", False),  # too few frames
        (500, 0, 0.94, "top1", False),  # too little agreement
        (500, 100, 0.99, "top1", False),  # too many errors
        (500, 10, 0.99, "top1", True),  # a few errors
        (500, 0, None, "f1", False),
        (500, 0, 0.02, "mean_error", True),  # lower is better: <= 1 - 0.95
        (500, 0, 0.2, "mean_error", False),
    ],
)
def test_should_promote(
    frames: int, errors: int, value: float | None, metric: Any, expected: bool
) -> None:
    got = should_promote(
        frames=frames,
        errors=errors,
        agreement=value,
        metric=metric,
        min_frames=500,
        min_agreement=0.95,
    )
    assert got is expected


@pytest.mark.parametrize(
    ("score", "bin_"), [(0.0, 0), (0.05, 0), (0.1, 1), (0.95, 9), (1.0, 9), (7.0, 9), (-1.0, 0)]
)
def test_bin_of(score: float, bin_: int) -> None:
    assert bin_of(score) == bin_


def _result(version: int, output: Output) -> tuple[Item, Result]:
    item = Item(0, 0.0, 0.0, None, None, None, None)  # type: ignore[arg-type]
    return item, Result(0, 0.0, "m", version, "cpu", 1.0, 1.0, output)


def test_output_stats_per_version_with_previous_kept_across_a_restart(tmp_path: Path) -> None:
    stats = OutputStats("m", tmp_path)
    assert stats.doc() is None
    for output in (cls("red"), cls("red"), cls("blue")):
        stats.observe(*_result(1, output))
    doc = stats.doc()
    assert doc is not None
    assert doc["version"] == 1 and doc["frames"] == 3
    assert doc["classes"] == {"red": 2, "blue": 1}
    assert doc["scores"][9] == 3 and sum(doc["scores"]) == 3  # top score 0.9
    assert doc["previous"] is None
    stats.observe(*_result(2, det(("person", A), ("car", A))))
    doc = stats.doc()
    assert doc is not None
    assert (doc["version"], doc["frames"], doc["classes"]) == (2, 1, {"person": 1, "car": 1})
    assert doc["previous"] is not None and doc["previous"]["frames"] == 3
    again = OutputStats("m", tmp_path).doc()  # written at the swap: a restart keeps it
    assert again is not None and again["previous"] == doc["previous"]


def test_output_stats_ignores_a_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "outputs.json").write_text('{"current": {"version": "x"}, "previous": [1]}')
    assert OutputStats("m", tmp_path).doc() is None


def _figures(**fields: Any) -> dict[str, Any]:
    return {"version": 1, "frames": 3, "scores": [0] * 9 + [3], "classes": {"a": 3}, **fields}


@pytest.mark.parametrize(
    "damage",
    [
        {"frames": -1},
        {"frames": True},
        {"scores": [0] * 9 + [True]},
        {"scores": [0] * 9 + [-3]},
        {"classes": {"a": -3}},
        {"classes": {"a": False}},
        {"classes": {"a": 2.5}},
    ],
)
def test_output_stats_refuse_negative_and_bool_counts_and_start_afresh(
    tmp_path: Path, damage: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A count read back that is negative or a bool is a damaged file: both versions'
    figures are dropped with one warning line, and counting starts afresh."""
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"current": _figures(version=2), "previous": _figures(**damage)}))
    with caplog.at_level("WARNING", logger="agent.shadow.outputs"):
        stats = OutputStats("m", tmp_path)
    assert stats.doc() is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "start afresh" in lines[0] and str(path) in lines[0], lines
    stats.observe(*_result(3, cls("red")))
    doc = stats.doc()
    assert doc is not None and (doc["frames"], doc["previous"]) == (1, None)
    path.write_text(json.dumps({"current": _figures(), "previous": None}))
    good = OutputStats("m", tmp_path).doc()  # the same file undamaged is read back
    assert good is not None and good["frames"] == 3 and good["classes"] == {"a": 3}


# -- the instruction ---------------------------------------------------------------------


def _doc(**fields: Any) -> dict[str, Any]:
    return {"schema": 1, "model": "m", "version": 2, "issued_at": 1000.0, **fields}


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"sample_pct": 0}, "sample_pct: 0 is not a whole percentage 1..100"),
        ({"sample_pct": 101}, "sample_pct"),
        ({"sample_pct": 10.5}, "sample_pct"),
        ({"max_cpu_pct": True}, "max_cpu_pct"),
        ({"promote": 5}, "promote: must be an object"),
        ({"promote": {"min_agreement": 2, "min_frames": 5}}, "promote.min_agreement"),
        ({"promote": {"min_agreement": 0.9, "min_frames": 0}}, "promote.min_frames"),
        ({"model": "other"}, "model: 'other' is not this topic's model"),
        ({"version": 0}, "version"),
        ({"target": "device:else"}, "target"),
        ({"issued_at": 10_000.0}, "issued_at"),  # ahead of the clock
    ],
)
def test_parse_shadow_refuses_with_the_field(fields: dict[str, Any], error: str) -> None:
    payload = json.dumps(_doc(**fields)).encode()
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(".", r"\.")):
        parse_shadow(payload, "device", "dev1", model="m", now=1000.0, max_skew_s=60.0)


def test_parse_shadow_defaults_and_clear() -> None:
    got = parse_shadow(json.dumps(_doc()).encode(), "group:g", "dev1", model="m")
    assert got is not None
    assert (got.sample_pct, got.max_cpu_pct, got.promote, got.source) == (10, 25, None, "group:g")
    full = _doc(sample_pct=100, max_cpu_pct=50, promote={"min_agreement": 0.9, "min_frames": 5})
    got = parse_shadow(json.dumps(full).encode(), "device", "dev1", model="m")
    assert got is not None and got.promote == Promote(0.9, 5) and got.sample_pct == 100
    assert parse_shadow(b"", "device", "dev1", model="m") is None


def test_parse_shadow_signed(tmp_path: Path) -> None:
    key_path, pub = generate_keypair(tmp_path)
    ring = KeyRing.load((pub,), "update.desired_public_key")
    signed = sign_desired(_doc(target="device:dev1", sample_pct=50), load_private_key(key_path))
    got = parse_shadow(json.dumps(signed).encode(), "device", "dev1", model="m", key=ring)
    assert got is not None and got.sample_pct == 50
    tampered = {**signed, "sample_pct": 100}
    with pytest.raises(ValueError, match="signature: bad"):
        parse_shadow(json.dumps(tampered).encode(), "device", "dev1", model="m", key=ring)
    with pytest.raises(ValueError, match="signature: missing"):
        parse_shadow(json.dumps(_doc()).encode(), "device", "dev1", model="m", key=ring)


def test_winner_device_first_then_latest_group() -> None:
    def one(source: str, issued_at: float) -> Any:
        payload = json.dumps(_doc(issued_at=issued_at)).encode()
        return parse_shadow(payload, source, "dev1", model="m")

    groups = {"group:a": one("group:a", 5.0), "group:b": one("group:b", 7.0)}
    assert winner(groups).source == "group:b"  # type: ignore[union-attr]
    assert winner({**groups, "device": one("device", 1.0)}).source == "device"  # type: ignore[union-attr]
    assert winner({}) is None
