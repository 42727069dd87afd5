"""Real upstream HTTP servers the tests start: the demo model plus endpoints for edge cases."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from model_gateway.demo import create_model_server


class UpstreamControl:
    """Knobs a test turns on a running upstream from its own thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.requests = 0


def chat_completions(model: str) -> Any:
    """An OpenAI-compatible chat completions endpoint: the answer is the words of the last
    message, one per chunk when streaming (``pause`` seconds apart, a field of the request's
    own), with the usage the API reports (streaming: in a last chunk of its own when
    ``stream_options.include_usage``), then ``data: [DONE]``, and the answer's end ``linger``
    seconds later."""

    async def answer(request: Request) -> Response:
        doc = orjson.loads(await request.body())
        if not doc.get("messages"):
            error = {"message": "messages is required", "type": "invalid_request_error",
                     "param": "messages", "code": None}  # fmt: skip
            return Response(orjson.dumps({"error": error}), 400, media_type="application/json")
        words = str(doc["messages"][-1].get("content", "")).split() or ["ok"]
        usage = {"prompt_tokens": 3 + len(words), "completion_tokens": len(words),
                 "total_tokens": 3 + 2 * len(words)}  # fmt: skip
        base = {"id": "chatcmpl-1", "created": 1_765_000_000, "model": model}
        if not doc.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            body = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            return Response(orjson.dumps(body), media_type="application/json")
        pause = float(doc.get("pause", 0))

        async def events() -> AsyncIterator[bytes]:
            # a model's first token comes after the answer's head, which goes at once
            await asyncio.sleep(float(doc.get("first_pause", 0)))
            for i, word in enumerate(words):
                if i and pause:
                    await asyncio.sleep(pause)
                delta = {"content": word if i == 0 else " " + word}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
                chunk = {**base, "object": "chat.completion.chunk", "choices": [choice]}
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            last = {"index": 0, "delta": {}, "finish_reason": "stop"}
            yield (
                b"data: "
                + orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [last]})
                + b"\n\n"
            )
            if (doc.get("stream_options") or {}).get("include_usage"):
                chunk = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            if doc.get("split_done"):  # the last event in two writes
                yield b"data: [DO"
                await asyncio.sleep(0.05)
                yield b"NE]\n\n"
            else:
                yield b"data: [DONE]\n\n"
            # a server may take a moment to end its answer after its last event
            await asyncio.sleep(float(doc.get("linger", 0)))

        return StreamingResponse(events(), media_type="text/event-stream")

    return answer


def create_upstream(name: str, version: str, control: UpstreamControl | None = None) -> Starlette:
    """An upstream that names itself in every answer, so a test sees which variant served."""
    control = control or UpstreamControl()

    async def echo(request: Request) -> Response:
        control.requests += 1
        body = await request.body()
        return Response(
            orjson.dumps(
                {
                    "upstream": name,
                    "model_version": version,
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "body": body.decode("utf-8", "replace"),
                }
            ),
            media_type="application/json",
        )

    async def slow(request: Request) -> Response:
        control.requests += 1
        await asyncio.sleep(float(request.query_params.get("seconds", "2")))
        return Response(orjson.dumps({"upstream": name, "model_version": version}))

    async def reports_header(request: Request) -> Response:
        return Response(b"{}", media_type="application/json", headers={"X-Model-Version": "7.1"})

    async def reports_body(request: Request) -> Response:
        return Response(
            orjson.dumps({"model_version": "2024-06-01", "outputs": []}),
            media_type="application/json",
        )

    async def stream(request: Request) -> StreamingResponse:
        media_type = request.query_params.get("type", "application/octet-stream")

        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            # held until the test has seen the first chunk through the gateway
            while not control.release.is_set():
                await asyncio.sleep(0.01)
            yield b"data: second\n\n"

        return StreamingResponse(chunks(), media_type=media_type)

    async def held(request: Request) -> Response:
        # answers only once the test releases it (as echo, without the headers)
        control.requests += 1
        body = await request.body()
        while not control.release.is_set():
            await asyncio.sleep(0.01)
        return Response(
            orjson.dumps({"upstream": name, "model_version": version, "body": body.decode()}),
            media_type="application/json",
        )

    async def peer(request: Request) -> Response:
        # the gateway's side of the connection: the same port means a reused connection
        port = request.client.port if request.client else 0
        return Response(orjson.dumps({"port": port}), media_type="application/json")

    async def big(request: Request) -> Response:
        size = int(request.query_params.get("bytes", "2000000"))
        return Response(b"x" * size, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route(
                "/v1/chat/completions", chat_completions(f"tiny-chat-{version}"), methods=["POST"]
            ),
            Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/slow", slow),
            Route("/reports-header", reports_header),
            Route("/reports-body", reports_body),
            Route("/stream", stream),
            Route("/big", big),
            Route("/peer", peer),
            Route("/held/{rest:path}", held, methods=["GET", "POST"]),
            Mount("/", create_model_server("fraud", version)),
        ]
    )
