"""RFC 6901 JSON pointers, as the version source and the evaluation config use them."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from model_gateway.records import resolve_pointer

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
