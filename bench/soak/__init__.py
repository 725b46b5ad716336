"""Soak test: thousands of real SSE streams with disconnects, resumes, stops and rate-limit abuse,
then a full accounting of every token, every upstream stream, the bridge's resources and the audit.

``make soak`` runs ``python -m bench.soak`` (1 000 streams for 60 s). It starts an echo stub and one
bridge on loopback, warms up, measures the bridge's open fds and RSS, then keeps ``--concurrency``
logical streams running for ``--duration`` seconds. Each logical stream has a plan:

* ``complete``: read to ``done``;
* ``resume``: disconnect at random tokens (1 to 3 times) and reconnect with ``Last-Event-ID`` after
  a pause well inside ``RESUME_GRACE_S``; must still end with ``done``;
* ``late``: disconnect, reconnect after the grace window: must get one ``STREAM_EXPIRED`` frame;
* ``abandon``: disconnect for good (the bridge cancels upstream when the grace window ends);
* ``delete``: ``DELETE /chat-stream/{id}`` while reading; upstream must be cancelled.

A few ``hammer`` users open short streams far faster than ``RATE_LIMIT`` allows (429s expected).

Queries encode their own answer (``u7-s12-t0,u7-s12-t1,...`` with ``--echo-delimiter ,``), so
every token received is checked by index: no loss, no duplicate, no reorder, across resumes.
Afterwards: the stub's ``stream_end`` lines (one per stream, outcome as the client saw it),
``stream-stats`` (nothing open), fds and RSS back near the warm-up baseline, and after SIGTERM
``audit verify`` passes and the audit's event counts equal what the soak observed.

The summary is printed as JSON and written to ``--out`` (default ``bench/results/soak.json``); the
RSS samples behind it go beside it as ``<name>.timeline.csv`` (``--chart PNG`` draws them).
Exit status: 0 when every check passed, 1 otherwise.
"""
