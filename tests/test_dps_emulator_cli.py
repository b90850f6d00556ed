"""`flasher simulate dps` exposes the emulator's knobs: --https, --hub-name, --throttle*, --registration-quota,
and refuses bad values in one line with exit 2."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from fixtures_dps import ENROLLMENTS, DpsHttps, free_loopback, group_device_key

FLASHER = [sys.executable, "-m", "flasher"]


@pytest.fixture
def enrollments_file(tmp_path):
    path = tmp_path / "enrollments.json"
    path.write_text(json.dumps(ENROLLMENTS))
    return path


@pytest.mark.parametrize("args, names", [
    (["--registration-quota", "fast"], "--registration-quota 'fast'"),
    (["--registration-quota", "0/min"], "--registration-quota '0/min'"),
    (["--throttle-retry-after", "5"], "--throttle-retry-after"),
    (["--throttle", "-1"], "--throttle"),
    (["--throttle", "1", "--throttle-status", "404"], "--throttle-status"),
])
def test_bad_options_are_one_line_errors(cli, enrollments_file, tmp_path, args, names):
    code, out, err = cli("simulate", "dps", "--enrollments", enrollments_file, "--host", free_loopback(),
                         "--cert-dir", tmp_path / "certs", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and names in err and err.count("\n") == 1 and "Traceback" not in err


def test_simulate_dps_with_https_hub_name_throttle_and_quota(enrollments_file, tmp_path):
    from fixtures_dps import _may_bind

    if not _may_bind(443):
        pytest.skip("binding port 443 needs root or CAP_NET_BIND_SERVICE (CI has it)")
    host, state_file = free_loopback((8883, 443)), tmp_path / "state.json"
    proc = subprocess.Popen(FLASHER + ["simulate", "dps", "--enrollments", str(enrollments_file), "--host", host,
                                       "--cert-dir", str(tmp_path / "certs"), "--state", str(state_file), "--https",
                                       "--hub-name", "hub.emulator.test", "--throttle", "1",
                                       "--throttle-retry-after", "7", "--registration-quota", "2/min"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        ca = proc.stdout.readline().strip()
        assert ca.endswith(".pem"), proc.stderr.read() if proc.poll() is not None else ca
        api = DpsHttps(SimpleNamespace(host=host, websocket_port=443, ca_cert_path=ca))
        rid, key = "2cf7f1202490cc01", group_device_key("2cf7f1202490cc01")
        status, headers, body = api.register(rid, key)
        assert status == 429 and headers["retry-after"] == "7" and body["errorCode"] == 429001  # --throttle 1
        status, _, body = api.register_and_wait(rid, key)
        assert status == 200 and body["registrationState"]["assignedHub"] == "hub.emulator.test"
        assert api.register(rid, key)[0] == 202  # the quota's second
        status, headers, body = api.register(rid, key)
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 60 and body["errorCode"] == 429001
        state = json.loads(state_file.read_text())
        assert state["hub"] == "hub.emulator.test" and state["registration_quota"] == "2/min"
        assert (state["stats"]["throttled"], state["stats"]["quota_throttled"]) == (1, 1)
        assert state["stats"]["https_requests"] >= 5
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "HTTPS" in err and "registration quota 2/min" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
