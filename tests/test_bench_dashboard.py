"""bench/dashboard.py cannot rot silently: a small run (20 devices, one load per page,
real Chromium, real uvicorn) prints its table and sane figures for every page."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import chromium_paths

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "dashboard.py"
PAGES = {"overview", "overview p20", "device 1h", "device 24h", "device 7d", "releases",
         "rollouts", "rollout (all)"}  # fmt: skip


def test_the_dashboard_bench_prints_sane_figures_for_every_page() -> None:
    if chromium_paths() is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install them)")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--devices", "20", "--runs", "1", "--days", "0.2"],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("page ") and "render p50/p95" in line for line in lines)
    assert lines[-1].startswith("RESULT "), done.stdout[-2000:]
    pages = json.loads(lines[-1].removeprefix("RESULT "))["pages"]
    assert set(pages) == PAGES
    for name, p in pages.items():
        assert p["runs"] == 1, name
        # the same page fetched twice: "5 s ago" may read "12 s ago" the second time
        assert p["html_bytes"] > 1000, name
        assert abs(p["html_bytes"] - p["http_bytes"]) <= 64, (name, p)
        assert p["asset_bytes"] > 1000 and p["total_bytes"] > p["html_bytes"], name
        for figure in ("server_ms", "server_bare_ms", "render_ms", "render_bare_ms", "dom_ms"):
            p50, p95 = p[figure]
            assert 0 < p50 <= p95 < 15_000, (name, figure, p[figure])
        assert math.isfinite(p["render_ratio"]) and p["render_ratio"] > 0, name
        assert f"{name:14}" in done.stdout  # its row in the table
