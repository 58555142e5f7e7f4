"""Fixtures: the test CA (made by ``systemd/make-test-ca.sh``) and a real Mosquitto running the
production configuration of ``systemd/mosquitto/`` (see ``broker.py``)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from broker_process import MOSQUITTO, free_port

from .broker import (
    ACL,
    CONF,
    MAKE_CA,
    MOSQUITTO_PASSWD,
    SERVICE_USERS,
    SITES,
    SecureBroker,
    adapt_config,
    site_acl_lines,
)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a broker certificate for localhost/127.0.0.1 and a client certificate for home-1,
    made by the repository's script (once per session)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["bash", str(MAKE_CA), "-d", str(d), "home-1"], check=True,
                   capture_output=True, timeout=60)
    return d


@pytest.fixture
def broker_factory(tmp_path: Path, test_ca: Path) -> Iterator[Callable[..., SecureBroker]]:
    """Makes running brokers with the production config; ``mutual_tls`` and
    ``username_as_clientid`` turn on the config's commented-out options of those names."""
    if MOSQUITTO is None or MOSQUITTO_PASSWD is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    made: list[SecureBroker] = []

    def make(mutual_tls: bool = False, username_as_clientid: bool = False) -> SecureBroker:
        workdir = tmp_path / f"broker{len(made)}"
        workdir.mkdir(mode=0o700)
        certs = workdir / "certs"
        certs.mkdir(mode=0o700)
        for name in ("ca.crt", "server.crt", "server.key"):
            shutil.copy2(test_ca / name, certs / name)

        passwords = {u: secrets.token_urlsafe(18) for u in (*SITES, *SERVICE_USERS)}
        pw = workdir / "passwd"
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{u}:{p}\n" for u, p in passwords.items())
        subprocess.run([str(MOSQUITTO_PASSWD), "-U", str(pw)], check=True, capture_output=True,
                       timeout=30)
        assert not any(p in pw.read_text() for p in passwords.values()), "passwords not hashed"

        (workdir / "acl").write_text(ACL.read_text() + "".join(site_acl_lines(s) for s in SITES))
        plain_port, tls_port = free_port(), free_port()
        while tls_port == plain_port:
            tls_port = free_port()
        text = adapt_config(CONF.read_text(), workdir, plain_port, tls_port)
        for wanted, option in ((mutual_tls, "require_certificate true"),
                               (username_as_clientid, "use_username_as_clientid true")):
            if wanted:
                assert f"\n#{option}\n" in text, f"hems.conf lost its '#{option}' line"
                text = text.replace(f"\n#{option}\n", f"\n{option}\n")
        (workdir / "mosquitto.conf").write_text(text)
        broker = SecureBroker(workdir=workdir, plain_port=plain_port, tls_port=tls_port,
                              passwords=passwords, ca_file=certs / "ca.crt", tls_dir=test_ca)
        made.append(broker)
        broker.start()
        return broker

    yield make
    for b in made:
        b.stop()
    for b in made:  # secrets never in the broker's log (it logs every login, with usernames)
        log = b.log_path.read_text()
        assert "running" in log, "the broker log was not written"
        leaked = [u for u, p in b.passwords.items() if p in log]
        assert not leaked, f"password(s) of {leaked} appear in the broker log"


@pytest.fixture
def secure_broker(broker_factory: Callable[..., SecureBroker]) -> SecureBroker:
    """A running Mosquitto with the production config (plain loopback + TLS listener)."""
    return broker_factory()
