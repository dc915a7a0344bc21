"""edge-agent: verified TFLite model updates, inference and MQTT telemetry for edge boards."""

__version__ = "0.1.0"
