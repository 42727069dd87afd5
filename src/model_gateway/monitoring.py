"""A route's monitored data against its references: building a reference (from a file, or
pinned from a window of the log) and a window's statistics per variant, model version and
feature (docs/monitoring.md).

The figures come from the store, so every gateway sharing it (workers, replicas) computes
the same ones; the numerical work runs off the event loop (:func:`window_statistics` is
called in a thread).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from .config import SCORE_FEATURE, RouteConfig, monitors_score
from .drift import STATISTICS, compare, summarize
from .features import category_text, number
from .store import Store
from .store.queries import EVERY_RECORD

#: a reference that applies to every variant, or every model version, of its route
ANY = "*"
Key = tuple[str, str]
#: the ends of prediction ids a sample is drawn by (six hex digits)
SAMPLE_SPACE = 16**6
#: a reference pinned from the log reads at most about this many of the window's records
PIN_MOST = 200_000


class ReferenceBuildError(ValueError):
    """A reference could not be built from what it was given; the message says why."""


def monitored(route: RouteConfig) -> list[tuple[str, bool]]:
    """The route's monitored names, each with whether it is categorical: its features, then
    the score when it is monitored."""
    assert route.monitoring is not None
    names = [(f.name, f.kind == "categorical") for f in route.monitoring.features]
    return names + ([(SCORE_FEATURE, False)] if monitors_score(route) else [])


def collect(route: RouteConfig, rows: Iterable[dict[str, Any]]) -> dict[Key, dict[str, list[Any]]]:
    """Each (variant, model version)'s values of each monitored name, from the log's rows.

    A request's features are on its own record (a batch's, on the batch's); a prediction's
    score on its own (a batch's, on each row's). A score missing from a prediction that was
    answered counts as missing; a feature the record does not name (monitored only since,
    or a request whose body was not read) does not count at all."""
    assert route.monitoring is not None
    names = [f.name for f in route.monitoring.features]
    score = monitors_score(route)
    found: dict[Key, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        values = found[(row["variant"], row["model_version"])]
        features = row.get("features")
        if features:
            doc = orjson.loads(features)
            for name in names:
                if name in doc:
                    found_value = doc[name]  # a request's value, or its rows'
                    if isinstance(found_value, list):
                        values[name] += found_value
                    else:
                        values[name].append(found_value)
        if score and row.get("batch_size") is None and row["status"] < 400:
            values[SCORE_FEATURE].append(row["score"])
    return found


def reference_for(references: Sequence[dict[str, Any]], variant: str, version: str) -> Any:
    """The reference that applies to ``variant`` serving ``version``: the newest of those
    naming both, else the variant alone, else the version alone, else neither; or None."""
    for wanted in ((variant, version), (variant, ANY), (ANY, version), (ANY, ANY)):
        for reference in references:  # newest first
            if (reference["variant"], reference["model_version"]) == wanted:
                return reference
    return None


def window_statistics(
    route: RouteConfig,
    rows: Sequence[dict[str, Any]],
    references: Sequence[dict[str, Any]],
    window: str,
) -> list[dict[str, Any]]:
    """A window's statistics: one entry per variant, model version and monitored name."""
    assert route.monitoring is not None
    bounds = {f.name: f.range for f in route.monitoring.features}
    out = []
    for (variant, version), values in sorted(collect(route, rows).items()):
        reference = reference_for(references, variant, version)
        summaries = {} if reference is None else reference["summaries"]
        for name, categorical in monitored(route):
            if name not in values:
                continue
            figures = compare(summaries.get(name), values[name], categorical, bounds.get(name))
            out.append(
                {
                    "window": window,
                    "variant": variant,
                    "model_version": version,
                    "feature": name,
                    "reference_id": None if reference is None else reference["reference_id"],
                    **{k: figures[k] for k in STATISTICS},
                }
            )
    return out


async def window_rows(
    store: Store, route: str, since: float, until: float, most: int
) -> list[dict[str, Any]]:
    """A route's monitored records of [since, until): all of them, or when there are more than
    ``most``, a uniform sample of about ``most`` (by the random end of each prediction id, so
    that a request is in or out alike in every window and on every gateway)."""
    total = await store.count_monitored(route, since, until)
    if total <= most:
        return await store.monitored_rows(route, since, until, EVERY_RECORD)
    below = f"{int(most / total * SAMPLE_SPACE):06x}"
    return await store.monitored_rows(route, since, until, below)


async def drift(
    store: Store, route: RouteConfig, since: float, until: float, window: str
) -> list[dict[str, Any]]:
    """The statistics of ``route`` over [since, until) against its stored references (about
    ``monitoring.max_rows`` of the window's records, at most); computed in a thread."""
    assert route.monitoring is not None
    rows = await window_rows(store, route.name, since, until, route.monitoring.max_rows)
    references = await stored_references(store, route.name)
    return await asyncio.to_thread(window_statistics, route, rows, references, window)


