"""Values read from the mesh: too deep is refused before json.loads, cheaply when shallow."""

from __future__ import annotations

from mesh.codec import MAX_DEPTH, load_object


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    deep = b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1)
    assert load_object(deep, kind="test") is None
    at_limit = b'{"a":' * MAX_DEPTH + b"1" + b"}" * MAX_DEPTH
    assert load_object(at_limit, kind="test") is not None


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    many = ("[{" * (MAX_DEPTH + 5)).encode()
    assert load_object(b'{"s": "' + many + b'"}', kind="test") == {"s": many.decode()}
