"""The error families of edge-agent.

Callers branch on the family, not on the message:

- ``ConfigError``: the configuration is invalid (exit 78, never retried).
- ``TransportError``: the registry could not be reached or the transfer broke off;
  retried with capped, jittered backoff, and a partial download is kept for resume.
- ``VerificationError``: what arrived is not what was promised (length, hash,
  signature, manifest rules); never retried, reported loudly.
- ``RefusedError``: the release is well-formed but policy forbids it (downgrade,
  same version with other bytes, another model); never retried.
- ``StoreError``: the local store cannot take the release (disk full, busy, corrupt).
- ``ValidationError``: the release fails its on-device self-test or latency budget;
  never retried (the version is marked bad on this device).
- ``ModelError``: a model cannot be loaded or run here (no runtime, compiled for a TPU
  that is absent, corrupt file); ``AcceleratorError`` when the Edge TPU is the cause.
- ``SourceError`` (``agent.sources``): the stream is lost; the pipeline reconnects.
- ``DocumentError`` (also a ValueError): a JSON document from outside (manifest, index,
  desired state, command, a device's report) is not one we accept
  (``agent.strictjson``); each caller turns it into its own family (a manifest's into
  VerificationError, a command's into an error reply).
- ``DatabaseError``: the fleet server's database URL is not one we accept, or the
  database cannot be reached or migrated (``agent.server.db``); one line, no traceback.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose; its text is shown to operators."""


class ConfigError(EdgeAgentError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class DocumentError(EdgeAgentError, ValueError):
    """A JSON document from outside breaks the parsing rules; one line, ``WHAT: why``."""


class DatabaseError(EdgeAgentError):
    """The fleet server's database is unusable: a bad URL, unreachable, or not migratable."""


class UpdateError(EdgeAgentError):
    """An update could not be completed; the active release is unchanged."""


class TransportError(UpdateError):
    """The registry was unreachable or a transfer broke off. Worth retrying."""


class RegistryError(UpdateError):
    """The registry answered, but not usefully (404, off-host redirect). Not retried."""


class VerificationError(UpdateError):
    """Bytes, length, signature or manifest do not match what was promised. Not retried."""


class RefusedError(UpdateError):
    """The release is valid but policy refuses it (downgrade, other bytes, other model)."""


class StoreError(UpdateError):
    """The local model store cannot complete the operation (no space, busy, damaged)."""


class ValidationError(UpdateError):
    """The release failed its self-test or latency budget on this device. Not retried."""


class ModelError(EdgeAgentError):
    """A model cannot be loaded or run on this device; the message says what to change."""


class AcceleratorError(ModelError):
    """The Edge TPU is missing, unreachable or failed; the CPU variant may still serve."""
