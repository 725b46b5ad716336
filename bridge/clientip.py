"""The caller's IP address, believing ``X-Forwarded-For`` only as far as our own proxies wrote it.

Each proxy *appends* the address it received the request from, so only the right-hand end of the
header was written by infrastructure we trust; everything to the left may be typed by the client.
Walking from the right and stopping at the first address that is not one of ours prevents the
classic spoof where a client sends ``X-Forwarded-For: 1.2.3.4`` to borrow someone else's rate
limit (taking the left-most value) or to dodge its own.
"""

from __future__ import annotations

import functools
import ipaddress

from bridge.config import IPNetwork
from bridge.types import Identity

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_HOPS = 32  # a longer chain is not from our proxies; bounds work on a hostile header


_CACHE_SIZE = 1024
_CACHED_HEADER_CHARS = 256  # longer X-Forwarded-For values are parsed every time


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> tuple[str, bool]:
    """``_client_ip``, remembered for the last peers seen, so a request does not pay the parse again.

    Bounded in entries and in key size, so a client varying its header cannot grow it.
    """
    if forwarded_for is None or len(forwarded_for) <= _CACHED_HEADER_CHARS:
        return _cached_client_ip(peer, forwarded_for, trusted)
    return _client_ip(peer, forwarded_for, trusted)


def _client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> tuple[str, bool]:
    """Return ``(ip, peer_trusted)``.

    ``peer`` is the socket peer address; ``forwarded_for`` is every ``X-Forwarded-For`` value joined
    with commas (in header order). When the peer is not a trusted proxy the header is ignored.
    A malformed entry stops the walk and the last trusted hop is used: a garbled header must not
    let anything to its left through.
    """
    peer_ip = parse_ip(peer) if peer else None
    if peer_ip is None:
        return (peer or "unknown"), False
    if not _is_trusted(peer_ip, trusted):
        return str(peer_ip), False
    current = peer_ip
    hops = [h for h in (forwarded_for or "").split(",")][::-1][:_MAX_HOPS]
    for hop in hops:
        if not hop.strip():
            continue
        parsed = parse_ip(hop)
        if parsed is None:
            break
        current = parsed
        if not _is_trusted(parsed, trusted):
            break
    return str(current), True


def parse_ip(text: str) -> IPAddress | None:
    """Parse ``1.2.3.4``, ``1.2.3.4:5678``, ``::1`` or ``[::1]:5678``; IPv4-mapped IPv6 becomes IPv4."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        text = host
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            return None
        text = host
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


IPV6_BLOCK_BITS = 64
_MAX_UNPARSED_CHARS = 64


def address_block(address: str) -> str:
    """The unit a client is counted as: an IPv4 address, or the /64 an IPv6 address lies in.

    An IPv6 host is routinely given a whole /64, so counting single IPv6 addresses let one client
    present a fresh address, and get a fresh failure budget and a fresh audit record, per request.
    IPv4-mapped IPv6 counts as the IPv4 address. A peer that is not an address (a unix socket,
    ``unknown``) is its own block, cut to a bounded length.
    """
    ip = parse_ip(address)
    if ip is None:
        return address[:_MAX_UNPARSED_CHARS]
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    return str(ipaddress.IPv6Network((ip, IPV6_BLOCK_BITS), strict=False))


def counting_key(identity: Identity) -> str:
    """The key a caller is counted under: its identity key when it has an id, else its address block.

    ``Identity.key`` of an anonymous caller is its single address (stream ownership needs exactly
    that); counted that way, each address of an IPv6 /64 would bring a budget of its own.
    ``net:`` keeps these keys apart from the ``user:``, ``proxy:`` and ``ip:`` spaces.
    """
    if identity.user_id:
        return identity.key
    return f"net:{address_block(identity.client_ip)}"


def _is_trusted(ip: IPAddress, trusted: tuple[IPNetwork, ...]) -> bool:
    return any(ip.version == net.version and ip in net for net in trusted)


_cached_client_ip = functools.lru_cache(maxsize=_CACHE_SIZE)(_client_ip)
