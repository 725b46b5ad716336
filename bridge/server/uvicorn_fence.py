"""The uvicorn internals the bridge builds on, checked before the first of them is used.

The connection protocol (bridge/server/protocol.py, bridge/server/budget.py) subclasses uvicorn's
``HttpToolsProtocol``, replaces its ``data_received``, overrides its callbacks and reads its
attributes, and reads and sets a ``RequestResponseCycle``'s state; the CLI subclasses
``uvicorn.Server``. None of these names is uvicorn's public API. Had a release renamed one, the
bridge would start, then fail with an AttributeError in the middle of a request, or an override
would simply stop being called (a head limit that no longer runs); and a fix uvicorn makes to the
``data_received`` the bridge replaces never reaches the bridge.

So the bridge runs only on the uvicorn minor versions it is tested with (``SUPPORTED_RANGE``:
pyproject.toml declares the same range, and tests/e2e/test_uvicorn_range.py runs the header attacks
against its lowest and highest release), and only when every name in ``REQUIRED`` is there.
Otherwise ``require_supported_uvicorn`` raises ``UnsupportedUvicorn``: one line naming the
installed version, the supported range and what is missing, which the CLI prints before exit 2.

It runs when this module is imported, before the internals below are: the bridge's modules import
them from here (a removed class is then that one line, not an ImportError), and the CLI calls it
before it imports anything that serves.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import CodeType, ModuleType
from typing import Any

import uvicorn

from bridge.errors import UnsupportedUvicorn

# [lowest, below): whole minor versions, each tested (tests/e2e/test_uvicorn_range.py runs both ends).
LOWEST_SUPPORTED = (0, 35)
FIRST_UNSUPPORTED = (0, 56)
SUPPORTED_RANGE = f">={LOWEST_SUPPORTED[0]}.{LOWEST_SUPPORTED[1]},<{FIRST_UNSUPPORTED[0]}.{FIRST_UNSUPPORTED[1]}"


@dataclass(frozen=True, slots=True)
class Uses:
    """What the bridge uses of one uvicorn class.

    ``methods``: defined by the class or a base outside the standard library (an override whose
    base method is gone would silently stop being called: asyncio.Protocol's no-op ``data_received``
    would do). ``attributes``: assigned to an instance by the class's own code. ``parameters``: a
    method's leading parameters, by name and in order, as the bridge passes them.
    """

    module: str
    name: str
    methods: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()
    parameters: tuple[tuple[str, tuple[str, ...]], ...] = ()


HTTPTOOLS_IMPL = "uvicorn.protocols.http.httptools_impl"

REQUIRED: tuple[Uses, ...] = (
    # bridge/server/protocol.py: HeadLimitedProtocol
    Uses(
        HTTPTOOLS_IMPL,
        "HttpToolsProtocol",
        methods=(
            # asyncio and httptools call these on the subclass; it calls uvicorn's with super()
            "connection_made",
            "connection_lost",
            "data_received",
            "on_message_begin",
            "on_header",
            "on_headers_complete",
            "on_body",
            "on_message_complete",
            # uvicorn calls these by name; the subclass extends them
            "on_response_complete",
            "timeout_keep_alive_handler",
            # the subclass calls these
            "send_400_response",
            "handle_websocket_upgrade",
            "_unset_keepalive_if_required",
            "_should_upgrade",
            "_unsupported_upgrade_warning",
        ),
        attributes=(
            "loop",
            "logger",
            "parser",
            "transport",
            "flow",
            "pipeline",
            "headers",
            "cycle",
            "server_state",
            "timeout_keep_alive",
        ),
        parameters=(("__init__", ("config", "server_state", "app_state", "_loop")),),
    ),
    # bridge/server/protocol.py (the request under way; a body past its deadline wakes the app's
    # receive as a disconnect)
    Uses(
        HTTPTOOLS_IMPL,
        "RequestResponseCycle",
        attributes=("response_started", "response_complete", "disconnected", "message_event"),
    ),
    # bridge/server/budget.py: HoldableFlow
    Uses(
        "uvicorn.protocols.http.flow_control",
        "FlowControl",
        methods=("pause_reading", "resume_reading"),
        attributes=("read_paused",),
        parameters=(("__init__", ("transport",)),),
    ),
    Uses("uvicorn.server", "ServerState", attributes=("default_headers",)),
    # bridge/cli.py: the server announcing readiness and relaying stop signals
    Uses(
        "uvicorn.server",
        "Server",
        methods=("run", "startup", "handle_exit"),
        attributes=("should_exit",),
        parameters=(
            ("__init__", ("config",)),
            ("run", ("sockets",)),
            ("startup", ("sockets",)),
            ("handle_exit", ("sig", "frame")),
        ),
    ),
    Uses("uvicorn.config", "Config"),
)


def minor_version(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``0.54.0`` or ``0.56.0rc1``; None if unreadable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def missing_names(required: tuple[Uses, ...] = REQUIRED) -> list[str]:
    """Each name of ``required`` the installed uvicorn lacks, as ``Class.name`` (or the module path)."""
    missing: list[str] = []
    for uses in required:
        try:
            module: ModuleType | None = importlib.import_module(uses.module)
        except ImportError:
            module = None
        owner = getattr(module, uses.name, None)
        if not isinstance(owner, type):
            missing.append(f"{uses.module}.{uses.name}")
            continue
        missing.extend(f"{uses.name}.{name}" for name in uses.methods if not _defines(owner, name))
        assigned = assigned_attributes(owner)
        missing.extend(f"{uses.name}.{name}" for name in uses.attributes if name not in assigned)
        for method, names in uses.parameters:
            if _leading_parameters(getattr(owner, method, None), len(names)) != names:
                missing.append(f"{uses.name}.{method}({', '.join(names)})")
    return missing


def require_supported_uvicorn() -> None:
    """Raise ``UnsupportedUvicorn`` unless the installed uvicorn is in range and has every name used."""
    version = str(getattr(uvicorn, "__version__", "unknown"))
    minor = minor_version(version)
    in_range = minor is not None and LOWEST_SUPPORTED <= minor < FIRST_UNSUPPORTED
    missing = missing_names()
    if in_range and not missing:
        return
    problems = [] if in_range else ["outside the supported range"]
    if missing:
        problems.append("missing " + ", ".join(missing))
    raise UnsupportedUvicorn(
        f"uvicorn {version} is not supported (supported: uvicorn{SUPPORTED_RANGE}): {'; '.join(problems)}; "
        f"install a supported one: pip install 'uvicorn[standard]{SUPPORTED_RANGE}'"
    )


def _defines(owner: type, name: str) -> bool:
    return any(name in vars(base) for base in _own_bases(owner))


def _own_bases(owner: type) -> Iterator[type]:
    """The classes of ``owner``'s MRO outside the standard library (uvicorn's, not asyncio's or object)."""
    for base in owner.__mro__:
        if base.__module__.split(".")[0] not in sys.stdlib_module_names:
            yield base


