"""RFC 6901 JSON pointers, as the version source and the evaluation config use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from model_gateway.answers import AnswerReader, resolve_pointer
from model_gateway.config import RouteConfig, load_config
from model_gateway.errors import ConfigError

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


def test_the_rows_of_a_batch_are_read_where_the_pointers_point() -> None:
    """A V2 predict_proba of 3 rows (shape [3, 2], flattened): P(class 1) of each row, at
    1, 3 and 5; a label output of shape [3] beside it; a V1 list of predictions."""
    answers = answers_for(
        {"task": "binary", "prediction": "/outputs/1/data/0", "score": "/outputs/0/data/1"}
    )
    doc = {
        "outputs": [
            {"name": "proba", "shape": [3, 2], "data": [0.9, 0.1, 0.3, 0.7, 0.4, 0.6]},
            {"name": "label", "shape": [3], "data": [0, 1, 1]},
        ]
    }
    assert answers.rows(doc) == (3, [("0", 0.1), ("1", 0.7), ("1", 0.6)])
    one = {"outputs": [{"shape": [1, 2], "data": [0.9, 0.1]}, {"shape": [1], "data": [0]}]}
    assert answers.rows(one) is None
    assert answers.prediction(one) == ("0", 0.1)
    v1 = answers_for({"task": "binary"})
    assert v1.rows({"predictions": [1, 0, True]}) == (3, [("1", None), ("0", None), ("1", None)])
    assert v1.rows({"predictions": [1]}) is None


@given(json_doc, st.sampled_from(["/outputs/0/data/0", "/predictions/0", "/a/0/b"]))
def test_any_answer_gives_rows_or_none(doc: Any, where: str) -> None:
    """Whatever a model server answers, reading its rows never fails: a batch of two or
    more, or none."""
    answers = answers_for({"task": "binary", "prediction": where, "score": where})
    rows = answers.rows(doc if isinstance(doc, dict) else {"outputs": doc, "predictions": doc})
    assert rows is None or rows[0] == len(rows[1]) >= 2


@given(
    shape=st.lists(st.integers(-3, 2**70) | st.booleans() | st.none(), max_size=3),
    data=st.lists(st.integers(0, 1) | st.floats() | st.text(max_size=2), max_size=12),
    within=st.integers(0, 3),
)
def test_any_v2_output_gives_rows_or_none(shape: list[Any], data: list[Any], within: int) -> None:
    answers = answers_for({"task": "binary", "prediction": f"/outputs/0/data/{within}"})
    rows = answers.rows({"outputs": [{"shape": shape, "data": data}]})
    assert rows is None or rows[0] == len(rows[1]) == shape[0] >= 2
