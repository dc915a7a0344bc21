"""The device–fleet contract: the values and documents both sides of MQTT speak.

One module, imported by the agent (which builds these documents) and by the fleet
tools (which read them); docs/protocol.md describes the same and
tests/test_contract.py checks the two against each other.

- **Literals** for the enumerated values: update phases and outcomes, what the
  state's ``phase`` may say, update source kinds, event names, status states. mypy
  then refuses a misspelt event name or phase where the agent makes one.
- **TypedDicts** for the documents (``StatusDoc``, ``StateDoc`` with its
  ``UpdateDoc``, ``TelemetryDoc``, ``EventDoc``, ``ResultDoc``): the bodies the
  agent builds, before the outbox adds the envelope. TypedDicts, not pydantic
  models, because the agent's documents *are* dicts on the wire: building them costs
  nothing on the device's hot paths (telemetry, results), keeps the key order and so
  the bytes as they were, and mypy checks every key and value where one is built.
- ``*Message`` TypedDicts are the documents as they travel (envelope + body), and
  :func:`validator` gives a pydantic ``TypeAdapter`` over one: strict (no coercion of
  ``"1"`` to 1), unknown keys refused (events excepted: their detail varies by name).
  Tests validate what a real agent published with them; a server can ingest with
  them. Importing this module does not import pydantic (the device's pipeline and
  telemetry use only the Literals and TypedDicts): the pydantic settings are plain
  attributes here, read when :func:`validator` imports pydantic.

The fleet tools' defence against hostile devices stays in
:mod:`agent.fleet.reports` (escape every string, drop a wrongly typed field, keep the
rest): it reads the enumerated fields through the Literals here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeVar, get_args

from typing_extensions import NotRequired, TypedDict

if TYPE_CHECKING:
    from pydantic import TypeAdapter

SCHEMA: Final = 1  # the envelope's "schema"

# -- enumerated values -------------------------------------------------------------

UpdatePhase = Literal["downloading", "verifying", "validating", "activating", "probation"]
UpdateOutcome = Literal["succeeded", "failed", "rolled_back"]
StatePhase = Literal[
    "idle",
    "downloading",
    "verifying",
    "validating",
    "activating",
    "probation",
    "succeeded",
    "failed",
    "rolled_back",
]
"""The state's ``phase``: ``idle`` before any update, the phase while one runs, then
its outcome."""
SourceKind = Literal["device", "group", "channel", "local", "local-offline", "shadow"]
"""An update's ``source`` is ``device``, ``group:NAME``, ``channel:NAME``, ``local``, ``shadow`` or
``local-offline``: this is the part before the colon."""
MqttProtocol = Literal["5", "3.1.1"]  # telemetry's mqtt.protocol
StatusState = Literal["online", "offline"]
OfflineReason = Literal["lost", "stopped"]  # the Last Will's, a clean stop's
EventName = Literal[
    "agent_started",
    "agent_stopped",
    "config_reloaded",
    "config_rejected",
    "update_started",
    "update_phase",
    "update_progress",
    "update_validated",
    "update_succeeded",
    "update_failed",
    "rolled_back",
    "update_error",
    "state_repaired",
    "desired_ignored",
    "desired_invalid",
    "model_swapped",
    "model_failed",
    "source_lost",
    "source_recovered",
    "source_ended",
    "accelerator_lost",
    "accelerator_recovered",
    "accelerator_fallback",
    "pipeline_error",
    "outbox_dropped",
    "diagnostics_requested",
    "shadow_started",
    "shadow_failed",
    "shadow_promoted",
    "shadow_stopped",
]
ShadowPhase = Literal["downloading", "loading", "running", "failed", "promoted", "stopped"]
AgreementMetric = Literal["top1", "f1", "mean_error"]

UPDATE_PHASES: Final[tuple[UpdatePhase, ...]] = get_args(UpdatePhase)
UPDATE_OUTCOMES: Final[tuple[UpdateOutcome, ...]] = get_args(UpdateOutcome)
STATE_PHASES: Final[tuple[StatePhase, ...]] = get_args(StatePhase)
SOURCE_KINDS: Final[tuple[SourceKind, ...]] = get_args(SourceKind)
STATUS_STATES: Final[tuple[StatusState, ...]] = get_args(StatusState)
OFFLINE_REASONS: Final[tuple[OfflineReason, ...]] = get_args(OfflineReason)
EVENT_NAMES: Final[tuple[EventName, ...]] = get_args(EventName)
SHADOW_PHASES: Final[tuple[ShadowPhase, ...]] = get_args(ShadowPhase)

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # a group or channel name (a topic level)
SOURCE_PATTERN: Final = rf"^(device|local|local-offline|shadow|(group|channel):{_NAME})$"


@dataclass(frozen=True)
class _Pattern:
    """A pattern pydantic checks (through ``__get_pydantic_core_schema__``, called only
    when a validator is built), so that this module needs no pydantic to import."""

    pattern: str

    def __get_pydantic_core_schema__(self, source: Any, handler: Callable[[Any], Any]) -> Any:
        schema = handler(source)  # the str schema
        schema["pattern"] = self.pattern
        return schema


Source = Annotated[str, _Pattern(SOURCE_PATTERN)]
"""An update's ``source`` (a str to mypy; the validators check the pattern)."""


