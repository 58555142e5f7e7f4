"""The production ACL (systemd/mosquitto/acl) on a real Mosquitto: who may publish and read what.

Every negative assertion is made at a subscriber that *is* allowed to read the topic, after a
permitted marker from the same publisher (or a later one) has arrived; see ``wire.py``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import aiomqtt
import pytest

from .broker import SecureBroker
from .wire import WAIT_S, client, publish_all, read_until

R = "hems/v1"
M = "hems/v1/market/c1"


async def test_site_cannot_publish_as_another_site(secure_broker: SecureBroker) -> None:
    b = secure_broker
    forged = [  # home-1 writing everything that belongs to home-2
        (f"{R}/home-2/state", b"forged"),
        (f"{R}/home-2/telemetry", b"forged"),
        (f"{R}/home-2/availability", b"offline"),
        (f"{R}/home-2/cmd_result/mode", b"forged"),
        (f"{R}/home-2/envelope/status", b"forged"),
        ("homeassistant/sensor/hems_home_2/site_w/config", b"forged"),
    ]
    marker = (f"{R}/home-1/state", b"marker")
    ha_marker = ("homeassistant/sensor/hems_home_1/site_w/config", b"marker")
    async with client(b, "dashboard") as dash, client(b, "home-1") as h1:
        for t in (f"{R}/+/state", f"{R}/+/telemetry", f"{R}/+/availability",
                  f"{R}/+/cmd_result/+", f"{R}/+/envelope/status", "homeassistant/#"):
            await dash.subscribe(t, qos=1)
        await publish_all(h1, forged)
        await publish_all(h1, [marker, ha_marker])
        got = await read_until(dash, {marker, ha_marker})
    assert [g for g in got if g[1] != b"marker"] == []
    # and its own topics do get through (the marker above); HA discovery for itself too
    assert ha_marker in got


async def test_site_cannot_bid_meter_or_ack_in_another_sites_name(
        secure_broker: SecureBroker) -> None:
    b = secure_broker
    async with client(b, "market-operator", v5=True) as op, client(b, "dso") as dso, \
            client(b, "home-1") as h1:
        await op.subscribe(f"$share/ops/{M}/bids/+", qos=1)
        await op.subscribe(f"$share/ops/{M}/meter/+", qos=1)
        await dso.subscribe(f"{R}/+/dso/ack", qos=1)
        await publish_all(h1, [(f"{M}/bids/home-2", b"forged"), (f"{M}/meter/home-2", b"forged"),
                               (f"{R}/home-2/dso/ack", b"forged")])
        bid, meter, ack = ((f"{M}/bids/home-1", b"own"), (f"{M}/meter/home-1", b"own"),
                           (f"{R}/home-1/dso/ack", b"own"))
        await publish_all(h1, [bid, meter, ack])
        got_op = await read_until(op, {bid, meter})
        got_dso = await read_until(dso, {ack})
    assert sorted(got_op) == sorted([bid, meter])
    assert got_dso == [ack]


async def test_site_cannot_send_commands(secure_broker: SecureBroker) -> None:
    """Commands come from the dashboard user only: not from another site, nor from the site
    itself (a compromised gateway cannot spoof an operator command to itself)."""
    b = secure_broker
    marker = (f"{R}/home-2/cmd/mode", b'{"mode":"idle","id":"marker"}')
    async with client(b, "home-2") as h2, client(b, "home-1") as h1, \
            client(b, "dashboard") as dash:
        await h2.subscribe(f"{R}/home-2/cmd/#", qos=1)
        await publish_all(h1, [(f"{R}/home-2/cmd/mode", b'{"mode":"force_discharge"}')])
        await publish_all(h2, [(f"{R}/home-2/cmd/reserve", b'{"soc_pct":0}')])
        await publish_all(dash, [marker])
        got = await read_until(h2, {marker})
    assert got == [marker]


async def test_site_cannot_publish_an_envelope(secure_broker: SecureBroker) -> None:
    b = secure_broker
    controls, default = f"{R}/home-1/dso/controls", f"{R}/home-1/dso/default"
    legit = (controls, b'{"from":"dso"}')
    marker = (default, b'{"from":"dso","marker":true}')
    async with client(b, "dso") as dso:
        await publish_all(dso, [legit], retain=True)
    async with client(b, "home-1", ident="hems-gw-home-1") as gw, \
            client(b, "home-1", ident="attacker-1") as h1, client(b, "home-2") as h2, \
            client(b, "dso") as dso:
        await gw.subscribe(controls, qos=1)
        first = await read_until(gw, {legit})  # the retained document, as the gateway sees it
        await gw.subscribe(default, qos=1)
        # Its own site's envelope (the compromised-gateway case) and a neighbour's: both
        # retained, so a successful forgery would also replace what every later subscriber gets.
        await publish_all(h1, [(controls, b'{"export_w":1e9}'), (default, b'{"export_w":1e9}')],
                          retain=True)
        await publish_all(h2, [(controls, b'{"export_w":1e9}'), (default, b'{"export_w":1e9}')],
                          retain=True)
        await publish_all(dso, [marker])
        got = await read_until(gw, {marker})
    assert first == [legit]
    assert got == [marker]
    # The retained document is still the DSO's.
    async with client(b, "home-1", ident="hems-gw-home-1") as gw:
        await gw.subscribe(controls, qos=1)
        assert await read_until(gw, {legit}) == [legit]


async def test_dso_cannot_publish_market_or_gateway_topics(secure_broker: SecureBroker) -> None:
    """Least privilege the other way round: the DSO's user writes envelopes and nothing else."""
    b = secure_broker
    marker = (f"{R}/home-1/dso/controls", b"marker")
    async with client(b, "home-1") as gw, client(b, "dso") as dso:
        for t in (f"{R}/home-1/cmd/#", f"{R}/home-1/dso/controls", f"{M}/award/home-1"):
            await gw.subscribe(t, qos=1)
        await publish_all(dso, [(f"{R}/home-1/cmd/mode", b"x"), (f"{M}/award/home-1", b"x")])
        await publish_all(dso, [marker])
        got = await read_until(gw, {marker})
    assert got == [marker]


