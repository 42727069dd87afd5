"""Configuration: the shipped example is valid; every bad key is named by its YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from model_gateway.cli import main
from model_gateway.config import load_config, parse_config
from model_gateway.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.yaml"


def base() -> dict:
    return {
        "routes": [
            {
                "name": "fraud",
                "path": "/v2/models/fraud",
                "variants": [
                    {
                        "name": "a",
                        "url": "http://127.0.0.1:8001",
                        "model_version": "1",
                        "weight": 1,
                    },
                    {
                        "name": "b",
                        "url": "http://127.0.0.1:8002",
                        "model_version": "2",
                        "weight": 1,
                    },
                ],
            }
        ]
    }


def problems_of(doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(doc))
    return info.value.problems


def test_shipped_example_is_valid() -> None:
    loaded = load_config(EXAMPLE)
    assert loaded.config.routes[0].variants[0].name == "champion"
    assert len(loaded.version) == 16


def test_version_is_the_content_hash() -> None:
    text = yaml.safe_dump(base())
    assert parse_config(text).version == parse_config(text).version
    assert parse_config(text + "\n# changed\n").version != parse_config(text).version


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d: d["routes"][0]["variants"][1].update(weight=-1),
            "routes[0].variants[1].weight: must be >= 0",
        ),
        (
            lambda d: d["routes"][0]["variants"][0].pop("url"),
            "routes[0].variants[0].url: is required",
        ),
        (
            lambda d: d["routes"][0]["variants"][0].update(url="ftp://x"),
            "routes[0].variants[0].url: must be an http:// or https:// URL with a host",
        ),
        (lambda d: d["routes"][0].update(colour="red"), "routes[0].colour: is not a known setting"),
        (
            lambda d: d["routes"][0].update(match="regex"),
            "routes[0].match: must be one of 'exact' or 'prefix'",
        ),
        (lambda d: d["routes"][0].update(path="v2"), "routes[0].path: must start with '/'"),
        (
            lambda d: d["routes"][0].update(path="/admin/x"),
            "routes[0].path: /admin is answered by the gateway itself",
        ),
        (
            lambda d: d["routes"][0].update(variants=[]),
            "routes[0].variants: must have at least 1 item(s)",
        ),
        (
            lambda d: d["routes"][0]["variants"][1].update(name="a"),
            "routes[0].variants[1].name: duplicate variant name 'a'",
        ),
        (
            lambda d: [v.update(weight=0) for v in d["routes"][0]["variants"]],
            "routes[0].variants: at least one weight must be > 0",
        ),
        (
            lambda d: d["routes"].append(dict(d["routes"][0])),
            "routes[1].name: duplicate route name 'fraud'",
        ),
        (
            lambda d: d.update(storage={"overflow": "spill"}),
            "storage.overflow: must be one of 'block' or 'drop'",
        ),
        (
            lambda d: d.update(storage={"url": "mysql://x"}),
            "storage.url: must start with sqlite:// or postgresql://",
        ),
        (
            lambda d: d["routes"][0].update(timeouts={"total": 0}),
            "routes[0].timeouts.total: must be > 0",
        ),
        (
            lambda d: d.update(server={"client_body_timeout": 0}),
            "server.client_body_timeout: must be > 0",
        ),
        (
            lambda d: d.update(server={"client_header_timeout": -1}),
            "server.client_header_timeout: must be > 0",
        ),
        (
            lambda d: d.update(server={"send_timeout": 0}),
            "server.send_timeout: must be > 0",
        ),
        (
            lambda d: d.update(server={"max_header_bytes": 100}),
            "server.max_header_bytes: must be >= 1024",
        ),
    ],
)
def test_problems_name_the_yaml_path(change, expected: str) -> None:
    doc = base()
    change(doc)
    assert expected in problems_of(doc)


def test_every_problem_is_reported_at_once() -> None:
    doc = base()
    doc["routes"][0]["variants"][0]["weight"] = -1
    doc["routes"][0]["variants"][1]["weight"] = -2
    assert len(problems_of(doc)) == 2


def test_invalid_yaml_names_line_and_column() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("routes:\n  - name: [unclosed\n")
    assert info.value.problems[0].startswith("line 3, column 1: invalid YAML")


def test_environment_references(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = base()
    doc["admin"] = {"token": "${GW_TEST_TOKEN}"}
    monkeypatch.setenv("GW_TEST_TOKEN", "s3cret")
    assert parse_config(yaml.safe_dump(doc)).config.admin.token == "s3cret"
    monkeypatch.delenv("GW_TEST_TOKEN")
    assert problems_of(doc) == ["admin.token: environment variable GW_TEST_TOKEN is not set"]
    doc["admin"] = {"token": "${GW_TEST_TOKEN:-fallback}"}
    assert parse_config(yaml.safe_dump(doc)).config.admin.token == "fallback"


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(EXAMPLE)]) == 0
    assert "ok" in capsys.readouterr().out
    doc = base()
    doc["routes"][0]["variants"][1]["weight"] = -1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--config", str(bad)])
    assert exit_info.value.code == 1
    assert "routes[0].variants[1].weight: must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check", "--config", str(tmp_path / "missing.yaml")])
    assert "cannot read file" in capsys.readouterr().err
