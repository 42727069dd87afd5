"""The ``model-gateway`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .cli_common import load_or_exit, time_arg, with_store
from .cli_monitoring import add_monitoring_commands
from .config import LoadedConfig, RouteConfig
from .console import configure_logging
from .feedback import ORIGINS
from .labelling import STRATA, STRATEGIES
from .store import Store
from .store.base import StoreOpenError, store_location


def cmd_check(args: argparse.Namespace) -> int:
    loaded = load_or_exit(args.config)
    routes = loaded.config.routes
    variants = sum(len(r.variants) for r in routes)
    shadows = sum(len(r.shadows) for r in routes)
    summary = f"{len(routes)} routes, {variants} variants" + (
        f", {shadows} shadows" if shadows else ""
    )
    print(f"{args.config}: ok (version {loaded.version}, {summary})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    loaded = load_or_exit(args.config)
    host = args.host or loaded.config.server.host
    port = loaded.config.server.port if args.port is None else args.port
    serve(loaded, host, port, args.workers)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .server import run_demo

    loaded = load_or_exit(args.config)
    host = args.host or loaded.config.server.host
    port = loaded.config.server.port if args.port is None else args.port
    run_demo(loaded, host, port)
    return 0


def _route_and_window(
    args: argparse.Namespace, loaded: LoadedConfig, *, horizon: bool = False
) -> tuple[RouteConfig, float, float]:
    """The route and [since, until) asked for; ``horizon``: a window with no end given ends
    the route's label horizon before now (a report's)."""
    from .admin import DAY, label_horizon

    routes = {r.name: r for r in loaded.config.routes}
    name = args.route or (next(iter(routes)) if len(routes) == 1 else None)
    if name not in routes:
        print(f"--route: one of {', '.join(sorted(routes))} is required", file=sys.stderr)
        raise SystemExit(2)
    end = time.time() - (label_horizon(routes[name]) if horizon else 0.0)
    until = args.until if args.until is not None else end
    since = args.since if args.since is not None else until - DAY
    return routes[name], since, until


def cmd_report(args: argparse.Namespace) -> int:
    import orjson

    from .admin import experiment_window, find_experiment, presented, route_report

    loaded = load_or_exit(args.config)
    if args.experiment is not None:
        found = find_experiment(loaded.config.routes, args.experiment)
        if found is None or found.experiment is None:
            ids = [r.experiment.id for r in loaded.config.routes if r.experiment]
            print(
                f"--experiment: one of {', '.join(ids) or '(none configured)'} is required",
                file=sys.stderr,
            )
            return 2
        if args.since is not None or args.route is not None:
            print("--experiment counts from its start: no --since or --route", file=sys.stderr)
            return 2
        route = found
        since, until = experiment_window(found, found.experiment, args.until)
    else:
        route, since, until = _route_and_window(args, loaded, horizon=True)
    report = presented(with_store(loaded, lambda store: route_report(store, route, since, until)))
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    """``rollout status``, or an operator's action on one rollout, through the store: every
    gateway on it follows within its rollout's interval."""
    import orjson

    from .rollout_runner import operate, stored_rollouts

    loaded = load_or_exit(args.config)
    routes = [r for r in loaded.config.routes if r.rollout is not None]
    now = time.time()
    if args.action == "status":
        found = with_store(loaded, lambda store: stored_rollouts(store, routes, now))
        if args.json:
            sys.stdout.write(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            sys.stdout.write(rollout_table(found))
        return 0
    if args.id is None:
        print(f"rollout {args.action}: the rollout's id is required", file=sys.stderr)
        return 2
    try:
        with_store(loaded, lambda store: operate(store, routes, args.id, args.action, "cli", now))
    except KeyError:
        ids = ", ".join(r.rollout.id for r in routes if r.rollout) or "(none configured)"
        print(f"no rollout {args.id!r} in the store for this file (one of {ids})", file=sys.stderr)
        return 1
    except ValueError as refused:
        print(f"rollout {args.id}: {refused}", file=sys.stderr)
        return 1
    print(f"rollout {args.id}: {args.action} stored; the gateways follow within their interval")
    return 0


def rollout_table(found: list[dict[str, Any]]) -> str:
    """Rollouts as a table for a terminal."""
    head = ("ROLLOUT", "ROUTE", "STATUS", "STEP", "CHALLENGER", "IN STEP", "WHY")
    rows = [
        (
            r["id"],
            r["route"],
            r["status"],
            f"{r['step']}/{len(r['steps'])}",
            f"{r['challenger']} {r['challenger_percent']:g} %",
            f"{int(r['seconds_in_step'])} s",
            r["reason"],
        )
        for r in found
    ]
    if not rows:
        return "no rollouts in the store for this file\n"
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head) - 1)]
    lines = []
    for row in [head, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]))
    return "\n".join(lines) + "\n"


