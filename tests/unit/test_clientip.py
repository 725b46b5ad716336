"""Client IP from the socket peer and X-Forwarded-For, believing only trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest

from bridge.clientip import address_block, client_ip, counting_key, parse_ip
from bridge.config import IPNetwork
from bridge.types import Identity

TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
)


def test_untrusted_peer_ignores_spoofed_header() -> None:
    assert client_ip("198.51.100.9", "1.2.3.4", TRUSTED) == ("198.51.100.9", False)
    assert client_ip("198.51.100.9", "1.2.3.4", ()) == ("198.51.100.9", False)


def test_trusted_peer_takes_rightmost_untrusted_hop() -> None:
    # client typed "1.2.3.4"; our edge proxy appended the real client 198.51.100.9, then an internal hop
    chain = "1.2.3.4, 198.51.100.9, 10.1.2.3"
    assert client_ip("10.0.0.2", chain, TRUSTED) == ("198.51.100.9", True)


def test_trusted_peer_without_header_is_itself() -> None:
    assert client_ip("10.0.0.2", None, TRUSTED) == ("10.0.0.2", True)
    assert client_ip("10.0.0.2", " , ", TRUSTED) == ("10.0.0.2", True)


def test_all_trusted_chain_gives_leftmost() -> None:
    assert client_ip("10.0.0.2", "10.9.9.9, 10.1.1.1", TRUSTED) == ("10.9.9.9", True)


def test_malformed_entry_stops_walk() -> None:
    assert client_ip("10.0.0.2", "1.2.3.4, not-an-ip, 10.1.1.1", TRUSTED) == ("10.1.1.1", True)
    assert client_ip("10.0.0.2", "1.2.3.4, bogus", TRUSTED) == ("10.0.0.2", True)


def test_ports_brackets_and_mapped_addresses() -> None:
    assert client_ip("::ffff:10.0.0.2", "[2001:db8::1]:443", TRUSTED) == ("2001:db8::1", True)
    assert client_ip("fd00::1", "198.51.100.9:5555", TRUSTED) == ("198.51.100.9", True)
    assert client_ip("::ffff:198.51.100.9", "1.2.3.4", TRUSTED) == ("198.51.100.9", False)


@pytest.mark.parametrize("peer", [None, "", "testclient"])
def test_unparseable_peer_is_untrusted(peer: str | None) -> None:
    ip, trusted = client_ip(peer, "1.2.3.4", TRUSTED)
    assert trusted is False and ip != "1.2.3.4"


@pytest.mark.parametrize("text", ["1.2.3.4:", "[::1", "[::1]x", "1.2.3.4:ab", "::1]:80", "999.1.1.1"])
def test_parse_ip_rejects_malformed(text: str) -> None:
    assert parse_ip(text) is None


def test_hostile_long_header_is_bounded() -> None:
    chain = ", ".join(["10.0.0.1"] * 10_000)
    ip, trusted = client_ip("10.0.0.2", "6.6.6.6, " + chain, TRUSTED)
    assert trusted and ip == "10.0.0.1"


def test_the_decision_cache_stays_bounded_whatever_headers_a_client_sends() -> None:
    """The cache is keyed by client input: a client varying X-Forwarded-For must not grow it."""
    from bridge import clientip

    clientip._cached_client_ip.cache_clear()
    for i in range(clientip._CACHE_SIZE * 3):
        assert client_ip("10.0.0.2", f"198.51.{i // 256 % 256}.{i % 256}", TRUSTED)[1] is True
    assert clientip._cached_client_ip.cache_info().currsize <= clientip._CACHE_SIZE
    long_chain = ", ".join(["198.51.100.9"] * 40)  # over the cached key length: parsed, not kept
    before = clientip._cached_client_ip.cache_info().currsize
    assert client_ip("10.0.0.2", long_chain, TRUSTED) == ("198.51.100.9", True)
    assert clientip._cached_client_ip.cache_info().currsize == before
    # A cached answer is the computed one: the same call twice agrees with an uncached parse.
    assert client_ip("10.0.0.2", "1.2.3.4, 198.51.100.9", TRUSTED) == ("198.51.100.9", True)
    assert client_ip("10.0.0.2", "1.2.3.4, 198.51.100.9", TRUSTED) == clientip._client_ip(
        "10.0.0.2", "1.2.3.4, 198.51.100.9", TRUSTED
    )


@pytest.mark.parametrize(
    ("address", "block"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("[2001:db8:1:3::1]:443", "2001:db8:1:3::/64"),
        ("unknown", "unknown"),
        ("x" * 1000, "x" * 64),
    ],
)
def test_address_block_is_the_ipv4_address_or_the_ipv6_64(address: str, block: str) -> None:
    assert address_block(address) == block


def test_counting_key_is_the_identity_key_or_the_anonymous_callers_block() -> None:
    assert counting_key(Identity(client_ip="2001:db8::1", user_id="alice", authenticated=True)) == "user:alice"
    assert counting_key(Identity(client_ip="2001:db8::1", user_id="alice")) == "proxy:alice"
    assert counting_key(Identity(client_ip="2001:db8::1")) == "net:2001:db8::/64"
    assert counting_key(Identity(client_ip="203.0.113.7")) == "net:203.0.113.7"
