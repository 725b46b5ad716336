"""Every event-stream answer carries the same event-stream headers, from one builder (in process).

The three responses that open an event stream (a live stream, the doctor's diagnostic stream and
the one-frame answer to a late resume) each built their header list once; the late-resume answer
drifted: no ``no-transform`` (a proxy may compress or buffer it) and no ``x-heartbeat-interval``.
"""

from __future__ import annotations

from starlette.responses import Response

from bridge import sse
from bridge.doctor.stream import DiagnosticStream
from bridge.errors import StreamExpired
from bridge.stream.response import ErrorFrameResponse, EventStreamResponse
from bridge.stream.session import StreamSession
from tests.support.sessions import NO_RESUME

HEARTBEAT_S = NO_RESUME.heartbeat_interval_s
EVENT_STREAM_HEADERS = dict(sse.response_headers(HEARTBEAT_S, {}))


def event_stream_answers() -> dict[str, Response]:
    session = StreamSession(stream_id="s1", request_id="r1", owner="o", policy=NO_RESUME)
    return {
        "stream": EventStreamResponse(session, headers={"ratelimit-limit": "20"}),
        "diagnostic": DiagnosticStream(
            idle_s=0,
            last_event_id=None,
            heartbeat_interval_s=HEARTBEAT_S,
            send_timeout_s=NO_RESUME.send_timeout_s,
            headers={"ratelimit-limit": "20"},
            on_end=lambda: None,
        ),
        "late resume": ErrorFrameResponse("s1:3", StreamExpired("gone", retryable=False), HEARTBEAT_S),
    }


def test_every_event_stream_answer_has_the_same_event_stream_headers() -> None:
    for name, response in event_stream_answers().items():
        raw = dict(response.raw_headers)
        assert {key: raw.get(key) for key in EVENT_STREAM_HEADERS} == EVENT_STREAM_HEADERS, name


def test_the_event_stream_headers_keep_proxies_from_buffering_and_announce_the_heartbeat() -> None:
    headers = {k.decode(): v.decode() for k, v in EVENT_STREAM_HEADERS.items()}
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "no-transform" in headers["cache-control"] and headers["x-accel-buffering"] == "no"
    assert headers["x-heartbeat-interval"] == f"{HEARTBEAT_S:g}"


def test_event_stream_answers_are_starlette_responses_whose_headers_can_be_read() -> None:
    answers = event_stream_answers()
    for name, response in answers.items():
        assert response.headers["content-type"] == sse.MEDIA_TYPE, name
        assert "content-length" not in response.headers, name
    assert answers["stream"].headers["x-connection-id"] == "s1"
    assert answers["stream"].headers["ratelimit-limit"] == "20"
