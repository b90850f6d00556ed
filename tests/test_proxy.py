"""DPS and the hub through a proxy: the real SDK, a real HTTP CONNECT (or SOCKS5) proxy, the emulator.

The emulator answers as ``dps.flasher.test``, a name this machine cannot resolve (``.test``
is reserved, RFC 2606); only the proxy knows where it is. So a registration that works went
through the proxy, and the proxy's log shows each tunnel (DPS, then the hub).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import urllib.parse

import pytest
from fixtures_dps import GROUP_PRIMARY, ID_SCOPE, free_loopback, group_device_key, leftover_threads, wait_for
from proxies import HttpConnectProxy, Socks5Proxy

from flasher.childenv import child_env
from flasher.dps import DpsError, Transport, register_device
from flasher.errors import InputError
from flasher.proxy import parse_proxy
from flasher.secrets import MASK, Redactor

NAME = "dps.flasher.test"
PASSWORD = "p@ss:Q7"  # short (the log masker's literal rule starts at 8), with characters a URL must escape
IN_URL = urllib.parse.quote(PASSWORD, safe="")


def password_forms() -> set[str]:
    return {PASSWORD, IN_URL, base64.b64encode(f"bench:{PASSWORD}".encode()).decode()}


@pytest.fixture
def named(make_dps_emulator):
    """An emulator known as NAME, on 443 only, and the address the proxies resolve NAME to."""
    emu = make_dps_emulator(hub_name=NAME, port=None, websocket_port=443)
    return emu, {NAME: emu.host}


@pytest.fixture
def http_proxy(named):
    emu, hosts = named
    proxies = []

    def make(**kwargs):
        p = HttpConnectProxy(free_loopback(0), hosts=hosts, **kwargs).start()
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.stop()



def register(emu, rid, transport, **kwargs):
    return register_device(rid, group_device_key(rid), id_scope=ID_SCOPE, dps_host=NAME, ca_cert=emu.ca_cert_path,
                           transport=transport, timeout=30, **kwargs)


# --- through the proxy ----------------------------------------------------------------------

def test_dps_and_the_hub_both_go_through_an_open_connect_proxy(named, http_proxy):
    emu, _ = named
    proxy = http_proxy()
    reg = register(emu, "2cf7f120249b0001", Transport(websockets=True, proxy=parse_proxy(proxy.url, "--proxy")))
    assert reg.assigned_hub == NAME
    log = proxy.log()
    assert [(t["target"], t["status"], t["user"]) for t in log] == [(f"{NAME}:443", "200", None)] * 2  # DPS, hub
    assert all(t["sent"] > 0 and t["received"] > 0 for t in log)
    assert [m["payload"] for m in emu.state()["messages"] if m["device_id"] == "2cf7f120249b0001"] == ["TestMessage"]


def test_without_the_proxy_the_name_does_not_even_resolve(named):
    emu, _ = named
    with pytest.raises(DpsError) as info:
        register(emu, "2cf7f120249b0002", Transport(websockets=True))
    assert info.value.kind == "unreachable" and "cannot resolve" in str(info.value)


def test_credentials_from_a_file_through_the_cli(named, http_proxy, cli, tmp_path, monkeypatch):
    emu, _ = named
    proxy = http_proxy(username="bench", password=PASSWORD)
    (tmp_path / "proxy-password").write_text(PASSWORD + "\n")
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    code, out, err = cli("-vv", "register", "2cf7f120249b0003", "--id-scope", ID_SCOPE, "--dps-host", NAME, "--ca-cert",
                         emu.ca_cert_path, "--websockets", "--proxy", f"http://bench@{proxy.address}",
                         "--proxy-password-file", tmp_path / "proxy-password", "--json")
    assert code == 0, err
    assert json.loads(out)["assigned_hub"] == NAME
    assert [(t["status"], t["user"]) for t in proxy.log()] == [("200", "bench")] * 2
    assert "DEBUG azure.iot.device" in err and "Setting custom proxy options" in err  # -vv: the SDK's own logs
    assert not any(form in out + err for form in password_forms())


def test_a_407_is_one_line_naming_the_proxy_and_no_retry(named, http_proxy, cli, tmp_path, monkeypatch):
    emu, _ = named
    proxy = http_proxy(username="bench", password="the right one")
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    monkeypatch.setenv("FLASHER_PROXY_PASSWORD", PASSWORD)
    code, out, err = cli("register", "2cf7f120249b0004", "--id-scope", ID_SCOPE, "--dps-host", NAME, "--ca-cert",
                         emu.ca_cert_path, "--websockets", "--proxy", f"http://bench@{proxy.address}")
    assert code == 1 and out == ""
    assert err == (f"error: registration '2cf7f120249b0004' at {NAME}: proxy http://bench@{proxy.address} refused the "
                   f"user name or password (407 Proxy Authentication Required)\n")
    assert [t["status"] for t in proxy.log()] == ["407"]  # asked once, not in a loop
    assert emu.state()["stats"]["websocket_connections"] == 0


def test_a_407_without_credentials_says_how_to_give_them(named, http_proxy):
    emu, _ = named
    proxy = http_proxy(username="bench", password=PASSWORD)
    baseline = set(threading.enumerate())
    with pytest.raises(DpsError) as info:
        register(emu, "2cf7f120249b0005", Transport(websockets=True, proxy=parse_proxy(proxy.url, "--proxy")))
    assert info.value.kind == "proxy" and "wants a user name and password (407" in str(info.value)
    assert "--proxy-password-file" in str(info.value)
    assert wait_for(lambda: not leftover_threads(baseline)), leftover_threads(baseline)


def test_a_proxy_answering_401_like_tinyproxy_is_a_refused_password_too(named, http_proxy):
    emu, _ = named
    proxy = http_proxy(username="bench", password=PASSWORD, auth_status="401 Unauthorized")
    wrong = parse_proxy(f"http://bench:nope@{proxy.address}", "--proxy")
    with pytest.raises(DpsError) as info:
        register(emu, "2cf7f120249b000c", Transport(websockets=True, proxy=wrong))
    assert str(info.value).endswith(f"proxy http://bench@{proxy.address} refused the user name or password "
                                    f"(401 Unauthorized)")
    assert [t["status"] for t in proxy.log()] == ["401"]


def test_a_proxy_that_only_allows_443_is_explained(make_dps_emulator, http_proxy):
    emu = make_dps_emulator(hub_name=NAME, websocket_port=443)  # 8883 open too
    host = emu.host
    proxy = http_proxy(allow_ports={443})
    proxy.hosts[NAME] = host
    with pytest.raises(DpsError) as info:
        register(emu, "2cf7f120249b0006", Transport(proxy=parse_proxy(proxy.url, "--proxy")))
    assert str(info.value) == (f"registration '2cf7f120249b0006' at {NAME}: proxy {proxy.url} refused the tunnel to "
                               f"{NAME}:8883 (403 Forbidden); proxies often allow only port 443: try --websockets")
    assert register(emu, "2cf7f120249b0006", Transport(websockets=True, proxy=parse_proxy(proxy.url, "--proxy")))


def test_socks5_with_a_user_name_and_password(named):
    emu, hosts = named
    with Socks5Proxy(free_loopback(0), username="bench", password=PASSWORD, hosts=hosts) as proxy:
        url = f"socks5://bench:{IN_URL}@{proxy.address}"
        assert register(emu, "2cf7f120249b0007", Transport(websockets=True, proxy=parse_proxy(url, "$HTTPS_PROXY")))
        assert [(t["target"], t["status"], t["user"]) for t in proxy.log()] == [(f"{NAME}:443", "granted", "bench")] * 2
        wrong = parse_proxy(f"socks5://bench:nope@{proxy.address}", "--proxy")
        with pytest.raises(DpsError) as info:
            register(emu, "2cf7f120249b0008", Transport(websockets=True, proxy=wrong))
        assert str(info.value).endswith(f"proxy socks5://bench@{proxy.address} refused the user name or password "
                                        f"(SOCKS5 authentication failed)")


# --- HTTPS_PROXY, NO_PROXY, --proxy none ------------------------------------------------------

def test_https_proxy_from_the_environment_with_its_password(named, http_proxy, cli, monkeypatch):
    emu, _ = named
    proxy = http_proxy(username="bench", password=PASSWORD)
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    monkeypatch.setenv("HTTPS_PROXY", f"http://bench:{IN_URL}@{proxy.address}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    args = ("register", "2cf7f120249b0009", "--id-scope", ID_SCOPE, "--dps-host", NAME, "--ca-cert", emu.ca_cert_path,
            "--websockets", "--no-test-message")
    code, out, err = cli("-vv", *args)
    assert code == 0, err
    assert [t["user"] for t in proxy.log()] == ["bench"]
    assert "DEBUG azure.iot.device" in err
    assert not any(form in out + err for form in password_forms())
    # NO_PROXY sends it direct (and the name does not resolve without the proxy), as --proxy none does
    monkeypatch.setenv("NO_PROXY", "localhost,.flasher.test")
    code, out, err = cli(*args)
    assert code == 1 and "cannot resolve the host name" in err
    monkeypatch.delenv("NO_PROXY")
    code, out, err = cli(*args, "--proxy", "none")
    assert code == 1 and "cannot resolve the host name" in err
    assert len(proxy.log()) == 1


def test_https_proxy_never_takes_loopback_hosts(dps_emulator, cli, monkeypatch):
    with HttpConnectProxy(free_loopback(0)) as proxy:
        monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        code, out, err = cli("register", "2cf7f120249b000a", "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host,
                             "--ca-cert", dps_emulator.ca_cert_path, "--no-test-message")
        assert code == 0, err
        assert proxy.log() == []
        # --proxy means it, even for loopback
        code, out, err = cli("register", "2cf7f120249b000a", "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host,
                             "--ca-cert", dps_emulator.ca_cert_path, "--no-test-message", "--proxy", proxy.url)
        assert code == 0, err
        assert [t["target"] for t in proxy.log()] == [f"{dps_emulator.host}:8883"]


# --- the URL, its password, and where it must never show -------------------------------------

@pytest.mark.parametrize("text, url, user, password", [
    ("http://proxy.corp:3128", "http://proxy.corp:3128", None, None),
    ("proxy.corp:3128", "http://proxy.corp:3128", None, None),
    ("http://proxy.corp", "http://proxy.corp:8080", None, None),
    ("socks5h://bench@10.0.0.1", "socks5h://bench@10.0.0.1:1080", "bench", None),
    (f"http://bench:{IN_URL}@[::1]:3128/", "http://bench@[::1]:3128", "bench", PASSWORD),
])
def test_proxy_urls(text, url, user, password):
    p = parse_proxy(text, "--proxy")
    assert p is not None and str(p) == url and p.username == user
    assert (p.password.reveal() if p.password else None) == password
    assert PASSWORD not in repr(p) and IN_URL not in repr(p)


@pytest.mark.parametrize("text, fragment", [
    ("https://proxy.corp:3128", "TLS to the proxy itself is not supported"),
    ("ftp://proxy.corp:21", "the scheme must be http, socks5 or socks5h"),
    (f"http://bench:{IN_URL}@proxy.corp:99999", "Port out of range"),
    (f"http://bench:{IN_URL}@proxy.corp:31a8", "not a proxy URL"),
    ("http://proxy.corp:3128/path", "no path, query or fragment"),
    (f"http://:{IN_URL}@proxy.corp:3128", "a password without a user name"),
    ("http://", "no host"),
])
def test_bad_proxy_urls_never_echo_the_password(text, fragment):
    with pytest.raises(InputError) as info:
        parse_proxy(text, "--proxy")
    message = str(info.value)
    assert message.startswith("--proxy") and fragment in message and "\n" not in message
    assert PASSWORD not in message and IN_URL not in message


def test_a_bad_proxy_is_exit_2_before_anything_is_sent(dps_emulator, cli, monkeypatch):
    monkeypatch.setenv("FLASHER_GROUP_PRIMARY_KEY", GROUP_PRIMARY)
    monkeypatch.setenv("HTTPS_PROXY", f"https://bench:{IN_URL}@proxy.corp:3128")
    before = dps_emulator.state()["stats"]
    code, out, err = cli("register", "2cf7f120249b000b", "--id-scope", ID_SCOPE, "--dps-host", dps_emulator.host)
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert err.startswith("error: $HTTPS_PROXY 'https://bench:********@proxy.corp:3128': the scheme must be")
    assert dps_emulator.state()["stats"] == before


def test_a_password_in_flasher_toml_is_refused_and_a_reference_is_used(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    (tmp_path / "flasher.toml").write_text(f'proxy = "http://bench:{IN_URL}@proxy.corp:3128"\n')
    code, out, err = cli("config")
    assert code == 2 and "'proxy' holds a password inline" in err and "proxy_password_file" in err
    assert IN_URL not in err and PASSWORD not in err
    (tmp_path / "pw").write_text(PASSWORD)
    (tmp_path / "flasher.toml").write_text('proxy = "http://bench@proxy.corp:3128"\nproxy_password_file = "pw"\n'
                                           "websockets = true\n")
    code, out, err = cli("config", "--json")
    rows = {r["name"]: r for r in map(json.loads, out.splitlines())}
    assert code == 0, err
    assert rows["proxy"]["value"] == "http://bench@proxy.corp:3128" and rows["websockets"]["value"] is True
    assert rows["proxy_password"] == {"name": "proxy_password", "value": "(secret)",
                                      "source": f"{tmp_path / 'pw'} (flasher.toml proxy_password_file)"}


def test_the_command_line_password_warns_and_is_masked_in_every_log_record(monkeypatch, tmp_path):
    import flasher.commands.options as options
    from flasher.settings import resolve

    warnings: list[str] = []
    monkeypatch.setattr(options, "err", warnings.append)
    monkeypatch.delenv("FLASHER_PROXY_PASSWORD", raising=False)
    s = resolve({"proxy": f"http://bench:{IN_URL}@proxy.corp:3128"}, ["proxy", "websockets"], cwd=str(tmp_path))
    transport = options.transport_from(s)
    assert transport.proxy is not None and transport.proxy.password.reveal() == PASSWORD
    assert warnings == ["warning: the password in --proxy is visible in the process list; prefer --proxy-password-file "
                        "or $FLASHER_PROXY_PASSWORD"]
    # whatever logger writes the URL (the SDK, urllib3, ours), the filter masks its password, short as it is
    record = logging.LogRecord("paho", logging.DEBUG, __file__, 1, "dialing %s", (f"http://bench:{IN_URL}@x:1",), None)
    Redactor().filter(record)
    assert record.getMessage() == f"dialing http://bench:{MASK}@x:1"


def test_children_never_see_a_proxy_password():
    env = child_env({"HTTPS_PROXY": f"http://bench:{IN_URL}@proxy.corp:3128", "http_proxy": "http://open.proxy:3128",
                     "ALL_PROXY": "bench:secret@socks.corp:1080", "PATH": "/usr/bin"})
    assert env == {"http_proxy": "http://open.proxy:3128", "PATH": "/usr/bin"}
