"""The MQTT contract of one gateway: topics, payload builders, and validation on receipt.

Every payload has a JSON schema in ``gateway/schemas/`` (documented in ``docs/mqtt.md``). The
validator here is deliberately small and typed: it implements the subset of JSON Schema 2020-12
that those files use (type, enum, const, properties, required, additionalProperties, minimum,
maximum, exclusiveMinimum/Maximum, minLength/maxLength, pattern, items, allOf, if/then/else) and
*refuses to load* a schema that uses any other keyword, so a schema can never silently promise a
check that is not made. It avoids a dependency (``jsonschema`` pulls a compiled ``rpds-py``) on
the Pi; the test suite cross-checks it against ``jsonschema`` when that is installed.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

SCHEMA_NAMES = ("telemetry", "state", "availability", "cmd_mode", "cmd_reserve", "cmd_result",
                "envelope_status", "forecast_pv")
ONLINE = "online"
OFFLINE = "offline"

_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "examples", "default"}
_KEYWORDS = {"type", "enum", "const", "properties", "required", "additionalProperties",
             "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
             "maxLength", "pattern", "items", "allOf", "if", "then", "else"}


class SchemaError(Exception):
    """A schema file uses something this validator does not check."""


@dataclass(frozen=True)
class Topics:
    """The versioned topic tree of one site: ``<root>/<site>/...`` (root default ``hems/v1``)."""

    root: str
    site: str

    @property
    def base(self) -> str:
        return f"{self.root}/{self.site}"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/#"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def cmd_result(self, name: str) -> str:
        return f"{self.base}/cmd_result/{name}"

    def command_name(self, topic: str) -> str | None:
        """``mode`` for ``<base>/cmd/mode``; None if ``topic`` is not a command topic."""
        prefix = f"{self.base}/cmd/"
        return topic[len(prefix):] if topic.startswith(prefix) else None


# --------------------------------------------------------------------------------------------
# Validation


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """The parsed schema ``gateway/schemas/<name>.json`` (checked for unsupported keywords)."""
    text = resources.files("gateway").joinpath("schemas", f"{name}.json").read_text("utf-8")
    s = json.loads(text)
    _check_keywords(s, name)
    return s


def _check_keywords(s: Any, where: str) -> None:
    if not isinstance(s, dict):
        raise SchemaError(f"{where}: a schema must be an object")
    for k, v in s.items():
        if k in _ANNOTATIONS:
            continue
        if k not in _KEYWORDS:
            raise SchemaError(f"{where}: keyword {k!r} is not supported by gateway.messages")
        if k == "properties":
            for pk, ps in v.items():
                _check_keywords(ps, f"{where}.{pk}")
        elif k in ("items", "if", "then", "else"):
            _check_keywords(v, f"{where}/{k}")
        elif k == "allOf":
            for i, sub in enumerate(v):
                _check_keywords(sub, f"{where}/allOf[{i}]")
        elif k == "additionalProperties" and not isinstance(v, bool):
            raise SchemaError(f"{where}: additionalProperties must be true or false")


def validate(name: str, value: Any) -> list[str]:
    """Problems of ``value`` against schema ``name``; empty when valid. Messages name the field."""
    errors: list[str] = []
    _validate(schema(name), value, "", errors)
    return errors


_TYPES: dict[str, Any] = {
    "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
}


def _is_type(value: Any, t: str) -> bool:
    if t == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    return isinstance(value, _TYPES[t])


def _where(path: str) -> str:
    return f"field '{path}'" if path else "payload"


def _validate(s: dict[str, Any], v: Any, path: str, errors: list[str]) -> None:

    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is_type(v, t) for t in types):
            errors.append(f"{_where(path)}: must be {' or '.join(types)}, got "
                          f"{_json_type(v)}")
            return
    if isinstance(v, float) and not math.isfinite(v):
        errors.append(f"{_where(path)}: must be a finite number")
        return
    if "const" in s and v != s["const"]:
        errors.append(f"{_where(path)}: must be {s['const']!r}, got {v!r}")
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{_where(path)}: must be one of {', '.join(map(str, s['enum']))}, "
                      f"got {_short(v)}")
    if _is_type(v, "number"):
        if "minimum" in s and v < s["minimum"]:
            errors.append(f"{_where(path)}: must be >= {s['minimum']}, got {v}")
        if "maximum" in s and v > s["maximum"]:
            errors.append(f"{_where(path)}: must be <= {s['maximum']}, got {v}")
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            errors.append(f"{_where(path)}: must be > {s['exclusiveMinimum']}, got {v}")
        if "exclusiveMaximum" in s and v >= s["exclusiveMaximum"]:
            errors.append(f"{_where(path)}: must be < {s['exclusiveMaximum']}, got {v}")
    if isinstance(v, str):
        if "minLength" in s and len(v) < s["minLength"]:
            errors.append(f"{_where(path)}: must have at least {s['minLength']} characters")
        if "maxLength" in s and len(v) > s["maxLength"]:
            errors.append(f"{_where(path)}: must have at most {s['maxLength']} characters, "
                          f"got {len(v)}")
        if "pattern" in s and not re.search(s["pattern"], v):
            errors.append(f"{_where(path)}: must match {s['pattern']!r}")
    if isinstance(v, list) and "items" in s:
        for i, item in enumerate(v):
            _validate(s["items"], item, f"{path}[{i}]", errors)
    if isinstance(v, dict):
        for req in s.get("required", []):
            if req not in v:
                errors.append(f"field '{_join(path, req)}': is required")
        props: dict[str, Any] = s.get("properties", {})
        for k, item in v.items():
            if k in props:
                _validate(props[k], item, _join(path, k), errors)
            elif s.get("additionalProperties", True) is False:
                errors.append(f"field '{_join(path, k)}': is not allowed")
    for sub in s.get("allOf", []):
        _validate(sub, v, path, errors)
    if "if" in s:
        probe: list[str] = []
        _validate(s["if"], v, path, probe)
        branch = s.get("then") if not probe else s.get("else")
        if branch is not None:
            _validate(branch, v, path, errors)



def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (the wire format of every JSON payload)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def rounded(x: float | None, nd: int = 1) -> float | None:
    """Round for the wire (sub-0.1 W digits are noise, and bytes are SD-card writes)."""
    return None if x is None else round(float(x), nd)


def command_result(site: str, command: str, cmd_id: str | None, status: str,
                   reason: str | None, ts: float) -> dict[str, Any]:
    """Payload of ``cmd_result/<command>``."""
    return {"v": 1, "site": site, "id": cmd_id, "command": command[:64], "status": status,
            "reason": None if reason is None else reason[:500], "ts": round(ts, 3)}
