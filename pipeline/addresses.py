"""Which network addresses intake may connect to, and which hosts an operator opened on purpose.

The rule is "globally routable unicast only": anything Python's ipaddress does not call global is
refused, and so is every IPv6 form that carries an IPv4 address inside it (mapped, compatible,
SIIT-translated, 6to4, Teredo, the well-known NAT64 prefix) when that IPv4 is not global. Prefixes
whose meaning is up to the local network (NAT64 local-use 64:ff9b:1::/48, the deprecated
IPv4-compatible ::/96) are refused outright: we cannot know where they lead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: translation defined by the site
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # RFC 4291, deprecated: ::a.b.c.d
SIIT_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765: ::ffff:0:a.b.c.d
DEFAULT_PORTS = frozenset({80, 443})


def forbidden_reason(address: IPAddress) -> str | None:
    """Why connecting to address is refused, or None when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL_USE:
            return f"{address} is in the local-use NAT64 prefix {NAT64_LOCAL_USE}"
        if address in IPV4_COMPATIBLE:
            return f"{address} is an IPv4-compatible address (deprecated, never routed)"
        embedded = embedded_ipv4(address)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} (inside {address})" if reason else None
    checks = (
        (address.is_multicast, "a multicast address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_private, "a private address"),
        (not address.is_global, "not a globally routable address"),
    )
    return next((f"{address} is {what}" for failed, what in checks if failed), None)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries (and a translator or tunnel would connect to)."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in SIIT_TRANSLATED or address in NAT64_WELL_KNOWN:
        return low32
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        server, client = address.teredo
        return client if forbidden_reason(client) else server
    return None


@dataclass(frozen=True)
class AllowedHosts:
    """Hosts exempt from the address check, each for one port.

    An entry "host:port" (or "[v6]:port") opens that port; a bare "host" opens only the default
    ports 80 and 443. So allowing an image server never opens the other services on its machine
    (a redirect to its Redis port is still refused).
    """

    entries: frozenset[tuple[str, int | None]]

    @classmethod
    def parse(cls, raw: list[str] | tuple[str, ...] | frozenset[str]) -> AllowedHosts:
        return cls(frozenset(parse_host_port(entry) for entry in raw if entry.strip()))

    def allows(self, host: str, port: int) -> bool:
        name = normalize_host(host)
        return (name, port) in self.entries or ((name, None) in self.entries and port in DEFAULT_PORTS)


def parse_host_port(entry: str) -> tuple[str, int | None]:
    """'cdn.example.com' -> (name, None); 'h:8080' -> ('h', 8080); '[::1]:8765' -> ('::1', 8765)."""
    text = entry.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a name, an IPv4 address, or a bare IPv6 address
        host, port = text, ""
    if port and not port.isdigit():
        raise ValueError(f"allowed host {entry!r}: the port must be a number")
    return normalize_host(host), int(port) if port else None


def normalize_host(host: str) -> str:
    name = host.strip().strip("[]").rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))  # one spelling per address: ::0001 is ::1
    except ValueError:
        return name
