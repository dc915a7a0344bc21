"""The dashboard's pages at fleet scale in headless Chromium: first render and weight,
against the same HTML served bare, same run.

The database (SQLite) is seeded by bench/dashboard_fleet.py with the ingester's own
writes: ``--devices`` devices with status, state, groups, versions, recent telemetry,
events and alert-worthy figures; ``sim-0001`` with ``--days`` days of its six charted
metrics at 10 s; finished rollouts (the last over all devices); a registry folder. The
app (:func:`agent.server.app.create_app`) runs on a real uvicorn (tests/serverhttp.py);
Debian's headless Chromium (tests/browser.py) logs in as a viewer through the login form.

Pages: the overview (``/ui/`` and its last page), ``sim-0001`` at 1 h, 24 h and 7 d, the
releases, the rollouts and the rollout over all devices. Each page's HTML is fetched
once over HTTP with a session cookie (``call()``: its bytes); the **baseline** is that
same HTML, byte for byte, served by a bare Starlette route on another uvicorn (no
database, no template, no session), with the same CSS/JS/icon links served by Starlette's
StaticFiles from the package's folder. Each run loads every page, then its baseline
(after ``WARMUP`` rounds); per load, from ``performance.getEntriesByType``:

- server: ``responseStart − requestStart`` (time to first byte, the request sent);
- first render: ``first-contentful-paint``; DOM ready: ``domContentLoadedEventEnd``
  (both from navigation start);
- weight: the HTML's and each resource's ``encodedBodySize`` (the icon, fetched by the
  browser outside resource timing, over HTTP).

Printed per page: p50/p95 of each, first render as a ratio to its baseline's p50, the
server time beside the baseline's, the goals (first render p95 <= 500 ms, HTML <= 200
kB), and one JSON line at the end (``RESULT {...}``) for tests/test_bench_dashboard.py.

    python bench/dashboard.py [--devices 1000] [--runs 10] [--days 7]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dashboard_fleet  # noqa: E402  (bench/, beside this file)
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import HTMLResponse  # noqa: E402
from starlette.routing import Mount, Route  # noqa: E402
from starlette.staticfiles import StaticFiles  # noqa: E402

from agent.fleet.broker import BrokerOptions  # noqa: E402
from agent.server.app import create_app  # noqa: E402
from agent.server.auth import create_token  # noqa: E402
from agent.server.context import ServeOptions, Server  # noqa: E402
from agent.server.db import open_database  # noqa: E402
from agent.server.ingest import IngestOptions  # noqa: E402
from agent.server.serve import settle_heap  # noqa: E402
from agent.server.web import pages, sessions  # noqa: E402
from tests.browser import Browser, browser, chromium_paths  # noqa: E402
from tests.serverhttp import call, running  # noqa: E402

WARMUP = 2
FCP_WAIT_S = 3.0
GOAL_RENDER_MS = 500.0
GOAL_HTML_KB = 200.0
ICON = "/ui/static/favicon.svg"

MEASURE = """
const nav = performance.getEntriesByType('navigation')[0];
const fcp = performance.getEntriesByType('paint')
  .find(e => e.name === 'first-contentful-paint');
return {
  request: nav.requestStart, response: nav.responseStart,
  dcl: nav.domContentLoadedEventEnd, html: nav.encodedBodySize,
  fcp: fcp ? fcp.startTime : null,
  resources: performance.getEntriesByType('resource')
    .map(r => [new URL(r.name).pathname, r.encodedBodySize]),
};
"""


class NoBroker:
    """The server's Publisher: the pages read, they publish nothing."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        raise RuntimeError("the dashboard bench publishes nothing")


@dataclass
class Load:
    """One page load's figures (ms from navigation start; bytes)."""

    server_ms: float
    render_ms: float
    dom_ms: float
    html: int
    resources: dict[str, int]


