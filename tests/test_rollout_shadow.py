"""``edge-fleet rollout --shadow`` on real agents (``edge-agent run`` subprocesses, a
real mosquitto, the registry over HTTP, the colour classifier on the real interpreter).

Two devices in one group run v1. A shadow rollout sends each step's devices a shadow
instruction and waits for their runs' verdicts; then, with ``--promote-at``, updates
them as a rollout does; without, hands the run to the group.

- v2, the same model with its labels rotated, disagrees on every frame: the canary's
  run fails the step, the rollout halts, the canary's run stops (its figures stay), the
  other device never hears of it, both serve v1;
- v3 agrees: each step passes, then its devices are updated; all run v3, and no
  per-device desired state or shadow instruction is left;
- v4 agrees, without ``--promote-at``: every member runs it in the shadow, the group's
  instruction is set and the per-device ones cleared, and the runs go on (no device
  starts its run again: the group's document is the same run).
"""

from __future__ import annotations

import time
from typing import Any

from agent import modelgen
from agent.fleet.publish import publish
from agent.fleet.rollout import plan
from tests import test_fleet
from tests.agentproc import MODEL, Tap
from tests.test_fleet import GROUP, Lab

lab = test_fleet.lab  # the fixture: a registry, a deploy key, a broker, agents, a tap

DEVICES = ("dev-a", "dev-b")
SHADOW = ("--shadow", "--sample", "100", "--min-frames", "8", "--timeout", "60")


def _publish(lab: Lab, version: int, model_file: str, labels: list[str]) -> None:
    folder = lab.root / f"labels-{version}"
    folder.mkdir()
    (folder / "labels.txt").write_text("\n".join(labels) + "\n")
    publish(
        [lab.models.path(model_file)],
        model=MODEL,
        version=version,
        registry=lab.registry,
        task="classification",
        labels=folder / "labels.txt",
        selftest_random=2,
    )


def _retained_shadows(lab: Lab) -> dict[str, dict[str, Any]]:
    """The shadow instructions retained on the broker now, by topic."""
    tap = Tap("127.0.0.1", lab.broker.port, ["edge/+/shadow/#", "edge/groups/+/shadow/#"])
    try:
        time.sleep(0.5)
        with tap._lock:
            return {topic: doc for topic, doc, retained in tap.messages if retained}
    finally:
        tap.close()


def _runs(lab: Lab, device: str) -> list[dict[str, Any]]:
    """The device's shadow run reports (state and telemetry) as the tap saw them."""
    docs = lab.tap.docs(f"{device}/state") + lab.tap.docs(f"{device}/telemetry")
    return [d["shadows"][MODEL] for d in docs if MODEL in (d.get("shadows") or {})]


def _started(lab: Lab, device: str, version: int) -> int:
    return sum(
        e.get("event") == "shadow_started" and e.get("version") == version
        for e in lab.tap.docs(f"{device}/events")
    )


