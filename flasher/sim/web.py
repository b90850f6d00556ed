"""The emulator's port 443: TLS, HTTP/1.1, and the server side of WebSockets (RFC 6455).

Azure's endpoints answer HTTPS on 443, and that is also where MQTT goes when port
8883 is blocked: the SDK's ``websockets=True`` opens ``wss://host:443/$iothub/websocket``
with the subprotocol ``mqtt`` and then speaks MQTT 3.1.1 inside binary frames. So
:class:`HttpsListener` reads one HTTP request at a time (keep-alive), hands a WebSocket
upgrade on a path it knows to an upgrade handler (the emulator feeds the stream to the
same MQTT connection handler as port 8883), and any other request to an HTTP handler
(today a 404; DPS's HTTPS registration API can be added there without touching the
framing). :class:`WebSocketStream` looks like the ``reader``/``writer`` pair the MQTT
server already reads from and writes to.

Why our own framing and not a WebSocket library: the SDK's paho-mqtt 1.x answers a
server's PING and CLOSE with *unmasked* frames (``WebsocketWrapper._create_frame(...,
do_masking=0)`` in ``paho/mqtt/client.py``). RFC 6455 section 5.1 tells a server to
close on any unmasked client frame, and strict server libraries do, which would drop the
SDK on its first pong. Azure evidently keeps such clients, so this server does too, for
control frames only (and counts them); unmasked *data* frames still close the
connection with 1002, as the RFC says.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import ssl
import struct
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

log = logging.getLogger("flasher.sim.web")

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, CLOSE_UNSUPPORTED, CLOSE_TOO_BIG = 1000, 1002, 1003, 1009
MAX_HEAD = 16 * 1024           # request line and headers
MAX_BODY = 1024 * 1024         # an HTTP request body
MAX_MESSAGE = 1024 * 1024 + 8  # a WebSocket message: the MQTT server's own packet limit, plus its header
HEAD_TIMEOUT = 10.0            # a client that opens a connection must send its request promptly
CLOSE_WAIT = 2.0               # how long a closing side waits for the peer's CLOSE


def accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((client_key.strip() + WS_GUID).encode("ascii")).digest()).decode("ascii")


class HttpError(Exception):
    """A request we answer with an error status and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class HttpRequest:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    peer: str = "?"

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query,
                                                          keep_blank_values=True).items()}

    def tokens(self, name: str) -> set[str]:
        """A comma-separated header as lower-case tokens (``Connection: keep-alive, Upgrade``)."""
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}

    @property
    def keep_alive(self) -> bool:
        if self.version == "HTTP/1.0":
            return "keep-alive" in self.tokens("connection")
        return "close" not in self.tokens("connection")

    @property
    def wants_websocket(self) -> bool:
        return "websocket" in self.tokens("upgrade") and "upgrade" in self.tokens("connection")


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, obj: object, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
        return cls(status, json.dumps(obj).encode("utf-8"), [("Content-Type", "application/json; charset=utf-8"),
                                                             *(headers or [])])

    def encode(self, keep_alive: bool) -> bytes:
        try:
            reason = HTTPStatus(self.status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {self.status} {reason}", *(f"{k}: {v}" for k, v in self.headers)]
        if self.status != 101:
            lines += [f"Content-Length: {len(self.body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (self.body if self.status != 101 else b"")


async def read_request(reader: asyncio.StreamReader, peer: str, timeout: float = HEAD_TIMEOUT) -> HttpRequest | None:
    """The next request on a connection, or None if the client closed it between requests."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise HttpError(400, "connection closed inside the request head") from None
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"request head over {MAX_HEAD} bytes") from None
    except TimeoutError:
        return None  # an idle keep-alive connection, or a client that never spoke
    text = head.decode("latin-1")  # HTTP/1.1 header bytes (RFC 9110 5.5); latin-1 maps every byte
    request_line, *header_lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"bad request line {request_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"bad header line {line[:80]!r}")
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "chunked request bodies are not supported")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "bad Content-Length") from None
    if not 0 <= length <= MAX_BODY:
        raise HttpError(413, f"body over {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    return HttpRequest(parts[0], parts[1], parts[2], headers, body, peer)


# --- WebSockets -------------------------------------------------------------------------

class WebSocketClosed(Exception):
    """The WebSocket is closed (by either side, or by a protocol error we closed it for)."""


@dataclass
class WebSocketStats:
    """What happened on one connection, for tests and the emulator's state."""

    pings_sent: int = 0
    pongs_received: int = 0
    unmasked_control_frames: int = 0   # paho 1.x: PONG and CLOSE go out unmasked
    close_received: int | None = None  # the status code of the peer's CLOSE, if one came
    close_sent: int | None = None


class WebSocketStream:
    """One upgraded connection, shaped like an ``asyncio`` reader *and* writer for the MQTT server.

    Reading returns the payload bytes of binary messages as one stream (MQTT packets can
    span frames, and a frame can hold several packets); PING is answered, PONG counted,
    a CLOSE answered and turned into end of stream. Writing sends each write as one
    binary frame, unmasked as RFC 6455 requires of a server.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, subprotocol: str | None = None,
                 max_message: int = MAX_MESSAGE):
        self._reader, self._writer = reader, writer
        self.subprotocol = subprotocol
        self.max_message = max_message
        self.stats = WebSocketStats()
        self._buffer = bytearray()
        self._eof = False
        self._closing = False

    # --- the reader side ------------------------------------------------------------
    async def readexactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            if self._eof:
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)
            try:
                message = await self._next_message()
            except WebSocketClosed:
                self._eof = True
                continue
            self._buffer += message
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def _next_message(self) -> bytes:
        """The next complete data message (reassembled from fragments); control frames are handled here."""
        message: bytearray | None = None
        while True:
            fin, opcode, payload = await self._read_frame()
            if opcode >= 0x8:
                await self._control(opcode, payload)
                continue
            if opcode == OP_CONTINUATION:
                if message is None:
                    await self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a message")
                    raise WebSocketClosed()
                message += payload
            elif message is not None:
                await self._fail(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
                raise WebSocketClosed()
            elif opcode == OP_BINARY:
                message = bytearray(payload)
            else:  # MQTT over WebSockets: binary frames only [MQTT-6.0.0-1]
                await self._fail(CLOSE_UNSUPPORTED, "MQTT needs binary frames" if opcode == OP_TEXT else "unknown opcode")
                raise WebSocketClosed()
            if len(message) > self.max_message:
                await self._fail(CLOSE_TOO_BIG, f"message over {self.max_message} bytes")
                raise WebSocketClosed()
            if fin:
                return bytes(message)

    async def _read_frame(self) -> tuple[bool, int, bytes]:
        try:
            b0, b1 = await self._reader.readexactly(2)
            if b0 & 0x70:
                await self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
                raise WebSocketClosed()
            fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
            if opcode >= 0x8 and (not fin or length > 125):
                await self._fail(CLOSE_PROTOCOL_ERROR, "control frames are unfragmented and at most 125 bytes")
                raise WebSocketClosed()
            if length == 126:
                (length,) = struct.unpack("!H", await self._reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", await self._reader.readexactly(8))
                if length >> 63:
                    await self._fail(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
                    raise WebSocketClosed()
            if length > self.max_message:
                await self._fail(CLOSE_TOO_BIG, f"frame over {self.max_message} bytes")
                raise WebSocketClosed()
            mask = await self._reader.readexactly(4) if masked else None
            payload = await self._reader.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ssl.SSLError):
            raise WebSocketClosed() from None
        if mask is not None:
            payload = _unmask(payload, mask)
        elif opcode < 0x8:
            await self._fail(CLOSE_PROTOCOL_ERROR, "a client's data frames must be masked (RFC 6455 5.1)")
            raise WebSocketClosed()
        else:
            self.stats.unmasked_control_frames += 1  # what paho does; tolerated, see the module docstring
        return fin, opcode, payload

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._send_frame(OP_PONG, payload)
            await self.drain()
        elif opcode == OP_PONG:
            self.stats.pongs_received += 1
        elif opcode == OP_CLOSE:
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self.stats.close_received = code
            if self.stats.close_sent is None:  # the peer started it: answer, then the stream ends
                self._send_close(code if code != 1005 else CLOSE_NORMAL)
            self._abort_transport()
            raise WebSocketClosed()
        else:
            await self._fail(CLOSE_PROTOCOL_ERROR, f"unknown control opcode {opcode:#x}")
            raise WebSocketClosed()

    async def _fail(self, code: int, why: str) -> None:
        log.info("WebSocket %s: closing with %d: %s", self.peer, code, why)
        self._send_close(code, why)
        await self.drain()
        self._abort_transport()

    # --- the writer side ------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self._closing:
            self._send_frame(OP_BINARY, data)

    async def drain(self) -> None:
        await self._writer.drain()

    def is_closing(self) -> bool:
        return self._closing or self._writer.is_closing()

    def get_extra_info(self, name: str, default=None):
        return self._writer.get_extra_info(name, default)

    def close(self) -> None:
        """Start the closing handshake (1000); the reading side sees the peer's answer as end of stream."""
        if not self._writer.is_closing() and self.stats.close_sent is None:
            self._send_close(CLOSE_NORMAL)

    async def finish(self) -> None:
        """End the connection cleanly: CLOSE (if not yet sent), wait briefly for the peer's CLOSE, drop TCP."""
        self.close()
        try:
            await asyncio.wait_for(self._await_close(), CLOSE_WAIT)
        except TimeoutError:
            log.debug("WebSocket %s: no CLOSE from the peer within %g s", self.peer, CLOSE_WAIT)
        finally:
            self._abort_transport()

    async def _await_close(self) -> None:
        while self.stats.close_received is None and not self._writer.is_closing():
            try:
                await self._read_frame_and_control()
            except WebSocketClosed:
                return

    async def _read_frame_and_control(self) -> None:
        fin, opcode, payload = await self._read_frame()
        if opcode >= 0x8:
            await self._control(opcode, payload)

    def ping(self, payload: bytes = b"") -> None:
        """Send a PING (at most 125 bytes); the peer's PONG shows in :attr:`stats`."""
        if len(payload) > 125:
            raise ValueError("a ping carries at most 125 bytes")
        self._send_frame(OP_PING, payload)
        self.stats.pings_sent += 1

    def _send_close(self, code: int, reason: str = "") -> None:
        self._send_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode("utf-8")[:123])
        self.stats.close_sent = code
        self._closing = True

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        if self._writer.is_closing() or (self._closing and opcode != OP_CLOSE):
            return
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        self._writer.write(head + payload)

    def _abort_transport(self) -> None:
        self._closing = True
        try:
            self._writer.close()
        except (ConnectionError, OSError, RuntimeError) as exc:
            log.debug("WebSocket %s: close: %s", self.peer, exc)

    @property
    def peer(self) -> str:
        peer = self._writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"


def _unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte key, done as one big integer operation (fast enough for MQTT-sized frames)."""
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


# --- the listener ---------------------------------------------------------------------------

UpgradeHandler = Callable[[WebSocketStream, HttpRequest], Awaitable[None]]
HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def not_found(request: HttpRequest) -> HttpResponse:
    return HttpResponse.json(404, {"message": f"no such resource: {request.method} {request.path}"})


class HttpsListener:
    """One TLS port that answers HTTP/1.1 requests and upgrades WebSockets on the paths it is given.

    ``upgrades`` maps a path to ``(subprotocol, handler)``: a request there must ask for a
    WebSocket with that subprotocol, and the handler then owns the stream until it
    returns. Every other request goes to ``http_handler``, which returns a response.
    """

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, *,
                 upgrades: dict[str, tuple[str, UpgradeHandler]], http_handler: HttpHandler = not_found):
        self.host, self.port, self.ssl = host, port, ssl_context
        self.upgrades, self.http_handler = upgrades, http_handler
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.streams: set[WebSocketStream] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, ssl=self.ssl, limit=MAX_HEAD,
                                                  ssl_handshake_timeout=10, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        try:
            while True:
                try:
                    request = await read_request(reader, peer)
                except HttpError as exc:
                    writer.write(HttpResponse.json(exc.status, {"message": str(exc)}).encode(keep_alive=False))
                    await writer.drain()
                    return
                if request is None:
                    return
                if request.path in self.upgrades:
                    await self._upgrade(request, reader, writer)
                    return
                response = await self.http_handler(request)
                keep = request.keep_alive
                writer.write(response.encode(keep_alive=keep))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("%s: %s", peer, exc.__class__.__name__)
        except asyncio.CancelledError:
            pass  # the listener is stopping
        finally:
            self._tasks.discard(task)
            try:
                writer.close()
            except (ConnectionError, OSError, RuntimeError) as exc:
                log.debug("%s: close: %s", peer, exc)

    async def _upgrade(self, request: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        subprotocol, handler = self.upgrades[request.path]
        key = request.headers.get("sec-websocket-key", "")
        offered = request.tokens("sec-websocket-protocol")
        problem = None
        if request.method != "GET" or not request.wants_websocket:
            problem = 426, "this resource is a WebSocket: send Upgrade: websocket"
        elif request.headers.get("sec-websocket-version") != "13":
            problem = 426, "WebSocket version 13 only"
        elif not _valid_key(key):
            problem = 400, "missing or malformed Sec-WebSocket-Key"
        elif subprotocol not in offered:
            problem = 400, f"the subprotocol must be {subprotocol!r}"
        if problem is not None:
            status, message = problem
            headers = [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")] if status == 426 else []
            writer.write(HttpResponse.json(status, {"message": message}, headers).encode(keep_alive=False))
            await writer.drain()
            return
        # paho checks each response header line: one that mentions "connection" must also say "upgrade".
        writer.write(HttpResponse(101, headers=[("Upgrade", "websocket"), ("Connection", "Upgrade"),
                                                ("Sec-WebSocket-Accept", accept_key(key)),
                                                ("Sec-WebSocket-Protocol", subprotocol)]).encode(keep_alive=True))
        await writer.drain()
        stream = WebSocketStream(reader, writer, subprotocol=subprotocol)
        self.streams.add(stream)
        try:
            await handler(stream, request)
            await stream.finish()
        finally:
            self.streams.discard(stream)


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (ValueError, TypeError):
        return False
