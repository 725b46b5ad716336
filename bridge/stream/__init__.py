"""The stream core: where a reader looks for each concept of one stream.

    opener.py     the one way to open a stream: identity, input, request id → a started session
    session.py    one local stream (``StreamSession``) and its parts: who hears of it (``Audience``),
                  the wait for the first answer (``FirstAnswer``), back-pressure (``Room``), who
                  reads it and for how long (``Lifecycle``), token timing (``TokenClock``)
    pump.py       gRPC messages → the session, with back-pressure (``UpstreamPump``)
    frames.py     messages and stream ends → SSE frames (``FrameEncoder``); stream and event ids
    replay.py     the replay log (``FrameLog``, pure) and whether a Last-Event-ID reconnect is
                  served here, from the store, or refused
    registry.py   the sessions this instance owns, and when an ended one is forgotten
    response.py   frames → the socket, heartbeats, send timeout, disconnect (``EventStreamResponse``)
    source.py     the interfaces a response drains and a session mirrors to (``FrameSource``,
                  ``FrameSink``), ``Notifier``, and the per-stream limits (``StreamPolicy``);
                  shared with bridge.resume

The UNAVAILABLE retry and the call's deadline live in ``bridge.upstream``; resume across
instances in ``bridge.resume``.
"""
