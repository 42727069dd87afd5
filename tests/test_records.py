"""RFC 6901 JSON pointers, as the version source and the evaluation config use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from model_gateway.config import RouteConfig, load_config
from model_gateway.errors import ConfigError
from model_gateway.records import AnswerReader, resolve_pointer

json_leaf = st.none() | st.booleans() | st.integers() | st.text(max_size=5)
json_doc = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet="ab/~01", max_size=4), children, max_size=4)
    ),
    max_leaves=20,
)


def paths(doc: Any) -> list[tuple[list[str], Any]]:
    """Every (path, node) pair in a document."""
    found: list[tuple[list[str], Any]] = [([], doc)]
    children = (
        doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    )
    for key, child in children:
        found += [([str(key), *rest], node) for rest, node in paths(child)]
    return found


def pointer(path: list[str]) -> str:
    return "".join("/" + token.replace("~", "~0").replace("/", "~1") for token in path)


@given(json_doc)
def test_every_node_is_found_by_its_pointer(doc: Any) -> None:
    for path, node in paths(doc):
        assert resolve_pointer(doc, pointer(path)) == node


def test_escapes_indexes_and_missing_paths() -> None:
    doc = {"a/b": {"m~n": [10, 20]}, "outputs": [{"data": [0.42]}]}
    assert resolve_pointer(doc, "/a~1b/m~0n/1") == 20
    assert resolve_pointer(doc, "/outputs/0/data/0") == 0.42
    assert resolve_pointer(doc, "") is doc
    for missing in (
        "/outputs/1/data/0",
        "/outputs/x",
        "/a~1b/m~0n/2",
        "/nope",
        "/outputs/0/data/0/1",
    ):
        assert resolve_pointer(doc, missing) is None


def answers_for(evaluation: dict[str, Any]) -> AnswerReader:
    route = RouteConfig.model_validate(
        {
            "name": "fraud",
            "path": "/v2/models/fraud",
            "variants": [{"name": "a", "url": "http://127.0.0.1:9", "model_version": "1"}],
            "evaluation": evaluation,
        }
    )
    return AnswerReader(route)


# What an MLServer scikit-learn model answers for predict_proba: P(class 0), P(class 1).
PROBA = {"model_name": "fraud", "outputs": [{"name": "predict_proba", "data": [0.2, 0.8]}]}


@given(p1=st.floats(0, 1), threshold=st.floats(0, 1))
def test_a_score_without_a_prediction_pointer_labels_by_threshold_only(
    p1: float, threshold: float
) -> None:
    """With ``score`` and no ``prediction``, the binary label is the score against the
    threshold, never the first output (which for predict_proba is P(class 0): read as the
    label, recall was 0.0 on a model whose recall is 0.89)."""
    answers = answers_for({"task": "binary", "score": "/outputs/0/data/1", "threshold": threshold})
    doc = {"outputs": [{"name": "predict_proba", "data": [1 - p1, p1]}]}
    predicted, score = answers.prediction(doc)
    assert score == p1
    assert predicted == ("1" if p1 >= threshold else "0")
    assert answers_for({"task": "binary", "score": "/outputs/0/data/1"}).prediction(PROBA) == (
        "1",
        0.8,
    )


def test_a_score_without_a_prediction_pointer_is_refused_beyond_binary(tmp_path: Path) -> None:
    """No label can be derived from one score on a multiclass or regression route: ``check``
    says so, rather than the gateway reading some other output as the label."""
    for task in ("multiclass", "regression"):
        config = tmp_path / f"{task}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "routes": [
                        {
                            "name": "r",
                            "path": "/r",
                            "variants": [
                                {"name": "a", "url": "http://127.0.0.1:9", "model_version": "1"}
                            ],
                            "evaluation": {"task": task, "score": "/outputs/0/data/0"},
                        }
                    ]
                }
            )
        )
        with pytest.raises(ConfigError) as refused:
            load_config(config)
        assert refused.value.problems == [
            f"routes[0].evaluation.prediction: required with a score on a {task} route"
            " (only a binary label can be derived from a score and the threshold)"
        ]
