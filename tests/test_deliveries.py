"""Deliveries: files of a route's predictions for downstream teams, each prediction in exactly
one file, across late records, crashes at every step and kill -9 of the gateway."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from model_gateway.cli import main
from model_gateway.config import DeliveryConfig, parse_config
from model_gateway.deliveries import DeliveryBusy, deliver, file_name
from model_gateway.store import Store

from .conftest import Upstream, wait_until
from .test_durability import load_until_killed, stored_ids
from .test_labelling import fraud_store, prediction, with_store_sync  # noqa: F401
from .test_processes import INFER, GatewayProcess

NOW = 1_800_010_000.0


def body(customer: str, amount: float) -> bytes:
    return json.dumps({"customer": {"id": customer}, "amount": amount}).encode()


def delivery(directory: Path, **extra: Any) -> DeliveryConfig:
    return DeliveryConfig(
        name="calls",
        route="fraud",
        directory=str(directory),
        fields={"customer": "/customer/id"},
        lookback="30d",
        **extra,
    )


def read_delivered(directory: Path) -> list[dict[str, Any]]:
    """Every row of every whole file (one with its manifest) in ``directory``, checking each
    manifest's row count and checksum."""
    rows: list[dict[str, Any]] = []
    for manifest in sorted(directory.glob("*.manifest.json")):
        described = json.loads(manifest.read_text())
        data = (directory / described["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == described["sha256"]
        if described["format"] == "parquet":
            found = pq.read_table(io.BytesIO(data)).to_pylist()
        else:
            found = list(csv.DictReader(io.StringIO(data.decode())))
        assert len(found) == described["rows"]
        rows += found
    return rows


def run(url: str, work: Any) -> Any:
    return with_store_sync(url, work)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_each_run_delivers_what_no_run_has_and_a_late_record_comes_next(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
    fmt: str,
) -> None:
    """30 predictions: the first run delivers them all, with the customer read from each
    captured request body; a run with nothing new writes nothing; 10 more, 4 of them logged
    late (their request two hours before the first run): the next run holds exactly those 10."""
    url, _ = fraud_store
    out = tmp_path / "out"
    config = delivery(out, format=fmt)
    first = [prediction("a", i, 0.1 * (i % 10), request_body=body(f"c{i}", i)) for i in range(30)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in first]))
    written = run(url, lambda store: deliver(store, config, NOW))
    assert [(d.seq, d.rows) for d in written] == [(1, 30)]
    assert written[0].path.name == file_name(config, 1, NOW)
    assert written[0].path.name.startswith("calls-00000001-")
    assert run(url, lambda store: deliver(store, config, NOW + 60)) == []
    late = [
        prediction("b", 100 + i, 0.5, request_body=body(f"late{i}", i), request_time=NOW - 7200)
        for i in range(4)
    ]
    more = [prediction("a", 200 + i, 0.5, request_time=NOW + i) for i in range(6)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in [*late, *more]]))
    written = run(url, lambda store: deliver(store, config, NOW + 120))
    assert [(d.seq, d.rows) for d in written] == [(2, 10)]
    rows = read_delivered(out)
    ids = [r["prediction_id"] for r in rows]
    assert sorted(ids) == sorted(r.prediction_id for r in [*first, *late, *more])
    assert len(ids) == len(set(ids))
    by_id = {r["prediction_id"]: r for r in rows}
    assert by_id[first[3].prediction_id]["customer"] == "c3"
    assert by_id[late[1].prediction_id]["customer"] == "late1"
    assert by_id[more[0].prediction_id]["customer"] in (None, "")  # no body captured
    one = by_id[first[0].prediction_id]
    assert (one["method"], one["path"]) == ("POST", "/fraud/predict")
    assert not list(out.glob(".*.tmp"))


