"""POST /feedback: labels joined to predictions, bad input answered item by item, never 5xx."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_gateway.records import canonical_label

from .conftest import GatewayFactory, InProcessFactory, Upstream, route, wait_until
from .inprocess import InProcessGateway


def features(i: int) -> dict[str, Any]:
    data = [(i % 7) * 0.5, (i % 3) * 1.0, (i % 5) * 0.7, (i % 2) * 1.0]
    return {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": data}]}


EVALUATION = {"task": "binary", "prediction": "/outputs/1/data/0", "score": "/outputs/0/data/0"}


def fraud_gateway(
    in_process: InProcessFactory, upstreams: dict[str, Upstream], **extra: Any
) -> InProcessGateway:
    return in_process(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1), ("b", upstreams["b"].url, 1)],
                evaluation=EVALUATION,
            )
        ],
        **extra,
    )


def predict(gw: InProcessGateway, i: int, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else {}
    r = gw.http.post("/v2/models/fraud/infer", json=features(i), headers=headers)
    assert r.status_code == 200
    return r


def wait_for_label(gw: InProcessGateway, prediction_id: str, label: str | None) -> dict[str, Any]:
    """The record once it is in the store with ``label`` as its latest label."""
    found: dict[str, Any] = {}

    def labelled() -> bool:
        answer = gw.http.get(f"/admin/predictions/{prediction_id}")
        found.update(answer.json())
        return answer.status_code == 200 and found["label"] == label

    wait_until(labelled, f"{prediction_id} labelled {label!r}")
    return found


def test_single_array_and_ndjson_by_prediction_or_request_id(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = fraud_gateway(in_process, upstreams)
    r1, r2, r3 = predict(gw, 1), predict(gw, 2, "client-2"), predict(gw, 3, "client-3")
    p1, p2, p3 = (r.headers["x-prediction-id"] for r in (r1, r2, r3))
    wait_for_label(gw, p3, None)  # all three are in the store

    one = gw.http.post("/feedback", json={"prediction_id": p1, "label": 1, "source": "analyst"})
    assert one.json() == {"accepted": 1, "rejected": 0, "waiting": 0, "errors": []}
    many = gw.http.post(
        "/feedback",
        json=[{"request_id": "client-2", "label": "0"}, {"prediction_id": p3, "label": True}],
    )
    assert many.json()["accepted"] == 2
    ndjson = (
        b'{"prediction_id": "%s", "label": 0, "timestamp": "2030-01-01T00:00:00Z"}\n\n'
        % p1.encode()
    )
    nd = gw.http.post("/feedback", content=ndjson, headers={"Content-Type": "application/x-ndjson"})
    assert nd.json()["accepted"] == 1

    record = wait_for_label(gw, p1, "0")  # the later label supersedes
    assert [f["label"] for f in record["feedback"]] == ["1", "0"]  # both are kept
    assert record["feedback"][0]["source"] == "analyst"
    assert record["feedback"][1]["label_time"] == "2030-01-01T00:00:00Z"
    assert wait_for_label(gw, p2, "0")["request_id"] == "client-2"
    assert wait_for_label(gw, p3, "1")["predicted"] == str(r3.json()["outputs"][1]["data"][0])


def test_timestamps_outside_years_1_to_9999_are_refused(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """A time the gateway could not write back as RFC 3339 is refused with a reason rather
    than stored (where it would break every later answer that shows it)."""
    gw = fraud_gateway(in_process, upstreams)
    times = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:01", 1e20, "9999-12-31T23:59:59Z"]
    answer = gw.http.post(
        "/feedback",
        json=[{"prediction_id": f"p{i}", "label": 1, "timestamp": t} for i, t in enumerate(times)],
    ).json()
    assert answer["accepted"] == 1
    reason = "timestamp must be RFC 3339 with an offset, or Unix seconds"
    assert answer["errors"] == [{"index": i, "reason": reason} for i in range(3)]


def test_bad_items_get_reasons_and_bad_bodies_get_4xx(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = fraud_gateway(in_process, upstreams)
    mixed = gw.http.post(
        "/feedback",
        json=[
            {"prediction_id": "p", "label": 1},
            {"label": 1},
            {"prediction_id": "p"},
            {"prediction_id": "p", "label": [1]},
            {"prediction_id": "p", "label": 1, "colour": "red"},
            {"prediction_id": "p", "label": 1, "timestamp": "yesterday"},
            {"prediction_id": 7, "label": 1},
            "not an object",
        ],
    )
    assert mixed.status_code == 200
    body = mixed.json()
    assert body["accepted"] == 1 and body["rejected"] == 7
    assert body["errors"] == [
        {"index": 1, "reason": "prediction_id or request_id is required"},
        {"index": 2, "reason": "label is required"},
        {"index": 3, "reason": "label must be a non-empty string, a finite number or a boolean"},
        {"index": 4, "reason": "unknown field(s): colour"},
        {"index": 5, "reason": "timestamp must be RFC 3339 with an offset, or Unix seconds"},
        {
            "index": 6,
            "reason": "prediction_id must be a non-empty string of at most 262 characters",
        },
        {"index": 7, "reason": "an item must be a JSON object"},
    ]
    nd = gw.http.post("/feedback", content=b'{"request_id": "x", "label": 1}\n{oops\n')
    assert nd.json()["errors"] == [{"index": 1, "reason": "line 2: malformed JSON"}]
    assert gw.http.post("/feedback", json=[{"label": 1}]).status_code == 422
    assert gw.http.post("/feedback", content=b"{not json").status_code == 400
    assert gw.http.post("/feedback", content=b"42").status_code == 400
    assert gw.http.post("/feedback", json=[]).status_code == 400
    assert gw.http.get("/feedback").status_code == 405


def test_feedback_before_its_prediction_is_kept_and_joined_later(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = fraud_gateway(in_process, upstreams)
    early = gw.http.post("/feedback", json={"request_id": "late-1", "label": 1})
    assert early.json()["accepted"] == 1
    r = predict(gw, 4, "late-1")
    record = wait_for_label(gw, r.headers["x-prediction-id"], "1")
    assert len(record["feedback"]) == 1


def test_feedback_token(in_process: InProcessFactory, upstreams: dict[str, Upstream]) -> None:
    gw = fraud_gateway(in_process, upstreams, admin={"token": "adm", "feedback_token": "lab"})
    item = {"request_id": "x", "label": 1}
    assert gw.http.post("/feedback", json=item).status_code == 401
    for token in ("lab", "adm"):
        ok = gw.http.post("/feedback", json=item, headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    # the feedback token does not open /admin
    assert gw.http.get("/admin/routing", headers={"Authorization": "Bearer lab"}).status_code == 401


def test_outcome_counters_match_the_labels(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """1. 40 predictions through two variants; the answer's label is the prediction.
    2. A label for each (the truth alternates), posted in one batch.
    3. The tp/fp/tn/fn counters per variant equal the confusion counts computed here.
    """
    gw = fraud_gateway(in_process, upstreams)
    expected: Counter[tuple[str, str]] = Counter()
    labels = []
    for i in range(40):
        r = predict(gw, i)
        predicted = r.json()["outputs"][1]["data"][0]
        actual = i % 2
        outcome = {(1, 1): "tp", (1, 0): "fp", (0, 0): "tn", (0, 1): "fn"}[(predicted, actual)]
        expected[(r.headers["x-model-variant"], outcome)] += 1
        labels.append({"prediction_id": r.headers["x-prediction-id"], "label": actual})
    wait_for_label(gw, labels[-1]["prediction_id"], None)
    assert gw.http.post("/feedback", json=labels).json()["accepted"] == 40
    # a second, superseding label is kept but not counted twice
    gw.http.post("/feedback", json=labels[:5])
    text = gw.http.get("/metrics").text
    seen: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        if line.startswith("model_gateway_feedback_outcomes_total{"):
            labels_part = dict(
                kv.split("=") for kv in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            seen[(labels_part["variant"].strip('"'), labels_part["outcome"].strip('"'))] = int(
                float(line.rsplit(" ", 1)[1])
            )
    assert seen == expected
    assert 'model_gateway_feedback_received_total{result="accepted"} 45.0' in text
    assert "model_gateway_prediction_score_bucket" in text


# Text a store keeps: no NUL and no unpaired surrogate (text encodable as UTF-8; hypothesis
# draws surrogates otherwise); items with NUL are in invalid_item below.
STORABLE = st.characters(codec="utf-8", exclude_characters="\x00")
valid_item = st.fixed_dictionaries(
    {"prediction_id": st.text(STORABLE, min_size=1, max_size=40)},
    optional={
        "label": st.one_of(
            st.integers(-5, 5),
            st.booleans(),
            # a label is text with something in it besides spaces (and not a number past
            # a float's range, which the label table refuses too)
            st.text(STORABLE, max_size=10).filter(lambda t: canonical_label(t) is not None),
            st.floats(allow_nan=False, allow_infinity=False),
        ),
        "timestamp": st.one_of(st.integers(0, 2**31), st.just("2026-01-01T00:00:00+02:00")),
        "source": st.text(STORABLE, max_size=10),
    },
).filter(lambda d: "label" in d)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
invalid_item = st.one_of(
    json_value.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"label": json_value}),
    st.fixed_dictionaries(
        {
            "prediction_id": st.text(min_size=1, max_size=10),
            "label": st.lists(json_value, max_size=2)
            | st.dictionaries(st.text(max_size=3), json_value, max_size=2)
            | st.none(),
        }
    ),
    st.fixed_dictionaries(
        {
            "prediction_id": st.text(min_size=1, max_size=10),
            "label": st.integers(),
            "unknown": json_value,
        }
    ),
    st.fixed_dictionaries({"prediction_id": st.just(""), "label": st.integers()}),
    # a label of nothing but spaces, or empty
    st.fixed_dictionaries(
        {"prediction_id": st.just("p"), "label": st.sampled_from(["", " ", "\t", "  \n"])}
    ),
    # NUL, which no store keeps, in any text of an item
    st.fixed_dictionaries(
        {
            "prediction_id": st.text(max_size=5).map(lambda t: f"{t}\x00"),
            "label": st.integers(),
        }
    ),
    st.fixed_dictionaries(
        {
            "prediction_id": st.text(min_size=1, max_size=5).filter(lambda t: "\x00" not in t),
            "label": st.text(max_size=5).map(lambda t: f"\x00{t}"),
        }
    ),
    st.fixed_dictionaries(
        {
            "prediction_id": st.text(min_size=1, max_size=10),
            "label": st.integers(),
            "timestamp": st.text(max_size=10).filter(lambda t: not t.strip()[:1].isdigit()),
        }
    ),
)


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_generated_garbage_never_5xx_and_valid_items_all_kept(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """Any mix of valid and invalid items, as a JSON array or NDJSON: every valid item is
    accepted, every invalid one is rejected with its index, and nothing gets a 5xx."""
    gw = fraud_gateway(in_process, upstreams)

    @settings(max_examples=60, deadline=None)
    @given(
        kinds=st.lists(st.booleans(), min_size=1, max_size=12), ndjson=st.booleans(), data=st.data()
    )
    def check(kinds: list[bool], ndjson: bool, data: st.DataObject) -> None:
        batch = [data.draw(valid_item if ok else invalid_item) for ok in kinds]
        n_valid = sum(kinds)
        if ndjson:
            body = b"\n".join(dumps(item) for item in batch)
            r = gw.http.post(
                "/feedback", content=body, headers={"Content-Type": "application/x-ndjson"}
            )
        else:
            r = gw.http.post(
                "/feedback",
                content=dumps(batch),
                headers={"Content-Type": "application/json"},
            )
        assert r.status_code == (200 if n_valid else 422), r.text
        answer = r.json()
        assert answer["accepted"] == n_valid, (batch, answer)
        assert answer["rejected"] == len(batch) - n_valid
        assert [e["index"] for e in answer["errors"]] == [i for i, ok in enumerate(kinds) if not ok]

    check()
    accepted = gw.app.state.metrics.registry.get_sample_value(
        "model_gateway_feedback_received_total", {"result": "accepted"}
    )
    gw.stop()
    # nothing valid lost: every accepted item is in the store
    db = sqlite3.connect(gw.db_path)
    stored = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
    db.close()
    assert stored == accepted


def test_arbitrary_bytes_get_4xx_never_5xx(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    gw = fraud_gateway(in_process, upstreams)

    @settings(max_examples=80, deadline=None)
    @given(
        body=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
        content_type=st.sampled_from(["application/json", "application/x-ndjson", "text/plain"]),
    )
    def check(body: bytes, content_type: str) -> None:
        r = gw.http.post("/feedback", content=body, headers={"Content-Type": content_type})
        assert r.status_code in (200, 400, 413, 422), (body, r.status_code, r.text)

    check()
    deep = b"[" * 100_000 + b"]" * 100_000
    assert gw.http.post("/feedback", content=deep).status_code == 400


def test_multiclass_counts_per_class(
    in_process: InProcessFactory, upstreams: dict[str, Upstream]
) -> None:
    """A multiclass route counts each labelled prediction one-vs-rest, per class."""
    gw = in_process(
        [
            route(
                "fraud",
                "/v2/models/fraud",
                [("a", upstreams["a"].url, 1)],
                evaluation={"task": "multiclass", "prediction": "/outputs/1/data/0"},
            )
        ]
    )
    expected: Counter[tuple[str, str]] = Counter()
    labels = []
    for i in range(12):
        r = predict(gw, i)
        predicted = str(r.json()["outputs"][1]["data"][0])
        actual = ("0", "1", "2")[i % 3]
        if predicted == actual:
            expected[(actual, "tp")] += 1
        else:
            expected[(actual, "fn")] += 1
            expected[(predicted, "fp")] += 1
        labels.append({"prediction_id": r.headers["x-prediction-id"], "label": actual})
    wait_for_label(gw, labels[-1]["prediction_id"], None)
    assert gw.http.post("/feedback", json=labels).json()["accepted"] == 12
    registry = gw.app.state.metrics.registry
    for (cls, outcome), count in expected.items():
        value = registry.get_sample_value(
            "model_gateway_feedback_class_outcomes_total",
            {
                "route": "fraud",
                "variant": "a",
                "model_version": "1",
                "class": cls,
                "outcome": outcome,
            },
        )
        assert value == count, (cls, outcome)


@pytest.mark.slow
def test_labels_posted_concurrently_are_all_kept(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """600 labels posted 60 at a time while the joiner joins them: each is answered 200 and
    kept. Transactions interleaved on the store's one SQLite connection used to fail some
    with a 503 (sqlite3: API misuse), and could roll back labels already answered as kept."""
    gw = gateway(
        [route("fraud", "/v2/models/fraud", [("a", upstreams["a"].url, 1)], evaluation=EVALUATION)]
    )

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:

            async def one(i: int) -> int:
                answer = await client.post("/v2/models/fraud/infer", json=features(i))
                item = {"prediction_id": answer.headers["x-prediction-id"], "label": i % 2}
                return (await client.post("/feedback", json=item)).status_code

            codes: list[int] = []
            for batch in range(10):
                codes += await asyncio.gather(*(one(batch * 60 + i) for i in range(60)))
            return codes

    assert asyncio.run(run()) == [200] * 600
    gw.stop()
    db = sqlite3.connect(gw.db_path)
    assert db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 600
    db.close()
