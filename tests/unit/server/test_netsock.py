"""Unit tests of the half-open detection options: set on the listener, inherited by accepted sockets."""

from __future__ import annotations

import socket

import pytest

from bridge.config import ConfigError, Settings
from bridge.server.netsock import KEEPALIVE_PROBES, HalfOpenDetection


def _accepted(detection: HalfOpenDetection) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    detection.apply(listener)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return listener, client, accepted


def test_accepted_sockets_inherit_the_listeners_user_timeout_and_keepalive() -> None:
    """The bridge sets the options once on its listening socket; this is what makes that enough."""
    sockets = _accepted(HalfOpenDetection(user_timeout_s=2.5, keepalive_s=7))
    try:
        accepted = sockets[2]
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_PROBES
    finally:
        for s in sockets:
            s.close()


def test_zero_leaves_the_kernel_defaults() -> None:
    sockets = _accepted(HalfOpenDetection(user_timeout_s=0, keepalive_s=0))
    try:
        assert sockets[2].getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        assert sockets[2].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        for s in sockets:
            s.close()


def test_defaults_detect_a_silent_peer_well_under_a_minute() -> None:
    settings = Settings.from_env({})
    assert 0 < settings.tcp_user_timeout_s <= 30 and 0 < settings.tcp_keepalive_s <= settings.tcp_user_timeout_s


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TCP_USER_TIMEOUT_S", "-1"),
        ("TCP_USER_TIMEOUT_S", "1e9"),
        ("TCP_USER_TIMEOUT_S", "nan"),
        ("TCP_KEEPALIVE_S", "-1"),
        ("TCP_KEEPALIVE_S", "40000"),
        ("TCP_KEEPALIVE_S", "1.5"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