def test_a_claim_whose_file_was_never_written_is_written_first(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The process died after claiming run 1 and before its file: the next run writes run 1
    from its claim, then claims and writes run 2 with what came since."""
    url, _ = fraud_store
    out = tmp_path / "out"
    config = delivery(out)
    first = [prediction("a", i, 0.5) for i in range(5)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in first]))
    claim = store_claim("calls", 0.0, NOW, "a gateway that died", NOW - 1)
    assert run(url, claim) == 1
    later = [prediction("a", 10 + i, 0.5) for i in range(3)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in later]))
    written = run(url, lambda store: deliver(store, config, NOW + 1))
    assert [(d.seq, d.rows) for d in written] == [(1, 5), (2, 3)]
    ids = sorted(r["prediction_id"] for r in read_delivered(out))
    assert ids == sorted(r.prediction_id for r in [*first, *later])


def store_claim(name: str, since: float, now: float, holder: str, until: float) -> Any:
    return lambda store: store.claim_delivery(name, "fraud", since, now, holder, until, 10**6)


def test_a_run_marked_before_its_manifest_showed_gets_its_manifest_only(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """The process died after marking the run and before renaming its manifest into place:
    the next run renames it and writes nothing again (the file is as it was)."""
    url, _ = fraud_store
    out = tmp_path / "out"
    config = delivery(out)
    run(url, lambda store: store.write_predictions([prediction("a", 0, 0.5).as_row()]))
    (done,) = run(url, lambda store: deliver(store, config, NOW))
    before = done.path.stat()
    manifest = done.path.with_name(done.path.name + ".manifest.json")
    manifest.rename(manifest.with_name(f".{manifest.name}.tmp"))
    assert run(url, lambda store: deliver(store, config, NOW + 1)) == []
    assert manifest.exists()
    after = done.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(read_delivered(out)) == 1


def test_a_consumer_that_takes_the_files_away_gets_nothing_twice(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A consumer moves each file and its manifest away as soon as they show: later runs
    deliver only what is new."""
    url, _ = fraud_store
    out, taken = tmp_path / "out", tmp_path / "taken"
    taken.mkdir()
    config = delivery(out)
    seen: list[str] = []
    for round_ in range(3):
        batch = [prediction("a", 10 * round_ + i, 0.5) for i in range(3)]
        run(url, lambda store, b=batch: store.write_predictions([r.as_row() for r in b]))
        run(url, lambda store, r=round_: deliver(store, config, NOW + r))
        seen += [row["prediction_id"] for row in read_delivered(out)]
        for path in out.iterdir():
            if not path.name.startswith("."):
                path.rename(taken / path.name)
    assert len(seen) == 9 and len(set(seen)) == 9


def test_a_manifest_left_by_another_store_does_not_stand_for_a_new_run(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A directory holding run 1 of a store since replaced: the new store's run 1 is a file
    of its own, with all its predictions."""
    url, _ = fraud_store
    out = tmp_path / "out"
    out.mkdir()
    config = delivery(out)
    old = out / file_name(config, 1, NOW - 86_400)
    old.write_text("prediction_id\nold\n")
    old.with_name(old.name + ".manifest.json").write_text('{"seq": 1, "rows": 1}')
    records = [prediction("a", i, 0.5) for i in range(5)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in records]))
    (done,) = run(url, lambda store: deliver(store, config, NOW))
    assert done.rows == 5 and done.path != old
    assert old.read_text() == "prediction_id\nold\n"


def test_a_run_being_written_by_another_gateway_is_left_to_it_until_its_lease_ends(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Gateway A claimed run 1 and is writing it (its lease runs ten minutes); gateway B,
    with a directory of its own, leaves it alone; once A's lease has run out (A died), B
    writes it."""
    url, _ = fraud_store
    config = delivery(tmp_path / "b")
    run(url, lambda store: store.write_predictions([prediction("a", 0, 0.5).as_row()]))
    assert run(url, store_claim("calls", 0.0, NOW, "gateway-a", NOW + 600)) == 1
    with pytest.raises(DeliveryBusy):
        run(url, lambda store: deliver(store, config, NOW + 60, holder="gateway-b"))
    done = run(url, lambda store: deliver(store, config, NOW + 601, holder="gateway-b"))
    assert [(d.seq, d.rows) for d in done] == [(1, 1)]


def test_a_delivery_being_run_elsewhere_is_left_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    out = tmp_path / "out"
    out.mkdir()
    config = delivery(out)
    with (out / ".lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DeliveryBusy):
            run(url, lambda store: deliver(store, config, NOW))


def test_export_since_last_runs_the_delivery_and_writes_the_labelling_sample(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, base = fraud_store
    out = tmp_path / "out"
    config = tmp_path / "deliveries.yaml"
    loaded = yaml.safe_load(base.read_text())
    loaded["deliveries"] = [
        {
            "name": "calls",
            "route": "fraud",
            "directory": str(out),
            "every": None,
            "sample": {"n": 10, "by": ["variant", "score_decile"]},
        }
    ]
    config.write_text(yaml.safe_dump(loaded))
    records = [prediction("ab"[i % 2], i, (i % 50) / 50) for i in range(200)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in records]))
    args = ["export", "--config", str(config), "--since-last", "calls"]
    assert main(args) == 0
    assert "200 predictions" in capsys.readouterr().err
    assert main(args) == 0
    assert "nothing new to deliver for calls" in capsys.readouterr().err
    assert main(["export", "--config", str(config), "--since-last", "nope"]) == 1
    assert "no delivery is named 'nope' (configured: calls)" in capsys.readouterr().err
    (manifest,) = out.glob("*.manifest.json")
    described = json.loads(manifest.read_text())
    sample = list(csv.DictReader((out / described["sample"]).read_text().splitlines()))
    assert len(sample) == 20 and {r["variant"] for r in sample} == {"a", "b"}
    assert all(0 < float(r["inclusion_probability"]) <= 1 for r in sample)
    assert {r["prediction_id"] for r in sample} <= {r.prediction_id for r in records}


def test_a_delivery_must_name_a_route_and_new_columns() -> None:
    text = """
routes:
  - name: fraud
    path: /fraud
    variants: [{name: a, url: "http://127.0.0.1:9", model_version: "1"}]
deliveries:
  - {name: d, route: nowhere, directory: /tmp/x, fields: {score: /s}}
  - {name: d, route: fraud, directory: /tmp/x, every: soon}
"""
    with pytest.raises(Exception) as found:
        parse_config(text)
    message = str(found.value)
    assert "deliveries[1].every" in message
    text = text.replace("every: soon", "every: 1h")
    with pytest.raises(Exception) as found:
        parse_config(text)
    message = str(found.value)
    assert "deliveries[0].route: no route is named 'nowhere'" in message
    assert "deliveries[0].fields: score already name columns" in message
    assert "deliveries[1].name: duplicate delivery name 'd'" in message


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_between_deliveries_delivers_every_prediction_exactly_once(
    tmp_path: Path, upstreams: dict[str, Upstream]
) -> None:
    """A gateway delivering every second, under load, killed (SIGKILL) three times; then
    started once more and stopped gracefully, and the delivery run once from the CLI. The
    files' rows are the log's live predictions, each exactly once."""
    db = tmp_path / "log.db"
    out = tmp_path / "out"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {
                    "url": f"sqlite:///{db}",
                    "durability": "answered",
                    "spool_path": str(tmp_path / "spool"),
                },
                "server": {"config_poll_interval": 0},
                "routes": [
                    {
                        "name": "fraud",
                        "path": "/v2/models/fraud",
                        "variants": [
                            {"name": "a", "url": upstreams["a"].url, "model_version": "1"}
                        ],
                    }
                ],
                "deliveries": [
                    {"name": "calls", "route": "fraud", "directory": str(out), "every": "1s"}
                ],
            }
        )
    )
    for round_ in range(3):
        gw = GatewayProcess(config)
        for _ in range(20):
            answer = httpx.post(f"{gw.url}/v2/models/fraud/infer", json=INFER)
            assert answer.status_code == 200
        # a delivery of this round's first requests, then load, and the kill
        wait_until(
            lambda done=round_: len(list(out.glob("*.manifest.json"))) > done,
            "this round's delivery",
            120,
        )
        # long enough under load for deliveries to run meanwhile: the kill may land in one
        load_until_killed(gw, 3000)
    last = GatewayProcess(config)
    last.terminate_and_wait()
    assert main(["export", "--config", str(config), "--since-last", "calls"]) == 0
    delivered = [r["prediction_id"] for r in read_delivered(out)]
    assert len(delivered) == len(set(delivered)), "a prediction delivered twice"
    assert set(delivered) == stored_ids(db)
    assert len(list(out.glob("*.manifest.json"))) >= 3


