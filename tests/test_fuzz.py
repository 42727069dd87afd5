"""Bad input at scale: thousands of malformed requests to the data plane, /feedback and
/admin. The gateway answers each with a status below 500 (or closes a connection it cannot
parse), and never sends anything to a host that is not in its configuration."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_gateway.cli import main
from model_gateway.store.base import sqlite_path
from model_gateway.store.postgres import split_schema

from .conftest import GatewayFactory, Upstream, route, running
from .test_store import POSTGRES, store_url

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

__all__ = ["store_url"]  # a fixture, used by name


def stored_records(url: str) -> list[dict[str, Any]]:
    """Every prediction record in the store at ``url`` (SQLite or PostgreSQL)."""
    if url.startswith("sqlite"):
        db = sqlite3.connect(sqlite_path(url))
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute("SELECT * FROM predictions")]
        finally:
            db.close()

    async def fetch() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(
            POSTGRES, server_settings={"search_path": split_schema(url)[1] or "public"}
        )
        try:
            return [dict(r) for r in await conn.fetch("SELECT * FROM predictions")]
        finally:
            await conn.close()

    return asyncio.run(fetch())


class Recorder:
    """A raw ASGI upstream that answers 200 to anything and remembers what reached it."""

    def __init__(self) -> None:
        self.hosts: list[bytes] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        with self.lock:
            self.hosts.append(dict(scope["headers"]).get(b"host", b""))
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def exchange(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the gateway may close early on a request it refuses
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except OSError:
            pass
    return answer


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(
    str.encode
)
TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
    min_size=1,
    max_size=20,
)
# header names a client must not be able to use to smuggle anything, hostile or not
ODD_TOKEN = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
BYTES_TEXT = st.binary(max_size=60) | st.text(max_size=60).map(
    lambda t: t.encode("utf-8", "surrogatepass") if t.isascii() else t.encode("utf-8", "replace")
)


@st.composite
def requests(draw: st.DrawFn, canary_port: int) -> bytes:
    # mostly well-framed requests with hostile contents, sometimes broken framing too
    sane = draw(st.integers(0, 9)) < 8
    methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD"]
    method = draw(st.sampled_from(methods if sane else [*methods, b"BREW", b"G\xffT"]))
    base = draw(st.sampled_from(BASES))
    text = PRINTABLE if sane else BYTES_TEXT
    if sane:  # a valid request-target: hostile characters arrive percent-encoded
        suffix = PRINTABLE.map(lambda b: quote(b, safe="/?=&%:.").encode())
    else:
        suffix = BYTES_TEXT.map(
            lambda b: b.replace(b" ", b"%20").replace(b"\r", b"").replace(b"\n", b"")
        )
    target = draw(
        st.one_of(
            st.just(base),
            st.builds(lambda b, t: b + t, st.just(base), suffix),
            st.sampled_from(TRICKS),
            st.just(f"http://127.0.0.1:{canary_port}/v2/models/fraud/infer".encode()),
            st.just(f"http://127.0.0.1:{canary_port}/".encode()),
        )
    )
    hosts = [b"localhost", f"127.0.0.1:{canary_port}".encode()]
    headers = [b"Host: " + draw(st.sampled_from(hosts if sane else [*hosts, b"\xff\xfe"]))]
    for _ in range(draw(st.integers(0, 4))):
        value = draw(text).replace(b"\r", b"").replace(b"\n", b"")
        headers.append(draw(TOKEN if sane else ODD_TOKEN).encode() + b": " + value)
    if draw(st.booleans()):
        headers.append(b"X-Huge: " + b"a" * draw(st.sampled_from([1000, 70_000])))
    body = draw(st.one_of(st.binary(max_size=200), st.sampled_from(BODIES)))
    length = "exact" if sane else draw(st.sampled_from(["exact", "missing", "lie", "huge"]))
    if length == "exact":
        headers.append(b"Content-Length: %d" % len(body))
    elif length == "lie":
        headers.append(b"Content-Length: %d" % (len(body) + 5))
    elif length == "huge":
        headers.append(b"Content-Length: 99999999999")
    if draw(st.booleans()):
        headers.append(b"X-Model-Variant: " + draw(st.sampled_from([b"a", b"nope", b"\xff"])))
    head = method + b" " + target + b" HTTP/1.1\r\n" + b"\r\n".join(headers)
    return head + b"\r\nConnection: close\r\n\r\n" + body


BASES = [
    b"/v2/models/fraud/infer",
    b"/feedback",
    b"/admin/reload",
    b"/admin/routing",
    b"/admin/report",
    b"/admin/predictions/",
    b"/admin/drift",
    b"/admin/references",
    b"/metrics",
    b"/healthz",
    b"/v1/models/fraud:predict",
    b"/",
]
TRICKS = [
    b"/v2/models/fraud/../../admin/reload",
    b"/v2/models/fraud/%2e%2e/%2e%2e/metrics",
    b"//evil.example/x",
    b"/admin/routing?at=9999-12-31T23:59:59-23:59",
    b"/admin/routing?at=0001-01-01T00:00:00+23:59",
    b"/admin/report?since=x&until=y",
    b"/admin/report?route=fraud&since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z",
    b"*",
    b"/%ff%fe",
    # what no store keeps as it is, in the path: NUL, other control characters, the UTF-8
    # of a surrogate, and overlong paths
    b"/v2/models/fraud/%00",
    b"/v2/models/fraud/infer%00x",
    b"/v2/models/fraud/%01%1b%7f",
    b"/v2/models/fraud/%ED%A0%80",
    b"/v2/models/%00/infer",
    b"/v2/models/fraud/" + b"a" * 20_000,
    b"/v2/models/fraud/" + b"%00" * 5_000,
    b"/admin/predictions/%00",
    b"/admin/routing?at=%00",
    b"/admin/drift?route=%00&since=x",
    b"/admin/drift?route=fraud&since=2030-01-01T00:00:00Z&until=2020-01-01T00:00:00Z",
    b"/admin/references/%00",
    b"/admin/references?route=%ED%A0%80",
]
BODIES = [
    b'{"inputs": [',
    b'{"prediction_id": "x", "label": [1]}',
    b"\xff\xfe\x00",
    b"[" * 5000,
    # feedback holding NUL, lone surrogates (JSON escapes orjson refuses), control
    # characters, overlong values
    b'{"prediction_id": "\\u0000", "label": 1}',
    b'[{"prediction_id": "x", "label": "\\ud800"}, {"prediction_id": "y", "label": 1}]',
    b'{"request_id": "\\udfff\\u0000", "label": "a\\u0001b", "source": "\\ud83d"}',
    b'{"prediction_id": "' + b"p" * 100_000 + b'", "label": 1}',
    b'{"prediction_id": "x", "label": "' + b"\\u0000" * 10_000 + b'"}',
    # decisions and hand-label weights: NUL, lone surrogates, huge and odd numbers
    b'{"prediction_id": "x", "outcome": "accepted\\u0000", "value": 1e400}',
    b'{"request_id": "r", "outcome": "\\ud800", "value": "12", "origin": "\\u0000"}',
    b'{"prediction_id": "x", "label": 1, "inclusion_probability": -0.0, "origin": "human"}',
    b'[{"prediction_id": "x", "value": 123456789012345678901234567890}, {"value": true}]',
    # monitored features holding NUL, lone surrogates, control characters, overlong text
    b'{"inputs": [{"name": "\\u0000\\ud800", "shape": [1, 4], "data": [1e308, "x", null]}]}',
    b'{"inputs": [{"name": "' + b"n" * 100_000 + b'", "data": [[1], [2]]}]}',
    b'{"route": "fraud", "since": "\\u0000", "until": 1}',
]


def test_malformed_requests_never_get_a_5xx_or_reach_another_host(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture, store_url: str, tmp_path: Path
) -> None:
    """On both stores (fewer examples on PostgreSQL, whose round trips are slower). The
    route reads a cost from each body and a delivery writes files of the records every
    second, with a field read from each captured body: every live inference record is in
    exactly one file at the end."""
    examples = 2000 if store_url.startswith("sqlite") else 400
    model, canary = Recorder(), Recorder()
    with running(model) as upstream, running(canary) as other:
        gw = gateway(
            [
                {
                    "name": "fraud",
                    "path": "/v2/models/fraud",
                    "allow_override": True,
                    "max_body_bytes": 1_000_000,
                    "variants": [{"name": "a", "url": upstream.url, "model_version": "1"}],
                    # copies of the malformed requests too, to the same (recording) upstream
                    "shadows": [{"name": "s", "url": upstream.url, "model_version": "2"}],
                    # a cost and a delivery's field read from every malformed body
                    "evaluation": {
                        "costs": {
                            "false_positive": 1,
                            "false_negative": {"pointer": "/inputs/0/data/0", "default": 0},
                        }
                    },
                    "capture": {"bodies": True},
                    # features read from every malformed body into the log
                    "monitoring": {
                        "features": [
                            {"name": "x0", "input": "features", "column": 0},
                            {"name": "id", "pointer": "/inputs/*/name", "kind": "categorical"},
                        ],
                    },
                }
            ],
            server={"config_poll_interval": 0},
            storage={"url": store_url},
            deliveries=[
                {
                    "name": "fuzz",
                    "route": "fraud",
                    "directory": str(tmp_path / "delivered"),
                    "every": "1s",
                    "fields": {"name": "/inputs/0/name", "first": "/inputs/0/data/0"},
                }
            ],
        )
        port = gw.server.port
        statuses: dict[int, int] = {}

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        @given(raw=requests(other.port))
        def check(raw: bytes) -> None:
            answer = exchange(port, raw)
            if not answer:
                return  # closed without an answer: acceptable for what cannot be parsed
            assert answer.startswith(b"HTTP/1.1 "), answer[:200]
            status = int(answer[9:12])
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (raw[:300], answer[:500])

        check()
        gw.stop()  # waits for the shadow copies
        assert canary.hosts == [], "a request reached a host that is not in the configuration"
        upstream_host = upstream.url.removeprefix("http://").encode()
        assert all(h == upstream_host for h in model.hosts)
        assert sum(statuses.values()) > examples // 2
    # nothing the store refused, nothing lost
    registry = gw.app.state.metrics.registry
    assert registry.get_sample_value("model_gateway_log_write_errors_total") == 0
    assert registry.get_sample_value("model_gateway_log_records_dead_lettered_total") == 0
    # every request the live variant got was copied, and every copy became a record; the
    # client half-closes after its request, which the gateway (as uvicorn and nginx) takes
    # for a client gone: many left before their answer (499)
    records = stored_records(store_url)
    live = {r["prediction_id"] for r in records if not r["shadow"]}
    reached = {
        r["prediction_id"]
        for r in records
        if not r["shadow"]
        and (r["status"] == 200 or r["error"] == "client disconnected before the answer")
    }
    copied = [r["shadow_of"] for r in records if r["shadow"]]
    assert reached <= set(copied) <= live and len(copied) == len(set(copied))
    assert len(reached) > examples // 20
    assert "shadow copy" not in caplog.text
    # the delivery's files, once it has run after the last record: each record once
    assert main(["export", "--config", str(gw.config_path), "--since-last", "fuzz"]) == 0
    delivered = [
        row["prediction_id"]
        for manifest in (tmp_path / "delivered").glob("*.manifest.json")
        for row in csv.DictReader(
            io.StringIO(
                (tmp_path / "delivered" / json.loads(manifest.read_text())["file"])
                .read_bytes()
                .decode(),
                newline="",
            )
        )
    ]
    expected = {
        r["prediction_id"]
        for r in records
        if not r["shadow"] and r["inference"] and r["batch_size"] is None
    }
    assert len(delivered) == len(set(delivered)) and set(delivered) == expected


def ask(port: int, raw: bytes) -> bytes:
    """Send a request asking to close, and read the answer to its end (without the half-close
    of :func:`exchange`, which the gateway takes for a client gone)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


