"""Predictions out to files and labels back in: ``export``, ``sample``, ``feedback import``.

Exports stream from the store in batches (memory stays flat however long the window) and
show a progress bar on stderr; each row is a prediction joined with its latest label.
"""

from __future__ import annotations

import csv
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from tqdm import tqdm

from .columns import EXPORT_COLUMNS, SAMPLE_COLUMNS
from .feedback import FeedbackItem, validate_item
from .labelling import draw, score_deciles
from .store import Store

Format = Literal["csv", "jsonl", "parquet"]


def rfc3339(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    from .control_answers import format_rfc3339

    return format_rfc3339(seconds)


def export_row(row: dict[str, Any]) -> dict[str, Any]:
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
                        writer(export_row(row))
                    written += len(batch)
                    progress.update(len(batch))
    return written


def _text_writer(fmt: Format, handle: IO[str]) -> Any:
    if fmt == "jsonl":
        return lambda row: handle.write(orjson.dumps(row).decode() + "\n")
    writer = csv.DictWriter(handle, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()
    return writer.writerow


def parquet_schema(columns: Sequence[str]) -> Any:
    """The Parquet types of export columns (text for any not known here)."""
    import pyarrow as pa

    def kind(column: str) -> Any:
        if column in ("latency_ms", "first_byte_ms", "score"):
            return pa.float64()
        if column in ("status", "prompt_tokens", "completion_tokens", "batch_size"):
            return pa.int64()
        if column in ("shadow", "inference", "streamed"):
            return pa.bool_()
        return pa.string()

    return pa.schema([(column, kind(column)) for column in columns])


async def _export_parquet(
    store: Store, route: str, since: float, until: float, out: Path, progress: tqdm[Any]
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(EXPORT_COLUMNS)
    written = 0
    with pq.ParquetWriter(str(out), schema) as writer:
        async for batch in store.iter_export(route, since, until):
            rows = [export_row(row) for row in batch]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            written += len(rows)
            progress.update(len(rows))
    return written


async def sample(
    store: Store,
    route: str,
    since: float,
    until: float,
    n: int,
    seed: int,
    out: Path,
    strategy: str = "uniform",
    by: Sequence[str] = (),
) -> int:
    """Predictions not labelled yet, drawn for hand labelling (labelling.py), to a CSV with an
    empty ``label`` column and each row's ``inclusion_probability``, ready for ``feedback
    import``. ``uniform``: ``n`` at random; ``stratified``: ``n`` split over the strata
    ``by`` names, more where positives are expected (``n`` per variant when ``by`` names the
    variant); ``disagreement``: ``n`` of those a shadow answered otherwise than the live
    model. The same store, arguments and seed give the same rows."""
    live: list[dict[str, Any]] = []
    shadow_answers: dict[str, list[str]] = defaultdict(list)
    async for batch in store.iter_export(route, since, until):
        # in prediction id order, so the draw is reproducible; live predictions only (a label
        # given for one measures its shadow copies too), of a single row (a batch request is
        # labelled row by row), not labelled yet
        for row in batch:
            if row["shadow"]:
                if row["predicted"] is not None:
                    shadow_answers[row["shadow_of"]].append(row["predicted"])
            elif row["inference"] and row["batch_size"] is None:
                live.append(row)
    chosen = sample_rows(live, shadow_answers, n, seed, strategy, by)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SAMPLE_COLUMNS)
        writer.writeheader()
        writer.writerows(chosen)
    return len(chosen)


def sample_rows(
    rows: list[dict[str, Any]],
    shadow_answers: dict[str, list[str]],
    n: int,
    seed: int | tuple[int, ...],
    strategy: str,
    by: Sequence[str],
) -> list[dict[str, Any]]:
    """The rows of a labelling sample (:data:`SAMPLE_COLUMNS`) drawn from ``rows`` (live
    predictions in prediction id order); those labelled already are skipped;
    ``shadow_answers``: the shadows' answers by live prediction id, for ``disagreement``."""
    live = [row for row in rows if row["label"] is None]
    if strategy == "disagreement":
        live = [
            row
            for row in live
            if row["predicted"] is not None
            and any(a != row["predicted"] for a in shadow_answers.get(row["prediction_id"], ()))
        ]
    if strategy == "uniform":
        by = ()
    keys = _strata(live, by)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(live):
        groups[row["variant"] if "variant" in by else ""].append(i)
    chosen: list[tuple[int, float]] = []
    for number, name in enumerate(sorted(groups)):
        members = groups[name]
        drawn = draw(
            [keys[i] for i in members],
            [live[i]["score"] for i in members],
            n,
            (*(seed if isinstance(seed, tuple) else (seed,)), number),
            by_score=strategy == "stratified" and "score_decile" in by,
        )
        chosen.extend((members[j], p) for j, p in drawn)
    out = []
    for i, probability in sorted(chosen):
        row = live[i]
        out.append(
            {
                "prediction_id": row["prediction_id"],
                "request_id": row["request_id"],
                "variant": row["variant"],
                "model_version": row["reported_version"] or row["configured_version"],
                "request_time": rfc3339(row["request_time"]),
                "predicted": row["predicted"],
                "score": row["score"],
                "stratum": ",".join(f"{k}={v}" for k, v in zip(by, keys[i], strict=True)),
                # a disagreement sample stands for the disagreements only: its labels are no
                # estimate of the variant's figures, and carry no weight
                "inclusion_probability": "" if strategy == "disagreement" else repr(probability),
                "label": "",
            }
        )
    return out


def _strata(rows: list[dict[str, Any]], by: Sequence[str]) -> list[tuple[Any, ...]]:
    """Each row's stratum: its values of ``by``; score deciles within its variant."""
    deciles: dict[int, int] = {}
    if "score_decile" in by:
        per_variant: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            per_variant[row["variant"]].append(i)
        for members in per_variant.values():
            found = score_deciles([rows[i]["score"] for i in members])
            deciles.update(zip(members, found, strict=True))
    out = []
    for i, row in enumerate(rows):
        values = {
            "variant": row["variant"],
            "model_version": row["reported_version"] or row["configured_version"],
            "predicted": row["predicted"],
            "score_decile": deciles.get(i),
        }
        out.append(tuple(values[key] for key in by))
    return out


class LabelFileError(Exception):
    """The file as a whole cannot be read as labels."""


def read_labels(
    path: Path, source: str | None, origin: str | None = None
) -> Iterator[tuple[int, FeedbackItem | str]]:
    """(line number, item or reason) for each CSV row that has a label, an outcome or a
    value; other rows are not labelled yet and are skipped. A file without a ``label``,
    ``outcome`` or ``value`` column, or without a ``prediction_id`` or ``request_id`` column,
    raises :class:`LabelFileError`. Labels are hand labels (origin ``human``) when the file
    has an ``inclusion_probability`` column (a labelling sample), else an ``import``, unless
    ``origin`` or a row says otherwise."""
    now = time.time()
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not columns & {"label", "outcome", "value"}:
            raise LabelFileError(f"no label column (columns: {', '.join(sorted(columns))})")
        if not columns & {"prediction_id", "request_id"}:
            raise LabelFileError("no prediction_id or request_id column")
        default_origin = origin or ("human" if "inclusion_probability" in columns else "import")
        for line, row in enumerate(reader, start=2):
            cells = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
            if not any(cells.get(k) for k in ("label", "outcome", "value")):
                continue
            item: dict[str, Any] = {}
            for key in ("prediction_id", "request_id", "label", "timestamp", "source"):
                if cells.get(key):
                    item[key] = cells[key]
            # a sample's weight goes with its hand label, not with a decision alone
            if cells.get("inclusion_probability") and cells.get("label"):
                item["inclusion_probability"] = _number_cell(cells["inclusion_probability"])
            if cells.get("value"):
                item["value"] = _number_cell(cells["value"])
            if cells.get("outcome"):
                item["outcome"] = cells["outcome"]
            item["origin"] = cells.get("origin") or default_origin
            if source and "source" not in item:
                item["source"] = source
            yield line, validate_item(item, now)


def _number_cell(text: str) -> float | str:
    """A cell's number, or its text (refused, with a reason, by the item's validation)."""
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else text