@dataclass
class Page:
    name: str
    path: str
    http_bytes: int = 0
    html: bytes = b""
    loads: list[Load] = field(default_factory=list)
    bare: list[Load] = field(default_factory=list)
    assets: dict[str, int] = field(default_factory=dict)  # path: the largest size seen

    def saw(self, load: Load) -> None:
        """Keep each resource's size: a load served from the memory cache may report 0
        (and the warm-up's first, cold, load the real size)."""
        for path, size in load.resources.items():
            self.assets[path] = max(size, self.assets.get(path, 0))


def pages_for(rollout: str) -> list[Page]:
    return [
        Page("overview", "/ui/"),
        Page("overview p20", "/ui/?page=20"),
        Page("device 1h", "/ui/devices/sim-0001?span=1h"),
        Page("device 24h", "/ui/devices/sim-0001?span=24h"),
        Page("device 7d", "/ui/devices/sim-0001?span=7d"),
        Page("releases", "/ui/releases"),
        Page("rollouts", "/ui/rollouts"),
        Page("rollout (all)", f"/ui/rollouts/{rollout}"),
    ]


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p95 (a single value is both)."""
    if len(values) < 2:
        return values[0], values[0]
    return statistics.median(values), statistics.quantiles(values, n=20, method="inclusive")[18]


def bare_app(captured: dict[str, bytes]) -> Starlette:
    """The baseline: each page's captured HTML, as it is, from a dict; the same static
    folder at the same path. No database, no template, no session."""

    async def page(request: Request) -> HTMLResponse:
        body = captured[request.path_params["name"]]
        return HTMLResponse(body, headers=pages.SECURITY_HEADERS)

    return Starlette(routes=[
        Route("/bare/{name}", page),
        Mount("/ui/static", StaticFiles(directory=pages.HERE / "static")),
    ])  # fmt: skip


def measure(web: Browser, url: str) -> Load:
    web.web.get(url)
    deadline = time.monotonic() + FCP_WAIT_S
    while True:  # the paint entry can trail the load event by a frame
        got: dict[str, Any] = web.web.execute_script(MEASURE)
        if got["fcp"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if got["fcp"] is None:
        raise RuntimeError(f"{url}: no first-contentful-paint after {FCP_WAIT_S:g} s")
    return Load(
        server_ms=got["response"] - got["request"],
        render_ms=got["fcp"],
        dom_ms=got["dcl"],
        html=int(got["html"]),
        resources={path: int(size) for path, size in got["resources"]},
    )


@contextmanager
def fleet_app(url: str, registry: Path) -> Iterator[tuple[str, str, str]]:
    """The fleet server's app on uvicorn: (base URL, a viewer token, a session secret)."""
    engine = open_database(url)
    now = time.time()
    with engine.begin() as conn:
        token = create_token(conn, "bench", "viewer", now)
        made = sessions.create_session(conn, token, now)
    assert made is not None
    options = ServeOptions(url, BrokerOptions("mqtt://127.0.0.1:1"), IngestOptions("bench"),
                           registry=str(registry))  # fmt: skip
    app = create_app(Server(options, engine, publisher=NoBroker()))
    settle_heap()  # as edge-fleet serve does before it serves
    try:
        with running(app) as base:
            yield base, token, made[0]
    finally:
        engine.dispose()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    url = f"sqlite:///{tmp / 'fleet.db'}"
    engine = open_database(url)
    took = dashboard_fleet.seed(engine, args.devices, args.days, tmp / "registry")
    engine.dispose()
    print(f"seeded {args.devices} devices in {took['devices_s']:.1f} s; sim-0001's "
          f"{took['history_docs']} documents of history in {took['history_s']:.1f} s")  # fmt: skip
    listed = pages_for(took["rollout"])
    captured: dict[str, bytes] = {}
    with ExitStack() as stack:
        base, token, secret = stack.enter_context(fleet_app(url, tmp / "registry"))
        cookie = {"Cookie": f"{sessions.COOKIE}={secret}"}
        for n, page in enumerate(listed):
            reply = call("GET", base + page.path, headers=cookie, timeout=60)
            if reply.status != 200:
                raise RuntimeError(f"GET {page.path} answered {reply.status}: {reply.text[:200]}")
            page.html = reply.text.encode()
            page.http_bytes = len(page.html)
            captured[str(n)] = page.html
        icon = len(call("GET", base + ICON).text.encode())
        bare = stack.enter_context(running(bare_app(captured)))
        web = stack.enter_context(browser())
        web.base = base
        web.open("/ui/login")
        web.web.find_element("id", "token").send_keys(token)
        web.web.find_element("id", "login").click()
        web.wait_path("/ui/")
        for round_ in range(WARMUP + args.runs):
            for n, page in enumerate(listed):
                real = measure(web, base + page.path)
                plain = measure(web, f"{bare}/bare/{n}")
                page.saw(real)
                if round_ >= WARMUP:
                    page.loads.append(real)
                    page.bare.append(plain)
    return report(listed, icon)


