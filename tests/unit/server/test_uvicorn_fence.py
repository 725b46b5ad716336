"""The uvicorn fence (bridge/server/uvicorn_fence.py), in process: a uvicorn the bridge was not tested with,
or one lacking a name the connection protocol uses, is one typed line, never an AttributeError
mid-request.

The broken uvicorns here are the installed one with a name taken away (monkeypatch, undone after
each test); tests/e2e/test_uvicorn_range.py runs real releases at both ends of the range, and one below.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import re
import subprocess
import sys
import textwrap
import tomllib
import types
from typing import Any

import pytest
import uvicorn

import bridge.cli
from bridge.cli import main
from bridge.errors import ConfigError, UnsupportedUvicorn
from bridge.server.budget import HoldableFlow
from bridge.server.protocol import HeadLimitedProtocol
from bridge.server.uvicorn_fence import (
    FIRST_UNSUPPORTED,
    LOWEST_SUPPORTED,
    REQUIRED,
    SUPPORTED_RANGE,
    FlowControl,
    HttpToolsProtocol,
    RequestResponseCycle,
    Server,
    ServerState,
    assigned_attributes,
    minor_version,
    missing_names,
    require_supported_uvicorn,
)
from tests.support.processes import ROOT, base_env

REMEDY = "install a supported one: pip install 'uvicorn[standard]>=0.35,<0.56'"


def refusal(version: str, problems: str) -> str:
    return f"uvicorn {version} is not supported (supported: uvicorn>=0.35,<0.56): {problems}; {REMEDY}"


def refused() -> str:
    with pytest.raises(UnsupportedUvicorn) as caught:
        require_supported_uvicorn()
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- the installed uvicorn


def test_installed_uvicorn_is_in_range_and_has_every_name_the_bridge_uses() -> None:
    require_supported_uvicorn()
    assert missing_names() == []
    minor = minor_version(uvicorn.__version__)
    assert minor is not None and LOWEST_SUPPORTED <= minor < FIRST_UNSUPPORTED
    assert issubclass(UnsupportedUvicorn, ConfigError)  # the CLI's one line and exit 2


def test_pyproject_and_constraints_declare_the_fenced_range() -> None:
    """What pip may install is what the fence accepts, and the pinned version is inside it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    declared = [d for d in pyproject["project"]["dependencies"] if d.startswith("uvicorn")]
    assert declared == [f"uvicorn[standard]{SUPPORTED_RANGE}"]
    constraints = (ROOT / "constraints.txt").read_text(encoding="utf-8")
    pinned = re.search(r"^uvicorn==(\S+)$", constraints, re.MULTILINE)
    assert pinned, "constraints.txt pins uvicorn"
    minor = minor_version(pinned.group(1))
    assert minor is not None and LOWEST_SUPPORTED <= minor < FIRST_UNSUPPORTED


# ---------------------------------------------------------------------------- version outside the range


