"""Rollouts on real gateways: a failing challenger taken back under load, the moves in the
history with their reasons, operators' actions through the admin API and the command line,
a rollout that survives a restart, and two replicas on one PostgreSQL with one decider."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from model_gateway.cli import main

from .conftest import GatewayFactory, RunningGateway, Upstream, running, wait_until
from .test_processes import GatewayProcess
from .test_store import POSTGRES, drop_schema

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INFER = {
    "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
}


#: a client's idle connections expire well before the gateway's keep-alive timeout closes
#: them, so that a request is never sent on a connection the server is closing
CLIENT_LIMITS = httpx.Limits(keepalive_expiry=1.0)


class FailingModel:
    """A V2 model server that answers every ``every``-th request 500, and counts them all."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        self.requests += 1
        failed = self.requests % self.every == 0
        body = b'{"error": "model crashed"}' if failed else orjson.dumps(
            {"model_name": "fraud", "model_version": "2",
             "outputs": [{"name": "score", "shape": [1], "datatype": "FP32", "data": [0.9]}]}
        )  # fmt: skip
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 500 if failed else 200,
                    "headers": headers})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


def rollout_route(champion: str, challenger: str, **rollout: Any) -> dict[str, Any]:
    return {
        "name": "fraud",
        "path": "/v2/models/fraud",
        "variants": [
            {"name": "champion", "url": champion, "model_version": "1", "weight": 100},
            {"name": "challenger", "url": challenger, "model_version": "2", "weight": 0},
        ],
        "rollout": {
            "id": "r1",
            "challenger": "challenger",
            "steps": [5, 25, 50, 100],
            "interval": 0.5,
            **rollout,
        },
    }


async def load(url: str, rate: float, until: Any) -> None:
    """``rate`` requests a second to ``url`` until ``until()`` is true (asked four times a
    second)."""
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=CLIENT_LIMITS) as client:
        started = time.monotonic()
        sent = 0
        pending: set[asyncio.Task[Any]] = set()
        asked = 0.0
        while True:
            if time.monotonic() - asked >= 0.25:
                if until():
                    break
                asked = time.monotonic()
            due = started + sent / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.ensure_future(client.post("/v2/models/fraud/infer", json=INFER))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await asyncio.gather(*pending, return_exceptions=True)


def rollout_of(gw: RunningGateway) -> dict[str, Any]:
    found: dict[str, Any] = gw.http.get("/admin/rollouts/r1").json()
    return found


