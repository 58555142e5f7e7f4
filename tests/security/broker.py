"""A real Mosquitto running the PRODUCTION configuration of ``systemd/mosquitto/``.

The fixture reads ``systemd/mosquitto/hems.conf`` and changes only what cannot be the same in a
test: the two listener ports (free loopback ports) and the ``/etc/mosquitto/hems/`` directory (a
temp dir holding the password file, the ACL and the certificates), plus what Debian's main
``mosquitto.conf`` would add (persistence location, log file). The ACL is the repository's
``systemd/mosquitto/acl`` plus the per-site Home Assistant lines its README tells an installer
to add. Certificates come from ``systemd/make-test-ca.sh``. Passwords are random, written only to
files in the temp dir (plain ``user:password`` mode 0600, then hashed in place by
``mosquitto_passwd -U``): never on a command line, never logged.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from broker_process import start_mosquitto, stop_process

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "systemd" / "mosquitto" / "hems.conf"
ACL = REPO / "systemd" / "mosquitto" / "acl"
MAKE_CA = REPO / "systemd" / "make-test-ca.sh"
ETC = "/etc/mosquitto/hems/"

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/bin/mosquitto_passwd" if os.path.exists("/usr/bin/mosquitto_passwd") else None)

SITES = ("home-1", "home-2")
SERVICE_USERS = ("dso", "market-operator", "dashboard")


def site_acl_lines(site: str) -> str:
    """The per-site lines README.md ("Add a site") has an installer append to the ACL."""
    node = site.replace("-", "_")
    return f"\nuser {site}\ntopic write homeassistant/+/hems_{node}/+/config\n"


def adapt_config(text: str, workdir: Path, plain_port: int, tls_port: int) -> str:
    """The production config with test ports and paths. Fails loudly if the production file
    no longer has what is being replaced, so the test cannot drift from it unnoticed."""
    subs = [
        (r"(?m)^listener 1883 127\.0\.0\.1$", f"listener {plain_port} 127.0.0.1"),
        (r"(?m)^listener 8883$", f"listener {tls_port} 127.0.0.1"),
        (re.escape(ETC), f"{workdir}/"),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        assert n >= 1, f"hems.conf no longer matches {pattern!r}"
    # What Debian's /etc/mosquitto/mosquitto.conf supplies around the drop-in:
    text += (f"\npersistence_location {workdir}/\nlog_dest file {workdir}/mosquitto.log\n")
    if os.geteuid() == 0:
        text += "user root\n"  # else mosquitto drops to user 'mosquitto', who cannot read tmp
    return text


@dataclass
class SecureBroker:
    """Mosquitto with the production config, its users and their (random) passwords."""

    workdir: Path
    plain_port: int
    tls_port: int
    passwords: dict[str, str]
    ca_file: Path
    tls_dir: Path
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self, timeout_s: float = 10.0) -> None:
        # Both listeners are open before the broker accepts on either: probing the plain one
        # is enough (and leaves no TLS handshake error in the log).
        self.proc = start_mosquitto(self.workdir / "mosquitto.conf", self.host, self.plain_port,
                                    self.log_path, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s)
        self.proc = None