async def test_only_the_dashboard_sends_a_site_its_pv_forecast(secure_broker: SecureBroker
                                                               ) -> None:
    """The external PV forecast steers a site's plan: a neighbour (or the site itself) cannot
    publish one, and a site reads only its own."""
    b = secure_broker
    marker = (f"{R}/home-2/forecast/pv", b'{"marker": 2}')
    other = (f"{R}/home-1/forecast/pv", b'{"marker": 1}')
    async with client(b, "home-2") as h2, client(b, "home-1") as h1, \
            client(b, "dashboard") as dash:
        await h2.subscribe(f"{R}/+/forecast/pv", qos=1)
        await publish_all(h1, [(f"{R}/home-2/forecast/pv", b'{"forged": 1}')])
        await publish_all(h2, [(f"{R}/home-2/forecast/pv", b'{"self": 1}')])
        await publish_all(dash, [other, marker])
        got = await read_until(h2, {marker})
    assert got == [marker]


async def test_only_the_dso_sends_a_site_its_heartbeat(secure_broker: SecureBroker) -> None:
    """The DSO heartbeat keeps a gateway in contact (``dso_heartbeat_timeout_s``): a site cannot
    publish one for a neighbour, nor for itself (a compromised gateway must not keep itself "in
    contact" with a dead DSO), and a site reads only its own."""
    b = secure_broker
    marker = (f"{R}/home-2/dso/heartbeat", b'{"marker": 2}')
    other = (f"{R}/home-1/dso/heartbeat", b'{"marker": 1}')
    async with client(b, "home-2") as h2, client(b, "home-1") as h1, client(b, "dso") as dso:
        await h2.subscribe(f"{R}/+/dso/heartbeat", qos=1)
        await publish_all(h1, [(f"{R}/home-2/dso/heartbeat", b'{"forged": 1}'),
                               (f"{R}/home-1/dso/heartbeat", b'{"own": 1}')])
        await publish_all(h2, [(f"{R}/home-2/dso/heartbeat", b'{"self": 2}')])
        await publish_all(dso, [other, marker])
        got = await read_until(h2, {marker})
    assert got == [marker]


