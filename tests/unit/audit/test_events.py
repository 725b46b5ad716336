"""Every audit event type carries exactly its allowed fields; PII appears only where the rules allow."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.audit.events import (
    EARLIEST_TS,
    LATEST_TS,
    EventFactory,
    SecurityKind,
    format_ts,
    parse_ts,
    retention_cutoff,
)
from bridge.audit.keys import derive_keys
from bridge.types import Identity, StreamResult

KEYS = derive_keys(b"k" * 32)
FACTORY = EventFactory(KEYS, lambda: datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
QUERY = "Berapa lama visa kunjungan?"
AUTHED = Identity(client_ip="203.0.113.7", user_id="u-42", role="member", email="ana@example.com", authenticated=True)
ANON = Identity(client_ip="203.0.113.9", email="unverified@example.com")  # email must never be kept
BASE = {"ts", "event_type", "request_id", "trace_id", "user_id", "identity_kind"}
END = BASE | {"query_hmac", "tokens", "first_token_ms", "duration_ms", "outcome"}
EXPECTED = {
    "stream_started": BASE | {"query_hmac"},
    "stream_completed": END,
    "stream_cancelled": END,
    "stream_failed": END | {"error_code"},
    "chat": BASE | {"query_hmac", "tokens", "duration_ms", "outcome", "error_code"},
    "rate_limited": BASE | {"client_ip", "path", "reason", "count", "first_ts"},
    "auth_failed": BASE | {"client_ip", "path", "reason", "count", "first_ts"},
    "admin_read": BASE | {"filters", "returned"},
}


def build(kind: str, identity: Identity) -> dict[str, object]:
    result = StreamResult("s1", "r1", "error", 7, 120.5, 15.25, error_code="UPSTREAM_UNAVAILABLE")
    if kind.startswith("stream_"):
        return dict(FACTORY.stream(kind, identity, "r1", "t" * 32, QUERY, result).body)  # type: ignore[arg-type]
    if kind == "chat":
        chat = FACTORY.chat(identity, "r1", None, QUERY, outcome="completed", duration_ms=80.0, tokens=9)
        return dict(chat.body)
    if kind == "admin_read":
        return dict(FACTORY.admin_read(identity, "r1", None, filters={"limit": "10"}, returned=3).body)
    return dict(FACTORY.security(kind, identity, "r1", None, "/api/v2/bali-zero/chat", "RATE_LIMITED").body)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_authenticated_caller_gets_exactly_the_allowed_fields_plus_email(kind: str) -> None:
    body = build(kind, AUTHED)
    assert set(body) == EXPECTED[kind] | {"email"}
    assert body["email"] == "ana@example.com"
    assert body["user_id"] == "u-42"
    assert body["identity_kind"] == "token"
    assert body["event_type"] == kind


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_anonymous_caller_has_no_email_and_a_pseudonymous_user_id(kind: str) -> None:
    body = build(kind, ANON)
    assert set(body) == EXPECTED[kind]
    assert "email" not in body
    assert str(body["user_id"]).startswith("anon:") and "203.0.113.9" not in str(body["user_id"])
    assert body["user_id"] == FACTORY.user_id(Identity(client_ip="203.0.113.9"))
    assert body["identity_kind"] == "anonymous"


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_ip_only_on_security_events_and_query_never_raw(kind: str) -> None:
    body = build(kind, ANON)
    text = repr(body)
    assert ("client_ip" in body) == (kind in {"rate_limited", "auth_failed"})
    assert ("203.0.113.9" in text) == (kind in {"rate_limited", "auth_failed"})
    assert QUERY not in text
    if "query_hmac" in body:
        assert body["query_hmac"] == KEYS.query_hmac(QUERY) and len(str(body["query_hmac"])) == 64


def test_trusted_proxy_user_id_is_kept_but_unverified_email_is_not() -> None:
    proxied = Identity(client_ip="10.0.0.1", user_id="proxy-user", email="x@example.com")
    body = build("stream_started", proxied)
    assert body["user_id"] == "proxy-user"
    assert body["identity_kind"] == "proxy", "a proxy-asserted id must not read as a verified one"
    assert "email" not in body


def test_stream_end_measurements_and_kind_from_outcome() -> None:
    result = StreamResult("s1", "r9", "cancelled", 4, 55.55555, None, trace_id="a" * 32)
    body = FACTORY.stream_ended(AUTHED, QUERY, result).body
    assert body["event_type"] == "stream_cancelled"
    assert (body["request_id"], body["trace_id"]) == ("r9", "a" * 32)
    assert (body["tokens"], body["duration_ms"], body["first_token_ms"], body["outcome"]) == (
        4,
        55.556,
        None,
        "cancelled",
    )
    assert body["ts"] == "2025-03-01T12:00:00.000000Z"


def test_query_hmac_is_keyed_and_separate_from_ip_pseudonym() -> None:
    other = derive_keys(b"o" * 32)
    assert KEYS.query_hmac(QUERY) != other.query_hmac(QUERY)
    assert KEYS.query_hmac("10.0.0.1") not in KEYS.pseudonym("10.0.0.1")


def test_parse_ts_normalises_offsets() -> None:
    assert parse_ts("2025-03-01T14:00:00+02:00") == "2025-03-01T12:00:00.000000Z"
    assert parse_ts("2025-03-01T12:00:00Z") == "2025-03-01T12:00:00.000000Z"
    assert parse_ts("2025-03-01") == "2025-03-01T00:00:00.000000Z"


# -- timestamps over the whole range of datetime ---------------------------------------------------

MICROSECOND = timedelta(microseconds=1)
LAST_MICROSECOND = (datetime.max - datetime.min) // MICROSECOND
OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))  # ISO 8601: ±hh:mm
INSTANTS = st.one_of(  # the whole range, and the two days at each end where an offset overflows UTC
    st.datetimes(min_value=datetime.min, max_value=datetime.max, timezones=OFFSETS),
    st.datetimes(min_value=datetime.min, max_value=datetime.min + timedelta(days=2), timezones=OFFSETS),
    st.datetimes(min_value=datetime.max - timedelta(days=2), max_value=datetime.max, timezones=OFFSETS),
)
UTC_INSTANTS = st.datetimes(min_value=datetime.min, max_value=datetime.max, timezones=st.just(UTC))
PROPERTY = settings(max_examples=300, deadline=None, database=None)


def utc_microseconds(moment: datetime) -> int:
    """Microseconds since 0001-01-01T00:00:00Z, in exact integers (may lie outside datetime's range)."""
    offset = moment.utcoffset() or timedelta(0)
    return (moment.replace(tzinfo=None) - datetime.min) // MICROSECOND - offset // MICROSECOND


@PROPERTY
@given(INSTANTS)
def test_parse_ts_is_the_utc_instant_or_a_value_error(moment: datetime) -> None:
    """Every ISO 8601 instant with any offset: its fixed-width UTC form, or ValueError (a 400) when
    UTC cannot hold it; never OverflowError (a 500 that dropped the connection)."""
    micros = utc_microseconds(moment)
    if not 0 <= micros <= LAST_MICROSECOND:
        with pytest.raises(ValueError, match="outside"):
            parse_ts(moment.isoformat())
        return
    stored = parse_ts(moment.isoformat())
    assert len(stored) == len(EARLIEST_TS) and stored.endswith("Z") and EARLIEST_TS <= stored <= LATEST_TS
    assert utc_microseconds(datetime.fromisoformat(stored)) == micros


@PROPERTY
@given(INSTANTS, INSTANTS)
def test_parsed_bounds_sort_as_text_in_time_order(a: datetime, b: datetime) -> None:
    """What SQL compares: ``since``/``until`` against stored ``ts`` as text, for years 1..9999."""
    ma, mb = utc_microseconds(a), utc_microseconds(b)
    if 0 <= ma <= LAST_MICROSECOND and 0 <= mb <= LAST_MICROSECOND:
        ta, tb = parse_ts(a.isoformat()), parse_ts(b.isoformat())
        assert (ta < tb, ta == tb) == (ma < mb, ma == mb)


@PROPERTY
@given(UTC_INSTANTS, UTC_INSTANTS)
def test_format_ts_has_four_digit_years_and_sorts_in_time_order(a: datetime, b: datetime) -> None:
    ta, tb = format_ts(a), format_ts(b)
    assert len(ta) == len(tb) == len(EARLIEST_TS)
    assert ta[:4] == f"{a.year:04d}" and parse_ts(ta) == ta
    assert (ta < tb) == (a < b)


def test_years_before_1000_are_zero_padded() -> None:
    assert format_ts(datetime(999, 1, 1, tzinfo=UTC)) == "0999-01-01T00:00:00.000000Z"
    assert format_ts(datetime(1, 1, 1, tzinfo=UTC)) == EARLIEST_TS
    assert parse_ts("0999-01-01T00:00:00Z") < parse_ts("2025-01-01T00:00:00Z")


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_instants_outside_utc_are_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"outside {EARLIEST_TS}..{LATEST_TS}")):
        parse_ts(text)


def test_retention_cutoff_never_overflows_and_refuses_negative_days() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert retention_cutoff(now, 0) == "2025-03-01T12:00:00.000000Z"
    assert retention_cutoff(now, 90) == "2024-12-01T12:00:00.000000Z"
    assert retention_cutoff(now, 10**6) == EARLIEST_TS  # keeps everything
    assert retention_cutoff(now, 10**12) == EARLIEST_TS  # beyond what timedelta holds
    with pytest.raises(ValueError, match="negative"):
        retention_cutoff(now, -1)


@pytest.mark.parametrize("kind", ["rate_limited", "auth_failed"])
def test_security_event_states_how_many_refusals_it_stands_for(kind: SecurityKind) -> None:
    single = build(kind, ANON)
    assert single["count"] == 1 and single["first_ts"] == single["ts"]
    folded = FACTORY.security(kind, ANON, "r1", None, "/p", "RATE_LIMITED", 41, "2030-01-01T00:00:00.000000Z")
    assert folded.body["count"] == 41 and folded.body["first_ts"] == "2030-01-01T00:00:00.000000Z"
    with pytest.raises(ValueError, match="at least one"):
        FACTORY.security(kind, ANON, "r1", None, "/p", "RATE_LIMITED", 0)
