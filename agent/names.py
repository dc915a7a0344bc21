"""The names both sides put in topics and ACL lines: device ids, group names, prefixes.

One topic level each, of letters, digits, '.', '_' and '-': no wildcard, no '/', nothing
mosquitto's ACL parser would read as a comment or a %-code. The device's config
(agent.config) and the fleet's tools (agent.fleet.acl, the server) check names here, so
the device's path imports nothing of agent.fleet.
"""

from __future__ import annotations

import re

# The same rule as DeviceConfig.id in agent/config.py: one topic level, no wildcards,
# no '/', no spaces, nothing mosquitto's ACL parser would read as a comment or a %-code.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# "groups" is a topic level of its own (PREFIX/groups/<group>/desired): a device with
# that id would own PREFIX/groups/reply/# and so the desired state of group "reply".
RESERVED_DEVICE_IDS = frozenset({"groups"})


def check_name(kind: str, name: str) -> str | None:
    """The problem with ``name`` as a ``kind``, or None when it is usable."""
    if not NAME_PATTERN.fullmatch(name):
        return (
            f"{kind} {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(not first), no '/', '+', '#' or spaces"
        )
    return None


def check_prefix(prefix: str) -> str | None:
    """The problem with ``prefix`` as a topic prefix, or None when it is usable.

    A prefix is one or more topic levels (``edge``, ``acme/edge``) of the same
    characters as device ids; it cannot start with '$' (broker topics).
    """
    levels = prefix.split("/")
    if not all(NAME_PATTERN.fullmatch(level) for level in levels):
        return (
            f"topic prefix {prefix!r} is not valid: levels of letters, digits, '.', '_' "
            "and '-' joined by '/', no '+', '#', spaces or empty levels"
        )
    return None


def check_device_id(device: str) -> str | None:
    """The problem with ``device`` as a device id (= certificate CN), or None when usable.

    Whoever signs device certificates must apply this check to the CN: the ACL's
    patterns trust the CN, and a CN such as ``dev-a/cmd`` would reach dev-a's commands.
    """
    problem = check_name("device id", device)
    if problem is None and device in RESERVED_DEVICE_IDS:
        problem = f"device id {device!r} is reserved (it is a topic level of its own)"
    return problem


def check_group_name(group: str) -> str | None:
    """The problem with ``group`` as a group name, or None when it is usable.

    A group name is a topic level (``PREFIX/groups/<group>/desired``) and a line of the
    ACL: the same rule as device ids, so a '#' or '+' cannot widen a subscription and
    a '/' cannot reach another group's topics.
    """
    return check_name("group name", group)
