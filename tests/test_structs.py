"""agent.structs: msgspec's validation errors read once into a key path and a message."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pytest
from msgspec import Meta

from agent.structs import dotted, locate, rule_pattern, whole

_NAME = rule_pattern(r"^[a-z]+$", "lower-case letters")


class _Item(msgspec.Struct, forbid_unknown_fields=True):
    size: Annotated[int, Meta(ge=0)]
    name: Annotated[str, Meta(pattern=_NAME)] = "a"

    def __post_init__(self) -> None:
        if self.name == "bad":
            raise ValueError("name: is reserved")


class _Doc(msgspec.Struct, forbid_unknown_fields=True):
    items: list[_Item]
    tags: dict[str, int] = {}
    groups: list[str] = []

    def __post_init__(self) -> None:
        if "x" in self.groups:
            raise ValueError(f"groups[{self.groups.index('x')}]: x is taken")
        if len(self.items) > 2:
            raise ValueError("too many items")


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({"items": [{"size": -1}]}, ("items", 0, "size"), "Expected `int` >= 0"),
        ({"items": [{"size": 1, "name": "A"}]}, ("items", 0, "name"), "must be lower-case letters"),
        ({"items": [{}]}, ("items", 0, "size"), "required"),
        ({}, ("items",), "required"),
        ({"items": [], "colour": 1}, ("colour",), "unknown field"),
        ({"items": [], "a\nb": 1}, ("a\nb",), "unknown field"),
        ({"items": [{"size": 1, "name": "bad"}]}, ("items", 0, "name"), "is reserved"),
        ({"items": [], "groups": ["a", "x"]}, ("groups", 1), "x is taken"),
        ({"items": [{"size": 1}] * 3}, (), "too many items"),
        ({"items": [], "tags": {"a": "1"}}, ("tags", "[...]"), "Expected `int`, got `str`"),
        ([], (), "Expected `object`, got `array`"),
    ],
)
def test_locate_gives_the_key_path_and_the_message(
    data: Any, path: tuple[str | int, ...], message: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, _Doc)
    assert locate(info.value) == (path, message)


def test_a_rule_is_moved_to_its_key_only_when_the_key_is_a_field() -> None:
    error = msgspec.ValidationError("name: is reserved")
    assert locate(error, frozenset({"name"})) == (("name",), "is reserved")
    assert locate(error, frozenset({"size"})) == ((), "name: is reserved")


def test_an_unregistered_pattern_keeps_msgspec_s_words() -> None:
    pattern = whole(r"^[0-9]+$")
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert("x", Annotated[str, Meta(pattern=pattern)])
    assert locate(info.value) == ((), f"Expected `str` matching regex {pattern!r}")


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("files", 1, "name"), "files[1].name"),
        (("device", "groups", 0), "device.groups[0]"),
        (("tags", "[...]"), "tags[...]"),
        (("device", "a\x1b[31m"), "device.'a\\x1b[31m'"),
        (("a.b",), "'a.b'"),
        (("x", "line\nbreak"), "x.'line\\nbreak'"),
        (("",), "''"),
        ((), ""),
    ],
)
def test_dotted_quotes_a_key_that_is_not_a_plain_name(
    path: tuple[str | int, ...], text: str
) -> None:
    assert dotted(path) == text
    assert dotted(path).isprintable()


def test_whole_anchors_the_end_of_the_text() -> None:
    assert whole(r"^a$") == r"^a\Z" and whole("^a") == "^a"
