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

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "systemd" / "mosquitto" / "hems.conf"
ACL = REPO / "systemd" / "mosquitto" / "acl"
MAKE_CA = REPO / "systemd" / "make-test-ca.sh"
ETC = "/etc/mosquitto/hems/"

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or (
    "/usr/bin/mosquitto_passwd" if os.path.exists("/usr/bin/mosquitto_passwd") else None)

SITES = ("home-1", "home-2")
SERVICE_USERS = ("dso", "market-operator", "dashboard")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}{log}")
            # Both listeners are open before the broker accepts on either: probing the plain
            # one is enough (and leaves no TLS handshake error in the log).
            with contextlib.suppress(OSError), socket.create_connection(
                    (self.host, self.plain_port), timeout=0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.proc = None
