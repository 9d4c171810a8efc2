"""The request decoder faces every program allowed to publish commands: whatever the bytes,
it returns a request or a one-line error, and never raises."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands import (
    MAX_REQUEST_BYTES,
    DecodeError,
    DrainRequest,
    FailoverRequest,
    FenceRequest,
    Reply,
    Verb,
    decode_request,
)

VERBS = [v.value for v in Verb]
names = st.from_regex(r"[a-z0-9-]{1,63}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(verb=st.text(max_size=20) | st.sampled_from(VERBS), data=st.binary(max_size=512))
def test_any_bytes_decode_to_a_request_or_an_error(verb: str, data: bytes) -> None:
    result = decode_request(verb, data)
    assert isinstance(result, DecodeError) or result.verb.value == verb
    if isinstance(result, DecodeError):
        assert result.message and "\n" not in result.message


@given(
    verb=st.sampled_from(VERBS),
    body=st.dictionaries(
        st.sampled_from(["app", "site", "to", "by", "reason", "extra"]), json_values, max_size=5
    ),
    app=st.none() | names,
)
@settings(max_examples=300)
def test_any_json_object_decodes_to_a_request_or_an_error(
    verb: str, body: dict[str, Any], app: str | None
) -> None:
    result = decode_request(verb, json.dumps(body).encode(), app=app)
    if not isinstance(result, DecodeError):
        assert result.verb.value == verb
        if app is not None and hasattr(result, "app"):
            assert result.app == app


@given(app=names, to=st.none() | names, by=st.none() | st.text(max_size=50))
def test_valid_failover_round_trips(app: str, to: str | None, by: str | None) -> None:
    body = {"app": app, "to": to, "by": by}
    result = decode_request("failover", json.dumps(body).encode())
    assert result == FailoverRequest(app=app, to=to, by=by)


@given(depth=st.integers(min_value=1, max_value=MAX_REQUEST_BYTES // 2))
@settings(max_examples=20)
def test_deep_nesting_is_an_error_not_a_crash(depth: int) -> None:
    result = decode_request("drain", b"[" * depth + b"]" * depth)
    assert isinstance(result, DecodeError)


def test_error_messages_name_the_problem() -> None:
    cases: dict[tuple[str, bytes], tuple[str, str]] = {
        ("drain", b"{"): ("malformed", "malformed JSON"),
        ("drain", b"[1]"): ("malformed", "must be a JSON object"),
        ("drain", b"{}"): ("invalid", "site: field required"),
        ("drain", b'{"site": 5}'): ("invalid", "site: Input should be a valid string"),
        ("drain", b'{"site": "Site_A"}'): ("invalid", "site: String should match pattern"),
        ("failover", b'{"app": "x", "too": "b"}'): ("invalid", "too: unknown field"),
        ("explode", b"{}"): ("unknown_verb", "unknown verb 'explode'"),
        ("drain", b" " * (MAX_REQUEST_BYTES + 1)): ("too_large", "request too large"),
        ("fence", b"\xff\xfe\x00"): ("malformed", "malformed JSON"),
    }
    for (verb, data), (code, text) in cases.items():
        result = decode_request(verb, data)
        assert isinstance(result, DecodeError), (verb, data[:20])
        assert result.code == code and text in result.message, result


def test_app_subject_fills_the_app_and_refuses_a_mismatch() -> None:
    assert decode_request("fence", b"", app="ledger") == FenceRequest(app="ledger")
    mismatch = decode_request("fence", b'{"app": "other"}', app="ledger")
    assert isinstance(mismatch, DecodeError) and "does not match" in mismatch.message
    site_verb = decode_request("drain", b'{"site": "a"}', app="ledger")
    assert isinstance(site_verb, DecodeError) and site_verb.code == "unknown_verb"


def test_no_type_coercion() -> None:
    assert isinstance(decode_request("failover", b'{"app": ["ledger"]}'), DecodeError)
    assert isinstance(decode_request("drain", b'{"site": "a", "reason": 1}'), DecodeError)
    assert decode_request("drain", b'{"site": "a"}') == DrainRequest(site="a")


@given(data=st.binary(max_size=256))
def test_reply_decode_never_raises(data: bytes) -> None:
    reply = Reply.decode(data)
    assert reply.ok in (True, False)


def test_reply_encoding() -> None:
    assert json.loads(Reply.success(site="a", changed=True).encode()) == {
        "ok": True,
        "site": "a",
        "changed": True,
    }
    assert json.loads(Reply.failure("nope").encode()) == {"ok": False, "error": "nope"}