def test_files_are_renamed_whole(tmp_path: Path) -> None:
    from model_gateway.deliveries import _write_atomically

    target = tmp_path / "f.csv"
    _write_atomically(target, b"a,b\n1,2\n")
    assert target.read_bytes() == b"a,b\n1,2\n"
    assert sorted(os.listdir(tmp_path)) == ["f.csv"]


def test_an_unwritable_directory_is_a_clear_error_and_loses_nothing(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The directory is a file: the CLI says so and exits 1; nothing is claimed, so the
    next run, to a directory that works, delivers everything."""
    url, base = fraud_store
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    loaded = yaml.safe_load(base.read_text())
    loaded["deliveries"] = [
        {"name": "calls", "route": "fraud", "directory": str(blocked / "out"), "every": None}
    ]
    config = tmp_path / "d.yaml"
    config.write_text(yaml.safe_dump(loaded))
    records = [prediction("a", i, 0.5) for i in range(7)]
    run(url, lambda store: store.write_predictions([r.as_row() for r in records]))
    assert main(["export", "--config", str(config), "--since-last", "calls"]) == 1
    assert f"cannot write to {blocked / 'out'}" in capsys.readouterr().err
    assert run(url, lambda store: store.delivery_runs("calls")) == []
    loaded["deliveries"][0]["directory"] = str(tmp_path / "works")
    config.write_text(yaml.safe_dump(loaded))
    assert main(["export", "--config", str(config), "--since-last", "calls"]) == 0
    assert len(read_delivered(tmp_path / "works")) == 7


def test_runs_that_failed_for_longer_than_the_lookback_skip_nothing(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A lookback of an hour; the run after the first comes ten hours later (the runs in
    between failed), and a record of 30 minutes before the first run was written late: it
    is delivered, since the lookback counts back from the last run that claimed."""
    url, _ = fraud_store
    out = tmp_path / "out"
    config = DeliveryConfig(name="calls", route="fraud", directory=str(out), lookback="1h")
    run(
        url,
        lambda store: store.write_predictions([prediction("a", 0, 0.5, request_time=NOW).as_row()]),
    )
    assert [d.rows for d in run(url, lambda store: deliver(store, config, NOW + 1))] == [1]
    late = prediction("a", 1, 0.5, request_time=NOW - 1800)
    run(url, lambda store: store.write_predictions([late.as_row()]))
    written = run(url, lambda store: deliver(store, config, NOW + 10 * 3600))
    assert [d.rows for d in written] == [1]
    assert late.prediction_id in {r["prediction_id"] for r in read_delivered(out)}


def test_an_ordinary_run_looks_back_minutes_and_a_sweep_the_whole_lookback(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A record written an hour after its request (the store was away) is not in the next
    ordinary run, which reads only the minutes before the last run, and is in the next
    sweep's; nothing twice."""
    url, _ = fraud_store
    out = tmp_path / "out"
    config = delivery(out)
    first = prediction("a", 0, 0.5, request_time=NOW)
    run(url, lambda store: store.write_predictions([first.as_row()]))
    assert [d.rows for d in run(url, lambda store: deliver(store, config, NOW + 1))] == [1]
    late = prediction("a", 1, 0.5, request_time=NOW - 3600)
    recent = prediction("a", 2, 0.5, request_time=NOW + 30)
    run(url, lambda store: store.write_predictions([late.as_row(), recent.as_row()]))
    ordinary = run(url, lambda store: deliver(store, config, NOW + 60, sweep=False))
    assert [d.rows for d in ordinary] == [1]
    swept = run(url, lambda store: deliver(store, config, NOW + 120, sweep=True))
    assert [d.rows for d in swept] == [1]
    ids = [r["prediction_id"] for r in read_delivered(out)]
    assert sorted(ids) == sorted([first.prediction_id, late.prediction_id, recent.prediction_id])


def test_a_gateway_delivers_on_its_schedule_in_a_process_of_its_own(
    gateway: Any, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    """A gateway with a delivery every second: the files hold its predictions, each once,
    with the customer read from each captured body, and its /metrics counts what was
    delivered."""
    out = tmp_path / "out"
    gw = gateway(
        [
            {
                "name": "fraud",
                "path": "/v2/models/fraud",
                "capture": {"bodies": True},
                "variants": [{"name": "a", "url": upstreams["a"].url, "model_version": "1"}],
            }
        ],
        deliveries=[
            {
                "name": "calls",
                "route": "fraud",
                "directory": str(out),
                "every": "1s",
                "fields": {"customer": "/parameters/customer"},
            }
        ],
    )
    sent = []
    for i in range(5):
        body = {**INFER, "parameters": {"customer": f"c{i}"}}
        answer = gw.http.post("/v2/models/fraud/infer", json=body)
        assert answer.status_code == 200
        sent.append(answer.headers["x-prediction-id"])

    def delivered() -> float:
        for line in gw.http.get("/metrics").text.splitlines():
            if line.startswith('model_gateway_delivered_rows_total{delivery="calls"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    wait_until(lambda: delivered() == 5, "the five predictions delivered")
    rows = read_delivered(out)
    assert sorted(r["prediction_id"] for r in rows) == sorted(sent)
    assert sorted(r["customer"] for r in rows) == [f"c{i}" for i in range(5)]


def test_reading_a_run_leaves_the_stores_writes_free(tmp_path: Path) -> None:
    """SQLite: while a run's rows are read batch by batch, another process writes (the log)
    and this connection writes too (a label between two batches): no write fails with
    "database is locked", as one did when a cursor stayed open across the batches."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    records = [prediction("a", i, 0.5) for i in range(30)]

    async def work(store: Store) -> int:
        await store.write_predictions([r.as_row() for r in records])
        seq = await store.claim_delivery("calls", "fraud", 0.0, NOW, "me", NOW + 600, 10**6)
        assert seq == 1
        read = 0
        async for batch in store.iter_delivery("calls", 1, batch=10):
            read += len(batch)
            other = sqlite3.connect(tmp_path / "log.db")
            other.execute("INSERT INTO configs VALUES ('v', 1.0, 'elsewhere', 'text')")
            other.commit()
            other.close()
            await store.insert_feedback(
                [("f" + batch[0]["prediction_id"], batch[0]["prediction_id"], None, "1", NOW,
                  NOW, None, "downstream", None, None, None)]
            )  # fmt: skip
        return read

    assert run(url, work) == 30


def test_a_run_a_stopped_process_left_on_this_host_is_finished_at_once(
    fraud_store: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    """A gateway's run was cut short by its stop, its lease running on: the next process on
    the same host (which holds the directory's lock) finishes it at once, not ten minutes
    later."""
    from model_gateway.deliveries import HOLDER

    url, _ = fraud_store
    config = delivery(tmp_path / "out")
    run(url, lambda store: store.write_predictions([prediction("a", 0, 0.5).as_row()]))
    assert run(url, store_claim("calls", 0.0, NOW, HOLDER, NOW + 600)) == 1
    done = run(url, lambda store: deliver(store, config, NOW + 1))
    assert [(d.seq, d.rows) for d in done] == [(1, 1)]