async def stored_references(store: Store, route: str | None) -> list[dict[str, Any]]:
    """The references stored for ``route`` (every route: None), newest first, each with its
    summaries and provenance read."""
    out = []
    for row in await store.references(route):
        body = orjson.loads(row["body"])
        out.append({**row, "source": orjson.loads(row["source"]), "summaries": body})
    return out


def described(reference: dict[str, Any]) -> dict[str, Any]:
    """What a listing shows of a reference: who it applies to, where it came from, and each
    feature's count, missing ratio, mean and variance (not its sample)."""
    return {
        "reference_id": reference["reference_id"],
        "route": reference["route"],
        "variant": reference["variant"],
        "model_version": reference["model_version"],
        "created_at": reference["created_at"],
        "source": reference["source"],
        "features": {
            name: {k: s.get(k) for k in ("kind", "count", "missing_ratio", "mean", "variance")}
            for name, s in reference["summaries"].items()
        },
    }


def summaries_of(route: RouteConfig, columns: dict[str, list[Any]]) -> dict[str, Any]:
    """The summaries of a reference from each monitored name's values (the score's when
    given); a feature without values is an error."""
    out = {}
    absent = []
    for name, categorical in monitored(route):
        if name not in columns:
            if name != SCORE_FEATURE:
                absent.append(name)
            continue
        out[name] = summarize(columns[name], categorical)
    if absent:
        raise ReferenceBuildError(
            f"no column for {', '.join(absent)} (the reference names its columns as the"
            " route's monitored features)"
        )
    return out


def read_columns(path: Path, route: RouteConfig) -> dict[str, list[Any]]:
    """A training file's columns of the route's monitored names: CSV (a header row naming
    them) or Parquet; numeric values read as numbers, blanks and what is not a number as
    missing."""
    kinds = dict(monitored(route))
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path, columns=[c for c in kinds if c in _parquet_names(path)])
        except Exception as error:  # pyarrow's errors have no common base
            raise ReferenceBuildError(f"{path}: cannot read as Parquet: {error}") from None
        raw = {name: table.column(name).to_pylist() for name in table.column_names}
    else:
        try:
            with path.open(newline="", encoding="utf-8-sig") as handle:  # Excel's BOM
                reader = csv.DictReader(handle)
                wanted = [c for c in kinds if c in (reader.fieldnames or [])]
                raw = {c: [] for c in wanted}
                for record in reader:
                    for c in wanted:
                        raw[c].append(record.get(c))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise ReferenceBuildError(f"{path}: cannot read as CSV: {error}") from None
    return {c: [_value(v, kinds[c]) for v in values] for c, values in raw.items()}


def _parquet_names(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as error:  # pyarrow's errors have no common base
        raise ReferenceBuildError(f"{path}: cannot read as Parquet: {error}") from None


def _value(value: Any, categorical: bool) -> Any:
    """A training file's cell as a request's value would be read (features.py)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):  # CSV: every cell is text
        if categorical:
            return category_text(_file_category(value))
        try:
            return number(float(value))
        except ValueError:
            return None
    return category_text(value) if categorical else number(value)


def _file_category(text: str) -> Any:
    """A CSV cell as the value it stands for where that matters to a category's spelling: a
    bool (pandas writes True), a whole number (pandas writes 1.0 in a column with blanks)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = float(text)
    except ValueError:
        return text
    return value if value.is_integer() and "." in text else text


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reference_row(
    route: str,
    variant: str,
    version: str,
    summaries: dict[str, Any],
    source: dict[str, Any],
    now: float | None = None,
) -> dict[str, Any]:
    """A reference as the store keeps it."""
    return {
        "reference_id": uuid.uuid4().hex,
        "route": route,
        "variant": variant,
        "model_version": version,
        "created_at": time.time() if now is None else now,
        "source": orjson.dumps(source).decode(),
        "body": orjson.dumps(summaries).decode(),
    }


async def pin_from_log(
    store: Store, route: RouteConfig, since: float, until: float
) -> list[dict[str, Any]]:
    """A reference per variant and model version seen in [since, until), from the logged
    values of the whole window (a uniform sample of PIN_MOST records of a longer one)."""
    rows = await window_rows(store, route.name, since, until, PIN_MOST)
    requests = sum(1 for row in rows if row.get("features"))
    source = {"log": {"since": since, "until": until, "requests": requests}}
    out = await asyncio.to_thread(_pinned, route, rows, source)
    if not out:
        raise ReferenceBuildError(f"no monitored requests of route {route.name!r} in that window")
    return out


def _pinned(
    route: RouteConfig, rows: list[dict[str, Any]], source: dict[str, Any]
) -> list[dict[str, Any]]:
    out = []
    for (variant, version), values in sorted(collect(route, rows).items()):
        summaries = {
            name: summarize(values[name], categorical)
            for name, categorical in monitored(route)
            if name in values
        }
        out.append(reference_row(route.name, variant, version, summaries, source))
    return out
