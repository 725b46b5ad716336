"""Investigation tools: run the bridge under probes to find where time or memory goes.

They answer "why" once a benchmark or the soak has shown "what"; nothing in ``make bench`` or
``make test`` depends on their figures.

* ``python -m bench.lab.timeline``: where one request's time goes between its bytes and its first token.
* ``python -m bench.lab.probes``: the probes the timeline installs around a server's request path.
* ``python -m bench.lab.memtrace``: the bridge with pymalloc / tracemalloc dumps on SIGUSR2
  (``bench.soak --memtrace-at`` drives it).
"""