def source_kind(source: str) -> SourceKind | None:
    """The kind of an update's ``source`` (``group:yard`` → ``group``), or None when
    ``source`` is not one the contract allows."""
    if not re.fullmatch(SOURCE_PATTERN, source):
        return None
    kind = source.split(":", 1)[0]
    return next(k for k in SOURCE_KINDS if k == kind)


# -- documents (bodies, as the agent builds them) -----------------------------------

_T = TypeVar("_T")


def _pydantic_config(**config: Any) -> Callable[[type[_T]], type[_T]]:
    """pydantic's ``with_config`` without importing pydantic: it sets the attribute that
    pydantic reads from a TypedDict (``__pydantic_config__``, a ConfigDict's keys)."""

    def inner(cls: type[_T]) -> type[_T]:
        setattr(cls, "__pydantic_config__", dict(config))  # noqa: B010 (a TypedDict class)
        return cls

    return inner


_STRICT = _pydantic_config(extra="forbid", strict=True)
_OPEN = _pydantic_config(extra="allow", strict=True)  # the events' detail varies by name


@_STRICT
class StatusExtra(TypedDict, total=False):
    """What every status of a device carries, the Last Will's too."""

    groups: list[str]
    agent_version: str


@_STRICT
class StatusDoc(StatusExtra):
    """``<device>/status`` (retained): online on every connect, offline as the Last Will
    (``reason: lost``) or at a clean stop (``reason: stopped``)."""

    state: StatusState
    reason: NotRequired[OfflineReason]


@_STRICT
class UpdateDoc(TypedDict):
    """The state's ``update``: the latest update (its ``id`` is its events' ``update_id``)."""

    id: str
    model: str
    version: int
    source: Source
    issued_at: float | None
    phase: UpdatePhase
    outcome: UpdateOutcome | None
    reason: str | None
    started_at: float
    deadline_s: float | None
    retry: bool | None


@_STRICT
class AppliedDesiredDoc(TypedDict):
    """The state's ``desired``: the last desired state applied."""

    model: str
    version: int
    issued_at: float
    source: Source


@_STRICT
class RuntimeDoc(TypedDict):
    """The state's ``runtime``: how the serving model runs (``runtime.interpreters`` and
    ``runtime.threads``, as configured or as the calibration chose them)."""

    interpreters: int
    threads: int
    chosen_by: Literal["config", "calibration"]
    note: str | None  # e.g. interpreters ignored on the Edge TPU


@_STRICT
class AgreementDoc(TypedDict):
    """How far a shadow candidate agrees with the active model (agent/shadow/agreement.py):
    top1 and f1 0..1 (higher: closer), mean_error the mean absolute difference."""

    metric: AgreementMetric
    value: float | None  # None before the first compared frame
    frames: int