def report(listed: list[Page], icon: int) -> dict[str, Any]:
    out: dict[str, Any] = {"pages": {}}
    head = f"{'bare':>10} {'render p50/p95':>15} {'bare':>6} {'ratio':>6} {'DOM p50':>8}"
    print(f"\n{'page':14} {'HTML kB':>8} {'+CSS/JS/icon':>12} {'server p50/p95':>15} {head}  goals")
    for page in listed:
        last = page.loads[-1]
        assets = sum(page.assets.values()) + (0 if ICON in page.assets else icon)
        server = percentiles([x.server_ms for x in page.loads])
        server_bare = percentiles([x.server_ms for x in page.bare])
        render = percentiles([x.render_ms for x in page.loads])
        render_bare = percentiles([x.render_ms for x in page.bare])
        dom = percentiles([x.dom_ms for x in page.loads])
        ratio = render[0] / render_bare[0] if render_bare[0] > 0 else math.inf
        html_kb = last.html / 1000
        fast = "met" if render[1] <= GOAL_RENDER_MS else "MISSED"
        light = "met" if html_kb <= GOAL_HTML_KB else "MISSED"
        goals = (
            f"render p95 <= {GOAL_RENDER_MS:.0f} ms {fast}, HTML <= {GOAL_HTML_KB:.0f} kB {light}"
        )
        if abs(last.html - page.http_bytes) > page.http_bytes / 50:  # times such as "3 min ago"
            goals += f" (HTTP gave {page.http_bytes} B, the browser {last.html} B)"
        print(f"{page.name:14} {html_kb:8.1f} {assets / 1000:12.1f} "
              f"{server[0]:7.1f}/{server[1]:<7.1f} {server_bare[0]:5.1f}/{server_bare[1]:<4.1f} "
              f"{render[0]:7.1f}/{render[1]:<7.1f} {render_bare[0]:6.1f} {ratio:6.2f} "
              f"{dom[0]:8.1f}  {goals}")  # fmt: skip
        out["pages"][page.name] = {
            "path": page.path, "html_bytes": last.html, "http_bytes": page.http_bytes,
            "asset_bytes": assets, "total_bytes": last.html + assets,
            "server_ms": server, "server_bare_ms": server_bare, "render_ms": render,
            "render_bare_ms": render_bare, "render_ratio": ratio, "dom_ms": dom,
            "runs": len(page.loads),
        }  # fmt: skip
    print(
        "(ms; server = responseStart - requestStart; render = first-contentful-paint; "
        "ratio = render p50 / the bare page's)"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10, help="loads per page after warm-up")
    parser.add_argument("--days", type=float, default=7.0, help="sim-0001's history, days")
    args = parser.parse_args()
    if not 1 <= args.devices <= 20_000:
        parser.error("--devices must be 1..20000")
    if not 1 <= args.runs <= 1000:
        parser.error("--runs must be 1..1000")
    if not 0 <= args.days <= 7:
        parser.error("--days must be 0..7 (the raw samples' retention)")
    if chromium_paths() is None:
        print("dashboard: skipped (chromium and chromium-driver are not installed: "
              "apt-get install chromium chromium-driver)")  # fmt: skip
        return
    print(f"dashboard: {args.devices} devices, {args.runs} loads per page after {WARMUP} "
          f"warm-up rounds")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        result = run(args, Path(tmp))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