@pytest.mark.parametrize("version", ["0.56.0", "0.56.0rc1", "1.0.0", "0.34.3", "0.9.1", "unknown"])
def test_uvicorn_outside_the_tested_range_is_refused_naming_version_and_range(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    monkeypatch.setattr(uvicorn, "__version__", version)
    assert refused() == refusal(version, "outside the supported range")


@pytest.mark.parametrize("version", ["0.35.0", "0.35.7", "0.55.0", "0.55.3"])
def test_every_release_of_a_supported_minor_version_passes(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(uvicorn, "__version__", version)
    require_supported_uvicorn()


# ---------------------------------------------------------------------------- a name taken away


def test_uvicorn_without_a_private_method_the_protocol_calls_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "_should_upgrade")
    assert refused() == refusal(uvicorn.__version__, "missing HttpToolsProtocol._should_upgrade")


def test_uvicorn_without_its_own_data_received_is_refused_although_asyncio_has_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio.Protocol's no-op would answer ``super().data_received``: only uvicorn's counts."""
    monkeypatch.delattr(HttpToolsProtocol, "data_received")
    assert hasattr(HttpToolsProtocol, "data_received")
    assert refused() == refusal(uvicorn.__version__, "missing HttpToolsProtocol.data_received")


def test_uvicorn_whose_cycle_no_longer_sets_an_attribute_the_bridge_reads_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class CycleWithoutResponseStarted:
        def __init__(self, transport: Any) -> None:
            self.transport = transport
            self.response_complete = False
            self.disconnected = False
            self.message_event = asyncio.Event()

        async def send(self, message: Any) -> None: ...

    monkeypatch.setattr(
        sys.modules[RequestResponseCycle.__module__], "RequestResponseCycle", CycleWithoutResponseStarted
    )
    assert refused() == refusal(uvicorn.__version__, "missing RequestResponseCycle.response_started")


def test_uvicorn_whose_server_renamed_a_parameter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def handle_exit(self: Server, signum: int, frame: Any) -> None: ...

    monkeypatch.setattr(Server, "handle_exit", handle_exit)
    assert refused() == refusal(uvicorn.__version__, "missing Server.handle_exit(sig, frame)")


def test_uvicorn_module_without_a_class_the_bridge_subclasses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, FlowControl.__module__, types.ModuleType(FlowControl.__module__))
    assert refused() == refusal(uvicorn.__version__, "missing uvicorn.protocols.http.flow_control.FlowControl")


def test_uvicorn_without_a_module_the_bridge_imports_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn.server", None)  # import raises ImportError
    assert refused() == refusal(uvicorn.__version__, "missing uvicorn.server.ServerState, uvicorn.server.Server")


def test_version_and_missing_names_are_reported_together_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uvicorn, "__version__", "0.56.0")
    monkeypatch.delattr(HttpToolsProtocol, "_unset_keepalive_if_required")
    monkeypatch.delattr(ServerState, "__init__")
    assert refused() == refusal(
        "0.56.0",
        "outside the supported range; missing HttpToolsProtocol._unset_keepalive_if_required, "
        "ServerState.default_headers",
    )


def test_cli_prints_one_line_and_exits_2_before_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(uvicorn, "__version__", "0.56.0")
    # An address this host does not have: binding it fails (exit 1), so a 2 means the check came first.
    assert main(["--host", "192.0.2.1", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"bali-zero-bridge: cannot start: {refusal('0.56.0', 'outside the supported range')}\n"


def test_importing_the_protocol_module_on_an_unsupported_uvicorn_raises_the_typed_error() -> None:
    """In a fresh interpreter: the check runs when the protocol module is first imported."""
    code = "import uvicorn\nuvicorn.__version__ = '0.56.0'\nimport bridge.server.protocol\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=base_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"bridge.errors.UnsupportedUvicorn: {refusal('0.56.0', 'outside the supported range')}"


# ---------------------------------------------------------------------------- the replaced method


# uvicorn's ``HttpToolsProtocol.data_received`` (its source, dedented), as HeadLimitedProtocol's
# ``data_received``, ``_parse`` and ``_feed`` reproduce it slice by slice. The same at both ends of
# the supported range and in the pinned version.
REVIEWED_DATA_RECEIVED_SHA256 = "02c2572f1df559070eba7f206a3f7e251782f5af4aaae194fc1ffb67f24c3873"


def test_uvicorn_data_received_is_the_one_the_protocol_replaces() -> None:
    """The protocol never calls uvicorn's ``data_received``: a fix uvicorn makes there (a parser
    error answered differently, an upgrade check) would never reach the bridge. A changed one must be
    read and carried into HeadLimitedProtocol before this digest is updated."""
    source = textwrap.dedent(inspect.getsource(HttpToolsProtocol.data_received))
    assert hashlib.sha256(source.encode()).hexdigest() == REVIEWED_DATA_RECEIVED_SHA256, source


# ---------------------------------------------------------------------------- the list is complete


def fenced(owner: type) -> set[str]:
    uses = [u for u in REQUIRED if u.name == owner.__name__]
    assert len(uses) == 1, owner
    return {*uses[0].methods, *uses[0].attributes, *(method for method, _ in uses[0].parameters)}


def uvicorn_members(owner: type) -> set[str]:
    """The methods and instance attributes uvicorn's own code gives ``owner``."""
    defined = {name for base in owner.__mro__ if base.__module__.startswith("uvicorn") for name in vars(base)}
    return defined | assigned_attributes(owner)


def names_touched(subclass: type) -> dict[str, set[str]]:
    """Attribute names the subclass's own code uses: on ``self`` (and ``super()``), its own method
    names, and those read through ``self.cycle``, ``self.server_state`` and ``self.flow``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(subclass)))
    touched: dict[str, set[str]] = {"self": set(), "cycle": set(), "server_state": set(), "flow": set()}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            touched["self"].add(node.name)
        if not isinstance(node, ast.Attribute):
            continue
        target = node.value
        on_self = isinstance(target, ast.Name) and target.id == "self"
        on_super = isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id == "super"
        if on_self or on_super:
            touched["self"].add(node.attr)
        elif (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
            and target.attr in touched
        ):
            touched[target.attr].add(node.attr)
    return touched


SUBCLASSES = {
    "protocol": (HeadLimitedProtocol, HttpToolsProtocol),
    "flow": (HoldableFlow, FlowControl),
    "server": (bridge.cli._Server, Server),
}


@pytest.mark.parametrize(("subclass", "base"), SUBCLASSES.values(), ids=SUBCLASSES.keys())
def test_every_uvicorn_name_a_bridge_subclass_touches_is_fenced(subclass: type, base: type) -> None:
    """A uvicorn method or attribute used, overridden or shadowed by the bridge's code, not listed in
    REQUIRED, would escape the check: a new use must be added there (this names it)."""
    touched = names_touched(subclass)
    unfenced = {f"{base.__name__}.{n}" for n in touched["self"] & uvicorn_members(base) if n not in fenced(base)}
    if base is HttpToolsProtocol:
        for attribute, owner in (("cycle", RequestResponseCycle), ("server_state", ServerState), ("flow", FlowControl)):
            unfenced |= {
                f"{owner.__name__}.{n}" for n in touched[attribute] & uvicorn_members(owner) if n not in fenced(owner)
            }
    assert not unfenced, sorted(unfenced)


def test_only_the_fence_imports_uvicorn_internals() -> None:
    """Every other module gets them from bridge/server/uvicorn_fence.py, so the check runs before the import."""
    allowed = {"bridge/server/uvicorn_fence.py"}
    offenders = set()
    for path in (ROOT / "bridge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            if any(module.startswith("uvicorn.") for module in modules):
                offenders.add(str(path.relative_to(ROOT)))
    assert offenders <= allowed, sorted(offenders - allowed)