async def test_site_cannot_read_another_sites_awards_commands_or_envelope(
        secure_broker: SecureBroker) -> None:
    b = secure_broker
    async with client(b, "market-operator", v5=True) as op:
        # retained before anyone subscribes: the subscriber must not get it at subscribe time
        await publish_all(op, [(f"{M}/award/home-1", b"award-1")], retain=True)
    async with client(b, "dso") as dso:
        await publish_all(dso, [(f"{R}/home-1/dso/controls", b"env-1")], retain=True)
    award2 = (f"{M}/award/home-2", b"award-2")
    cmd2 = (f"{R}/home-2/cmd/mode", b"cmd-2")
    env2 = (f"{R}/home-2/dso/controls", b"env-2")
    async with client(b, "home-2") as h2, client(b, "market-operator", v5=True) as op, \
            client(b, "dashboard") as dash, client(b, "dso") as dso:
        # Mosquitto 2.0 grants these SUBSCRIBEs and filters at delivery: what matters is that
        # nothing of home-1's is delivered, retained or live, even through a wildcard.
        for t in (f"{M}/award/home-1", f"{M}/bid_result/home-1", f"{M}/settlement/home-1",
                  f"{R}/home-1/cmd/#", f"{R}/home-1/dso/controls", f"{M}/award/+", "#"):
            await h2.subscribe(t, qos=1)
        await publish_all(op, [(f"{M}/award/home-1", b"award-1b"),
                               (f"{M}/bid_result/home-1", b"br-1"),
                               (f"{M}/settlement/home-1", b"st-1")])
        await publish_all(dash, [(f"{R}/home-1/cmd/mode", b"cmd-1")])
        await publish_all(dso, [(f"{R}/home-1/dso/controls", b"env-1b")])
        await publish_all(op, [award2])
        await publish_all(dash, [cmd2])
        await publish_all(dso, [env2])
        got = await read_until(h2, {award2, cmd2, env2})
    leaked = [g for g in got if "home-1" in g[0]]
    assert leaked == []
    assert {award2, cmd2, env2} <= set(got)  # its own arrive (wildcards may deliver twice)


async def test_site_cannot_publish_market_results(secure_broker: SecureBroker) -> None:
    b = secure_broker
    fake = b'{"v":1,"community":"c1","fake":true}'
    result = (f"{M}/result", b"real-result")
    async with client(b, "home-2") as h2, client(b, "home-1") as h1, \
            client(b, "market-operator", v5=True) as op:
        for t in (f"{M}/announce", f"{M}/result", f"{M}/award/home-2",
                  f"{M}/bid_result/home-2", f"{M}/settlement/home-2"):
            await h2.subscribe(t, qos=1)
        await publish_all(h1, [(f"{M}/announce", fake), (f"{M}/result", fake),
                               (f"{M}/award/home-2", fake), (f"{M}/bid_result/home-2", fake),
                               (f"{M}/settlement/home-2", fake)], retain=True)
        # not even its own award or statement
        await publish_all(h2, [(f"{M}/award/home-2", fake), (f"{M}/settlement/home-2", fake)])
        await publish_all(op, [result])
        got = await read_until(h2, {result})
    assert got == [result]


