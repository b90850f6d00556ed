"""Proxies between the bench and Azure: ``--proxy``, ``proxy`` in flasher.toml, and ``HTTPS_PROXY``.

Factory and office networks often let nothing out but an HTTP proxy (``CONNECT`` to
port 443) or a SOCKS5 proxy. The SDK takes one as ``ProxyOptions`` and PySocks opens the
tunnel (``socks.py``: Basic ``Proxy-Authorization`` when a user name and password are
set, whatever ProxyOptions' docstring says). This module only parses and describes
proxies; :mod:`flasher.dps` hands them to the SDK.

A proxy password is a secret: it comes from the URL (on the command line, with a
warning: the process list shows it; in ``HTTPS_PROXY``; never inline in flasher.toml),
from ``--proxy-password-file``, ``$FLASHER_PROXY_PASSWORD`` or flasher.toml's
``proxy_password_env``/``proxy_password_file``. It is held as a :class:`Secret`, and every
text this module makes shows the URL with the password masked.

``HTTPS_PROXY`` (or ``https_proxy``) follows the convention of curl and Go: hosts in
``NO_PROXY`` and loopback addresses go direct. A proxy given with ``--proxy`` or in
flasher.toml is used for every host.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from dataclasses import dataclass, field, replace

from flasher.errors import InputError
from flasher.secrets import MASK, Secret, mask_url_passwords

SCHEMES = {"http": "HTTP", "socks5": "SOCKS5", "socks5h": "SOCKS5"}  # URL scheme -> the SDK's ProxyOptions type
DEFAULT_PORTS = {"http": 8080, "socks5": 1080, "socks5h": 1080}   # ProxyOptions' documented defaults
NONE = "none"  # `--proxy none`: no proxy for this run, whatever HTTPS_PROXY says


@dataclass(frozen=True)
class Proxy:
    """One proxy: where it is, who we are to it, and where its URL came from (``--proxy``, ``$HTTPS_PROXY``...)."""

    scheme: str
    host: str
    port: int
    source: str
    username: str | None = None
    password: Secret | None = field(default=None, compare=False)
    from_environment: bool = False  # HTTPS_PROXY: NO_PROXY and loopback hosts go direct

    @property
    def sdk_type(self) -> str:
        return SCHEMES[self.scheme]

    def url(self) -> str:
        """The URL to show: the user name, never the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        return f"{self.scheme}://{user}{host}:{self.port}"

    __str__ = url

    def __repr__(self) -> str:
        password = f", password=<{self.password.source}>" if self.password else ""
        return f"Proxy({self.url()!r} from {self.source}{password})"

    def with_password(self, password: Secret) -> Proxy:
        if not self.username:
            raise InputError(f"proxy {self.url()}: a password needs a user name in the URL "
                             f"(http://USER@host:port)")
        return replace(self, password=password)

    def applies_to(self, host: str) -> bool:
        """Whether a connection to ``host`` goes through this proxy."""
        if not self.from_environment:
            return True
        return not (_is_loopback(host) or _no_proxy(host))


def parse_proxy(value: object, where: str) -> Proxy | None:
    """``http://[user[:password]@]host[:port]`` or ``socks5://...`` (``none``: no proxy; no scheme: http),
    checked once.

    ``where`` names the source for errors (``--proxy``, ``$HTTPS_PROXY``, ``flasher.toml: proxy``);
    an error shows the URL with its password masked.
    """
    text = str(value).strip()
    if text.lower() == NONE:
        return None
    shown = mask_url(text)
    if not text:
        raise InputError(f"{where}: empty (a proxy URL such as http://proxy.example:3128, or 'none')")
    if "://" not in text:
        text = "http://" + text  # curl's convention: no scheme means http
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"{where} {shown!r}: not a proxy URL ({_masked_reason(exc, text)})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        hint = " (TLS to the proxy itself is not supported; most proxies take http://)" if scheme == "https" else ""
        raise InputError(f"{where} {shown!r}: the scheme must be http, socks5 or socks5h{hint}")
    if not parts.hostname:
        raise InputError(f"{where} {shown!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InputError(f"{where} {shown!r}: a proxy URL has no path, query or fragment")
    if port == 0:
        raise InputError(f"{where} {shown!r}: port 0")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = None
    if parts.password:
        password = Secret(urllib.parse.unquote(parts.password), f"the password in {where}")
    if password is not None and not username:
        raise InputError(f"{where} {shown!r}: a password without a user name")
    return Proxy(scheme, parts.hostname, port or DEFAULT_PORTS[scheme], where, username, password,
                 from_environment=where.startswith("$"))


def has_password(text: str) -> bool:
    """Whether a proxy URL carries a password (flasher.toml may not: it only references secrets)."""
    try:
        return bool(urllib.parse.urlsplit(str(text).strip()).password)
    except ValueError:
        return mask_url(str(text)) != str(text)


mask_url = mask_url_passwords


def _masked_reason(exc: Exception, text: str) -> str:
    reason = mask_url(str(exc))
    try:
        password = urllib.parse.urlsplit(text).password
    except ValueError:
        password = None
    return reason.replace(password, MASK) if password else reason


def _is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _no_proxy(host: str) -> bool:
    """curl's NO_PROXY rules: ``*``, exact names, and domain suffixes (``.corp`` or ``corp`` matches ``a.corp``)."""
    raw = os.environ.get("NO_PROXY", os.environ.get("no_proxy", ""))
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower() for e in raw.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.split(":")[0] if entry.count(":") == 1 else entry  # host:port entries match the host
        entry = entry.lstrip(".").rstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
        try:
            if "/" in entry and ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False