@_STRICT
class ShadowDoc(TypedDict):
    """A shadow run of one model's candidate (state's and telemetry's ``shadows``)."""

    model: str
    version: int
    issued_at: float
    phase: ShadowPhase
    sample_pct: int
    max_cpu_pct: int
    frames: int  # frames the candidate ran on and was compared
    skipped: int  # sampled frames skipped for the CPU bound
    errors: int
    error: str | None
    latency_ms_p50: float | None  # the candidate's invoke (its own resize included)
    active_latency_ms_p50: float | None  # the active model's, on the same frames
    agreement: AgreementDoc


@_STRICT
class OutputVersionDoc(TypedDict):
    """One model version's output statistics (agent/shadow/outputs.py)."""

    version: int | None
    frames: int
    scores: list[int]  # 10 bins of the top score per frame: [0,.1), …, [.9,1]
    classes: dict[str, int]  # label -> frames where it was top / detected


@_STRICT
class OutputsDoc(OutputVersionDoc):
    """Telemetry's ``outputs[MODEL]``: the serving version's, and the one before."""

    previous: OutputVersionDoc | None


@_STRICT
class ModelFields(TypedDict):
    """What the state says of one served model: its release, what serves, its update."""

    model: str | None  # None: no model.name configured and nothing in the store
    version: int | None
    sha256: str | None
    backend: str | None  # edgetpu or cpu
    serving: int | None
    previous: int | None
    phase: StatePhase
    last_error: str | None
    update: UpdateDoc | None
    desired: AppliedDesiredDoc | None
    bad: list[str]


@_STRICT
class StateDoc(ModelFields):
    """``<device>/state`` (retained): the first pipeline's model's fields on top (the
    single model's), every model's under ``models`` when there are several."""

    agent_version: str
    runtime: NotRequired[RuntimeDoc | None]  # None while nothing serves; older agents omit it
    # several models (``pipelines:``, or a cascade): every model's part, by model name
    models: NotRequired[dict[str, ModelStateDoc]]
    pipelines: NotRequired[dict[str, PipelineDoc]]
    shadows: NotRequired[dict[str, ShadowDoc]]  # model -> its shadow run; older agents omit it


@_STRICT
class ModelStateDoc(ModelFields):
    """The state's ``models[MODEL]``: the top-level fields of one served model."""

    runtime: RuntimeDoc | None


@_STRICT
class PipelineDoc(TypedDict):
    """The state's ``pipelines[NAME]``: its model, its cascade's, its source's type."""

    model: str
    cascade: str | None
    source: str


@_STRICT
class InferenceDoc(TypedDict):
    """Telemetry's ``inference``: the pipeline's figures (:class:`agent.pipeline.Stats`)."""

    frames: int
    results: int
    dropped: int
    errors: int
    fps: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    infer_ms_p50: float
    backend: str  # edgetpu or cpu
    model: str
    version: int | None
    source_connected: bool


@_STRICT
class CascadeFiguresDoc(TypedDict):
    """A pipeline's cascade in telemetry: its model and figures."""

    model: str
    version: int | None
    crops: int
    infer_ms_p50: float
    errors: int


@_STRICT
class PipelineInferenceDoc(InferenceDoc):
    """Telemetry's ``pipelines[NAME]``: the pipeline's figures and its cascade's."""

    cascade: CascadeFiguresDoc | None


@_STRICT
class OutboxFigures(TypedDict):
    depth: int
    bytes: int
    dropped: int
    overflow: int


@_STRICT
class MqttFigures(TypedDict):
    connected: bool
    protocol: MqttProtocol | None
    connects: int
    inflight: int
    rejected: int
    unsent_qos0: int


@_STRICT
class Figures(TypedDict):
    """The outbox and connection figures (telemetry's, and :meth:`Telemetry.snapshot`)."""

    outbox: OutboxFigures
    mqtt: MqttFigures


ThrottleFlag = Literal["under_voltage", "freq_capped", "throttled", "soft_temp_limit"]
THROTTLE_FLAGS: Final[tuple[ThrottleFlag, ...]] = get_args(ThrottleFlag)