class HostileModel:
    """A model server on a raw socket that answers each request with the bytes a test put in
    ``answer``, exactly (any status line, headers and body, well-formed or not)."""

    def __init__(self) -> None:
        self.answer = b""
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(self.answer)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


# Text a model server may put in its answer: anything, unpaired surrogates and NUL included
# (st.characters draws surrogates only when asked), and some of it overlong.
HOSTILE_TEXT = st.one_of(
    st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=30).map(
        "".join
    ),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfff", "1\n", "\x1b[31m", "\x7f", "\u2028"]),
    st.integers(1, 200_000).map(lambda n: "v" * n),
)
HEADER_VALUE = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from([b"1\x01", b"\xff\xfe", b"2\x7f", b"ok"]),
)


@st.composite
def model_answers(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([200, 200, 200, 201, 400, 404, 500, 503]))
    doc = {
        "model_version": draw(HOSTILE_TEXT | st.integers() | st.none()),
        "outputs": [
            {"name": "label", "data": [draw(HOSTILE_TEXT | st.integers(0, 1))]},
            {"name": "score", "data": [draw(st.floats() | HOSTILE_TEXT)]},
        ],
    }
    # ensure_ascii: what JSON cannot carry raw (an unpaired surrogate) goes as an escape
    body = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        body = draw(st.binary(max_size=300))  # not JSON at all
    headers = [b"Content-Type: application/json"]
    if draw(st.booleans()):
        headers.append(b"X-Model-Version: " + draw(HEADER_VALUE))
    framing = draw(st.sampled_from(["length", "length", "chunked", "close"]))
    if framing == "length":
        headers.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        headers.append(b"Connection: close")
        payload = body
    return b"HTTP/1.1 %d X\r\n%s\r\n\r\n%s" % (status, b"\r\n".join(headers), payload)


