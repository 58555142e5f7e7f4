"""The command line as a user runs it: ``hems sim`` in its own process, ``hems scan --json``
against it, and a short ``hems demo --json`` whose energy figures must agree with the
simulator's own physics."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

HEMS = [sys.executable, "-m", "gateway.cli"]


@pytest.fixture
def sim_process() -> Iterator[dict[str, object]]:
    proc = subprocess.Popen(
        [*HEMS, "sim", "--port", "0", "--speed", "60", "--start", "2026-06-21T10:00:00Z"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield json.loads(line)
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean stop


def test_sim_prints_one_ready_line_and_scan_decodes_each_device(
    sim_process: dict[str, object],
) -> None:
    devices = sim_process["devices"]
    assert isinstance(devices, list)
    assert sorted(d["kind"] for d in devices) == ["battery", "inverter", "meter"]
    expected = {"inverter": {1, 103, 120, 121, 123}, "battery": {1, 124, 802}, "meter": {1, 203}}
    for d in devices:
        assert d["host"] == "127.0.0.1" and d["port"] > 0 and d["unit"] == 1
        out = subprocess.run(
            [*HEMS, "scan", "--host", d["host"], "--port", str(d["port"]), "--unit", "1", "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        )
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["base"] == 40000
        assert {m["id"] for m in report["models"]} == expected[d["kind"]]
        common = next(m for m in report["models"] if m["id"] == 1)
        assert common["points"]["Mn"]  # a manufacturer string, decoded


def test_scan_of_a_closed_port_is_one_clear_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [*HEMS, "scan", "--host", "127.0.0.1", "--port", str(port), "--timeout", "0.5", "--json"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert f"127.0.0.1:{port}" in out.stderr


def test_demo_runs_the_daemon_and_its_figures_agree_with_the_physics() -> None:
    out = subprocess.run(
        [*HEMS, "demo", "--hours", "2", "--speed", "720", "--start", "2026-06-21T08:00:00Z",
         "--json"],
        capture_output=True, text=True, timeout=180, check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["sim_hours"] == 2 and report["homes"] == 1
    assert report["polls"] > 100 and report["poll_errors"] == 0
    assert report["broker"] in ("mosquitto", "amqtt")
    e, truth = report["energy_kwh"], report["truth_kwh"]
    # a June morning (before the DSO stress windows): the PV produces, and what the gateway
    # integrated from its Modbus polls
    # matches the simulator's exact integrals
    assert e["pv"] > 1.0
    for k in ("pv", "import", "export", "load", "battery_charge", "battery_discharge"):
        assert e[k] == pytest.approx(truth[k], abs=0.05 + 0.03 * truth[k]), k
    # store-and-forward, measured at an independent subscriber
    tel = report["telemetry"]
    assert tel["produced"] >= 100  # one record per simulated minute
    assert tel["stored"] == tel["published"] == tel["received"] == tel["produced"]
    assert tel["lost"] == 0 and tel["in_order"]
    assert report["ha_discovery_configs"] >= 8
    # the slow loop planned every 15 simulated minutes and the LP was used, not the fallback
    assert report["planner"]["lp"] >= 6 and report["planner"]["fallbacks"] == 0
    env = report["envelope"]
    assert set(env) >= {"controls", "max_export_exceedance_w", "exceedance_s",
                        "max_import_exceedance_w", "p99_response_s"}
