"""Start and stop a real Mosquitto process for tests (shared by tests/conftest.py and the
security tests' TLS broker)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(conf: Path, host: str, probe_port: int, log_path: Path,
                    timeout_s: float = 10.0) -> subprocess.Popen[bytes]:
    """Run ``mosquitto -c conf``; return once ``probe_port`` accepts connections. Raises
    RuntimeError with mosquitto's own output if it exits or does not listen in time."""
    assert MOSQUITTO is not None
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            log = log_path.read_text() if log_path.exists() else ""
            raise RuntimeError(f"mosquitto exited with {proc.returncode}: {err}{log}")
        with contextlib.suppress(OSError), socket.create_connection((host, probe_port),
                                                                    timeout=0.2):
            return proc
        time.sleep(0.02)
    stop_process(proc)
    raise RuntimeError(f"mosquitto did not listen on {probe_port} within {timeout_s} s")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM (mosquitto saves sessions and queued messages), SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
