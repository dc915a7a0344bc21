"""The docs stay true: the configuration reference matches the config models, every
config field is described, local links resolve, and nothing points outside the repo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from agent import configdoc
from agent.config import fields_of, parse_config

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
MARKDOWN = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    + [p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith(".")]
)
# Markdown links and images: [text](target) and ![alt](target), not inside code.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def test_configuration_reference_matches_the_config_models() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == configdoc.render(), (
        f"docs/configuration.md is stale; regenerate it: {configdoc.REGENERATE}"
    )


def test_the_regenerate_command_prints_the_reference() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "agent.configdoc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert run.stdout == configdoc.render()
    assert run.stderr == ""


@pytest.mark.parametrize("model", configdoc.all_models(), ids=lambda m: m.__name__)
def test_every_config_field_has_a_description(model: type[msgspec.Struct]) -> None:
    missing = [
        name for name, field in fields_of(model).items() if not configdoc.description(field).strip()
    ]
    assert not missing, f"{model.__name__}: add Meta(description=...) to {', '.join(missing)}"


def test_the_reference_covers_every_key_and_source_type() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    for section, field in fields_of(configdoc.Config).items():
        assert f"## `{section}`" in text
        struct = configdoc._section_struct(field)
        kinds = configdoc.source_types() if struct is None else [struct]
        prefix = f"{section}[]" if section == "pipelines" else section
        for kind in kinds:
            for key in fields_of(kind):
                assert f"| `{prefix}.{key}` |" in text
    for kind in configdoc.source_types():
        tag = fields_of(kind)["type"].default
        assert f"### source type {tag}" in text


def test_the_reference_example_is_a_valid_config() -> None:
    config = parse_config(configdoc.EXAMPLE, "example.yaml", env={})
    assert config.device.id == "pi-door-01"
    assert config.model.name == "person-detector"
    assert "```yaml\n" + configdoc.EXAMPLE in REFERENCE.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("auto", "auto"),
        ("5", '"5"'),  # YAML reads 5 as a number, which mqtt.protocol refuses
        ("3.1.1", "3.1.1"),
        ("", '""'),
        ("true", '"true"'),
        (True, "true"),
        (False, "false"),
        (1.0, "1.0"),
        (Path("/var/lib/edge-agent/models"), "/var/lib/edge-agent/models"),
    ],
)
def test_values_are_written_as_yaml_reads_them(value: object, written: str) -> None:
    assert configdoc._literal(value) == written


def test_a_quoted_literal_from_the_reference_is_accepted() -> None:
    assert parse_config('mqtt: {protocol: "5"}', env={}).mqtt.protocol == "5"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return LINK.findall(CODE.sub("", text))


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_local_links_resolve(doc: Path) -> None:
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif not linked.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {', '.join(broken)}"


def test_docs_exist_for_the_readme_map() -> None:
    for name in (
        "install",
        "fleet",
        "configuration",
        "protocol",
        "troubleshooting",
        "architecture",
        "benchmarks",
    ):
        assert (ROOT / "docs" / f"{name}.md").is_file(), name
        assert f"(docs/{name}.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_nothing_in_the_repository_points_outside_it() -> None:
    outside = ("../" + "shared", "DESIGN" + ".md")
    searched = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / ".ci" / "run"]
    for folder in ("docs", "agent", "tests", "bench", "provisioning", "systemd"):
        searched += [p for p in (ROOT / folder).rglob("*") if p.is_file()]
    found = []
    for path in searched:
        if "__pycache__" in path.parts or path.suffix in (".pyc", ".so", ".tflite"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {word}" for word in outside if word in text]
    assert not found, "point to the project's docs/ instead: " + "; ".join(found)
