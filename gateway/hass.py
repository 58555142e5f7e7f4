"""Home Assistant MQTT discovery: the gateway appears in HA with no YAML.

One retained config message per entity at ``<prefix>/<component>/<node_id>/<object_id>/config``
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery). Sensors read the retained
``state`` topic through ``value_template``; all share one device block and the gateway's
availability topic (LWT), so HA greys them out when the gateway dies. The energy counters carry
``device_class: energy`` + ``state_class: total_increasing`` in kWh, which is what HA's Energy
dashboard needs for grid import/export and solar production.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.commands import MODES
from gateway.messages import OFFLINE, ONLINE, Topics

SW_VERSION = "0.1.0"


@dataclass(frozen=True)
class Entity:
    """One HA entity: component, object id and its specific config keys."""

    component: str
    object_id: str
    config: dict[str, Any]


def _sensor(object_id: str, name: str, key: str, unit: str | None, device_class: str | None,
            state_class: str | None, **extra: Any) -> Entity:
    cfg: dict[str, Any] = {"name": name, "value_template": f"{{{{ value_json.{key} }}}}"}
    if unit is not None:
        cfg["unit_of_measurement"] = unit
    if device_class is not None:
        cfg["device_class"] = device_class
    if state_class is not None:
        cfg["state_class"] = state_class
    cfg.update(extra)
    return Entity("sensor", object_id, cfg)


def entities(topics: Topics) -> list[Entity]:
    """The entities one gateway announces (state keys are those of ``schemas/state.json``)."""
    return [
        _sensor("site_power", "Grid power", "site_w", "W", "power", "measurement"),
        _sensor("pv_power", "PV power", "pv_w", "W", "power", "measurement"),
        _sensor("battery_power", "Battery power", "battery_w", "W", "power", "measurement"),
        _sensor("load_power", "House load", "load_w", "W", "power", "measurement"),
        _sensor("battery_soc", "Battery state of charge", "soc_pct", "%", "battery",
                "measurement"),
        _sensor("grid_import_energy", "Grid import energy", "import_kwh", "kWh", "energy",
                "total_increasing"),
        _sensor("grid_export_energy", "Grid export energy", "export_kwh", "kWh", "energy",
                "total_increasing"),
        _sensor("pv_energy", "PV energy", "pv_kwh", "kWh", "energy", "total_increasing"),
        _sensor("mode", "Mode", "mode", None, "enum", None, options=list(MODES),
                icon="mdi:home-battery"),
        _sensor("gateway_status", "Gateway status", "status", None, "enum", None,
                options=["ok", "degraded"], entity_category="diagnostic"),
        _sensor("telemetry_backlog", "Telemetry backlog", "backlog", None, None, "measurement",
                entity_category="diagnostic", icon="mdi:tray-full"),
        Entity("number", "battery_reserve", {
            "name": "Battery reserve",
            "command_topic": topics.cmd("reserve"),
            "command_template": '{"id": "ha", "soc_pct": {{ value }}}',
            "value_template": "{{ value_json.reserve_soc_pct }}",
            "min": 0, "max": 100, "step": 1, "unit_of_measurement": "%",
            "mode": "box", "entity_category": "config",
        }),
        # Gateway connectivity reads the availability topic itself, so it has no availability
        # block of its own: when the gateway dies it shows "disconnected", not "unavailable".
        Entity("binary_sensor", "gateway_online", {
            "name": "Gateway", "state_topic": topics.availability, "payload_on": ONLINE,
            "payload_off": OFFLINE, "device_class": "connectivity",
            "entity_category": "diagnostic",
        }),
    ]


def node_id(site: str) -> str:
    return "hems_" + site.replace("-", "_")


def discovery_messages(topics: Topics, prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """(topic, payload) of every discovery config message; publish retained, QoS 1."""
    from gateway.messages import dumps

    node = node_id(topics.site)
    device = {"identifiers": [node], "name": f"hems {topics.site}", "manufacturer": "hems",
              "model": "home energy gateway", "sw_version": SW_VERSION}
    origin = {"name": "hems", "sw_version": SW_VERSION}
    availability = [{"topic": topics.availability, "payload_available": ONLINE,
                     "payload_not_available": OFFLINE}]
    out: list[tuple[str, bytes]] = []
    for e in entities(topics):
        cfg: dict[str, Any] = {"unique_id": f"{node}_{e.object_id}",
                               "object_id": f"{node}_{e.object_id}"}
        cfg.update(e.config)
        if e.component != "binary_sensor":
            cfg.setdefault("state_topic", topics.state)
            cfg["availability"] = availability
        cfg["device"] = device
        cfg["origin"] = origin
        out.append((f"{prefix}/{e.component}/{node}/{e.object_id}/config", dumps(cfg)))
    return out


def removal_messages(topics: Topics, prefix: str = "homeassistant") -> list[tuple[str, bytes]]:
    """Empty retained payloads that remove every entity from HA (for uninstall)."""
    return [(t, b"") for t, _ in discovery_messages(topics, prefix)]
