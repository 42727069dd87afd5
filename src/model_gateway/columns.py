"""The columns of the files the gateway writes: exports, deliveries and labelling samples
(datafiles.py, deliveries.py); the configuration checks a delivery's own columns against
them."""

from __future__ import annotations

EXPORT_COLUMNS = (
    "prediction_id",
    "request_id",
    "route",
    "variant",
    "model_name",
    "configured_version",
    "reported_version",
    "config_version",
    "assignment",
    "inference",
    "method",
    "path",
    "request_time",
    "latency_ms",
    "first_byte_ms",
    "streamed",
    "status",
    "error",
    "predicted",
    "score",
    "served_model",
    "prompt_tokens",
    "completion_tokens",
    "shadow",
    "shadow_of",
    "batch_of",
    "batch_size",
    "features",
    "label",
    "label_time",
    "label_origin",
)
SAMPLE_COLUMNS = (
    "prediction_id",
    "request_id",
    "variant",
    "model_version",
    "request_time",
    "predicted",
    "score",
    "stratum",
    "inclusion_probability",
    "label",
)
