"""Fixtures for the driver tests (helpers live in modbus_servers.py, a uniquely named module,
so that ``import`` from a test never picks up another directory's conftest)."""

from modbus_servers import serve

__all__ = ["serve"]
