"""A small asyncio MQTT 3.1.1 server that hands every packet to an application.

Why not a broker library: amqtt 0.12 (the maintained Python broker) closes any client
that publishes to a topic starting with ``$`` ([MQTT-4.7.2-1]), and every DPS request is
a publish to ``$dps/registrations/...``; it also routes by topic only, so a DPS answer on
``$dps/registrations/res/...`` would reach every device subscribed to ``res/#``, while
real DPS answers only the connection that asked. Its plugin API offers neither a hook
that replies to one session nor one that accepts ``$`` publishes. DPS and IoT Hub are not
brokers anyway: they are request/response endpoints that speak MQTT.

So this server does not route between clients. It implements the MQTT 3.1.1 session
layer (CONNECT/CONNACK with return codes, SUBSCRIBE/SUBACK, UNSUBSCRIBE/UNSUBACK,
PUBLISH QoS 0/1/2 with PUBACK/PUBREC/PUBREL/PUBCOMP, PINGREQ/PINGRESP, DISCONNECT,
keep-alive, client-id takeover) and asks an :class:`MqttApplication` what to do with a
CONNECT and each PUBLISH; the application answers through :meth:`Connection.publish`,
which delivers to that one connection if one of its subscriptions matches. Sessions
are not kept after a connection closes (CONNACK's session-present flag is always 0).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("flasher.sim.mqtt")

# Packet types
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes
ACCEPTED = 0
REFUSED_PROTOCOL_VERSION = 1
REFUSED_IDENTIFIER_REJECTED = 2
REFUSED_SERVER_UNAVAILABLE = 3
REFUSED_BAD_USERNAME_PASSWORD = 4
REFUSED_NOT_AUTHORIZED = 5

MAX_PACKET = 1024 * 1024  # IoT Hub caps messages at 256 KiB; leave room


class ProtocolError(Exception):
    """The peer broke MQTT 3.1.1: the connection is closed without an answer."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 section 4.7 matching, including the rule that wildcards never match a leading '$'."""
    if topic.startswith("$") and topic_filter[:1] in ("#", "+"):
        return False
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def valid_filter(topic_filter: str) -> bool:
    if not topic_filter or "\0" in topic_filter:
        return False
    parts = topic_filter.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            return False
        if "+" in p and p != "+":
            return False
    return True


def _encode_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("!H", len(b)) + b


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u8(self) -> int:
        if self.pos + 1 > len(self.data):
            raise ProtocolError("truncated packet")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > len(self.data):
            raise ProtocolError("truncated packet")
        self.pos += 2
        return struct.unpack_from("!H", self.data, self.pos - 2)[0]

    def binary(self) -> bytes:
        n = self.u16()
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated packet")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def text(self) -> str:
        try:
            s = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not UTF-8") from None
        if "\0" in s:
            raise ProtocolError("string contains U+0000")
        return s

    def rest(self) -> bytes:
        self.pos, out = len(self.data), self.data[self.pos:]
        return out

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


@dataclass
class ConnectRequest:
    client_id: str
    username: str | None
    password: str | None
    clean_session: bool
    keep_alive: int