def cmd_export(args: argparse.Namespace) -> int:
    from .datafiles import export

    loaded = load_or_exit(args.config)
    if args.since_last is not None:
        return _deliver_now(loaded, args.since_last, args.recent)
    if args.out is None:
        print("model-gateway export: --out is required (or --since-last NAME)", file=sys.stderr)
        return 2
    route, since, until = _route_and_window(args, loaded)
    out = Path(args.out)
    count = with_store(
        loaded, lambda store: export(store, route.name, since, until, args.format, out)
    )
    print(f"{count} predictions of route {route.name} written to {out}", file=sys.stderr)
    return 0


def _deliver_now(loaded: LoadedConfig, name: str, recent: bool = False) -> int:
    """Run the delivery ``name`` now: what no run of it has delivered, to its directory.
    ``recent``: an ordinary run (the gateway's), not a sweep; each file written is then
    also printed on stdout as a JSON line, for the gateway to count."""
    from .deliveries import BUSY_EXIT, DeliveryBusy, deliver

    found = {d.name: d for d in loaded.config.deliveries}
    delivery = found.get(name)
    if delivery is None:
        known = ", ".join(sorted(found)) or "none"
        print(f"no delivery is named {name!r} (configured: {known})", file=sys.stderr)
        return 1
    try:
        written = with_store(
            loaded, lambda store: deliver(store, delivery, time.time(), sweep=not recent)
        )
    except DeliveryBusy as exc:
        print(f"{exc}; try again when it is done", file=sys.stderr)
        return BUSY_EXIT
    except OSError as exc:
        print(f"delivery {name}: cannot write to {delivery.directory}: {exc}", file=sys.stderr)
        return 1
    for done in written:
        print(f"{done.path}: {done.rows} predictions", file=sys.stderr)
        print(json.dumps({"file": str(done.path), "rows": done.rows}), flush=True)
    if not written:
        print(f"nothing new to deliver for {name}", file=sys.stderr)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .datafiles import sample

    loaded = load_or_exit(args.config)
    route, since, until = _route_and_window(args, loaded)
    out = Path(args.out)
    count = with_store(
        loaded,
        lambda store: sample(
            store, route.name, since, until, args.n, args.seed, out, args.strategy, args.by
        ),
    )
    print(f"{count} predictions sampled to {out} (seed {args.seed})", file=sys.stderr)
    return 0


def cmd_feedback_import(args: argparse.Namespace) -> int:
    from .datafiles import LabelFileError, read_labels
    from .feedback import FeedbackItem, judge_labels

    loaded = load_or_exit(args.config)
    valid: list[tuple[int, FeedbackItem]] = []
    now = time.time()
    refused: list[tuple[int, str]] = []
    try:
        for line, result in read_labels(Path(args.file), args.source, args.origin):
            if isinstance(result, str):
                refused.append((line, result))
            else:
                valid.append((line, result))
    except LabelFileError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    routes = {r.name: r for r in loaded.config.routes}

    async def load(store: Store) -> tuple[int, int, int]:
        kept, unfit, waiting = await judge_labels(store, routes, valid)
        refused.extend(unfit)
        if kept:
            await store.insert_feedback([item.as_row(now) for _, item in kept])
        return len(kept), waiting, len(await store.join_feedback(time.time()))

    imported, waiting, joined = with_store(loaded, load)
    for line, reason in sorted(refused):
        print(f"{args.file}:{line}: {reason}", file=sys.stderr)
    print(
        f"{imported} labels imported ({joined} joined to predictions now; {waiting} name no "
        f"prediction stored yet and are joined when it is), {len(refused)} rejected",
        file=sys.stderr,
    )
    # a rejected row is a label lost unless it is fixed: the import says so in its status
    return 1 if refused else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .store.schema import LATEST_VERSION, SchemaTooNewError

    loaded = load_or_exit(args.config)
    try:
        version = with_store(loaded, lambda store: store.schema_version())
    except SchemaTooNewError as exc:
        print(exc, file=sys.stderr)
        return 1
    where = store_location(loaded.config.storage.url)
    print(f"{where}: schema version {version} (latest {LATEST_VERSION})")
    return 0


