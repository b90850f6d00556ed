"""`flasher keys`, run as a real process: formats, inputs, errors, streaming, secrecy, and
agreement with an independent HMAC (openssl)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import select
import shutil
import subprocess
import sys

import pytest

GOLDEN_GROUP_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
GOLDEN_ID = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
GOLDEN_DEVICE_KEY = "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
SECONDARY = base64.b64encode(bytes(range(32, 96))).decode()  # a valid 64-byte key, not a real one
FLASHER = [sys.executable, "-m", "flasher"]


def env_with(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHER_")}
    env.update(extra)
    return env


PRIMARY_ENV = env_with(FLASHER_GROUP_PRIMARY_KEY=GOLDEN_GROUP_KEY)
BOTH_ENV = env_with(FLASHER_GROUP_PRIMARY_KEY=GOLDEN_GROUP_KEY, FLASHER_GROUP_SECONDARY_KEY=SECONDARY)


def run(args, env=PRIMARY_ENV, input=None, cwd=None):
    return subprocess.run([*FLASHER, *args], capture_output=True, text=True, env=env, input=input, cwd=cwd, timeout=120)


def openssl_device_key(group_key_b64: str, registration_id: str) -> str:
    """The derivation done by openssl alone: HMAC-SHA256 keyed by the decoded group key."""
    hexkey = base64.b64decode(group_key_b64).hex()
    r = subprocess.run(["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{hexkey}", "-binary"],
                       input=registration_id.encode("utf-8"), capture_output=True, timeout=30, check=True)
    return base64.b64encode(r.stdout).decode()


def test_golden_vector_text():
    r = run(["keys", GOLDEN_ID])
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{GOLDEN_ID}\t{GOLDEN_DEVICE_KEY}\n"


def test_agrees_with_openssl_for_many_ids():
    assert shutil.which("openssl"), "this test needs openssl (apt-get install openssl)"
    ids = [f"{i * 0x9E3779B97F4A7C15 % 2**64:016x}" for i in range(1, 41)]
    ids += ["lora-2cf7f12024900138", "a", "x.y:z_w-1", "-", GOLDEN_ID, "0" * 128, "9", "sn-007", "d.e-v", "z-"]
    r = run(["keys", "--format", "csv", *ids], env=BOTH_ENV)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["registration_id"] for row in rows] == ids
    for row in rows:
        rid = row["registration_id"]
        assert row["primary_device_key"] == openssl_device_key(GOLDEN_GROUP_KEY, rid), rid
        assert row["secondary_device_key"] == openssl_device_key(SECONDARY, rid), rid


def test_eui_spellings_become_the_same_id():
    r = run(["keys", "2C:F7:F1:20:24:90:01:38", "2cf7f12024900138", "2C-F7-F1-20-24-90-01-38", "0x2CF7F12024900138",
             "--registration-id-format", "lora-{deveui}"])
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4 and len(set(lines)) == 1 and lines[0].startswith("lora-2cf7f12024900138\t")


def test_csv_and_json_formats():
    r = run(["keys", "--format", "csv", GOLDEN_ID, "abc"], env=BOTH_ENV)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0] == "registration_id,primary_device_key,secondary_device_key"
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows[0]["primary_device_key"] == GOLDEN_DEVICE_KEY and rows[1]["registration_id"] == "abc"
    assert all(row["secondary_device_key"] for row in rows)

    r = run(["keys", "--format", "json", GOLDEN_ID, "abc"])  # no secondary key: null
    assert r.returncode == 0
    objs = [json.loads(line) for line in r.stdout.splitlines()]
    assert objs == [
        {"registration_id": GOLDEN_ID, "primary_device_key": GOLDEN_DEVICE_KEY, "secondary_device_key": None},
        {"registration_id": "abc", "primary_device_key": objs[1]["primary_device_key"], "secondary_device_key": None},
    ]
    r = run(["keys", "--format", "json", "abc"], env=BOTH_ENV)
    assert json.loads(r.stdout)["secondary_device_key"] == openssl_device_key(SECONDARY, "abc")


def test_input_file_and_stdin(tmp_path):
    f = tmp_path / "ids.txt"
    f.write_text(f"{GOLDEN_ID}\n\n  2cf7f12024900138  \n")
    by_file = run(["keys", "--input", str(f)])
    by_stdin = run(["keys", "--input", "-"], input=f.read_text())
    assert by_file.returncode == by_stdin.returncode == 0
    assert by_file.stdout == by_stdin.stdout
    assert [line.split("\t")[0] for line in by_file.stdout.splitlines()] == [GOLDEN_ID, "2cf7f12024900138"]
    both = run(["keys", "first-id", "--input", str(f)])
    assert [line.split("\t")[0] for line in both.stdout.splitlines()] == ["first-id", GOLDEN_ID, "2cf7f12024900138"]


BAD_INPUT = "good-1\nBad Id\ngood-2\n\nends.\ngood-3\n"


def test_on_error_stop_reports_line_number(tmp_path):
    r = run(["keys", "--input", "-"], input=BAD_INPUT)
    assert r.returncode == 1
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == ["good-1"]
    assert r.stderr.startswith("error: line 2: registration id 'Bad Id'") and r.stderr.count("\n") == 1


def test_on_error_skip_reports_each_and_exits_1():
    r = run(["keys", "--input", "-", "--on-error", "skip"], input=BAD_INPUT)
    assert r.returncode == 1
    assert [line.split("\t")[0] for line in r.stdout.splitlines()] == ["good-1", "good-2", "good-3"]
    errors = r.stderr.splitlines()
    assert len(errors) == 2 and errors[0].startswith("error: line 2:") and errors[1].startswith("error: line 5:")


def test_bad_argument_is_named_by_position():
    r = run(["keys", "ok", "NOT OK"])
    assert r.returncode == 1 and r.stderr.startswith("error: argument 2:")


@pytest.mark.parametrize("args,env,match", [
    (["keys"], PRIMARY_ENV, "give ids as arguments or --input FILE"),
    (["keys", "x"], env_with(), "group primary key: missing"),
    (["keys", "x"], env_with(FLASHER_GROUP_PRIMARY_KEY="bm90IGEga2V5"), "group primary key: decodes to 9 bytes"),
    (["keys", "x", "--format", "xml"], PRIMARY_ENV, "'xml' is not one of"),
    (["keys", "x", "--registration-id-format", "{mac}"], PRIMARY_ENV, "must contain {deveui}"),
    (["keys", "--input", "/nonexistent/ids"], PRIMARY_ENV, "/nonexistent/ids"),
])
def test_usage_errors_exit_2(args, env, match):
    r = run(args, env=env)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and r.stdout == ""


def test_group_keys_never_printed_even_verbose(tmp_path):
    keyfile = tmp_path / "group.key"
    keyfile.write_text(GOLDEN_GROUP_KEY + "\n")
    raw_hex = base64.b64decode(GOLDEN_GROUP_KEY).hex()
    for args, env in ((["-vv", "keys", "--group-key-file", str(keyfile), GOLDEN_ID, "bad id!"], env_with()),
                      (["-vv", "keys", "--format", "json", "--on-error", "skip", GOLDEN_ID, "bad id!"], BOTH_ENV)):
        r = run(args, env=env)
        assert r.returncode == 1 and GOLDEN_DEVICE_KEY in r.stdout
        out = r.stdout + r.stderr
        for secret in (GOLDEN_GROUP_KEY, raw_hex, raw_hex.upper(), SECONDARY, GOLDEN_GROUP_KEY[:24], SECONDARY[:24]):
            assert secret not in out


def test_group_key_on_command_line_warns_once():
    r = run(["keys", "--group-key", GOLDEN_GROUP_KEY, GOLDEN_ID, "a", "b"], env=env_with())
    assert r.returncode == 0
    assert r.stderr.count("visible in the process list") == 1
    assert GOLDEN_GROUP_KEY not in r.stderr and r.stdout.count(GOLDEN_DEVICE_KEY) == 1
    quiet = run(["keys", GOLDEN_ID])
    assert quiet.stderr == ""


def test_100000_ids_stream_through(tmp_path):
    src = tmp_path / "ids.txt"
    with src.open("w") as f:
        for i in range(100_000):
            f.write(f"{i:016X}\n")
    out = tmp_path / "keys.csv"
    with out.open("w") as stdout:
        r = subprocess.run([*FLASHER, "keys", "--input", str(src), "--format", "csv"], stdout=stdout,
                           stderr=subprocess.PIPE, text=True, env=BOTH_ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    from flasher.keys import decode_symmetric_key, derive_device_key

    primary = decode_symmetric_key(GOLDEN_GROUP_KEY)
    n = 0
    with out.open() as f:
        assert next(f) == "registration_id,primary_device_key,secondary_device_key\n"
        for n, line in enumerate(f, 1):
            if n in (1, 4242, 100_000):
                rid, p, s = line.rstrip("\n").split(",")
                assert rid == f"{n - 1:016x}" and p == derive_device_key(primary, rid) and s
    assert n == 100_000


def test_output_starts_before_input_ends():
    """Streaming, shown without timing: keys come out while stdin is still open."""
    proc = subprocess.Popen([*FLASHER, "keys", "--input", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=PRIMARY_ENV)
    try:
        proc.stdin.write(b"".join(b"%016x\n" % i for i in range(3000)))  # 51 kB: fits the pipe, output overflows it
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "no output while stdin stays open"
        first = proc.stdout.readline()
        assert first.startswith(b"0000000000000000\t")
        proc.stdin.close()
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
        assert rest.count(b"\n") == 2999
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream and not stream.closed:
                stream.close()
