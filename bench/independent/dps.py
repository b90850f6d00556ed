"""An independent DPS + IoT Hub for benchmarks: Eclipse Mosquitto with a small DPS responder beside it.

Nothing here is flasher's emulator (flasher/sim/dps.py, flasher/sim/mqtt.py): the broker
is Debian's mosquitto (TLS on 8883, its own MQTT implementation), the certificates come
from the openssl command, and the responder is a paho client written from Microsoft's
DPS MQTT documentation ("Provision devices using MQTT", register and operation-status
topics, 202 assigning / 200 assigned, 429 with retry-after). It exists to check that what
bench/register.py measures against flasher's emulator holds against a stack that shares
none of its code or assumptions.

Unlike DPS (and flasher's emulator) it does not check device keys (mosquitto cannot check
a SAS token), and every device sees every answer on $dps/registrations/res/# (the SDK
keeps only its own request ids). It counts registrations per id and can enforce a quota:
at most COUNT in any window of WINDOW seconds, 429 with retry-after beyond it.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from pathlib import Path

import paho.mqtt.client as mqtt

REGISTER = "$dps/registrations/PUT/iotdps-register/"
STATUS = "$dps/registrations/GET/iotdps-get-operationstatus/"


def _params(topic: str) -> dict[str, str]:
    query = topic.split("?", 1)[1] if "?" in topic else ""
    return dict(p.split("=", 1) for p in query.split("&") if "=" in p)


def make_certs(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``host`` (an IP address), made by the openssl command."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
        "-subj", "/CN=independent DPS test CA", "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={host}",
        "-keyout", str(key), "-out", str(csr))
    ext = folder / "san.cnf"
    ext.write_text(f"subjectAltName=IP:{host}\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
        "-extfile", str(ext), "-out", str(cert))
    return ca, cert, key


class IndependentDps:
    """``with IndependentDps(host) as dps:`` runs mosquitto on host:8883 and the responder; stops both."""

    def __init__(self, host: str, quota: tuple[int, float] | None = None, retry_after: int = 1):
        self.host, self.quota, self.retry_after = host, quota, retry_after
        self.registered: Counter[str] = Counter()
        self.throttled = 0
        self.requests = Counter()   # register, status: what the responder was asked
        self._accepted: deque[float] = deque()
        self._ops: dict[str, str] = {}
        self._lock = threading.Lock()
        self._tmp = tempfile.TemporaryDirectory(prefix="independent-dps-")
        self._broker: subprocess.Popen | None = None
        self._log = None
        self._client: mqtt.Client | None = None

    @property
    def ca_cert_path(self) -> Path:
        return Path(self._tmp.name) / "ca.pem"

    def __enter__(self) -> IndependentDps:
        folder = Path(self._tmp.name)
        try:
            ca, cert, key = make_certs(folder, self.host)
            folder.chmod(0o755)   # mosquitto started as root reads them as the mosquitto user (throwaway certificates)
            for f in (ca, cert, key):
                f.chmod(0o644)
            conf = folder / "mosquitto.conf"
            conf.write_text(f"per_listener_settings false\nallow_anonymous true\nmax_queued_messages 100000\n"
                            f"listener 8883 {self.host}\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                            f"listener 18830 127.0.0.1\n")
            self._log = open(folder / "mosquitto.log", "wb")   # a pipe nobody reads would stall the broker
            self._broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                            stderr=self._log)
            self._client = mqtt.Client(client_id="independent-dps-responder", clean_session=True)
            self._client.on_message = self._on_message
            deadline = time.monotonic() + 10
            while True:
                try:
                    self._client.connect("127.0.0.1", 18830)
                    break
                except OSError:
                    if time.monotonic() > deadline or self._broker.poll() is not None:
                        log = (folder / "mosquitto.log").read_text(errors="replace")[-500:]
                        raise RuntimeError(f"mosquitto did not start: {log}") from None
                    time.sleep(0.1)
            self._client.subscribe([("$dps/registrations/PUT/#", 1), ("$dps/registrations/GET/#", 1)])
            self._client.loop_start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.loop_stop()
            self._client.disconnect()
        if self._broker is not None and self._broker.poll() is None:
            self._broker.terminate()
            try:
                self._broker.wait(10)
            except subprocess.TimeoutExpired:
                self._broker.kill()
                self._broker.wait()
        if self._log is not None:
            self._log.close()
        self._tmp.cleanup()

    def _answer(self, status: int, rid: str, body: dict, retry_after: int | None = None) -> None:
        topic = f"$dps/registrations/res/{status}/?$rid={rid}"
        if retry_after is not None:
            topic += f"&retry-after={retry_after}"
        assert self._client is not None
        self._client.publish(topic, json.dumps(body), qos=0)

    def _on_message(self, _client, _userdata, msg) -> None:
        try:
            self._respond(msg)
        except Exception:   # a responder bug must show, and must not stop paho's loop
            traceback.print_exc()
            raise

    def _respond(self, msg) -> None:
        p = _params(msg.topic)
        rid = p.get("$rid", "")
        self.requests["register" if msg.topic.startswith(REGISTER) else "status"] += 1
        if msg.topic.startswith(REGISTER):
            reg_id = json.loads(msg.payload or b"{}").get("registrationId", "")
            with self._lock:
                now = time.monotonic()
                if self.quota is not None:
                    count, window = self.quota
                    while self._accepted and self._accepted[0] <= now - window:
                        self._accepted.popleft()
                    if len(self._accepted) >= count:
                        self.throttled += 1
                        wait = max(1, math.ceil(self._accepted[0] + window - now))
                        self._answer(429, rid, {"errorCode": 429001, "message": "Operations are being throttled"},
                                     retry_after=wait)
                        return
                    self._accepted.append(now)
                op = str(uuid.uuid4())
                self._ops[op] = reg_id
            self._answer(202, rid, {"operationId": op, "status": "assigning"}, retry_after=self.retry_after)
        elif msg.topic.startswith(STATUS):
            op = p.get("operationId", "")
            with self._lock:
                reg_id = self._ops.pop(op, None)
                if reg_id is not None:
                    self.registered[reg_id] += 1
            if reg_id is None:
                self._answer(404, rid, {"errorCode": 404001, "message": "operation not found"})
                return
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            self._answer(200, rid, {"operationId": op, "status": "assigned", "registrationState": {
                "registrationId": reg_id, "createdDateTimeUtc": stamp, "assignedHub": self.host, "deviceId": reg_id,
                "status": "assigned", "substatus": "initialAssignment", "lastUpdatedDateTimeUtc": stamp,
                "etag": f'"{uuid.uuid4()}"'}})
