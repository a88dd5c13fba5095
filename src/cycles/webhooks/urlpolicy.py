"""Where webhooks may be sent (SSRF policy). Checked when a subscription is written and again at
send time against the addresses the name resolves to then; the sender connects to one of those
checked addresses, so a name that re-resolves to a private address later never reaches it."""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# Every range of the IANA IPv4 and IPv6 Special-Purpose Address Registries (RFC 6890 and updates, as of
# 2025), plus multicast and the deprecated site-local and IPv4-compatible forms. Test and documentation
# ranges are included: they are special-purpose, and nothing legitimate is served there.
DEFAULT_BLOCKED = (
    # IPv4
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/8",
    "100.64.0.0/10", "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24",
    "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    # IPv6
    "::1/128", "::/128", "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48",
    "100::/64", "100:0:0:1::/64", "2001::/23", "2001:db8::/32", "2002::/16", "2620:4f:8000::/48", "3fff::/20",
    "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)


class UrlRejected(ValueError):
    pass


@dataclass
class UrlPolicy:
    blocked_cidr_ranges: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKED))
    allowed_url_patterns: list[str] = field(default_factory=list)  # globs; empty = any
    allow_http: bool = False

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(c, strict=False) for c in self.blocked_cidr_ranges]


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]  # checked addresses to connect to, in resolver order


def check_syntax(url: str, policy: UrlPolicy) -> tuple[str, str, int]:
    if len(url) > 2048:
        raise UrlRejected("url must be at most 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRejected(f"url is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http"):
        raise UrlRejected("url must use https")
    if parts.scheme == "http" and not policy.allow_http:
        raise UrlRejected("url must use https (http is not allowed by the webhook security config)")
    if not parts.hostname:
        raise UrlRejected("url has no host")
    if parts.username or parts.password:
        raise UrlRejected("url must not carry credentials; use custom headers")
    if policy.allowed_url_patterns and not any(fnmatch.fnmatchcase(url, p) for p in policy.allowed_url_patterns):
        raise UrlRejected("url does not match any allowed_url_patterns of the webhook security config")
    return parts.scheme, parts.hostname.lower(), port or (443 if parts.scheme == "https" else 80)


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries and that a translator or tunnel may reach: IPv4-mapped,
    IPv4-compatible, SIIT, NAT64 (well-known and local-use prefixes, RFC 6052 layouts), 6to4 and Teredo.
    Checked even when the operator unblocks the IPv6 prefix itself (e.g. for DNS64)."""
    b = ip.packed
    v4 = ipaddress.IPv4Address
    if b[:10] == bytes(10) and b[10:12] in (b"\xff\xff", b"\x00\x00"):  # ::ffff:a.b.c.d, ::a.b.c.d
        return [v4(b[12:])]
    if b[:12] == bytes(8) + b"\xff\xff\x00\x00":  # ::ffff:0:a.b.c.d (SIIT)
        return [v4(b[12:])]
    if b[:12] == b"\x00\x64\xff\x9b" + bytes(8):  # 64:ff9b::/96
        return [v4(b[12:])]
    if b[:6] == b"\x00\x64\xff\x9b\x00\x01":  # 64:ff9b:1::/48, whichever RFC 6052 prefix length it uses
        return [v4(b[6:8] + b[9:11]), v4(b[7:8] + b[9:12]), v4(b[9:13]), v4(b[12:])]
    if b[:2] == b"\x20\x02":  # 2002:aabb:ccdd::/48 (6to4)
        return [v4(b[2:6])]
    if b[:4] == b"\x20\x01\x00\x00":  # 2001::/32 (Teredo): the server, and the client (inverted)
        return [v4(b[4:8]), v4(bytes(x ^ 0xFF for x in b[12:]))]
    return []


def _blocked(address: str, nets: list) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += embedded_ipv4(ip)
    return any(c.version == n.version and c in n for c in candidates for n in nets)


def resolve(url: str, policy: UrlPolicy) -> Target:
    """Syntax, then every resolved address against the blocked ranges: any blocked address refuses
    the URL (a name with one public and one private address is refused, not half-trusted)."""
    scheme, host, port = check_syntax(url, policy)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlRejected(f"url host {host} does not resolve: {exc}") from None
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
    nets = policy.networks()
    for address in addresses:
        if _blocked(address, nets):
            raise UrlRejected(f"url host {host} resolves to {address}, inside a blocked range")
    if not addresses:
        raise UrlRejected(f"url host {host} has no address")
    return Target(scheme, host, port, addresses)
