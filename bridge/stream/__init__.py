"""The stream core: one file per concern, each changeable without reading the others.

    opener.py     the one way to open a stream: identity, input, request id → a started session
    session.py    one local stream, tying the parts below together (``StreamSession``)
    pump.py       gRPC messages → the session, with back-pressure (``UpstreamPump``)
    frames.py     messages and stream ends → SSE frames (``FrameEncoder``)
    framelog.py   the replay buffer: unsent and sent frames, caps, trimming (pure)
    lifecycle.py  attach, detach, grace window, expiry
    response.py   frames → the socket, heartbeats, send timeout, disconnect (``EventStreamResponse``)
    registry.py   the sessions this instance owns
    source.py     the interfaces between them (``FrameSource``, ``FrameSink``) and ``Notifier``
    hooks.py      who hears of a stream: observer and the opener's hooks, told in order (``Audience``)
    answer.py     the opener's wait for the first answer or a refusal (``FirstAnswer``)
    backpressure.py  the pump waits while the reader is a window behind (``Room``)
    resumption.py whether a Last-Event-ID reconnect is served here, from the store, or refused
    ids.py        stream and event ids;  timing.py  token timing;  policy.py  the per-stream limits

The UNAVAILABLE retry and the call's deadline live in ``bridge.upstream``; resume across
instances in ``bridge.resume``.
"""
