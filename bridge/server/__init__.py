"""The HTTP server under the app: the connection, its sockets, and the uvicorn it is built on.

    protocol.py       the HTTP/1.1 connection: request heads bounded as they arrive, head, body and
                      idle deadlines, the pipeline held (``HeadLimitedProtocol``)
    budget.py         the connection's pieces that need no uvicorn to reason about (byte budget,
                      deadlines, the held pipeline, the linger)
    netsock.py        TCP options on the listening socket that drop a peer gone silent
    uvicorn_fence.py  the uvicorn internals the protocol builds on, checked before the first is used

Apart from the app because it is coupled to uvicorn, not to Starlette: everything here runs below
the ASGI interface, before a request reaches routing, and the app never imports it. Only the CLI
wires it in; only the fence imports uvicorn's internals (tests/unit/server/test_uvicorn_fence.py). This
package's ``__init__`` imports nothing, so the CLI can take ``netsock`` without importing uvicorn's
internals before the fence has checked them.
"""
