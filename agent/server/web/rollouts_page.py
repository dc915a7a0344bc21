"""The rollouts pages (issue 17): the history, a create form, one rollout per step and
device with its pause / resume / abort buttons.

- ``GET /ui/rollouts?page=N&status=S``: rollouts newest first, 50 a page; operators
  also get the create form.
- ``POST /ui/rollouts`` (operator): fields ``group``, ``model``, ``version``,
  ``canary_pct``, ``step_pct``, ``timeout_s``, and "shadow first" (``shadow`` ticked,
  ``sample_pct``, ``max_cpu_pct``, ``min_frames``, ``promote_at``) → the API's own
  :func:`agent.server.api.rollouts.create_rollout` (same checks, same audit entry);
  303 to the new rollout's page.
- ``GET /ui/rollouts/{id}``: the rollout, each step and each device's verdict (and
  its shadow run's, in a shadow rollout).
- ``POST /ui/rollouts/{id}/pause|resume|abort`` (operator): the API's own moves.

Every POST checks the session, its CSRF field and the ``Origin`` (403); a viewer's POST
is 403; what the API refuses comes back as the page with its one line (409, 422, 503).
The rollout and the history follow the server by themselves (:mod:`agent.server.web.live`);
a "reload" link stays for browsers without JavaScript.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from agent.fleet.shadow import DEFAULT_MAX_CPU_PCT, DEFAULT_MIN_FRAMES, DEFAULT_SAMPLE_PCT
from agent.server.api import rollouts as api
from agent.server.rollouts import STATUSES
from agent.server.schema import device_groups, rollouts
from agent.server.web import overview, pages
from agent.server.web.sessions import Session

router = APIRouter(prefix="/ui", include_in_schema=False)
PER_PAGE = 50
MAX_GROUPS_LISTED = 200  # the create form's suggestions
MAX_ID = 64
Action = Literal["pause", "resume", "abort"]
ACTIONS: tuple[Action, ...] = ("pause", "resume", "abort")
DONE = {
    "created": "Rollout created: the server issues its steps; this page follows them.",
    "pause": "Paused: no new step is issued; the current step's devices are still judged.",
    "resume": "Resumed.",
    "abort": "Aborting: the current step's unfinished devices are taken back.",
}
MOVES = {"pause": api.pause, "resume": api.resume, "abort": api.abort}  # the API's routes
DEFAULTS = {"canary_pct": "10", "step_pct": "25", "timeout_s": "900"}
SHADOW_DEFAULTS = {
    "sample_pct": str(DEFAULT_SAMPLE_PCT),
    "max_cpu_pct": str(DEFAULT_MAX_CPU_PCT),
    "min_frames": str(DEFAULT_MIN_FRAMES),
    "promote_at": "",
}


class FormProblems(ValueError):
    """A create form whose numbers cannot be read: the message lists each field."""


# -- pure rules ---------------------------------------------------------------------------


def _number(form: dict[str, str], name: str, problems: list[str]) -> float:
    text = form.get(name, DEFAULTS.get(name, "")).strip()
    try:
        value = float(text) if len(text) <= 20 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        problems.append(f"{name}: {text[:20]!r} is not a number")
    return value


def _whole(form: dict[str, str], name: str, problems: list[str]) -> int:
    text = form.get(name, SHADOW_DEFAULTS.get(name, "")).strip()
    if not text.isdigit() or len(text) > 10:
        problems.append(f"{name}: {text[:20]!r} is not a whole number")
        return 0
    return int(text)


def _shadow(form: dict[str, str], problems: list[str]) -> api.ShadowRequest | None:
    """The "shadow first" section: None unless its box is ticked; an empty
    ``promote_at`` is none (the group's shadow run at the end)."""
    if form.get("shadow", "") not in ("on", "1", "true"):
        return None
    sample, cpu, frames = (_whole(form, n, problems) for n in ("sample_pct", "max_cpu_pct",
                                                                "min_frames"))  # fmt: skip
    promote = None
    if form.get("promote_at", "").strip():
        promote = _number(form, "promote_at", problems)
    if problems:
        return None
    return api.ShadowRequest(
        sample_pct=sample, max_cpu_pct=cpu, min_frames=frames, promote_at=promote
    )


def rollout_request(form: dict[str, str]) -> api.RolloutRequest:
    """The API request a create form stands for. Raises FormProblems when a number
    cannot be read (names, ranges and the group are the API's to check)."""
    problems: list[str] = []
    version = form.get("version", "").strip()
    if not version.isdigit() or len(version) > 10:
        problems.append(f"version: {version[:20]!r} is not a positive integer")
    canary, step, timeout = (_number(form, n, problems) for n in DEFAULTS)
    shadow = _shadow(form, problems)
    if problems:
        raise FormProblems("; ".join(problems))
    return api.RolloutRequest(
        model=form.get("model", "").strip()[:200],
        version=int(version),
        group=form.get("group", "").strip()[:200],
        canary_pct=canary,
        step_pct=step,
        timeout_s=timeout,
        shadow=shadow,
    )


def allowed(status: str) -> list[Action]:
    """The buttons a rollout in ``status`` offers (as the API's moves allow)."""
    return [a for a in ACTIONS if status in api.MOVES[a][0]]


def tally(rollout: dict[str, Any]) -> dict[str, int]:
    """How many of a rollout's devices stand where: succeeded, failed, pending,
    untouched (from :func:`agent.server.api.rollouts.show`)."""
    counts = {"succeeded": 0, "failed": 0, "pending": 0, "untouched": 0}
    for step in rollout["steps"]:
        for device in step["devices"]:
            status = device["status"]
            if status == "untouched" and device.get("trial"):  # only its shadow run so far
                status = device["trial"]["status"]
            key = status if status in counts else "pending"
            counts[key] += 1
    return counts


MEMBERS_SHOWN = 100  # devices listed per step unless ?all=1 (a group of 1,000: 287 kB)
_RANK = {"failed": 0, "pending": 1, "untouched": 2, "succeeded": 3}  # what needs eyes first


def members_shown(
    devices: list[dict[str, Any]], everything: bool, limit: int = MEMBERS_SHOWN
) -> tuple[list[dict[str, Any]], int]:
    """A step's devices as its table lists them, and how many are left out: all of them
    in order when they fit (or ``everything``), else the first ``limit`` by what needs
    an operator's eyes first (failed, pending, not yet, succeeded; each in order)."""
    if everything or len(devices) <= limit:
        return devices, 0
    ranked = sorted(devices, key=lambda d: _RANK.get(str(d.get("status")), 1))
    return ranked[:limit], len(devices) - limit


# -- pages --------------------------------------------------------------------------------


def _list_context(
    request: Request, session: Session, page: int, status: str | None
) -> dict[str, Any]:
    server = pages.server_of(request)
    where = [rollouts.c.status == status] if status else []
    with server.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(rollouts).where(*where))
        at = overview.paginate(int(total.scalar() or 0), page, PER_PAGE)
        rows = conn.execute(
            sa.select(rollouts)
            .where(*where)
            .order_by(rollouts.c.created.desc(), rollouts.c.id)
            .offset(at.offset)
            .limit(PER_PAGE)
        ).all()
        groups = conn.execute(
            sa.select(device_groups.c.group_name)
            .distinct()
            .order_by(device_groups.c.group_name)
            .limit(MAX_GROUPS_LISTED)
        ).scalars()
        group_names = list(groups)
    return {
        "session": session,
        "rows": [api.rollout_summary(row) for row in rows],
        "where": at,
        "status": status,
        "statuses": STATUSES,
        "groups": group_names,
        "form": {**DEFAULTS, **SHADOW_DEFAULTS},
        "error": None,
    }


