"""Small, real proxies for the tests: an HTTP CONNECT proxy and a SOCKS5 proxy on loopback.

Each listens on its own address, optionally demands a user name and password (Basic
``Proxy-Authorization`` for HTTP, RFC 1929 for SOCKS5), resolves names of its own (``hosts``:
a name the test machine cannot resolve proves the client went through the proxy), relays
bytes both ways, and logs
every tunnel it was asked for (who asked, for where, with which user, what it answered,
how many bytes went each way). Use them as context managers: ``stop()`` closes the
listener and every open tunnel and joins every thread, on every path.
"""

from __future__ import annotations

import base64
import contextlib
import json
import selectors
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Tunnel:
    client: str
    target: str = ""
    user: str | None = None
    status: str = ""         # "200", "407", "403", "502" (HTTP) or "granted", "auth-failed", ... (SOCKS5)
    sent: int = 0            # client -> target bytes
    received: int = 0        # target -> client bytes
    opened: float = field(default_factory=time.time)
    closed: float | None = None


class _Proxy:
    """What both proxies share: the listener, the threads, the log, the relay."""

    kind = "?"

    def __init__(self, host: str = "127.0.0.1", *, username: str | None = None, password: str | None = None,
                 allow_ports: set[int] | None = None, log_file: str | Path | None = None,
                 hosts: dict[str, str] | None = None):
        self.host, self.username, self.password = host, username, password
        self.allow_ports = allow_ports
        self.hosts = hosts or {}  # the proxy's own name resolution, as a corporate proxy's DNS would have it
        self.log_file = Path(log_file) if log_file else None
        self.tunnels: list[Tunnel] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self.port = self._listener.getsockname()[1]
        self._accepter: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self):
        self._listener.listen(64)
        self._listener.settimeout(0.2)
        self._accepter = threading.Thread(target=self._accept_loop, name=f"test-{self.kind}-proxy", daemon=True)
        self._accepter.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._accepter is not None:
            self._accepter.join(10)
        self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for s in open_sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        for s in open_sockets:
            s.close()
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"proxy threads still running: {alive}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> list[dict]:
        with self._lock:
            return [asdict(t) for t in self.tunnels]

    def _record(self, tunnel: Tunnel) -> None:
        with self._lock:
            self.tunnels.append(tunnel)
        self._write_log()

    def _write_log(self) -> None:
        if self.log_file is not None:
            with self._lock:
                text = "".join(json.dumps(asdict(t)) + "\n" for t in self.tunnels)
            self.log_file.write_text(text)

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.add(s)
        return s

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            self._track(conn)
            t = threading.Thread(target=self._serve, args=(conn, f"{peer[0]}:{peer[1]}"),
                                 name=f"test-{self.kind}-proxy-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket, client: str) -> None:
        tunnel = Tunnel(client)
        upstream = None
        try:
            upstream = self._negotiate(conn, tunnel)
            if upstream is not None:
                self._relay(conn, upstream, tunnel)
        except OSError:
            tunnel.status = tunnel.status or "client-error"
        finally:
            tunnel.closed = time.time()
            self._write_log()
            for s in (conn, upstream):
                if s is not None:
                    with self._lock:
                        self._sockets.discard(s)
                    s.close()

    def _negotiate(self, conn: socket.socket, tunnel: Tunnel) -> socket.socket | None:
        raise NotImplementedError

    def _dial(self, host: str, port: int) -> socket.socket | None:
        try:
            return self._track(socket.create_connection((self.hosts.get(host, host), port), timeout=5))
        except OSError:
            return None

    def _relay(self, a: socket.socket, b: socket.socket, tunnel: Tunnel) -> None:
        a.settimeout(None)
        b.settimeout(None)
        with selectors.DefaultSelector() as sel:
            sel.register(a, selectors.EVENT_READ, (b, "sent"))
            sel.register(b, selectors.EVENT_READ, (a, "received"))
            while not self._stop.is_set():
                for key, _ in sel.select(0.2):
                    other, direction = key.data
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    except OSError:
                        data = b""
                    if not data:
                        return
                    other.sendall(data)
                    setattr(tunnel, direction, getattr(tunnel, direction) + len(data))


class HttpConnectProxy(_Proxy):
    """``CONNECT host:port HTTP/1.1`` -> ``200``, then bytes both ways. ``407`` without the right
    Basic credentials (when it has a user name; ``auth_status`` "401 Unauthorized" answers as
    tinyproxy does), ``403`` for a port not in ``allow_ports``, ``502`` when the target does not answer."""

    kind = "http"

    def __init__(self, *args, auth_status: str = "407 Proxy Authentication Required", **kwargs):
        super().__init__(*args, **kwargs)
        self.auth_status = auth_status

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def _negotiate(self, conn: socket.socket, tunnel: Tunnel) -> socket.socket | None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk or len(head) > 16384:
                tunnel.status = "bad-request"
                self._record(tunnel)
                return None
            head += chunk
        lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        method, target, _ = (lines[0].split(" ") + ["", "", ""])[:3]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        tunnel.target = target
        if method != "CONNECT":
            return self._answer(conn, tunnel, "405 Method Not Allowed")
        if self.username is not None:
            scheme, _, creds = headers.get("proxy-authorization", "").partition(" ")
            user, password = None, None
            if scheme.lower() == "basic":
                try:
                    user, _, password = base64.b64decode(creds).decode("utf-8").partition(":")
                except (ValueError, UnicodeDecodeError):
                    user = None
            tunnel.user = user
            if (user, password) != (self.username, self.password):
                return self._answer(conn, tunnel, self.auth_status, 'Proxy-Authenticate: Basic realm="flasher-tests"\r\n')
        host, _, port = target.rpartition(":")
        if not port.isdigit() or (self.allow_ports is not None and int(port) not in self.allow_ports):
            return self._answer(conn, tunnel, "403 Forbidden")
        upstream = self._dial(host.strip("[]"), int(port))
        if upstream is None:
            return self._answer(conn, tunnel, "502 Bad Gateway")
        # One write: PySocks reads the status line through a buffer it then throws away.
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        tunnel.status = "200"
        self._record(tunnel)
        return upstream

    def _answer(self, conn: socket.socket, tunnel: Tunnel, status: str, headers: str = "") -> None:
        conn.sendall(f"HTTP/1.1 {status}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        tunnel.status = status.split(" ")[0]
        self._record(tunnel)
        return None


class Socks5Proxy(_Proxy):
    """RFC 1928 CONNECT, with RFC 1929 user name/password when it has a user name."""

    kind = "socks5"

    @property
    def url(self) -> str:
        return f"socks5://{self.address}"

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _negotiate(self, conn: socket.socket, tunnel: Tunnel) -> socket.socket | None:
        version, n = self._recv(conn, 2)
        methods = self._recv(conn, n)
        want = 0x02 if self.username is not None else 0x00
        if version != 5 or want not in methods:
            conn.sendall(b"\x05\xff")
            tunnel.status = "no-acceptable-method"
            self._record(tunnel)
            return None
        conn.sendall(bytes([5, want]))
        if want == 0x02:
            _, ulen = self._recv(conn, 2)
            user = self._recv(conn, ulen).decode("utf-8", "replace")
            (plen,) = self._recv(conn, 1)
            password = self._recv(conn, plen).decode("utf-8", "replace")
            tunnel.user = user
            if (user, password) != (self.username, self.password):
                conn.sendall(b"\x01\x01")
                tunnel.status = "auth-failed"
                self._record(tunnel)
                return None
            conn.sendall(b"\x01\x00")
        _, cmd, _, atyp = self._recv(conn, 4)
        if atyp == 1:
            host = socket.inet_ntoa(self._recv(conn, 4))
        elif atyp == 3:
            (length,) = self._recv(conn, 1)
            host = self._recv(conn, length).decode("idna")
        else:
            host = socket.inet_ntop(socket.AF_INET6, self._recv(conn, 16))
        (port,) = struct.unpack("!H", self._recv(conn, 2))
        tunnel.target = f"{host}:{port}"
        reply = 0x00
        upstream = None
        if cmd != 1:
            reply = 0x07  # command not supported
        elif self.allow_ports is not None and port not in self.allow_ports:
            reply = 0x02  # not allowed by ruleset
        else:
            upstream = self._dial(host, port)
            reply = 0x00 if upstream is not None else 0x05  # connection refused
        conn.sendall(bytes([5, reply, 0, 1]) + socket.inet_aton("0.0.0.0") + b"\x00\x00")
        tunnel.status = "granted" if reply == 0 else f"refused-{reply:#04x}"
        self._record(tunnel)
        return upstream
