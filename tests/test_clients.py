"""Real clients, unchanged, through a real gateway: tritonclient's HTTP client speaks the Open
Inference Protocol (V2) to the gateway as it would to Triton or MLServer, with JSON and with
binary tensors, and prints the gateway's own errors."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Upstream,
    dead_url,
    error_code,
    route,
    wait_until,
)
from .test_faults import read_answer
from .test_feedback import EVALUATION, fraud_gateway


def client_of(gw: RunningGateway) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=gw.url.removeprefix("http://"))


def features(binary: bool, rows: int = 1) -> list[triton.InferInput]:
    tensor = triton.InferInput("features", [rows, 4], "FP32")
    data = np.array([[1.2, 0.4, 2.0, 0.1]] * rows, dtype=np.float32)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return [tensor]


def test_server_and_model_calls_answer_as_a_v2_server_would(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """Server live, ready and metadata are the gateway's own answers (before: 404 no_route,
    and the client said the server was not live); model ready and metadata are the model
    server's, through the route, and none of them is a prediction."""
    gw = fraud_gateway(gateway, upstreams)
    client = client_of(gw)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.get_server_metadata()["name"] == "model-gateway"
    assert client.is_model_ready("fraud")
    assert client.get_model_metadata("fraud")["name"] == "fraud"
    wait_until(lambda: len(gw.records()) == 2, "the model calls logged")
    assert {(r["method"], r["inference"]) for r in gw.records()} == {("GET", 0)}
    assert all(r["predicted"] is None for r in gw.records())
    client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_with_json_and_binary_tensors_is_read_and_evaluated(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], binary: bool
) -> None:
    """Inputs as JSON or as binary tensors, outputs as tritonclient asks by default (binary)
    and as JSON: the client gets the model's values, and the log reads the prediction and
    score from the answer either way (before: nothing from a binary answer)."""
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)],
                        evaluation=EVALUATION)])  # fmt: skip
    client = client_of(gw)
    asked = [
        None,
        [triton.InferRequestedOutput("score", binary_data=False),
         triton.InferRequestedOutput("label", binary_data=False)],
    ]  # fmt: skip
    results = [client.infer("fraud", features(binary), outputs=outputs) for outputs in asked]
    score = float(results[0].as_numpy("score")[0])
    assert 0 < score < 1
    for result in results:
        assert float(result.as_numpy("score")[0]) == score
        assert int(result.as_numpy("label")[0]) == int(score >= 0.5)
    wait_until(lambda: len(gw.records()) == 2, "both records written")
    for record in gw.records():
        assert record["inference"] == 1
        assert record["score"] == pytest.approx(score, abs=1e-6)
        assert record["predicted"] == str(int(score >= 0.5))
    client.close()


def test_a_versioned_path_reaches_the_variant_serving_that_version(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """``model_version="2"`` always reaches b (before: half the calls went to a's server,
    which answered 404); a version no variant serves gets the gateway's 404 naming those it
    has, which the client prints."""
    gw = fraud_gateway(gateway, upstreams)
    client = client_of(gw)
    for _ in range(12):
        result = client.infer("fraud", features(True), model_version="2")
        assert result.get_response()["model_version"] == "2"
    with pytest.raises(InferenceServerException) as info:
        client.infer("fraud", features(True), model_version="9")
    assert "serves no model version '9' (it serves 1, 2)" in str(info.value)
    assert info.value.status() == "404"
    wait_until(lambda: len(gw.records()) == 12, "the records written")
    assert {(r["variant"], r["assignment"]) for r in gw.records()} == {("b", "version")}
    client.close()


def test_the_gateways_own_errors_take_the_protocols_shape(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """On V2 and V1 paths an error of the gateway's own is ``{"error": "<text>"}``, its code
    in ``X-Gateway-Error``; tritonclient prints it (before: TypeError in ``str(exc)``).
    Elsewhere the body keeps the code beside the message."""
    gw = fraud_gateway(gateway, upstreams)
    client = client_of(gw)
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", features(False))
    assert "no route for POST /v2/models/nope/infer" in str(info.value)
    client.close()
    for path in ("/v2/models/nope/infer", "/v1/models/nope:predict"):
        answer = httpx.post(f"{gw.url}{path}", json={})
        assert answer.status_code == 404
        assert answer.headers["x-gateway-error"] == "no_route"
        assert answer.json() == {"error": f"no route for POST {path}"}
    other = httpx.post(f"{gw.url}/elsewhere", json={})
    assert other.headers["x-gateway-error"] == "no_route"
    assert error_code(other) == "no_route"


def test_server_ready_says_no_while_a_route_has_no_variant_up(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    health = {"path": "/v2/health/ready", "interval": 0.1, "unhealthy_threshold": 1}
    gw = gateway(
        [
            route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)]),
            route("gone", "/v2/models/gone", [("a", dead_url(), 1)], health=health),
        ]
    )
    client = client_of(gw)
    assert client.is_server_live()
    wait_until(lambda: not client.is_server_ready(), "the dead route's variant taken out")
    answer = httpx.get(f"{gw.url}/v2/health/ready")
    assert answer.status_code == 503 and "gone" in answer.json()["error"]
    client.close()


