"""Secrets out of what the agent sends for diagnosis: log lines and its configuration.

Pure rules over plain values (no I/O), tested by tables (tests/test_diagnostics.py):

- :func:`redact_text` for free text (a log line, a string in the config): a URL's
  ``user:password@`` keeps the user and loses the password; ``password=…``,
  ``token: …``, ``api_key="…"`` and the like lose their value; ``Bearer …`` and
  ``Basic …`` credentials and PEM private key blocks are replaced whole.
- :func:`redact_config` for a document (the loaded config as a dict): a key named
  like a secret (:data:`KEY_RULES`, first match wins) has its value replaced; every
  other string goes through :func:`redact_text`.

What is removed becomes :data:`REDACTED`, so a reader sees that something was there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, Literal

REDACTED: Final = "<redacted>"

_SECRET_WORDS = (
    r"passw(?:or)?d|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|client[_-]?secret|credentials?|auth(?:orization)?|session[_-]?id|cookie"
)

_KEY = rf"\b[\w.-]*(?:{_SECRET_WORDS})[\w-]*[\"']?"  # a secret's name, maybe quoted

TEXT_RULES: Final[tuple[tuple[re.Pattern[str], str], ...]] = (
    # PEM private keys, whole (a key pasted into a message spans lines)
    (
        re.compile(
            r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|$)",
            re.DOTALL,
        ),
        REDACTED,
    ),
    # scheme://user:password@host -> scheme://user:<redacted>@host
    # (to the last @ before the path: a password may hold an @)
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*):[^\s/]*@"), rf"\1:{REDACTED}@"),
    # scheme://TOKEN@host: a long user name with no password is a token (GitHub's
    # https://ghp_…@github.com); a short one (admin, git, fleet) is a name
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/:@]{17,}@"), rf"\1{REDACTED}@"),
    # HTTP credentials: Authorization: Bearer abc, Basic dXNlcjpwYXNz
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    # "token": "x", password='x y': the quotes stay, so a JSON line stays JSON
    # (an escaped quote inside the value does not end it)
    (re.compile(rf"(?i)({_KEY}\s*[:=]\s*)([\"'])(?:\\.|(?!\2).)*\2"), rf"\1\2{REDACTED}\2"),
    # password=x, api_key: x, ?access_key=x&, Authorization: Bearer|Basic|Token|Digest x;
    # up to a separator
    (
        re.compile(
            rf"(?i)({_KEY}\s*[:=]\s*)(?:(?:bearer|basic|token|digest)\s+)?[^\s\"',;&)}}\]]+"
        ),
        rf"\1{REDACTED}",
    ),
)
"""(pattern, replacement) applied in order to free text."""

Action = Literal["keep", "redact"]

KEY_RULES: Final[tuple[tuple[re.Pattern[str], Action], ...]] = (
    # where a secret lives is not the secret: mqtt.password_file, password_credential
    (re.compile(r"(?i)_(file|path|dir|credential)$"), "keep"),
    (re.compile(rf"(?i)({_SECRET_WORDS})"), "redact"),
)
"""(pattern on a key's name, action) for documents: the first rule that matches
decides; a key no rule matches is kept (its strings still pass :func:`redact_text`)."""


def redact_text(text: str) -> str:
    """``text`` with every :data:`TEXT_RULES` match replaced."""
    for pattern, replacement in TEXT_RULES:
        text = pattern.sub(replacement, text)
    return text


def key_action(key: str) -> Action:
    """What :data:`KEY_RULES` says of a key named ``key``."""
    for pattern, action in KEY_RULES:
        if pattern.search(key):
            return action
    return "keep"


def redact_config(doc: Any) -> Any:
    """A copy of ``doc`` (JSON-like: dicts, lists, scalars) with secrets removed: the
    value of a key :func:`key_action` redacts (when not None), and secrets inside
    every other string (:func:`redact_text`)."""
    if isinstance(doc, Mapping):
        return {
            key: (
                REDACTED
                if value is not None and key_action(str(key)) == "redact"
                else redact_config(value)
            )
            for key, value in doc.items()
        }
    if isinstance(doc, list | tuple):
        return [redact_config(item) for item in doc]
    if isinstance(doc, str):
        return redact_text(doc)
    return doc