def strata_arg(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in keys if k not in STRATA]
    if unknown or not keys or len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError(
            f"expected distinct names among {', '.join(STRATA)}, comma-separated"
        )
    return keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model-gateway",
        description="Async reverse proxy for model servers: A/B routing, prediction log, metrics.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_server_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="the gateway's YAML file")
        p.add_argument("--host", help="address to bind (default: server.host)")
        p.add_argument("--port", type=int, help="port to bind, 0 for any free one")

    serve = commands.add_parser("serve", help="run the gateway")
    with_server_options(serve)
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser("check", help="validate a config file; exit 1 if invalid")
    check.add_argument("--config", required=True)
    check.set_defaults(func=cmd_check)

    def with_window(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True)
        p.add_argument("--route", help="route name (default: the only route)")
        p.add_argument("--since", type=time_arg, help="RFC 3339 (default: 24 h before --until)")
        p.add_argument("--until", type=time_arg, help="RFC 3339 (default: now)")

    migrate = commands.add_parser(
        "migrate", help="bring the store's schema up to date (the gateway also does on start)"
    )
    migrate.add_argument("--config", required=True)
    migrate.set_defaults(func=cmd_migrate)

    report = commands.add_parser(
        "report", help="per-variant quality, latency and errors of a route, as JSON"
    )
    with_window(report)
    report.add_argument(
        "--experiment", help="an experiment's id: its report from its start (default: until now)"
    )
    report.set_defaults(func=cmd_report)

    rollout = commands.add_parser(
        "rollout", help="rollouts: status as a table, or pause, resume, abort, promote one"
    )
    rollout.add_argument("action", choices=["status", "pause", "resume", "abort", "promote"])
    rollout.add_argument("id", nargs="?", help="the rollout's id (not for status)")
    rollout.add_argument("--config", required=True)
    rollout.add_argument("--json", action="store_true", help="status as JSON")
    rollout.set_defaults(func=cmd_rollout)

    export = commands.add_parser("export", help="predictions joined with labels, to a file")
    with_window(export)
    export.add_argument("--format", choices=["csv", "jsonl", "parquet"], default="csv")
    export.add_argument("--out", help="file to write")
    export.add_argument(
        "--since-last",
        metavar="NAME",
        help="run the delivery NAME now: what it has not delivered yet, to its directory",
    )
    # the gateway's ordinary runs: from minutes before the last run, not the whole lookback
    export.add_argument("--recent", action="store_true", help=argparse.SUPPRESS)
    export.set_defaults(func=cmd_export)

    sample = commands.add_parser(
        "sample", help="predictions not labelled yet, drawn to a CSV for hand labelling"
    )
    with_window(sample)
    sample.add_argument(
        "--n", type=int, required=True, help="how many (per variant when --by names variant)"
    )
    sample.add_argument("--seed", type=int, default=0, help="same seed, same sample")
    sample.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="uniform",
        help="uniform; stratified (by --by, more where positives are expected); "
        "disagreement (where a shadow answered otherwise)",
    )
    sample.add_argument(
        "--by",
        type=strata_arg,
        default=(),
        help=f"strata, comma-separated, of: {', '.join(STRATA)}",
    )
    sample.add_argument("--out", required=True, help="CSV file to write")
    sample.set_defaults(func=cmd_sample)

    feedback = commands.add_parser("feedback", help="labels")
    feedback_commands = feedback.add_subparsers(dest="feedback_command", required=True)
    importer = feedback_commands.add_parser(
        "import", help="labels from a CSV (prediction_id or request_id, label[, timestamp, source])"
    )
    importer.add_argument("file")
    importer.add_argument("--config", required=True)
    importer.add_argument("--source", help="source recorded for rows that name none")
    importer.add_argument(
        "--origin",
        choices=ORIGINS,
        help="origin of rows that name none (default: human for a labelling sample, a file "
        "with inclusion_probability; else import)",
    )
    importer.set_defaults(func=cmd_feedback_import)

    add_monitoring_commands(commands)

    demo = commands.add_parser("demo", help="run demo model servers and the gateway")
    with_server_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        result: int = args.func(args)
    except StoreOpenError as exc:
        print(f"model-gateway: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
