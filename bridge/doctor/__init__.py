"""``bali-zero-bridge doctor URL``: what the network path to a bridge does to Server-Sent Events.

Two halves of one check. The bridge serves a diagnostic stream (``stream.py``, routed at
``GET /api/v2/bali-zero/chat-stream/diagnostic``) whose frames arrive at known times with a known
shape; the doctor (``probe.py``) reads it through whatever stands between (proxies, CDNs, TLS
terminators) and ``checks.py`` turns what it saw into ``PROBLEM`` lines with their fixes. ``limits.py``
bounds every byte and second the doctor spends on a server it must treat as hostile.
"""