class MqttApplication:
    """What the server asks about; override what you need. Runs on the server's event loop."""

    async def on_connect(self, conn: Connection, req: ConnectRequest) -> int:
        """Return a CONNACK code; set ``conn.session_key`` to enable client-id takeover."""
        return ACCEPTED

    async def on_subscribe(self, conn: Connection, topic_filter: str, qos: int) -> int:
        """Return the granted QoS (0-2) or 0x80 to refuse."""
        return min(qos, 1)

    async def on_publish(self, conn: Connection, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Raise :class:`ProtocolError` to drop the connection (as IoT Hub does for a foreign topic)."""

    def on_close(self, conn: Connection, reason: str) -> None:
        """The connection is gone (``reason``: "disconnect", "eof", "error: ...", "takeover", "keep-alive", "server")."""


class ByteReader(Protocol):
    """What a connection reads from: an ``asyncio.StreamReader``, or a WebSocket (flasher.sim.web)."""

    async def readexactly(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    """What a connection writes to: an ``asyncio.StreamWriter``, or a WebSocket (flasher.sim.web)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


@dataclass(eq=False)
class Connection:
    reader: ByteReader
    writer: ByteWriter
    peer: str
    transport: str = "mqtt"  # "mqtt" (TLS on 8883) or "websocket" (TLS + WebSocket on 443)
    client_id: str = ""
    username: str | None = None
    session_key: object = None
    keep_alive: int = 0
    connected: bool = False
    subscriptions: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # for the application
    _next_id: int = 0
    _inflight: dict[int, str] = field(default_factory=dict)
    _qos2_pending: set[int] = field(default_factory=set)
    _closed: bool = False

    def _send(self, ptype: int, flags: int, body: bytes) -> None:
        if self._closed or self.writer.is_closing():
            return
        self.writer.write(bytes([(ptype << 4) | flags]) + _encode_length(len(body)) + body)

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> bool:
        """Deliver to this connection if one of its subscriptions matches; True if sent."""
        granted = [q for f, q in self.subscriptions.items() if topic_matches(f, topic)]
        if not granted or self._closed:
            return False
        qos = min(qos, max(granted), 1)
        body = _utf8(topic)
        if qos:
            self._next_id = self._next_id % 0xFFFF + 1
            while self._next_id in self._inflight:
                self._next_id = self._next_id % 0xFFFF + 1
            self._inflight[self._next_id] = topic
            body += struct.pack("!H", self._next_id)
        self._send(PUBLISH, qos << 1, body + payload)
        await self._drain()
        return True

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._closed = True

    def close(self) -> None:
        self._closed = True
        try:
            self.writer.close()
        except (ConnectionError, OSError, RuntimeError) as exc:  # the transport is already gone
            log.debug("%s: close: %s", self.peer, exc)


class MqttServer:
    """Accepts TLS (or plain, for tests of the codec) MQTT 3.1.1 connections for one application.

    :meth:`start` listens on ``host:port``; :meth:`serve` also runs connections that arrive
    another way (MQTT over WebSockets on 443), so both share sessions and the application.
    """

    def __init__(self, app: MqttApplication, host: str, port: int, ssl_context: ssl.SSLContext | None):
        self.app, self.host, self.port, self.ssl = app, host, port, ssl_context
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[Connection] = set()
        self._sessions: dict[object, Connection] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        # backlog: a fleet's boards connect all at once; asyncio's default of 100 overflows at a few hundred, and
        # the dropped handshakes come back seconds later (SYN retries), as a real DPS or hub would not make them
        self._server = await asyncio.start_server(self._accept, self.host, self.port, ssl=self.ssl,
                                                  ssl_handshake_timeout=10, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def connections(self) -> list[Connection]:
        return [c for c in self._conns if c.connected]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.serve(reader, writer)

    async def serve(self, reader: ByteReader, writer: ByteWriter, transport: str = "mqtt") -> None:
        """Run one MQTT connection to its end: accepted here on 8883, or handed over by another listener."""
        task = asyncio.current_task()
        assert task is not None  # always inside an asyncio task here
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        conn = Connection(reader, writer, f"{peer[0]}:{peer[1]}" if peer else "?", transport)
        self._conns.add(conn)
        reason = "eof"
        try:
            reason = await self._serve(conn)
        except ProtocolError as exc:
            reason = f"error: {exc}"
            log.info("%s (%s): protocol error: %s", conn.peer, conn.client_id or "-", exc)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            reason = f"error: {exc.__class__.__name__}"
        except asyncio.CancelledError:
            reason = "server"
        finally:
            self._conns.discard(conn)
            if conn.session_key is not None and self._sessions.get(conn.session_key) is conn:
                del self._sessions[conn.session_key]
            if conn.connected:
                conn.connected = False
                try:
                    self.app.on_close(conn, reason)
                except Exception:  # an application bug must not kill the server
                    log.exception("on_close failed")
            conn.close()
            self._tasks.discard(task)

    async def _read_packet(self, conn: Connection) -> tuple[int, int, bytes]:
        timeout = conn.keep_alive * 1.5 if conn.keep_alive else None
        if not conn.connected:
            timeout = 10.0  # [MQTT-3.1.0-1]-ish: a CONNECT must come promptly
        try:
            head = await asyncio.wait_for(conn.reader.readexactly(1), timeout)
        except TimeoutError:
            raise _KeepAliveExpired() from None
        length, mult = 0, 1
        for _ in range(4):
            b = (await conn.reader.readexactly(1))[0]
            length += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                break
        else:
            raise ProtocolError("malformed remaining length")
        if length > MAX_PACKET:
            raise ProtocolError(f"packet of {length} bytes exceeds {MAX_PACKET}")
        body = await conn.reader.readexactly(length) if length else b""
        return head[0] >> 4, head[0] & 0x0F, body

    async def _serve(self, conn: Connection) -> str:
        try:
            ptype, flags, body = await self._read_packet(conn)
        except _KeepAliveExpired:
            return "no CONNECT"
        except asyncio.IncompleteReadError:
            return "eof"
        if ptype != CONNECT:
            raise ProtocolError("first packet is not CONNECT")
        if not await self._connect(conn, flags, body):
            return "refused"
        while True:
            try:
                ptype, flags, body = await self._read_packet(conn)
            except _KeepAliveExpired:
                return "keep-alive"
            except asyncio.IncompleteReadError:
                return "eof"
            if ptype == PUBLISH:
                await self._publish(conn, flags, body)
            elif ptype == PUBACK:
                conn._inflight.pop(_Reader(body).u16(), None)
            elif ptype == PUBREL:
                if flags != 0x2:
                    raise ProtocolError("PUBREL with bad flags")
                pid = _Reader(body).u16()
                conn._qos2_pending.discard(pid)
                conn._send(PUBCOMP, 0, struct.pack("!H", pid))
            elif ptype in (PUBREC, PUBCOMP):
                conn._inflight.pop(_Reader(body).u16(), None)  # we never send QoS 2
            elif ptype == SUBSCRIBE:
                await self._subscribe(conn, flags, body)
            elif ptype == UNSUBSCRIBE:
                if flags != 0x2:
                    raise ProtocolError("UNSUBSCRIBE with bad flags")
                r = _Reader(body)
                pid = r.u16()
                while r.remaining:
                    conn.subscriptions.pop(r.text(), None)
                conn._send(UNSUBACK, 0, struct.pack("!H", pid))
            elif ptype == PINGREQ:
                conn._send(PINGRESP, 0, b"")
            elif ptype == DISCONNECT:
                return "disconnect"
            else:
                raise ProtocolError(f"unexpected packet type {ptype}")
            await conn._drain()

    async def _connect(self, conn: Connection, flags: int, body: bytes) -> bool:
        r = _Reader(body)
        proto, level = r.text(), r.u8()
        if proto != "MQTT" or level != 4:
            if proto in ("MQTT", "MQIsdp"):
                conn._send(CONNACK, 0, bytes([0, REFUSED_PROTOCOL_VERSION]))
                await conn._drain()
                return False
            raise ProtocolError(f"unknown protocol {proto!r}")
        cflags = r.u8()
        if cflags & 0x01:
            raise ProtocolError("reserved CONNECT flag set")
        clean = bool(cflags & 0x02)
        keep_alive = r.u16()
        client_id = r.text()
        if cflags & 0x04:  # will: topic and message (not routed by this server)
            r.text()
            r.binary()
        elif cflags & 0x38:
            raise ProtocolError("will QoS/retain without a will")
        username = r.text() if cflags & 0x80 else None
        password = None
        if cflags & 0x40:
            if username is None:
                raise ProtocolError("password without user name")
            try:
                password = r.binary().decode("utf-8")
            except UnicodeDecodeError:
                password = None
        if not client_id and not clean:
            conn._send(CONNACK, 0, bytes([0, REFUSED_IDENTIFIER_REJECTED]))
            await conn._drain()
            return False
        conn.client_id, conn.username, conn.keep_alive = client_id, username, keep_alive
        rc = await self.app.on_connect(conn, ConnectRequest(client_id, username, password, clean, keep_alive))
        conn._send(CONNACK, 0, bytes([0, rc]))
        await conn._drain()
        if rc != ACCEPTED:
            return False
        if conn.session_key is not None:
            old = self._sessions.get(conn.session_key)
            if old is not None and old is not conn:  # [MQTT-3.1.4-2]
                log.info("client id %r connected again: closing its previous connection", client_id)
                old.close()
            self._sessions[conn.session_key] = conn
        conn.connected = True
        return True

    async def _publish(self, conn: Connection, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x3, bool(flags & 0x1)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        r = _Reader(body)
        topic = r.text()
        if not topic or "+" in topic or "#" in topic:
            raise ProtocolError(f"invalid topic name {topic!r}")
        pid = r.u16() if qos else None
        payload = r.rest()
        if qos == 2 and pid in conn._qos2_pending:
            conn._send(PUBREC, 0, struct.pack("!H", pid))  # duplicate: already delivered once
            return
        if qos == 1:
            # Answer before the application replies: a DPS response must not overtake the PUBACK.
            conn._send(PUBACK, 0, struct.pack("!H", pid))
        elif qos == 2 and pid is not None:
            conn._qos2_pending.add(pid)
            conn._send(PUBREC, 0, struct.pack("!H", pid))
        await conn._drain()
        await self.app.on_publish(conn, topic, payload, qos, retain)

    async def _subscribe(self, conn: Connection, flags: int, body: bytes) -> None:
        if flags != 0x2:
            raise ProtocolError("SUBSCRIBE with bad flags")
        r = _Reader(body)
        pid = r.u16()
        codes = []
        if not r.remaining:
            raise ProtocolError("SUBSCRIBE without topics")
        while r.remaining:
            f, q = r.text(), r.u8()
            if q > 2 or not valid_filter(f):
                raise ProtocolError(f"bad subscription {f!r} QoS {q}")
            granted = await self.app.on_subscribe(conn, f, q)
            if granted != 0x80:
                conn.subscriptions[f] = granted
            codes.append(granted)
        conn._send(SUBACK, 0, struct.pack("!H", pid) + bytes(codes))


class _KeepAliveExpired(Exception):
    pass
