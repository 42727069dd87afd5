"""Predictions out to files and labels back in: ``export``, ``sample``, ``feedback import``.

Exports stream from the store in batches (memory stays flat however long the window) and
show a progress bar on stderr; each row is a prediction joined with its latest label.
"""

from __future__ import annotations

import csv
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from tqdm import tqdm

from .feedback import FeedbackItem, validate_item
from .store import Store

Format = Literal["csv", "jsonl", "parquet"]

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
    "label",
    "label_time",
)
SAMPLE_COLUMNS = (
    "prediction_id",
    "request_id",
    "variant",
    "model_version",
    "request_time",
    "predicted",
    "score",
    "label",
)


def rfc3339(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    from .control_answers import format_rfc3339

    return format_rfc3339(seconds)


def _export_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {column: row.get(column) for column in EXPORT_COLUMNS}
    out["request_time"] = rfc3339(row["request_time"])
    out["label_time"] = rfc3339(row["label_time"])
    out["shadow"] = bool(row["shadow"])
    out["inference"] = bool(row["inference"])
    out["streamed"] = bool(row["streamed"])
    return out


async def export(
    store: Store, route: str, since: float, until: float, fmt: Format, out: Path
) -> int:
    """Write every prediction of ``route`` in [since, until) to ``out``; the row count."""
    total = await store.count_rows(route, since, until)
    written = 0
    with tqdm(total=total, unit="rows", file=sys.stderr, disable=None) as progress:
        if fmt == "parquet":
            written = await _export_parquet(store, route, since, until, out, progress)
        else:
            with out.open("w", encoding="utf-8", newline="") as handle:
                writer = _text_writer(fmt, handle)
                async for batch in store.iter_export(route, since, until):
                    for row in batch:
                        writer(_export_row(row))
                    written += len(batch)
                    progress.update(len(batch))
    return written


def _text_writer(fmt: Format, handle: IO[str]) -> Any:
    if fmt == "jsonl":
        return lambda row: handle.write(orjson.dumps(row).decode() + "\n")
    writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    return writer.writerow


async def _export_parquet(
    store: Store, route: str, since: float, until: float, out: Path, progress: tqdm[Any]
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            (
                c,
                pa.float64()
                if c in ("latency_ms", "first_byte_ms", "score")
                else pa.int64()
                if c in ("status", "prompt_tokens", "completion_tokens", "batch_size")
                else pa.bool_()
                if c in ("shadow", "inference", "streamed")
                else pa.string(),
            )
            for c in EXPORT_COLUMNS
        ]
    )
    written = 0
    with pq.ParquetWriter(str(out), schema) as writer:
        async for batch in store.iter_export(route, since, until):
            rows = [_export_row(row) for row in batch]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            written += len(rows)
            progress.update(len(rows))
    return written


async def sample(
    store: Store, route: str, since: float, until: float, n: int, seed: int, out: Path
) -> int:
    """``n`` predictions drawn at random (the same ones for the same seed and store) to a CSV
    with an empty ``label`` column, ready for hand labelling and ``feedback import``."""
    rows: list[dict[str, Any]] = []
    async for batch in store.iter_export(route, since, until):
        # in prediction id order, so the draw is reproducible; live predictions only: a label
        # given for one measures its shadow copies too
        rows.extend(row for row in batch if not row["shadow"])
    chosen = random.Random(seed).sample(rows, min(n, len(rows)))
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        for row in chosen:
            writer.writerow(
                {
                    "prediction_id": row["prediction_id"],
                    "request_id": row["request_id"],
                    "variant": row["variant"],
                    "model_version": row["reported_version"] or row["configured_version"],
                    "request_time": rfc3339(row["request_time"]),
                    "predicted": row["predicted"],
                    "score": row["score"],
                    "label": "",
                }
            )
    return len(chosen)


class LabelFileError(Exception):
    """The file as a whole cannot be read as labels."""


def read_labels(path: Path, source: str | None) -> Iterator[tuple[int, FeedbackItem | str]]:
    """(line number, item or reason) for each CSV row that has a label; blank labels are
    rows not labelled yet and are skipped. A file without a ``label`` column, or without a
    ``prediction_id`` or ``request_id`` column, raises :class:`LabelFileError`."""
    now = time.time()
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if "label" not in columns:
            raise LabelFileError(f"no label column (columns: {', '.join(sorted(columns))})")
        if not columns & {"prediction_id", "request_id"}:
            raise LabelFileError("no prediction_id or request_id column")
        for line, row in enumerate(reader, start=2):
            if not (row.get("label") or "").strip():
                continue
            item: dict[str, Any] = {"label": row["label"].strip()}
            for key in ("prediction_id", "request_id", "timestamp", "source"):
                if (row.get(key) or "").strip():
                    item[key] = row[key].strip()
            if source and "source" not in item:
                item["source"] = source
            yield line, validate_item(item, now)