def configs(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM configs ORDER BY activated_at")]
    finally:
        conn.close()


def test_a_challenger_failing_one_request_in_five_is_taken_back_within_25_s(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """200 requests a second; the challenger answers 5xx to one in five; steps of 10 s, gated
    on an error ratio of at most 0.05. Its weight is 0 within 25 s of the first step, no
    request routed by the configuration from then on reached it, and one configuration
    version in the history names why."""
    challenger = FailingModel(every=5)
    with running(challenger) as model:
        gw = gateway(
            [
                rollout_route(
                    upstreams["a"].url,
                    model.url,
                    step_seconds=10,
                    gates={"error_ratio": {"max": 0.05}, "min_requests": 20},
                )
            ],
            server={"config_poll_interval": 0},
        )
        first = rollout_of(gw)
        assert (first["status"], first["challenger_percent"]) == ("running", 5)
        asyncio.run(load(gw.url, 200, lambda: rollout_of(gw)["status"] != "running"))
        done = rollout_of(gw)
        assert done["status"] == "rolled_back", done
        assert done["weights"] == {"champion": 100.0, "challenger": 0.0}
        # and the routing table says so: nothing more reaches it
        before = challenger.requests
        for _ in range(50):
            assert gw.http.post("/v2/models/fraud/infer", json=INFER).status_code == 200
        assert challenger.requests == before
    gw.stop()
    history = configs(gw.db_path)
    why = [c for c in history if "error_ratio" in c["source"]]
    assert len(why) == 1, [c["source"] for c in history]
    assert why[0]["source"].startswith("rollout r1: error_ratio 0.")
    assert why[0]["source"].endswith("> 0.05")
    started = history[0]["activated_at"]
    assert why[0]["activated_at"] - started < 25
    # no request routed by the rollback's configuration reached the challenger
    conn = sqlite3.connect(gw.db_path)
    late = conn.execute(
        "SELECT COUNT(*) FROM predictions WHERE variant = 'challenger' AND config_version = ?",
        (why[0]["version"],),
    ).fetchone()[0]
    conn.close()
    assert late == 0
    # /admin/routing at any instant after it shows the weights then in force
    assert yaml.safe_load(why[0]["text"])["rollout_weights"] == {
        "fraud": {"champion": 100.0, "challenger": 0.0}
    }


class ConstantModel:
    """A V2 model server that predicts the positive class for every request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        body = orjson.dumps({"outputs": [{"name": "label", "shape": [1], "datatype": "INT64",
                                          "data": [1]}]})  # fmt: skip
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def test_a_less_precise_challenger_is_rolled_back_on_labels_that_come_a_second_later(
    gateway: GatewayFactory,
) -> None:
    """Each predicts positive; the labels, posted a second after each answer, make the
    champion right 85 % of the time and the challenger 70 % (seeded). Gated on precision by
    the experiment's always-valid comparison, the challenger is rolled back before it has
    made 3,000 predictions."""
    rng = random.Random(20261206)
    with running(ConstantModel()) as champion, running(ConstantModel()) as challenger:
        route = rollout_route(
            champion.url, challenger.url, steps=[25, 50, 100], step_seconds=3600,
            gates={"quality": True},
        )  # fmt: skip
        route["evaluation"] = {"task": "binary", "prediction": "/outputs/0/data/0",
                               "positive_label": 1}  # fmt: skip
        route["experiment"] = {"id": "e1", "start": "2026-01-01T00:00:00Z",
                               "champion": "champion", "primary_metric": "precision",
                               "minimum_detectable_effect": 0.05}  # fmt: skip
        gw = gateway([route], server={"config_poll_interval": 0})

        async def run() -> None:
            labels: list[asyncio.Task[Any]] = []
            calls = asyncio.Semaphore(32)  # the client's connections, not a pace
            async with httpx.AsyncClient(
                base_url=gw.url, timeout=60, limits=CLIENT_LIMITS
            ) as client:

                async def one() -> None:
                    async with calls:
                        answer = await client.post("/v2/models/fraud/infer", json=INFER)
                    precision = 0.85 if answer.headers["x-model-variant"] == "champion" else 0.7
                    label = 1 if rng.random() < precision else 0
                    await asyncio.sleep(1)  # the label comes a second after the answer
                    item = {"prediction_id": answer.headers["x-prediction-id"], "label": label}
                    async with calls:
                        await client.post("/feedback", json=item)

                async def status() -> str:
                    found = await client.get("/admin/rollouts/r1")
                    return str(found.json()["status"])

                give_up = time.monotonic() + 240  # a bound on the test, not a timing
                while await status() == "running" and time.monotonic() < give_up:
                    labels += [asyncio.ensure_future(one()) for _ in range(10)]
                    await asyncio.sleep(0.1)
                await asyncio.gather(*labels)

        asyncio.run(run())
        done = rollout_of(gw)
    gw.stop()
    assert done["status"] == "rolled_back", done
    assert done["reason"].startswith("quality: precision worse by"), done["reason"]
    conn = sqlite3.connect(gw.db_path)
    made = conn.execute("SELECT COUNT(*) FROM predictions WHERE variant = 'challenger'").fetchone()
    conn.close()
    assert made[0] < 3000, made


def test_operators_pause_resume_and_promote_and_a_restart_keeps_the_rollout(
    gateway: GatewayFactory, upstreams: dict[str, Upstream], capsys: pytest.CaptureFixture[str]
) -> None:
    """Through /admin/rollouts (with the admin token) and the command line: pause holds the
    step, resume restarts its clock, a wrong action is refused with 409, promote gives the
    challenger all the traffic. A gateway started again on the same store serves the
    promoted weights from its first request."""
    routes = [
        rollout_route(
            upstreams["a"].url,
            upstreams["b"].url,
            step_seconds=3600,
            gates={"error_ratio": {"max": 0.05}},
        )
    ]
    gw = gateway(routes, admin={"token": "adm"}, server={"config_poll_interval": 0})
    auth = {"Authorization": "Bearer adm"}
    assert gw.http.post("/admin/rollouts/r1/pause").status_code == 401
    paused = gw.http.post("/admin/rollouts/r1/pause", headers=auth)
    assert paused.json()["status"] == "paused"
    again = gw.http.post("/admin/rollouts/r1/pause", headers=auth)
    assert again.status_code == 409
    assert again.json()["error"]["message"] == "cannot pause a rollout that is paused"
    assert gw.http.post("/admin/rollouts/nope/pause", headers=auth).status_code == 404
    assert main(["rollout", "resume", "r1", "--config", str(gw.config_path)]) == 0
    wait_until(
        lambda: gw.http.get("/admin/rollouts/r1", headers=auth).json()["status"] == "running",
        "the gateway to follow the command line",
    )
    capsys.readouterr()
    assert main(["rollout", "status", "--config", str(gw.config_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ROLLOUT", "ROUTE", "STATUS", "STEP"]
    assert table[1].split()[:4] == ["r1", "fraud", "running", "1/4"]
    assert "cli: resume" in table[1]
    promoted = gw.http.post("/admin/rollouts/r1/promote", headers=auth).json()
    assert promoted["weights"] == {"champion": 0.0, "challenger": 100.0}
    for _ in range(20):
        answer = gw.http.post("/v2/models/fraud/infer", json=INFER)
        assert answer.headers["x-model-variant"] == "challenger"
    metrics = gw.http.get("/metrics").text
    assert 'model_gateway_variant_weight{route="fraud",variant="challenger"} 100.0' in metrics
    assert 'model_gateway_rollout_state{rollout="r1",route="fraud",state="promoted"} 1.0' in metrics
    gw.stop()
    # the same file and store, a new process's worth of gateway
    again_gw = RunningGateway(gw.config_path, gw.db_path)
    try:
        answer = again_gw.http.post("/v2/models/fraud/infer", json=INFER)
        assert answer.headers["x-model-variant"] == "challenger"
    finally:
        again_gw.stop()


def test_two_replicas_on_postgresql_have_one_decider_and_hand_over_when_it_stops(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """Two gateways on one PostgreSQL schema, two rollouts: a challenger that fails every
    other request (fraud) and a healthy one (spam). Exactly one gateway decides each; once
    fraud's is rolled back, both serve its challenger weight 0 within the interval; once
    spam's decider stops, the other takes its lease when it runs out, and spam goes on."""
    schema = f"mg_rollout_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in POSTGRES else "?"
    url = f"{POSTGRES}{sep}schema={schema}"
    failing = FailingModel(every=2)
    replicas: list[RunningGateway] = []
    with running(failing) as bad:
        fraud = rollout_route(upstreams["a"].url, bad.url, step_seconds=3600,
                              gates={"error_ratio": {"max": 0.05}, "min_requests": 5})  # fmt: skip
        spam = rollout_route(upstreams["a"].url, upstreams["b"].url, step_seconds=1,
                             gates={"error_ratio": {"max": 0.05}, "min_requests": 5})  # fmt: skip
        spam.update(name="spam", path="/v2/models/spam")
        spam["rollout"]["id"] = "r2"
        try:
            for n in range(2):
                config = tmp_path / f"replica{n}.yaml"
                config.write_text(
                    yaml.safe_dump(
                        {
                            "storage": {"url": url},
                            "routes": [fraud, spam],
                            "server": {"config_poll_interval": 0},
                        }
                    )
                )
                replicas.append(RunningGateway(config, tmp_path / "unused.db"))

            def send(n: int) -> None:
                for gw in replicas:
                    for _ in range(0 if gw.stopped else n):
                        gw.http.post("/v2/models/fraud/infer", json=INFER)
                        gw.http.post("/v2/models/spam/infer", json=INFER)

            def rollout(gw: RunningGateway, rollout_id: str) -> dict[str, Any]:
                found: dict[str, Any] = gw.http.get(f"/admin/rollouts/{rollout_id}").json()
                return found

            def decided(gw: RunningGateway, route: str) -> float:
                prefix = "model_gateway_rollout_decisions_total{"
                return sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in gw.http.get("/metrics").text.splitlines()
                    if line.startswith(prefix) and f'route="{route}"' in line
                )

            def serving(gw: RunningGateway) -> dict[str, float]:
                """fraud's weights as this replica serves them (its own metrics)."""
                found = {}
                for line in gw.http.get("/metrics").text.splitlines():
                    if line.startswith('model_gateway_variant_weight{route="fraud"'):
                        name = line.split('variant="')[1].split('"')[0]
                        found[name] = float(line.rsplit(" ", 1)[1])
                return found

            wait_until(
                lambda: send(10) or all(rollout(g, "r1")["status"] == "rolled_back"
                                        for g in replicas),
                "fraud rolled back on both", 60,
            )  # fmt: skip
            for gw in replicas:  # within the interval of the rollback, or the look after
                assert serving(gw) == {"champion": 100.0, "challenger": 0.0}
            assert [decided(g, "fraud") > 0 for g in replicas].count(True) == 1
            wait_until(lambda: send(5) or rollout(replicas[0], "r2")["step"] >= 2,
                       "spam to advance", 60)  # fmt: skip
            deciders = [g for g in replicas if decided(g, "spam") > 0]
            assert len(deciders) == 1
            decider = deciders[0]
            follower = next(g for g in replicas if g is not decider)
            reached = rollout(decider, "r2")["step"]
            decider.stop()
            # its lease runs out, and the follower decides from then on
            wait_until(lambda: send(5) or rollout(follower, "r2")["step"] > reached,
                       "the follower to take spam over", 60)  # fmt: skip
            assert decided(follower, "spam") > 0
        finally:
            for gw in replicas:
                gw.stop()
            drop_schema(schema)


def test_the_shipped_example_rolls_back_a_challenger_that_fails(
    tmp_path: Path, upstreams: dict[str, Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """config/examples/rollout.yaml as shipped, served by `model-gateway serve`, the
    champion a demo model server and the challenger one that answers 5xx to one request in
    five: the error gate rolls it back, and `model-gateway rollout status` says why."""
    example = Path(__file__).resolve().parent.parent / "config" / "examples" / "rollout.yaml"
    failing = FailingModel(every=5)
    with running(failing) as challenger:
        monkeypatch.setenv("CHAMPION_URL", upstreams["a"].url)
        monkeypatch.setenv("CHALLENGER_URL", challenger.url)
        monkeypatch.setenv("ROLLOUT_DB", str(tmp_path / "rollout.db"))
        monkeypatch.delenv("MODEL_GATEWAY_ADMIN_TOKEN", raising=False)
        gw = GatewayProcess(example)
        try:

            def status() -> str:
                found = httpx.get(f"{gw.url}/admin/rollouts/fraud-v2-rollout").json()
                return str(found["status"])

            assert status() == "running"
            asyncio.run(load(gw.url, 200, lambda: status() != "running"))
            assert status() == "rolled_back"
        finally:
            assert gw.terminate_and_wait() in (0, -signal.SIGTERM)
    capture = subprocess.run(
        [sys.executable, "-m", "model_gateway", "rollout", "status", "--config", str(example)],
        capture_output=True,
        text=True,
        check=True,
    )
    row = capture.stdout.splitlines()[1]
    assert row.split()[:3] == ["fraud-v2-rollout", "fraud", "rolled_back"]
    assert "error_ratio 0." in row and "> 0.05" in row


def test_the_file_keeps_everything_but_the_rollouts_split(
    gateway: GatewayFactory, upstreams: dict[str, Upstream]
) -> None:
    """The rule for the file and a rollout: while the rollout runs, a reload takes every
    setting of the file, and the rollout keeps the split of its two variants (of the total
    the file now gives them); /admin/routing shows what serves and why. Removing the section
    gives the weights back to the file."""
    route = rollout_route(upstreams["a"].url, upstreams["b"].url, steps=[10, 100],
                          step_seconds=3600)  # fmt: skip
    gw = gateway([route], server={"config_poll_interval": 0})

    def live() -> dict[str, Any]:
        found: dict[str, Any] = gw.http.get("/admin/routing").json()
        return found

    def weights_now() -> dict[str, float]:
        return {v["name"]: v["weight"] for v in live()["routes"][0]["variants"]}

    assert weights_now() == {"champion": 90.0, "challenger": 10.0}
    assert live()["source"] == "rollout r1: started"
    # the operator edits the file: other weights, a smaller body limit
    doc = yaml.safe_load(gw.config_path.read_text())
    doc["routes"][0]["variants"][0]["weight"] = 150
    doc["routes"][0]["variants"][1]["weight"] = 50
    doc["routes"][0]["max_body_bytes"] = 100
    gw.config_path.write_text(yaml.safe_dump(doc))
    assert gw.http.post("/admin/reload").json()["status"] == "reloaded"
    assert weights_now() == {"champion": 180.0, "challenger": 20.0}  # 10 % of the new 200
    assert live()["source"] == str(gw.config_path)
    big = gw.http.post("/v2/models/fraud/infer", content=b"x" * 200)
    assert big.status_code == 413  # the file's new limit serves
    # the section removed: the file's own weights
    del doc["routes"][0]["rollout"]
    gw.config_path.write_text(yaml.safe_dump(doc))
    assert gw.http.post("/admin/reload").json()["status"] == "reloaded"
    assert weights_now() == {"champion": 150.0, "challenger": 50.0}
