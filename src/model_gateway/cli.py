"""The ``model-gateway`` command."""

from __future__ import annotations

import argparse
import sys

from .config import LoadedConfig, load_config
from .errors import ConfigError
from .logs import configure_logging


def _load_or_exit(path: str) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check(args: argparse.Namespace) -> int:
    loaded = _load_or_exit(args.config)
    routes = loaded.config.routes
    variants = sum(len(r.variants) for r in routes)
    print(
        f"{args.config}: ok (version {loaded.version}, {len(routes)} routes, {variants} variants)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    loaded = _load_or_exit(args.config)
    host = args.host or loaded.config.server.host
    port = loaded.config.server.port if args.port is None else args.port
    serve(loaded, host, port, args.workers)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .server import run_demo

    loaded = _load_or_exit(args.config)
    host = args.host or loaded.config.server.host
    port = loaded.config.server.port if args.port is None else args.port
    run_demo(loaded, host, port)
    return 0


def _time_arg(text: str) -> float:
    from .admin import parse_rfc3339

    try:
        return parse_rfc3339(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_report(args: argparse.Namespace) -> int:
    import asyncio
    import time

    import orjson

    from .admin import DAY, format_rfc3339
    from .quality import build_report
    from .store import open_store

    loaded = _load_or_exit(args.config)
    routes = {r.name: r for r in loaded.config.routes}
    name = args.route or (next(iter(routes)) if len(routes) == 1 else None)
    if name not in routes:
        print(f"--route: one of {', '.join(sorted(routes))} is required", file=sys.stderr)
        return 2
    until = args.until if args.until is not None else time.time()
    since = args.since if args.since is not None else until - DAY

    async def rows() -> list[dict[str, object]]:
        store = open_store(loaded.config.storage.url)
        await store.open()
        try:
            return await store.report_rows(name, since, until)
        finally:
            await store.close()

    report = build_report(asyncio.run(rows()), routes[name], since, until)
    report["since"], report["until"] = format_rfc3339(since), format_rfc3339(until)
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


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

    report = commands.add_parser(
        "report", help="per-variant quality, latency and errors of a route, as JSON"
    )
    report.add_argument("--config", required=True)
    report.add_argument("--route", help="route name (default: the only route)")
    report.add_argument("--since", type=_time_arg, help="RFC 3339 (default: 24 h before --until)")
    report.add_argument("--until", type=_time_arg, help="RFC 3339 (default: now)")
    report.set_defaults(func=cmd_report)

    demo = commands.add_parser("demo", help="run demo model servers and the gateway")
    with_server_options(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
