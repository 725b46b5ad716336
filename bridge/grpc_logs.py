"""gRPC's C-core log default, set by the entry point before anything imports grpc.

This module imports nothing of the bridge: importing it must not import grpc (bridge.errors does,
and most modules import bridge.errors), or the default would be set too late to matter.
"""

from __future__ import annotations

from collections.abc import MutableMapping

GRPC_LOG_VARIABLES = ("GRPC_VERBOSITY", "GRPC_TRACE")


def quiet_grpc_core_logs(environ: MutableMapping[str, str]) -> None:
    """Turn gRPC's C-core logging off (``GRPC_VERBOSITY=NONE``) unless the operator chose a verbosity
    or traces (either variable set and not empty): theirs is never overridden.

    The C core logs through absl, as plain text on stderr (``E1206 20:14:59.324843 5861
    chttp2_transport.cc:1435] ... GOAWAY ...``) in the middle of the bridge's JSON lines, which
    breaks a reader that parses one JSON object per line. What it reports about a call reaches the
    bridge's own log as that call's status details. It reads these variables once, when grpc is
    imported (set later, they change nothing), so the entry point calls this before any import of
    grpc; an ``--env-file`` is read too late for them.
    """
    if not any(environ.get(name, "").strip() for name in GRPC_LOG_VARIABLES):
        environ["GRPC_VERBOSITY"] = "NONE"