def test_a_route_that_claims_the_server_paths_gets_them(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """A route for all of ``/v2`` passes the server-level calls to its model server."""
    gw = gateway([route("all", "/v2", [("a", upstreams["a"].url, 1)])])
    assert httpx.get(f"{gw.url}/v2/health/live").headers["x-model-variant"] == "a"


def test_the_clients_own_request_id_finds_its_prediction(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """tritonclient cannot read the answer's headers, so a user knows the V2 request ``id``
    only. The answer repeats it; the log keeps it as the request id, and
    ``/admin/predictions/{id}`` and ``/feedback`` find the prediction by it (before: 404)."""
    gw = fraud_gateway(gateway, upstreams)
    client = client_of(gw)
    client.infer("fraud", features(True), request_id="order-7781")
    client.infer("fraud", features(True), request_id="order-7781")  # a retry: the latest counts
    client.close()
    wait_until(lambda: len(gw.records()) == 2, "both records written")
    listed = httpx.get(f"{gw.url}/admin/predictions", params={"request_id": "order-7781"}).json()
    assert len(listed["predictions"]) == 2
    assert listed["predictions"] == sorted(listed["predictions"], reverse=True)
    found = httpx.get(f"{gw.url}/admin/predictions/order-7781").json()
    assert found["prediction_id"] == listed["predictions"][0]
    assert found["request_id"] == "order-7781"
    answer = httpx.post(f"{gw.url}/feedback", json={"request_id": "order-7781", "label": 1})
    assert answer.json()["accepted"] == 1
    wait_until(
        lambda: httpx.get(f"{gw.url}/admin/predictions/order-7781").json()["label"] == "1",
        "the label joined by the client's id",
    )
    assert httpx.get(f"{gw.url}/admin/predictions/nothing").status_code == 404
    assert httpx.get(f"{gw.url}/admin/predictions").status_code == 400


def llm_gateway(gateway: GatewayFactory, upstreams: dict[str, Upstream]) -> RunningGateway:
    return gateway([route("llm", "/v1", [("a", upstreams["a"].url, 1)])])


def test_openai_chat_completions_whole_and_streamed(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """The openai SDK, its base URL the gateway's: a chat completion whole and streamed (with
    usage asked for) both arrive as from the model server; the log keeps the served model,
    the tokens and when the first byte left, and the token counters count them."""
    gw = llm_gateway(gateway, upstreams)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "the quick brown fox"}]
    whole = client.chat.completions.create(model="tiny", messages=messages)
    assert whole.choices[0].message.content == "the quick brown fox"
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    stream = client.chat.completions.create(
        model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for chunk in stream:
        parts += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == "the quick brown fox"
    assert usage is not None and usage.prompt_tokens == 7
    wait_until(lambda: len(gw.records()) == 2, "both records written")
    streamed, read_whole = sorted(gw.records(), key=lambda r: -r["streamed"])
    for record in (streamed, read_whole):
        assert record["status"] == 200
        assert record["served_model"] == "tiny-chat-1"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (7, 4)
        assert 0 < record["first_byte_ms"] <= record["latency_ms"]
    assert streamed["streamed"] == 1 and read_whole["streamed"] == 0
    wanted = [
        'model_gateway_tokens_total{kind="completion",route="llm",variant="a"} 8.0',
        'model_gateway_streamed_answers_total{route="llm",variant="a"} 1.0',
        'model_gateway_time_to_first_byte_seconds_count{route="llm",variant="a"} 2.0',
    ]
    wait_until(
        lambda: all(line in httpx.get(f"{gw.url}/metrics").text for line in wanted),
        "the answers counted",
    )


def test_openai_errors_reach_the_client_as_the_api_would_send_them(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """The model server's own error passes through untouched (the SDK reads its message);
    an error of the gateway's own is one the SDK reads too."""
    gw = llm_gateway(gateway, upstreams)
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[])
    assert info.value.status_code == 400 and "messages is required" in info.value.message
    elsewhere = openai.OpenAI(base_url=f"{gw.url}/nothing", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        elsewhere.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    assert "no route for POST /nothing/chat/completions" in missing.value.message
    assert missing.value.response.headers["x-gateway-error"] == "no_route"


@pytest.mark.tuned_edge
def test_a_head_refused_on_a_v2_path_is_answered_in_its_shape(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """431 before the head was whole, the path already read: a V2 path gets ``{"error":
    "<text>"}`` and ``X-Gateway-Error`` (before: the nested shape, and no header)."""
    gw = gateway([route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)])],
                 server={"max_header_bytes": 16384})  # fmt: skip
    with socket.create_connection(("127.0.0.1", gw.server.port)) as conn:
        conn.sendall(b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(64):  # well past the limit; the gateway answers and closes
            try:
                conn.sendall(b"e" * 4096)
            except OSError:
                break
        answer = read_answer(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"\r\nx-gateway-error: request_header_too_large" in head.lower()
    assert orjson.loads(body) == {"error": "the request's head is over 16384 bytes"}
