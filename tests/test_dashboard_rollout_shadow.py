"""The dashboard's "shadow first" rollouts: the form's section reaches the API (its
checks, one line naming the field), the rollout page shows the options and a shadow
run column per device; tables for the pure rules."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.server import rollstore
from agent.server.web import rollouts_page
from tests.test_dashboard import Client
from tests.test_dashboard_rollouts import FORM, site

SHADOW = {"shadow": "on", "sample_pct": "20", "max_cpu_pct": "30", "min_frames": "50",
          "promote_at": "0.95"}  # fmt: skip


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        (FORM, None),  # not ticked: no shadow
        ({**FORM, **SHADOW, "shadow": ""}, None),
        ({**FORM, **SHADOW}, (20, 30, 50, 0.95)),
        ({**FORM, "shadow": "on"}, (10, 25, 100, None)),  # the defaults; no promotion
        ({**FORM, **SHADOW, "promote_at": " "}, (20, 30, 50, None)),
        ({**FORM, **SHADOW, "sample_pct": "1.5"}, "sample_pct: '1.5' is not a whole number"),
        ({**FORM, **SHADOW, "min_frames": "-3"}, "min_frames: '-3' is not a whole number"),
        ({**FORM, **SHADOW, "promote_at": "most"}, "promote_at: 'most' is not a number"),
    ],
)  # fmt: skip
def test_rollout_request_with_shadow_first(form: dict[str, str], expected: Any) -> None:
    if isinstance(expected, str):
        with pytest.raises(rollouts_page.FormProblems, match=expected):
            rollouts_page.rollout_request(form)
        return
    shadow = rollouts_page.rollout_request(form).shadow
    if expected is None:
        assert shadow is None
    else:
        assert shadow is not None
        got = (shadow.sample_pct, shadow.max_cpu_pct, shadow.min_frames, shadow.promote_at)
        assert got == expected


def test_tally_counts_a_device_by_its_shadow_run_until_it_gets_the_release() -> None:
    def dev(status: str, trial: str | None) -> dict[str, Any]:
        return {"status": status, "trial": {"status": trial} if trial else None}

    devices = [dev("untouched", "failed"), dev("untouched", "pending"),
               dev("succeeded", "succeeded"), dev("untouched", None)]  # fmt: skip
    shown = {"steps": [{"devices": devices}]}
    assert rollouts_page.tally(shown) == {
        "succeeded": 1, "failed": 1, "pending": 1, "untouched": 1,
    }  # fmt: skip


def test_the_form_starts_a_shadow_rollout_and_its_page_shows_the_trials(tmp_path: Path) -> None:
    with site(f"sqlite:///{tmp_path / 'fleet.db'}") as s:
        client = Client(s.url)
        client.login(s.operator)
        csrf = client.csrf("/ui/rollouts")
        status, _, page = client.request("GET", "/ui/rollouts")
        assert 'id="shadow-first"' in page and 'name="promote_at"' in page
        bad = {**FORM, **SHADOW, "csrf": csrf, "max_cpu_pct": "0"}
        status, _, page = client.request("POST", "/ui/rollouts", bad)
        assert status == 422
        assert "shadow.max_cpu_pct: 0 is not a whole percentage from 1 to 100" in page
        assert 'value="0"' in page and "checked" in page  # the form keeps what was typed
        status, headers, _ = client.request("POST", "/ui/rollouts", {**FORM, **SHADOW,
                                                                     "csrf": csrf})  # fmt: skip
        assert status == 303, page
        rid = headers["location"].split("/")[-1].split("?")[0]
        with s.engine.connect() as conn:
            loaded = rollstore.load(conn, rid)
        assert loaded is not None and loaded[0].shadow is not None
        assert (loaded[0].shadow.sample_pct, loaded[0].shadow.promote_at) == (20, 0.95)
        status, _, page = client.request("GET", f"/ui/rollouts/{rid}")
        assert status == 200 and 'id="shadow-options"' in page
        assert "20 % of frames, at most 30 % CPU, 50 frames compared" in page
        assert "<th>Shadow run</th>" in page
        r, steps, members = loaded
        judged = [replace(m, trial="failed", trial_reason="disagrees: top1 0.2 over 50 frames",
                          trial_seconds=12.0) if m.step == 0 else m for m in members]  # fmt: skip
        with s.engine.begin() as conn:
            rollstore.save(conn, r, steps, judged, (r.status, members), time.time())
        canary = judged[0].device
        status, _, page = client.request("GET", f"/ui/rollouts/{rid}")
        row = page.split(f'id="member-{canary}"')[1].split("</tr>")[0]
        assert "disagrees: top1 0.2 over 50 frames" in row and "after 12" in row
        assert 'class="status failed">failed' in row
