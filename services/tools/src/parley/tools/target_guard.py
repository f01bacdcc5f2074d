"""SSRF guard: tools may only reach public addresses unless the org allows private targets.

The check runs on the addresses a connection will actually use. For host names it lives in the
resolver of the guarded HTTP session (:class:`GuardedResolver`): aiohttp connects only to what
the resolver returns, so the connection is pinned to the checked addresses and a DNS answer
that changes between a check and the connect (DNS rebinding) cannot slip through. IP literals
never reach a resolver, so :func:`check_url` checks them before the request, reading the host
as aiohttp will (yarl): it normalises Unicode forms such as full-width digits or an ideographic
full stop (``１２７.０.０.１``, ``127。0。0。1``) to an IP literal, which the standard library's
``urlsplit`` leaves as a name. Redirects are never followed (a 3xx could point anywhere), and
proxies from the environment are not used.

An org allowed private targets (its own services on a private network, set by the operator)
goes through the same guard with ``private_ok``: private and loopback addresses pass, but
link-local ones never do — 169.254.169.254 and fd00:ec2::254 are the cloud's instance metadata
services, which hand out the platform's own credentials and are no one's tool — nor Alibaba
Cloud's metadata service, 100.100.100.200 (in the shared range 100.64/10, not link-local).
Nor any IPv6 form of them a translator on the network would take to them: IPv4-mapped, 6to4,
Teredo, NAT64 (the well-known 64:ff9b::/96 and the local-use 64:ff9b:1::/48 of RFC 8215, the
address wherever RFC 6052 puts it), IPv4-translated (::ffff:0:a.b.c.d) and IPv4-compatible
(::a.b.c.d); for an org not allowed private targets, the same forms of a private address.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TargetNotAllowed(OSError):
    """The tool's target resolves to an address tools may not reach."""


def address_allowed(address: IPAddress, *, private_ok: bool = False) -> bool:
    """True for globally routable unicast addresses only.

    Refuses private, loopback, link-local, site-local, multicast, reserved, unspecified and
    shared (100.64/10) ranges, and IPv6 forms that embed an IPv4 address (mapped, 6to4, Teredo,
    NAT64, IPv4-translated, IPv4-compatible) when the embedded address is refused.
    ``private_ok``: only link-local, metadata, multicast and unspecified addresses are refused
    (see the module docstring).
    """
    if private_ok:
        return not _never(address)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_allowed(address.ipv4_mapped)
        if address.sixtofour is not None and not address_allowed(address.sixtofour):
            return False
        if address.teredo is not None and not address_allowed(address.teredo[1]):
            return False
        if not all(address_allowed(embedded) for embedded in _translated(address)):
            return False
        if address.is_site_local:  # fec0::/10: deprecated, yet private where still in use
            return False
    elif address in _IETF_PROTOCOL and address not in _IETF_GLOBAL:
        return False  # is_global says otherwise before Python 3.11.10 (CVE-2024-4032)
    return address.is_global and not (address.is_multicast or address.is_reserved
                                      or address.is_loopback or address.is_link_local
                                      or address.is_unspecified)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known prefix (RFC 6052)
# The local-use prefix (RFC 8215): a network's translator may use it, or any prefix of /48 to
# /96 within it, so the IPv4 address can sit where RFC 6052 puts it for any of those lengths.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765, SIIT)
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # IPv4-compatible (deprecated, RFC 4291)
# Where RFC 6052 puts the IPv4 address's bytes for a /48, /56 and /64 prefix (byte 8, the "u"
# octet, zero in those forms, is skipped); for a /96, the last four bytes.
_RFC6052_BYTES = ((6, 7, 9, 10), (7, 9, 10, 11), (9, 10, 11, 12))
# IETF protocol assignments: not globally reachable but for two anycast addresses (IANA).
_IETF_PROTOCOL = ipaddress.IPv4Network("192.0.0.0/24")
_IETF_GLOBAL = frozenset({ipaddress.IPv4Address("192.0.0.9"), ipaddress.IPv4Address("192.0.0.10")})
_METADATA_V6 = ipaddress.IPv6Address("fd00:ec2::254")  # AWS's, in the private fd00::/8
_METADATA_V4 = ipaddress.IPv4Address("100.100.100.200")  # Alibaba Cloud's, in 100.64/10


def _translated(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a translator could take ``address`` for (NAT64, SIIT, compatible)."""
    packed = address.packed
    if address in _NAT64 or address in _TRANSLATED or (
            address in _COMPATIBLE and int(address) > 1):  # not :: nor ::1, IPv6's own
        return [ipaddress.IPv4Address(packed[12:])]
    if address in _NAT64_LOCAL:
        # Each place the translator's prefix length could put it; a shorter prefix's place
        # only when its "u" octet is zero and the place holds something (the zero bytes of a
        # /96 address, 64:ff9b:1::a00:1, are no 0.0.0.0).
        shorter = [bytes(packed[i] for i in at) for at in _RFC6052_BYTES] if not packed[8] else []
        return [ipaddress.IPv4Address(packed[12:]),
                *(ipaddress.IPv4Address(b) for b in shorter if any(b))]
    return []


def _never(address: IPAddress) -> bool:
    """An address no tool may reach, whatever the org allows: link-local (and metadata)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour,
                    address.teredo[1] if address.teredo else None, *_translated(address)]
        if any(_never(inner) for inner in embedded if inner is not None):
            return True
        if address == _METADATA_V6:
            return True
    elif address == _METADATA_V4:
        return True
    return address.is_link_local or address.is_multicast or address.is_unspecified


def check_url(url: str, *, private_ok: bool = False) -> None:
    """Raise TargetNotAllowed for a URL whose host is a refused IP literal."""
    try:
        host = (URL(url).raw_host or "").split("%", 1)[0]  # the host aiohttp will connect to
    except ValueError as exc:
        raise TargetNotAllowed(f"target not allowed: the URL cannot be parsed ({exc})") from exc
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a host name: the guarded resolver checks what it resolves to
    if not address_allowed(address, private_ok=private_ok):
        raise TargetNotAllowed(f"target not allowed: {host} is not a "
                               f"{'reachable' if private_ok else 'public'} address")


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses if any address is not public.

    Refusing when *any* address is bad (rather than filtering) keeps a name that mixes public
    and private answers from being used to probe the inside.
    """

    def __init__(self, inner: AbstractResolver | None = None, *,
                 private_ok: bool = False) -> None:
        self._inner = inner or DefaultResolver()
        self.private_ok = private_ok

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """Resolve ``host`` and return its addresses only if every one is public."""
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            if not address_allowed(address, private_ok=self.private_ok):
                raise TargetNotAllowed(
                    f"target not allowed: {host} resolves to {address}, not a "
                    f"{'reachable' if self.private_ok else 'public'} address")
        return results

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()


def refused_target(exc: BaseException) -> TargetNotAllowed | None:
    """The TargetNotAllowed behind an aiohttp connection error, if that is what it was."""
    seen: set[int] = set()
    current: Any = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TargetNotAllowed):
            return current
        seen.add(id(current))
        current = getattr(current, "os_error", None) or current.__cause__ or current.__context__
    return None
