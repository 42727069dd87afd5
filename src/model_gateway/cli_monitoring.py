"""``model-gateway reference`` and ``model-gateway drift``: the references monitoring compares
with, and a window's statistics against them (docs/monitoring.md)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from .cli_common import load_or_exit, time_arg, with_store
from .config import LoadedConfig, RouteConfig, duration_seconds
from .monitoring import (
    ANY,
    ReferenceBuildError,
    described,
    drift,
    file_digest,
    pin_from_log,
    read_columns,
    reference_row,
    stored_references,
    summaries_of,
)
from .store import Store


def _monitored_routes(loaded: LoadedConfig, name: str | None) -> list[RouteConfig]:
    routes = [r for r in loaded.config.routes if r.monitoring is not None]
    if name is None:
        if not routes:
            print("no route of this file has a monitoring section", file=sys.stderr)
            raise SystemExit(2)
        return routes
    for route in routes:
        if route.name == name:
            return [route]
    known = ", ".join(r.name for r in routes) or "none"
    print(f"--route: {name!r} is not a monitored route (monitored: {known})", file=sys.stderr)
    raise SystemExit(2)


def cmd_reference_build(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.config)
    [route] = _monitored_routes(loaded, args.route)
    if (args.from_file is None) == (not args.from_log):
        print("give either --from FILE (.csv or .parquet) or --from-log", file=sys.stderr)
        return 2
    try:
        if args.from_log:
            if args.since is None:
                print("--from-log needs --since (and --until, default now)", file=sys.stderr)
                return 2
            until = args.until if args.until is not None else time.time()
            rows = with_store(loaded, lambda store: _pinned(store, route, args.since, until, args))
        else:
            if args.since is not None or args.until is not None:
                print("--since and --until go with --from-log, not --from", file=sys.stderr)
                return 2
            path = Path(args.from_file)
            if not path.is_file():
                print(f"--from: {path} is not a file", file=sys.stderr)
                return 2
            summaries = summaries_of(route, read_columns(path, route))
            rows_read = max((s["count"] for s in summaries.values()), default=0)
            source = {"file": path.name, "sha256": file_digest(path), "rows": rows_read}
            variant, version = args.variant or ANY, args.model_version or ANY
            rows = [reference_row(route.name, variant, version, summaries, source)]
            with_store(loaded, lambda store: store.save_references(rows))
    except ReferenceBuildError as exc:
        print(f"reference build: {exc}", file=sys.stderr)
        return 1
    for row in rows:
        print(
            f"reference {row['reference_id']} stored for route {route.name}, variant"
            f" {row['variant']}, model version {row['model_version']}"
        )
    return 0


async def _pinned(
    store: Store, route: RouteConfig, since: float, until: float, args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = await pin_from_log(store, route, since, until)
    rows = [
        r
        for r in rows
        if (args.variant is None or r["variant"] == args.variant)
        and (args.model_version is None or r["model_version"] == args.model_version)
    ]
    if not rows:
        raise ReferenceBuildError("no requests of that variant and model version in the window")
    await store.save_references(rows)
    return rows


def cmd_reference_list(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.config)
    found = with_store(loaded, lambda store: stored_references(store, args.route))
    listed = [described(r) for r in found]
    if args.format == "json":
        sys.stdout.write(orjson.dumps(listed, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    head = ("REFERENCE", "ROUTE", "VARIANT", "VERSION", "CREATED", "FEATURES", "SOURCE")
    rows = [
        (
            r["reference_id"],
            r["route"],
            r["variant"],
            r["model_version"],
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created_at"])),
            ",".join(r["features"]),
            orjson.dumps(r["source"]).decode(),
        )
        for r in listed
    ]
    sys.stdout.write(_table(head, rows) if rows else "no references stored\n")
    return 0


def cmd_reference_delete(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.config)
    if not with_store(loaded, lambda store: store.delete_reference(args.id)):
        print(f"no reference {args.id!r}", file=sys.stderr)
        return 1
    print(f"reference {args.id} deleted")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.config)
    routes = _monitored_routes(loaded, args.route)
    until = args.until if args.until is not None else time.time()
    if args.since is not None and args.since >= until:
        print("--since must be before --until", file=sys.stderr)
        return 2

    async def compute(store: Store) -> list[dict[str, Any]]:
        found = []
        for route in routes:
            assert route.monitoring is not None
            first = route.monitoring.windows[0]
            since = args.since if args.since is not None else until - duration_seconds(first)
            window = first if args.since is None else "since"
            for entry in await drift(store, route, since, until, window):
                found.append({"route": route.name, **entry})
        return found

    found = with_store(loaded, compute)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    head: tuple[str, ...] = ("ROUTE", "VARIANT", "VERSION", "FEATURE", "COUNT", "PSI", "KS")
    head = (*head, "KS P", "MISSING", "OUT OF RANGE", "MEAN", "VARIANCE")
    shown = ("psi", "ks_statistic", "ks_p_value", "missing_ratio", "out_of_range_ratio")
    rows = [
        (
            e["route"],
            e["variant"],
            e["model_version"],
            e["feature"],
            str(e["count"]),
            *(_figure(e[k]) for k in (*shown, "mean", "variance")),
        )
        for e in found
    ]
    sys.stdout.write(_table(head, rows) if rows else "no monitored requests in the window\n")
    return 0


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(head: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        for row in [head, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def add_monitoring_commands(commands: Any) -> None:
    """The ``reference`` and ``drift`` commands, on the ``model-gateway`` parser."""
    reference = commands.add_parser("reference", help="the references drift is measured against")
    verbs = reference.add_subparsers(dest="reference_command", required=True)
    build = verbs.add_parser(
        "build", help="a reference from a training file (CSV or Parquet) or a window of the log"
    )
    build.add_argument("--config", required=True)
    build.add_argument("--route", required=True)
    build.add_argument(
        "--from", dest="from_file", help="CSV or Parquet file, columns named as the features"
    )
    build.add_argument(
        "--from-log", action="store_true", help="pin the logged requests of --since..--until"
    )
    build.add_argument("--since", type=time_arg, help="RFC 3339 (with --from-log)")
    build.add_argument("--until", type=time_arg, help="RFC 3339 (with --from-log; default now)")
    build.add_argument("--variant", help="only this variant (default: a file's applies to all)")
    build.add_argument("--model-version", help="only this model version (default: all)")
    build.set_defaults(func=cmd_reference_build)
    listing = verbs.add_parser("list", help="the stored references, newest first")
    listing.add_argument("--config", required=True)
    listing.add_argument("--route")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    listing.set_defaults(func=cmd_reference_list)
    delete = verbs.add_parser("delete", help="delete a reference (the next newest applies)")
    delete.add_argument("id")
    delete.add_argument("--config", required=True)
    delete.set_defaults(func=cmd_reference_delete)

    drift_parser = commands.add_parser(
        "drift", help="each monitored feature's drift, missing and out-of-range values"
    )
    drift_parser.add_argument("--config", required=True)
    drift_parser.add_argument("--route", help="one route (default: every monitored route)")
    drift_parser.add_argument(
        "--since", type=time_arg, help="RFC 3339 (default: the first window before --until)"
    )
    drift_parser.add_argument("--until", type=time_arg, help="RFC 3339 (default: now)")
    drift_parser.add_argument("--format", choices=["table", "json"], default="table")
    drift_parser.set_defaults(func=cmd_drift)
