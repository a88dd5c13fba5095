"""Where webhooks may be sent (SSRF policy). Checked when a subscription is written and again at
send time against the addresses the name resolves to then; the sender connects to one of those
checked addresses, so a name that re-resolves to a private address later never reaches it."""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_BLOCKED = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "169.254.0.0/16",
                   "0.0.0.0/8", "100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4", "::1/128", "::/128",
                   "fc00::/7", "fe80::/10", "ff00::/8", "::ffff:0:0/96")


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


def _blocked(address: str, nets: list) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in nets)


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
