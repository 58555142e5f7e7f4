"""systemd's notify protocol (sd_notify(3)) with the standard library.

The protocol: send a datagram of newline-separated ``KEY=VALUE`` assignments to the AF_UNIX
socket named by ``$NOTIFY_SOCKET``. A name starting with ``@`` is in the Linux abstract
namespace (the ``@`` becomes a NUL byte). Without ``$NOTIFY_SOCKET`` (not run by systemd, or
``Type=`` is not ``notify``) every call is a no-op. ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, if
set, must be our pid) gives the watchdog period; systemd expects ``WATCHDOG=1`` well within it,
conventionally every half period.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd; every method is a cheap no-op outside systemd."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        e = os.environ if env is None else env
        self.address: str | None = e.get("NOTIFY_SOCKET") or None
        self._sock: socket.socket | None = None
        self.watchdog_s: float | None = None
        usec = e.get("WATCHDOG_USEC")
        pid = e.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                v = int(usec)
                self.watchdog_s = v / 1e6 if v > 0 else None
            except ValueError:
                log.warning("sd_notify: ignoring bad WATCHDOG_USEC=%r", usec)
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            return b"\0" + self.address[1:].encode()
        return self.address

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines (e.g. ``"READY=1"``, ``"STATUS=..."``); True if sent."""
        if self.address is None:
            return False
        if self.address[0] not in "/@":
            log.warning("sd_notify: unsupported NOTIFY_SOCKET %r", self.address)
            self.address = None
            return False
        msg = "\n".join(assignments).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self._target())
            self.sent += 1
            return True
        except OSError as e:
            # Never let the notification channel take the daemon down; systemd will notice.
            self.failed += 1
            if self.failed == 1:
                log.warning("sd_notify to %s failed: %s", self.address, e)
            return False

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
