"""The broker's access control list: what each device and operator may publish and read.

``render_acl`` writes a mosquitto ``acl_file`` for listeners that take the client
certificate's CN as the user name (``use_identity_as_username true``), so a device's
user name is its device id. Per-device rights are ``pattern`` lines with ``%u``; they
apply to every user, which is why the CA must sign only valid device ids (and the
admin names only for operators): a certificate's CN *is* its identity on the broker.

A device may write only its own reports (status, state, telemetry, results, events,
replies) and read only its own desired state and commands plus its groups' desired
states; it can never write a desired state or a command, its own included. With Home
Assistant discovery (``homeassistant.discovery``), a device also writes only its own
discovery configs (``<ha_prefix>/<component>/<id>/<object_id>/config``) and reads Home
Assistant's birth message (``<ha_prefix>/status``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agent.errors import ConfigError
from agent.names import (  # the rules live beside the device's config; re-exported here
    NAME_PATTERN,
    RESERVED_DEVICE_IDS,
    check_device_id,
    check_group_name,
    check_name,
    check_prefix,
)

__all__ = [
    "NAME_PATTERN",
    "RESERVED_DEVICE_IDS",
    "check_device_id",
    "check_group_name",
    "check_prefix",
    "render_acl",
]

# results/+: a pipeline's own results topic (``pipelines:``: …/results/PIPELINE)
DEVICE_WRITES = (
    "status",
    "state",
    "telemetry",
    "results",
    "results/+",
    "events",
    "reply",
    "reply/#",
)
DEVICE_READS = ("desired", "desired/+", "shadow/+", "cmd/#")
GROUP_READS = ("desired", "desired/+", "shadow/+")  # a model's own topics: …/desired/MODEL
HA_PREFIX = "homeassistant"  # Home Assistant's default discovery prefix


HA_COMPONENTS = ("sensor", "binary_sensor", "update")  # agent/homeassistant.py's kinds


def render_acl(
    devices: Mapping[str, Sequence[str]],
    *,
    prefix: str = "edge",
    admins: Sequence[str] = ("fleet",),
    ha_prefix: str = HA_PREFIX,
) -> str:
    """The text of a mosquitto acl_file for ``devices`` (id -> its groups) and ``admins``.

    Guarantees, for every certificate CN the broker accepts:

    - a device (CN = device id) may write only ``PREFIX/<id>/status``, ``/state``,
      ``/telemetry``, ``/results``, ``/results/+``, ``/events``, ``/reply`` and
      ``/reply/#``, and read
      only ``PREFIX/<id>/desired``, ``PREFIX/<id>/desired/+``, ``PREFIX/<id>/shadow/+``,
      ``PREFIX/<id>/cmd/#`` and ``PREFIX/groups/<group>/desired``, ``…/desired/+`` and
      ``…/shadow/+`` for the groups given here (``+``: a model's own topic);
    - a device may write only its own Home Assistant discovery configs,
      ``HA_PREFIX/<component>/<id>/<object_id>/config``, and read ``HA_PREFIX/status``;
    - an admin may read and write everything under ``PREFIX/`` and ``HA_PREFIX/``;
    - the reserved name ``groups`` gets nothing, even with a certificate.

    The output is deterministic (sorted), so it diffs well under configuration
    management. Raises ConfigError naming every invalid device id, group name, admin
    name or prefix, and any name used both as a device and as an admin.
    """
    problems: list[str] = []
    if (problem := check_prefix(prefix)) is not None:
        problems.append(problem)
    if (problem := check_prefix(ha_prefix)) is not None:
        problems.append(f"home assistant {problem}")
    for device, groups in devices.items():
        if (problem := check_device_id(device)) is not None:
            problems.append(problem)
        if isinstance(groups, str):  # "door" would silently mean groups d, o, o, r
            problems.append(f"groups of {device!r} must be a list of names, not {groups!r}")
            continue
        problems += [
            f"{p} (device {device!r})"
            for group in groups
            if (p := check_group_name(group)) is not None
        ]
    if not admins:
        problems.append("at least one admin is needed (the fleet tools connect as one)")
    for admin in admins:
        if (problem := check_name("admin name", admin)) is not None:
            problems.append(problem)
        elif admin in devices:
            problems.append(f"{admin!r} is both a device and an admin")
        elif admin in RESERVED_DEVICE_IDS:
            problems.append(f"admin name {admin!r} is reserved (it is a topic level of its own)")
    if problems:
        raise ConfigError(problems)

    lines = [
        "# mosquitto acl_file for edge-agent, written by `edge-fleet acl`; edit the command,",
        "# not this file. User name = client certificate CN (use_identity_as_username):",
        "# devices are their device id, operators their admin name. The patterns below",
        "# hold for every certificate the CA signs, so sign only valid device ids.",
        "# Anything not granted here is denied.",
        "",
        "# Each device: its own reports (write) and its own desired state and commands",
        "# (read). Never the other way round: nobody but an admin issues instructions.",
    ]
    lines += [f"pattern write {prefix}/%u/{suffix}" for suffix in DEVICE_WRITES]
    lines += [f"pattern read {prefix}/%u/{suffix}" for suffix in DEVICE_READS]
    lines += [
        "",
        "# Home Assistant MQTT discovery (homeassistant.discovery): each device its own",
        "# discovery configs of the three kinds it makes (write: never a switch or a",
        "# button whose command topic Home Assistant would publish to), and Home",
        "# Assistant's birth message (read).",
        *(f"pattern write {ha_prefix}/{kind}/%u/+/config" for kind in HA_COMPONENTS),
        f"pattern read {ha_prefix}/status",
        "",
        "# Not a device: 'groups' is a topic level, a certificate with that CN gets nothing.",
        *(
            f"user {name}\ntopic deny {prefix}/#\ntopic deny {ha_prefix}/#"
            for name in sorted(RESERVED_DEVICE_IDS)
        ),
    ]
    grouped = {device: sorted(set(groups)) for device, groups in devices.items() if groups}
    if grouped:
        lines += ["", "# The desired states and shadow runs of each device's groups (read only)."]
    for device in sorted(grouped):
        lines.append(f"user {device}")
        lines += [
            f"topic read {prefix}/groups/{group}/{suffix}"
            for group in grouped[device]
            for suffix in GROUP_READS
        ]
    lines += [
        "",
        "# Operators (edge-fleet deploy, devices, telemetry): everything under the prefix,",
        "# and under Home Assistant's discovery prefix.",
    ]
    for admin in sorted(set(admins)):
        lines += [f"user {admin}", f"topic readwrite {prefix}/#", f"topic readwrite {ha_prefix}/#"]
    return "\n".join(lines) + "\n"
