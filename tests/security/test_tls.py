"""TLS on the production listener, the test-CA script, and static checks of hems.conf."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest

from .broker import CONF, MAKE_CA, SecureBroker
from .wire import client, publish_all, read_until


@pytest.mark.parametrize("hostname", ["127.0.0.1", "localhost"])
async def test_client_trusting_the_ca_connects_over_tls(secure_broker: SecureBroker,
                                                        hostname: str) -> None:
    b = secure_broker
    msg = ("hems/v1/home-1/state", b'{"over":"tls"}')
    async with client(b, "dashboard", tls=True, hostname=hostname) as dash, \
            client(b, "home-1", tls=True, hostname=hostname) as gw:
        await dash.subscribe("hems/v1/+/state", qos=1)
        await publish_all(gw, [msg])
        assert await read_until(dash, {msg}) == [msg]


async def test_client_without_the_ca_is_refused_by_its_own_verification(
        secure_broker: SecureBroker) -> None:
    # ca_file="" = the system trust store, which does not know the test CA
    with pytest.raises(aiomqtt.MqttError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        async with client(secure_broker, "home-1", tls=True, ca_file=""):
            pass


def test_wrong_hostname_fails_verification(secure_broker: SecureBroker) -> None:
    """The broker's certificate names localhost and 127.0.0.1 only: a client that expects
    another name (e.g. DNS pointing at the wrong box) must refuse it."""
    ctx = ssl.create_default_context(cafile=str(secure_broker.ca_file))
    with socket.create_connection(("127.0.0.1", secure_broker.tls_port), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        ctx.wrap_socket(raw, server_hostname="broker.example.net")
    # control: the same context with the right name completes the handshake
    with socket.create_connection(("127.0.0.1", secure_broker.tls_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


# A minimal MQTT 3.1.1 CONNECT (client id "x", clean session, no credentials).
_CONNECT = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 60, 0, 1]) + b"x"


def _read_all(sock: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything until the peer closes; a reset counts as a close."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_plain_mqtt_is_not_spoken_on_the_tls_port(secure_broker: SecureBroker) -> None:
    with socket.create_connection(("127.0.0.1", secure_broker.tls_port), timeout=5) as s:
        s.sendall(_CONNECT)
        reply = _read_all(s)  # the broker closes the connection (a TLS alert at most)
    assert not reply.startswith(b"\x20"), "the TLS listener answered a plain CONNECT"
    # control: the loopback listener does answer it (CONNACK "not authorised", code 5)
    with socket.create_connection(("127.0.0.1", secure_broker.plain_port), timeout=5) as s:
        s.sendall(_CONNECT)
        assert _read_all(s)[:4] == bytes([0x20, 2, 0, 5])


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
        broker_factory: Callable[..., SecureBroker]) -> None:
    b = broker_factory(mutual_tls=True)
    ctx = ssl.create_default_context(cafile=str(b.ca_file))
    # TLS 1.3: the handshake "completes" on the client side; the server then refuses (an
    # alert or a bare close) instead of ever answering the CONNECT
    with socket.create_connection(("127.0.0.1", b.tls_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls, \
            pytest.raises(ssl.SSLError):
        tls.sendall(_CONNECT)
        _read_all(tls)
    # control: the same client with its certificate gets the MQTT answer (CONNACK, here
    # "not authorised" since this raw CONNECT carries no password)
    ctx.load_cert_chain(b.tls_dir / "home-1.crt", b.tls_dir / "home-1.key")
    with socket.create_connection(("127.0.0.1", b.tls_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(_CONNECT)
        assert _read_all(tls)[:4] == bytes([0x20, 2, 0, 5])
    crt, key = b.tls_dir / "home-1.crt", b.tls_dir / "home-1.key"
    msg = ("hems/v1/home-1/state", b"{}")
    async with client(b, "dashboard", tls=True, certfile=str(crt), keyfile=str(key)) as dash, \
            client(b, "home-1", tls=True, certfile=str(crt), keyfile=str(key)) as gw:
        await dash.subscribe("hems/v1/+/state", qos=1)
        await publish_all(gw, [msg])
        assert await read_until(dash, {msg}) == [msg]


# --- the production config, read as text ------------------------------------------------------


def _directives(text: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value.strip()))
    return out


def test_production_config_shape() -> None:
    d = _directives(CONF.read_text())
    keys = dict(d)
    assert keys["allow_anonymous"] == "false"
    assert keys["per_listener_settings"] == "false"
    assert keys["persistence"] == "true"
    assert keys["password_file"] and keys["acl_file"]
    assert int(keys["max_queued_messages"]) > 0 and int(keys["max_inflight_messages"]) > 0
    # Split into listener blocks: every listener without a certificate is loopback-only.
    blocks: list[list[tuple[str, str]]] = []
    for k, v in d:
        if k == "listener":
            blocks.append([(k, v)])
        elif blocks:
            blocks[-1].append((k, v))
    assert len(blocks) == 2
    for blk in blocks:
        opts = dict(blk)
        if "certfile" in opts:
            assert opts["tls_version"] in ("tlsv1.2", "tlsv1.3")
            assert opts.get("require_certificate", "false") in ("true", "false")
        else:
            assert opts["listener"].split()[1:] == ["127.0.0.1"], blk
    # Never a secret in the config itself.
    assert not re.search(r"(?i)password\s+\S", CONF.read_text().replace("password_file", ""))


# --- systemd/make-test-ca.sh ------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@needs_openssl
def test_make_test_ca_is_idempotent_and_keeps_keys_private(tmp_path: Path) -> None:
    d = tmp_path / "tls"
    run = [str(MAKE_CA), "-d", str(d), "home-1"]
    subprocess.run(["bash", *run], check=True, capture_output=True, timeout=60)
    first = _digest(d)
    out = subprocess.run(["bash", *run], check=True, capture_output=True, text=True, timeout=60)
    assert _digest(d) == first and out.stdout == ""  # nothing re-made, nothing said
    for key in d.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert (d / ".gitignore").read_text().splitlines()[-1] == "*"
    for crt in ("server.crt", "home-1.crt"):
        subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), str(d / crt)],
                       check=True, capture_output=True, timeout=30)
    # A new name list re-issues the broker certificate only, under the same CA.
    subprocess.run(["bash", str(MAKE_CA), "-d", str(d), "-n", "broker.lan", "-n", "127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    after = _digest(d)
    assert after["ca.crt"] == first["ca.crt"] and after["ca.key"] == first["ca.key"]
    assert after["server.crt"] != first["server.crt"]
    assert after["home-1.crt"] == first["home-1.crt"]
    san = subprocess.run(["openssl", "x509", "-in", str(d / "server.crt"), "-noout", "-ext",
                          "subjectAltName"], check=True, capture_output=True, text=True).stdout
    assert "DNS:broker.lan" in san and "127.0.0.1" in san and "localhost" not in san


@needs_openssl
def test_make_test_ca_refuses_a_bad_client_name(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(MAKE_CA), "-d", str(tmp_path / "x"), "../evil"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "client name" in r.stderr
    assert not (tmp_path / "evil.key").exists()


def test_default_output_directory_is_git_ignored() -> None:
    """Keys made with the default directory (var/tls) must never be committable."""
    repo = MAKE_CA.parents[1]
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    r = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "var/tls/ca.key"],
                       capture_output=True, timeout=30)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, "var/tls/ is not git-ignored: add /var/ to .gitignore"
