"""The doctor's verdicts, in-process (bridge/doctor/checks.py); tests/e2e/test_doctor.py runs the real path."""

from __future__ import annotations

import zlib
from typing import Any

import httpx

from bridge.doctor.checks import (
    Report,
    StreamRead,
    check_alpn,
    check_buffering,
    check_compression,
    check_cors,
    check_idle,
    check_last_event_id,
    idle_plan,
)
from bridge.doctor.limits import decoder_for, printable
from bridge.doctor.probe import _json_object


def read(headers: dict[str, str] | None = None, frames: list[tuple[float, dict[str, Any]]] | None = None) -> StreamRead:
    return StreamRead(200, httpx.Headers(headers or {}), frames or [], True, None)


def diagnostic(*arrivals: float) -> list[tuple[float, dict[str, Any]]]:
    return [(t, {"type": "diagnostic"}) for t in arrivals]


def names(report: Report) -> list[str]:
    return [p.name for p in report.problems]


def test_frames_released_together_are_reported_as_buffering() -> None:
    report = Report()
    check_buffering(read(frames=diagnostic(1.0, 1.001, 1.002, 1.003)), report)
    assert names(report) == ["buffering"]


def test_frames_arriving_apart_pass_the_buffering_check() -> None:
    report = Report()
    check_buffering(read(frames=diagnostic(0.0, 0.1, 0.2, 0.3)), report)
    assert report.problems == [] and report.notes[0].startswith("ok buffering")


def test_a_compressed_event_stream_is_a_problem() -> None:
    report = Report()
    check_compression(read({"content-encoding": "gzip"}), report)
    assert names(report) == ["compression"]


def test_a_dropped_last_event_id_is_a_problem() -> None:
    report = Report()
    check_last_event_id(read(frames=[(0.0, {"seq": 0})]), "doctor-x:1", report)
    assert names(report) == ["last-event-id"]
    report = Report()
    check_last_event_id(read(frames=[(0.0, {"seq": 0, "last_event_id": "doctor-x:1"})]), "doctor-x:1", report)
    assert report.problems == []


def test_a_preflight_without_last_event_id_is_a_cors_problem() -> None:
    preflight = httpx.Response(
        204,
        headers={"access-control-allow-origin": "https://a.example", "access-control-allow-headers": "authorization"},
    )
    report = Report()
    check_cors(read({"access-control-allow-origin": "https://a.example"}), preflight, "https://a.example", report)
    assert names(report) == ["cors"] and "Last-Event-ID" in report.problems[0].what


def test_http1_only_over_tls_is_a_problem() -> None:
    report = Report()
    check_alpn("http/1.1", report)
    assert names(report) == ["http2"]


def test_the_idle_check_waits_past_the_announced_heartbeat_within_the_cap() -> None:
    assert idle_plan(httpx.Headers({"x-heartbeat-interval": "5"}), 60.0) == (5.0, 7.0)
    assert idle_plan(httpx.Headers({"x-heartbeat-interval": "junk"}), 10.0) == (30.0, 10.0)


def test_a_stream_cut_during_the_silence_is_a_read_timeout_problem() -> None:
    report = Report()
    check_idle(StreamRead(200, httpx.Headers(), [], False, 4.2), 7.0, 5.0, report)
    assert names(report) == ["read-timeout"] and "about 4 s" in report.problems[0].what


def test_a_hostile_heartbeat_header_counts_as_absent() -> None:
    for raw in ("nan", "-5", "0", "inf", "-inf"):
        assert idle_plan(httpx.Headers({"x-heartbeat-interval": raw}), 60.0) == (30.0, 32.0), raw


# -- the byte and text limits (bridge/doctor/limits.py) ------------------------------------------


def test_a_gzip_bomb_inflates_only_to_the_cap() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = compressor.compress(bytes(64 * 1024 * 1024)) + compressor.flush()
    assert len(bomb) < 128 * 1024
    decoder = decoder_for("gzip", 1000)
    assert decoder is not None
    assert decoder.decode(bomb) == bytes(1000) and decoder.exceeded
    assert decoder.decode(bomb) == b""  # nothing more once the cap is spent


def test_a_body_of_exactly_the_cap_is_not_over_it() -> None:
    for encoding, body in (("identity", b"a" * 10), ("deflate", zlib.compress(b"a" * 10))):
        decoder = decoder_for(encoding, 10)
        assert decoder is not None
        assert b"".join(decoder.decode(body[i : i + 3]) for i in range(0, len(body), 3)) == b"a" * 10
        assert not decoder.exceeded, encoding
    identity = decoder_for("identity", 10)
    assert identity is not None and identity.decode(b"a" * 11) == b"a" * 10 and identity.exceeded


def test_encodings_the_doctor_cannot_bound_have_no_decoder() -> None:
    for encoding in ("br", "zstd", "gzip, gzip", "compress"):
        assert decoder_for(encoding, 10) is None, encoding
    assert decoder_for(None, 10) is not None and decoder_for(" GZIP ", 10) is not None


def test_server_text_is_printed_on_one_line_without_control_characters() -> None:
    hostile = "a\nPROBLEM forged\r\x1b[2J\x9b31m\u202eb\x00"
    shown = printable(hostile)
    assert shown.isprintable() and "\n" not in shown and "\x1b" not in shown
    assert shown == r"a\nPROBLEM forged\r\x1b[2J\x9b31m\u202eb\x00"
    assert (
        printable("é" * 500, 10) == "é" * 7 + "..."
        and printable("\n" * 500, 10) == r"\n\n\n..."
        and printable("ab", 2) == "ab"
    )


def test_a_frame_nested_past_the_stack_is_not_a_frame() -> None:
    assert _json_object("[" * 100_000) == {} and _json_object('{"type":"done"}') == {"type": "done"}
