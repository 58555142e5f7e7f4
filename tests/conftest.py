"""Shared fixtures: a real Mosquitto broker on a free loopback port.

``mosquitto`` gives a running broker (anonymous, persistence on, ``max_queued_messages`` raised so
a test subscriber that falls behind a drain burst loses nothing). It can be stopped and started
again on the same port mid-test (``stop()``, ``start()``, ``kill()``) — persistence keeps the
sessions and queued QoS-1 messages of persistent (``clean_session=False``) subscribers across a
clean stop. ``mosquitto_factory(**options)`` makes more brokers, e.g. with a password file.

Tests that need a broker are skipped when no ``mosquitto`` binary is installed (``.ci/run``
installs it from Debian packages).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from broker_process import MOSQUITTO, free_port, start_mosquitto, stop_process


@dataclass
class Mosquitto:
    """A mosquitto process under test control."""

    workdir: Path
    port: int
    users: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def _write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 0",
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "user root" if os.geteuid() == 0 else "",
        ]
        if self.users:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for u, p in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), u, p], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> None:
        """Start (again) on the same port; return once it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = start_mosquitto(self._write_config(), self.host, self.port, self.log_path,
                                    timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: sessions and queued messages are saved)."""
        stop_process(self.proc, timeout_s)
        self.proc = None

    def kill(self) -> None:
        """Die without saving (SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    made: list[Mosquitto] = []

    def make(users: dict[str, str] | None = None, start: bool = True) -> Mosquitto:
        d = tmp_path / f"mosquitto{len(made)}"
        d.mkdir()
        m = Mosquitto(workdir=d, port=free_port(), users=dict(users or {}))
        made.append(m)
        if start:
            m.start()
        return m

    yield make
    for m in made:
        m.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """A running anonymous Mosquitto on a free 127.0.0.1 port."""
    return mosquitto_factory()