@_STRICT
class ThrottledDoc(TypedDict):
    """The Raspberry Pi firmware's ``get_throttled`` flags: set now, and seen since boot.

    The names are :data:`ThrottleFlag`'s; typed as strings so that a flag a newer agent
    adds does not make a reader refuse the whole telemetry."""

    now: list[str]
    since_boot: list[str]


@_STRICT
class MachineDoc(TypedDict, total=False):
    """The machine and the agent's process (:class:`agent.sysinfo.SystemProbe`);
    absent from telemetry without a probe."""

    agent_version: str
    cpu_pct: float
    load: list[float]
    mem_pct: float
    mem_available_mb: float
    rss_mb: float
    agent_cpu_pct: float
    disk_free_mb: float | None
    temp_c: float | None
    tpu_temp_c: float | None
    throttled: ThrottledDoc  # absent where the board has no get_throttled
    cpu_freq_mhz: float  # absent without cpufreq (and psutil's)
    wifi_rssi_dbm: int  # absent without a wireless interface
    ip_addresses: list[str]  # absent without one up
    uptime_s: float
    boot_uptime_s: float


@_STRICT
class TelemetryDoc(MachineDoc):
    """``<device>/telemetry`` (retained): the machine (absent without a probe), the
    inference, outbox and connection figures."""

    inference: InferenceDoc | None
    outbox: OutboxFigures
    mqtt: MqttFigures
    pipelines: NotRequired[dict[str, PipelineInferenceDoc]]  # with several pipelines
    shadows: NotRequired[dict[str, ShadowDoc]]  # model -> its shadow run (while one is on)
    outputs: NotRequired[dict[str, OutputsDoc]]  # model -> output statistics per version


class TelemetryExtra(TypedDict, total=False):
    """What agent/shadow/ adds to a telemetry document."""

    shadows: dict[str, ShadowDoc]
    outputs: dict[str, OutputsDoc]


@_OPEN
class EventDoc(TypedDict):
    """``<device>/events``: ``event`` and a detail that depends on it (docs/protocol.md's
    events table)."""

    event: EventName


@_OPEN
class ResultDoc(TypedDict):
    """``<device>/results``: one inference result, plus ``classes``, ``detections`` or
    ``values`` by task."""

    frame: int
    ts: float
    model: str
    version: int
    backend: str  # edgetpu or cpu
    latency_ms: float
    infer_ms: float
    pipeline: NotRequired[str]  # with pipelines: (on results/<pipeline>)


# -- documents as they travel: the envelope and a body --------------------------------


class _Envelope(TypedDict):
    schema: Literal[1]
    seq: int
    id: str
    ts: float


@_STRICT
class StatusMessage(StatusDoc):
    """A status as published; the Last Will, made by the broker, has no ``seq``/``id``."""

    schema: Literal[1]
    ts: float
    seq: NotRequired[int]
    id: NotRequired[str]


@_STRICT
class StateMessage(_Envelope, StateDoc):
    pass


@_STRICT
class TelemetryMessage(_Envelope, TelemetryDoc):
    pass


@_OPEN
class EventMessage(_Envelope, EventDoc):
    pass


@_OPEN
class ResultMessage(_Envelope, ResultDoc):
    pass


MESSAGES: Final[dict[str, type[Any]]] = {
    "status": StatusMessage,
    "state": StateMessage,
    "telemetry": TelemetryMessage,
    "events": EventMessage,
    "results": ResultMessage,
}
"""The document each device topic (``<prefix>/<device>/<stream>``) carries."""


@cache
def validator(stream: str) -> TypeAdapter[Any]:
    """A strict pydantic validator for the messages of ``stream`` (a key of
    :data:`MESSAGES`); ``validate_python`` raises ``pydantic.ValidationError``.
    Imports pydantic (the server's and the tests' dependency, not the device's)."""
    from pydantic import TypeAdapter

    return TypeAdapter(MESSAGES[stream])
