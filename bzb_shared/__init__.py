"""Helpers shared by parts of the repository that must not import each other.

The bridge is the system under test, the stub (``rag_stub``) is its fake upstream, and the tests
and benchmarks drive both as separate processes: none may reach into another's internals, so
what they genuinely share lives here (the OTEL_* reading, the child-process runner, the
least-squares slope of the memory figures).
"""