def test_hostile_model_server_answers_are_answered_and_every_one_logged(
    gateway: GatewayFactory, store_url: str
) -> None:
    """A model server that answers with NUL, unpaired surrogates and control characters in
    its version header and JSON fields, overlong values, and bodies that are not JSON: every
    request gets an answer (the model's, or 502 for an answer that is not HTTP), and every
    one is in the log, on both stores, with nothing refused or lost."""
    model = HostileModel()
    try:
        gw = gateway(
            [
                {
                    "name": "fraud",
                    "path": "/v2/models/fraud",
                    "variants": [{"name": "a", "url": model.url, "model_version": "1"}],
                    "capture": {"bodies": True, "headers": True},
                    "evaluation": {
                        "task": "binary",
                        "prediction": "/outputs/0/data/0",
                        "score": "/outputs/1/data/0",
                    },
                    "health": {"passive_failures": 0},
                }
            ],
            server={"config_poll_interval": 0},
            storage={"url": store_url},
        )
        sent = 0
        statuses: dict[int, int] = {}

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(answer=model_answers())
        def check(answer: bytes) -> None:
            nonlocal sent
            model.answer = answer
            raw = (
                b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            reply = ask(gw.server.port, raw)
            sent += 1
            assert reply.startswith(b"HTTP/1.1 "), (answer[:300], reply[:300])
            status = int(reply[9:12])
            statuses[status] = statuses.get(status, 0) + 1
            expected = int(answer[9:12])
            assert status in (expected, 502), (answer[:300], reply[:300])

        check()
        # what the model servers said is in the metrics too: every label still exports
        scraped = httpx.get(f"{gw.url}/metrics")
        assert scraped.status_code == 200
        assert "model_gateway_requests_total" in scraped.text
        gw.stop()
    finally:
        model.close()
    registry = gw.app.state.metrics.registry
    print(f"\n{store_url.split(':')[0]}: sent {sent}, statuses {sorted(statuses.items())}")
    assert registry.get_sample_value("model_gateway_log_write_errors_total") == 0
    assert registry.get_sample_value("model_gateway_log_records_dead_lettered_total") == 0
    assert len(stored_records(store_url)) == sent


def test_ids_no_store_can_hold_find_nothing_on_either_store(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], store_url: str
) -> None:
    """A prediction id or request id with NUL or an unpaired surrogate names nothing stored:
    404, or no predictions, from either store (before, PostgreSQL refused the lookup and the
    gateway answered 503 store_unavailable; the fuzzer above found it)."""
    gw = gateway([route("r", "/echo", [("a", upstreams["a"].url, 1)])], storage={"url": store_url})
    for wanted in ("%00", "a%00b", "%ED%A0%80"):
        assert httpx.get(f"{gw.url}/admin/predictions/{wanted}").status_code == 404
        listed = httpx.get(f"{gw.url}/admin/predictions?request_id={wanted}")
        assert listed.status_code == 200 and listed.json()["predictions"] == []
