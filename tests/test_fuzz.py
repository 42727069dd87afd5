"""Bad input at scale: thousands of malformed requests to the data plane, /feedback and
/admin. The gateway answers each with a status below 500 (or closes a connection it cannot
parse), and never sends anything to a host that is not in its configuration."""

from __future__ import annotations

import socket
import threading
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import GatewayFactory, running


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
]
BODIES = [b'{"inputs": [', b'{"prediction_id": "x", "label": [1]}', b"\xff\xfe\x00", b"[" * 5000]


def test_malformed_requests_never_get_a_5xx_or_reach_another_host(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
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
                }
            ],
            server={"config_poll_interval": 0},
        )
        port = gw.server.port
        statuses: dict[int, int] = {}

        @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
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
        assert sum(statuses.values()) > 1000
    # every request the live variant got was copied, and every copy became a record; the
    # client half-closes after its request, which the gateway (as uvicorn and nginx) takes
    # for a client gone: many left before their answer (499)
    records = gw.records()
    live = {r["prediction_id"] for r in records if not r["shadow"]}
    reached = {
        r["prediction_id"]
        for r in records
        if not r["shadow"]
        and (r["status"] == 200 or r["error"] == "client disconnected before the answer")
    }
    copied = [r["shadow_of"] for r in records if r["shadow"]]
    assert reached <= set(copied) <= live and len(copied) == len(set(copied))
    assert len(reached) > 100
    assert "shadow copy" not in caplog.text