@router.get("/rollouts")
def rollouts_page(
    request: Request,
    page: Annotated[int, Query(ge=1, le=overview.MAX_PAGE)] = 1,
    status: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    session = pages.signed_in(request)
    if status is not None and status not in STATUSES:
        return pages.error_page(request, session, 422, f"status: one of {', '.join(STATUSES)}")
    context = _list_context(request, session, page, status or None)
    return pages.render(request, "rollouts.html", context)


@router.post("/rollouts")
async def create_form(request: Request) -> Response:
    """Create a rollout: the form's fields go through the API's create_rollout."""
    checked = await pages.operator_post(request, "start a rollout")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    try:
        try:
            body = rollout_request(form)
        except FormProblems as exc:
            raise HTTPException(422, str(exc)) from None
        made = await run_in_threadpool(api.create_rollout, body, request, session.caller)
    except HTTPException as exc:
        context = await run_in_threadpool(_list_context, request, session, 1, None)
        context["error"] = str(exc.detail)
        typed = {k: v[:200] for k, v in form.items() if k != "csrf"}
        context["form"] = {**DEFAULTS, **SHADOW_DEFAULTS, **typed}
        return pages.render(request, "rollouts.html", context, exc.status_code)
    return RedirectResponse(f"/ui/rollouts/{made['id']}?done=created", status_code=303)


def _rollout_context(
    request: Request, session: Session, rollout_id: str, everything: bool = False
) -> dict[str, Any]:
    shown = api.show(pages.server_of(request), rollout_id[:MAX_ID])  # HTTPException 404
    steps = []
    for step in shown["steps"]:
        listed, hidden = members_shown(step["devices"], everything)
        steps.append({**step, "listed": listed, "hidden": hidden})
    return {
        "session": session,
        "r": shown,
        "steps": steps,
        "everything": everything,
        "tally": tally(shown),
        "actions": allowed(shown["status"]),
        "done": None,
        "error": None,
    }


@router.get("/rollouts/{rollout_id}")
def rollout_page(
    request: Request,
    rollout_id: str,
    done: str | None = None,
    everything: Annotated[str | None, Query(alias="all")] = None,
) -> Response:
    session = pages.signed_in(request)
    try:
        context = _rollout_context(request, session, rollout_id, everything=everything == "1")
    except HTTPException as exc:
        return pages.error_page(request, session, exc.status_code, str(exc.detail))
    context["done"] = DONE.get(done or "")
    return pages.render(request, "rollout.html", context)


@router.post("/rollouts/{rollout_id}/{action}")
async def move_form(request: Request, rollout_id: str, action: str) -> Response:
    """Pause, resume or abort: the API's own moves (409 when the status does not allow)."""
    try:
        session, _form = await pages.checked_post(request)
    except HTTPException as exc:
        return pages.error_page(request, None, exc.status_code, str(exc.detail))
    move = next((a for a in ACTIONS if a == action), None)
    if move is None:
        return pages.error_page(request, session, 404, f"No action {action[:20]!r} on a rollout.")
    if session.caller.role != "operator":
        return pages.error_page(request, session, 403, f"Only an operator's token can {move} it.")
    rollout_id = rollout_id[:MAX_ID]
    try:
        await run_in_threadpool(MOVES[move], rollout_id, request, session.caller)
    except HTTPException as exc:
        try:
            context = await run_in_threadpool(_rollout_context, request, session, rollout_id)
        except HTTPException:
            return pages.error_page(request, session, exc.status_code, str(exc.detail))
        context["error"] = str(exc.detail)
        return pages.render(request, "rollout.html", context, exc.status_code)
    return RedirectResponse(f"/ui/rollouts/{rollout_id}?done={move}", status_code=303)