async def test_operator_reads_bids_through_a_shared_subscription(
        secure_broker: SecureBroker) -> None:
    """Two operator instances in one MQTT 5 share group: every bid reaches exactly one."""
    b = secure_broker
    bids = [(f"{M}/bids/{s}", f"bid-{s}-{i}".encode()) for i in range(10)
            for s in ("home-1", "home-2")]
    async with client(b, "market-operator", v5=True, ident="hems-market-c1-opA") as a, \
            client(b, "market-operator", v5=True, ident="hems-market-c1-opB") as c, \
            client(b, "home-1") as h1, client(b, "home-2") as h2:
        for inst in (a, c):
            await inst.subscribe(f"$share/ops/{M}/bids/+", qos=1)
        await publish_all(h1, [x for x in bids if "home-1" in x[0]])
        await publish_all(h2, [x for x in bids if "home-2" in x[0]])
        # read both instances until every bid is accounted for (the union is the marker set)
        got: list[tuple[str, bytes]] = []
        seen: set[tuple[str, bytes]] = set()

        async def drain(inst: aiomqtt.Client) -> None:
            async for m in inst.messages:
                assert isinstance(m.payload, bytes)
                got.append((str(m.topic), m.payload))
                seen.add((str(m.topic), m.payload))
                if seen >= set(bids):
                    return

        done, pending = await asyncio.wait([asyncio.create_task(drain(a)),
                                            asyncio.create_task(drain(c))],
                                           timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        assert done, f"bids missing: {sorted(set(bids) - seen)}"
    assert sorted(got) == sorted(bids)  # each exactly once across the group


@pytest.mark.parametrize("user,password", [(None, None), ("home-1", "wrong-password"),
                                           ("intruder", "whatever")])
@pytest.mark.parametrize("tls", [False, True])
async def test_unauthenticated_clients_are_refused(secure_broker: SecureBroker, user: str | None,
                                                   password: str | None, tls: bool) -> None:
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
        async with client(secure_broker, user, password=password, tls=tls):
            pass
    # the right password works on the same listener (the refusal is about the credentials)
    async with client(secure_broker, "home-1", tls=tls):
        pass
    log = secure_broker.log_path.read_text()
    assert "not authorised" in log  # the refusal is logged ...
    assert password is None or password not in log  # ... without the password tried


async def test_revoking_a_site_disconnects_it_and_refuses_its_login(
        secure_broker: SecureBroker) -> None:
    """README "Remove a site": delete its password line, reload (SIGHUP)."""
    b = secure_broker
    marker = (f"{R}/home-1/state", b"still here")
    async with client(b, "home-2") as h2, client(b, "home-1") as h1, \
            client(b, "dashboard") as dash:
        await dash.subscribe(f"{R}/+/state", qos=1)
        pw = b.workdir / "passwd"
        pw.write_text("".join(line + "\n" for line in pw.read_text().splitlines()
                              if not line.startswith("home-2:")))
        assert b.proc is not None
        b.proc.send_signal(signal.SIGHUP)
        with pytest.raises(aiomqtt.MqttError):  # the broker drops the connected session
            await asyncio.wait_for(anext(aiter(h2.messages)), WAIT_S)
        await publish_all(h1, [marker])  # the other sites carry on
        assert await read_until(dash, {marker}) == [marker]
    with pytest.raises(aiomqtt.MqttError, match=r"[Nn]ot authori[sz]ed"):
        async with client(b, "home-2"):
            pass


@pytest.mark.parametrize("username_as_clientid", [False, True])
async def test_reusing_a_gateways_client_id(broker_factory: Callable[..., SecureBroker],
                                            username_as_clientid: bool) -> None:
    """Known weakness (docs/security.md): with the default config another user can close a
    gateway's session by connecting with its client id (a DoS; it gains no rights). The
    config's optional ``use_username_as_clientid true`` stops it."""
    b = broker_factory(username_as_clientid=username_as_clientid)
    marker = (f"{R}/home-1/state", b"alive")
    async with client(b, "dashboard") as dash, \
            client(b, "home-1", ident="hems-gw-home-1") as gw:
        await dash.subscribe(f"{R}/+/state", qos=1)
        async with client(b, "home-2", ident="hems-gw-home-1"):
            if username_as_clientid:
                await publish_all(gw, [marker])  # the gateway's session survived
                assert await read_until(dash, {marker}) == [marker]
            else:
                with pytest.raises(aiomqtt.MqttError):
                    await asyncio.wait_for(anext(aiter(gw.messages)), WAIT_S)