def test_shadow_rollouts_halt_on_disagreement_promote_agreement_and_hand_a_run_to_the_group(
    lab: Lab,
) -> None:
    labels = list(modelgen.COLOUR_LABELS)
    lab.publish(1)
    lab.start(DEVICES)
    run = lab.rollout(1, "--timeout", "60")
    assert run.code == 0, run.out + run.err
    canary, other = (d for step in plan(DEVICES, GROUP, 50, 100) for d in step)

    # v2 disagrees: the canary's shadow run fails the step; the other never hears of it.
    _publish(lab, 2, "v2.tflite", labels[1:] + labels[:1])
    run = lab.rollout(2, *SHADOW, "--promote-at", "0.9", "--canary", "50", "--step", "100")
    assert run.code == 1, run.out + run.err
    assert "HALTED (canary failed on" in run.out, run.out
    assert f"failed: {canary}: disagrees: top1 0 over" in run.out, run.out
    assert f"untouched: {other}" in run.out
    assert f"shadow runs stopped on {canary}" in run.out
    assert not lab.tap.docs(f"{other}/shadow/{MODEL}")  # never sent one
    assert not _retained_shadows(lab)  # the canary's instruction cleared
    lab.wait(
        lambda: (_runs(lab, canary) or [{}])[-1].get("phase") == "stopped",
        15,
        "the canary's shadow run stopped",
    )
    stopped = _runs(lab, canary)[-1]
    assert stopped["version"] == 2 and stopped["frames"] >= 8  # its figures stay
    assert stopped["agreement"]["value"] == 0.0
    assert {r["version"] for r in lab.devices().values()} == {1}
    assert not any(e.get("event") == "update_started" and e.get("version") == 2
                   for d in DEVICES for e in lab.tap.docs(f"{d}/events"))  # fmt: skip

    # v3 agrees: each step passes its shadow run, then its devices are updated.
    _publish(lab, 3, "v3.tflite", labels)
    run = lab.rollout(3, *SHADOW, "--promote-at", "0.9", "--canary", "50", "--step", "100",
                      "--json")  # fmt: skip
    assert run.code == 0, run.out + run.err
    outcome = run.json()
    assert outcome["outcome"] == "succeeded"
    assert outcome["shadow"] == {
        "sample_pct": 100, "max_cpu_pct": 25, "min_frames": 8, "promote_at": 0.9,
    }  # fmt: skip
    trials = [w for step in outcome["shadow_steps"] for w in step]
    assert [w["device"] for w in trials] == [canary, other]
    assert all(w["status"] == "succeeded" and w["detail"].startswith("top1 1 over")
               for w in trials), trials  # fmt: skip
    updates = [w for step in outcome["steps"] for w in step]
    assert [(w["device"], w["status"]) for w in updates] == [
        (canary, "succeeded"), (other, "succeeded"),
    ]  # fmt: skip
    rows = lab.devices()
    assert {(r["version"], r["desired"]) for r in rows.values()} == {(3, None)}
    assert not _retained_shadows(lab)

    # v4 agrees, not promoted: the group runs it in the shadow at the end.
    _publish(lab, 4, "v1.tflite", labels)
    run = lab.rollout(4, *SHADOW, "--canary", "50", "--step", "100")
    assert run.code == 0, run.out + run.err
    assert "shadow rollout of colours v4 to group lab: succeeded, 2 device(s) run v4 in the " \
        "shadow" in run.out, run.out  # fmt: skip
    assert "edge-fleet promote --model colours --group lab makes it the release" in run.out
    retained = _retained_shadows(lab)
    assert list(retained) == [f"edge/groups/{GROUP}/shadow/{MODEL}"], retained
    assert retained[f"edge/groups/{GROUP}/shadow/{MODEL}"]["version"] == 4
    handed = {d: max(r["frames"] for r in _runs(lab, d) if r["version"] == 4) for d in DEVICES}
    lab.wait(
        lambda: all(
            _runs(lab, d)[-1]["phase"] == "running" and _runs(lab, d)[-1]["frames"] > handed[d] + 8
            for d in DEVICES
        ),
        20,
        "the shadow runs go on under the group's instruction",
    )
    assert all(_started(lab, d, 4) == 1 for d in DEVICES)  # none started again
    assert {r["version"] for r in lab.devices().values()} == {3}


def test_shadow_rollout_options_are_checked_before_connecting(lab: Lab) -> None:
    base = ("--model", MODEL, "--version", "2", "--group", GROUP)
    for args, expected in (
        (("--sample", "50"), "--sample, --max-cpu, --min-frames, --promote-at: only with --shadow"),
        (("--shadow", "--sample", "0"), "--sample: 0 is not a whole percentage"),
        (("--shadow", "--min-frames", "0"), "--min-frames: 0 is not a positive number"),
        (("--shadow", "--promote-at", "1.5"), "--promote-at: 1.5 is not an agreement"),
        # with --server too (checked here, before the request)
        (
            ("--shadow", "--server", "http://127.0.0.1:9", "--max-cpu", "101"),
            "--max-cpu: 101 is not a whole percentage",
        ),
    ):
        run = lab.fleet("rollout", *base, *args)
        assert run.code == 2, (args, run.out, run.err)
        assert expected in run.err, (args, run.err)
        assert "Traceback" not in run.err
