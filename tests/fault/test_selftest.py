"""``hems selftest``: the built-in fault run reports what it did, and reports a failure.

The first test runs a shortened self-test through the command line (two devices, three fault
kinds, a short broker outage, the silent DSO, every hostile message) and checks that the
``reliability`` counts are consistent with the per-fault / per-input details and with the
gateway's own counters. The second sends, among the bad inputs, one valid command mislabelled as
hostile: the gateway applies it, so the report must say that one bad input was not rejected and
the run failed (the counts come from the gateway, not from the test's expectations)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from community.selftest import SelftestOptions, format_report, run_selftest
from gateway.broker import find_mosquitto
from gateway.cli import main

pytestmark = [pytest.mark.fault,
              pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")]

KEYS = ("faults_injected", "faults_survived", "bad_inputs_tried", "bad_inputs_rejected",
        "rows_lost")


def check_consistent(r: dict[str, Any]) -> None:
    rel = r["reliability"]
    assert all(k in rel for k in KEYS), rel
    assert rel["faults_injected"] == len(r["faults"])
    assert rel["faults_survived"] == sum(f["survived"] for f in r["faults"])
    assert sum(c["injected"] for c in rel["faults_by_class"].values()) == rel["faults_injected"]
    assert rel["bad_inputs_tried"] == len(r["bad_inputs"])
    assert rel["bad_inputs_rejected"] == sum(i["rejected"] for i in r["bad_inputs"])
    assert all(i["answered"] for i in r["bad_inputs"]), r["bad_inputs"]
    # The command counts are the gateway's own: every command the report calls rejected is in
    # GatewayStats.commands_rejected, and nothing else is.
    cmd_rejected = sum(1 for i in r["bad_inputs"]
                       if i["name"].startswith("command:") and i["rejected"])
    assert sum(r["gateway"]["commands_rejected"].values()) == cmd_rejected
    env_rejected = sum(1 for i in r["bad_inputs"]
                       if i["name"].startswith("envelope:") and i["rejected"])
    assert sum(r["envelope"]["gateway"]["rejected"].values()) >= env_rejected
    t = r["telemetry"]
    # a row is lost if it is missing from the store, or never reached the subscriber, or both
    assert max(t["missing_in_store"], t["missing_at_subscriber"]) <= rel["rows_lost"] \
        <= t["missing_in_store"] + t["missing_at_subscriber"]
    assert t["produced"] - t["stored"] == t["missing_in_store"]


def test_short_selftest_survives_rejects_and_loses_nothing(capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    rc = main(["selftest", "--json", "--broker", "mosquitto", "--devices", "meter,battery",
               "--faults", "timeout,drop,out_of_range", "--fault-s", "20",
               "--broker-outage-s", "1"])
    out = capsys.readouterr()
    r = json.loads(out.out.strip().splitlines()[-1])  # the JSON is the last line of stdout
    assert rc == 0 and r["ok"], format_report(r)
    assert "hems selftest: PASS" in out.err  # the lines for people (stderr with --json)
    check_consistent(r)
    rel = r["reliability"]
    assert rel["faults_injected"] == 2 * 3 + 2  # + the broker outage and the silent DSO
    assert rel["faults_survived"] == rel["faults_injected"]
    assert {"timeout", "drop", "out_of_range", "broker_outage", "dso_silent"} \
        == set(rel["faults_by_class"])
    assert rel["bad_inputs_tried"] >= 20
    assert rel["bad_inputs_rejected"] == rel["bad_inputs_tried"]
    assert rel["rows_lost"] == 0 and r["telemetry"]["produced"] > 0
    assert r["telemetry"]["stored"] == r["telemetry"]["received"] == r["telemetry"]["produced"]
    assert rel["controls_accepted"] == rel["controls_sent"] == 2
    # a fault that stops the meter answering is seen by the gateway, and it comes back
    meter_timeout = next(f for f in r["faults"] if f["fault"] == "meter:timeout")
    assert meter_timeout["detected"] and meter_timeout["recovered_after_s"] is not None
    assert r["bad_input_phase"]["never_loosened"]


async def test_an_accepted_bad_input_is_reported_and_fails_the_run() -> None:
    opts = SelftestOptions(devices=(), broker_outage_s=None, dso_silent=False, broker="mosquitto",
                           extra_bad_commands=(("mode", b'{"mode": "auto"}'),))
    r = await run_selftest(opts)
    check_consistent(r)
    rel = r["reliability"]
    assert rel["faults_injected"] == 0
    assert rel["bad_inputs_rejected"] == rel["bad_inputs_tried"] - 1
    assert rel["not_rejected"] == ["command:extra_0"]
    assert not r["ok"]
    assert "NOT rejected command:extra_0" in format_report(r)