def assigned_attributes(owner: type) -> set[str]:
    """Every ``<obj>.<name> = ...`` in the code of ``owner``'s own classes (nested functions included).

    The instance attributes the class sets, found without making an instance (which would load an app).
    """
    names: set[str] = set()
    for base in _own_bases(owner):
        for member in vars(base).values():
            for code in _code_objects(member):
                names.update(
                    str(instruction.argval)
                    for instruction in dis.get_instructions(code)
                    if instruction.opname == "STORE_ATTR"
                )
    return names


def _code_objects(member: Any) -> Iterator[CodeType]:
    functions = (member.fget, member.fset) if isinstance(member, property) else (member,)
    for function in functions:
        function = getattr(function, "__func__", function)  # staticmethod, classmethod
        code = getattr(function, "__code__", None)
        if isinstance(code, CodeType):
            yield from _nested(code)


def _nested(code: CodeType) -> Iterator[CodeType]:
    yield code
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            yield from _nested(constant)


def _leading_parameters(method: Any, count: int) -> tuple[str, ...] | None:
    """The first ``count`` parameter names of ``method`` after ``self``; None if it has no signature."""
    try:
        names = list(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return None
    return tuple(names[1 : 1 + count])


require_supported_uvicorn()

# Imported only once the check passed; the bridge's modules import them from here.
from uvicorn.config import Config  # noqa: E402
from uvicorn.protocols.http.flow_control import FlowControl  # noqa: E402
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle  # noqa: E402
from uvicorn.server import Server, ServerState  # noqa: E402

__all__ = [
    "FIRST_UNSUPPORTED",
    "LOWEST_SUPPORTED",
    "REQUIRED",
    "SUPPORTED_RANGE",
    "Config",
    "FlowControl",
    "HttpToolsProtocol",
    "RequestResponseCycle",
    "Server",
    "ServerState",
    "Uses",
    "assigned_attributes",
    "minor_version",
    "missing_names",
    "require_supported_uvicorn",
]
