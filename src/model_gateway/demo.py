"""A small fraud-scoring model server speaking the Open Inference Protocol V2 (JSON and binary
tensors) and KServe V1's ``:predict``.

Three versions of it stand behind the gateway in ``make run`` (a champion, a challenger and a
shadow) and in the tests. Each version is a fixed logistic model over the input features, so
its answers are deterministic and the versions disagree on some inputs, as a champion and a
challenger would.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .tensors import HEADER_LENGTH, encode, read_binary_body

# (bias, weights) per version; versions not listed use the last one.
_MODELS: dict[str, tuple[float, tuple[float, ...]]] = {
    "1": (-2.0, (0.8, 0.5, 0.3, -0.2)),
    "2": (-2.4, (1.1, 0.4, 0.6, -0.1)),
    "3": (-2.2, (1.0, 0.6, 0.5, -0.3)),
}


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _request_document(body: bytes, header_length: str | None) -> dict[str, Any]:
    """An inference request, JSON or (binary tensor extension) a JSON header and bytes."""
    if header_length is None:
        doc = orjson.loads(body)
    else:
        doc = read_binary_body(body, int(header_length))
        if doc is None:
            raise ValueError("the binary body does not hold what its header says")
    if not isinstance(doc, dict):
        raise TypeError("the request is not a JSON object")
    return doc


def _answer(
    body: dict[str, Any], outputs: list[dict[str, Any]], request: dict[str, Any]
) -> Response:
    """The outputs the request asks for (all when it names none), each as JSON or, when asked
    (``binary_data`` per output, ``binary_data_output`` for all), as bytes after the JSON."""
    parameters = request.get("parameters") or {}
    everything_binary = bool(parameters.get("binary_data_output"))
    asked = {o["name"]: o.get("parameters") or {} for o in request.get("outputs") or []}
    chosen = [o for o in outputs if not asked or o["name"] in asked]
    tail = []
    for output in chosen:
        if asked.get(output["name"], {}).get("binary_data", everything_binary):
            raw = encode(output["datatype"], output.pop("data"))
            output["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
    body["outputs"] = chosen
    head = orjson.dumps(body)
    if not tail:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(tail),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


def fraud_score(version: str, features: list[float]) -> float:
    bias, weights = _MODELS.get(version, _MODELS["2"])
    z = bias + sum(w * x for w, x in zip(weights, features, strict=False))
    return 1.0 / (1.0 + math.exp(-z))


def create_model_server(model_name: str = "fraud", version: str = "1") -> Starlette:
    """A V2 server for one model version; ``version`` is reported in every answer."""

    async def ready(request: Request) -> Response:
        return _json({"ready": True})

    async def metadata(request: Request) -> Response:
        if request.path_params["name"] != model_name:
            return _json({"error": f"unknown model {request.path_params['name']}"}, 404)
        return _json(
            {
                "name": model_name,
                "versions": [version],
                "platform": "model-gateway-demo",
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [
                    {"name": "score", "datatype": "FP32", "shape": [-1]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]},
                ],
            }
        )

    async def infer(request: Request) -> Response:
        if request.path_params["name"] != model_name:
            return _json({"error": f"unknown model {request.path_params['name']}"}, 404)
        wanted = request.path_params.get("version")
        if wanted is not None and wanted != version:
            return _json({"error": f"unknown version {wanted} of model {model_name}"}, 404)
        try:
            doc = _request_document(await request.body(), request.headers.get(HEADER_LENGTH))
            tensor = doc["inputs"][0]
            data = [float(x) for x in tensor["data"]]
            shape = tensor.get("shape", [1, len(data)])
            width = int(shape[-1]) if len(shape) > 1 else len(data)
            if width <= 0 or len(data) % width:
                raise ValueError("data does not fit the shape")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
            return _json({"error": f"invalid inference request: {exc}"}, 400)
        rows = [data[i : i + width] for i in range(0, len(data), width)]
        scores = [round(fraud_score(version, row), 6) for row in rows]
        outputs = [
            {"name": "score", "datatype": "FP32", "shape": [len(rows)], "data": scores},
            {
                "name": "label",
                "datatype": "INT64",
                "shape": [len(rows)],
                "data": [int(s >= 0.5) for s in scores],
            },
        ]
        body: dict[str, Any] = {"model_name": model_name, "model_version": version}
        if "id" in doc:
            body["id"] = doc["id"]
        return _answer(body, outputs, doc)

    async def predict_v1(request: Request) -> Response:
        # KServe V1: {"instances": [[...], ...]} -> {"predictions": [label, ...]}
        if request.path_params["name"] != model_name:
            return _json({"error": f"unknown model {request.path_params['name']}"}, 404)
        try:
            instances = orjson.loads(await request.body())["instances"]
            scores = [fraud_score(version, [float(x) for x in row]) for row in instances]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return _json({"error": f"invalid prediction request: {exc}"}, 400)
        return _json({"predictions": [int(s >= 0.5) for s in scores]})

    return Starlette(
        routes=[
            Route("/v2/health/live", ready),
            Route("/v2/health/ready", ready),
            Route("/v2/models/{name}", metadata),
            Route("/v2/models/{name}/ready", ready),
            Route("/v2/models/{name}/versions/{version}", metadata),
            Route("/v2/models/{name}/versions/{version}/ready", ready),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
            Route("/v1/models/{name}:predict", predict_v1, methods=["POST"]),
        ]
    )
