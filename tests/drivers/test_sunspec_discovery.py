"""SunSpec discovery against real pymodbus servers, well-formed and malformed maps."""

from __future__ import annotations

import pytest
from modbus_servers import ServeFn, free_port
from sunspec_images import block, chain, inverter_image, raw_block

from drivers.modbus import ModbusLink
from drivers.natures import DeviceError, DeviceTimeout
from drivers.sunspec.discovery import DiscoveryError, discover


def link_for(s) -> ModbusLink:  # type: ignore[no-untyped-def]
    return ModbusLink.tcp(s.host, s.port, s.unit, timeout_s=0.5, name="dut")


@pytest.mark.parametrize("base", [40000, 0, 50000])
async def test_discovers_at_each_base(serve: ServeFn, base: int) -> None:
    img = inverter_image(base)
    s = await serve(img)
    smap = await discover(link_for(s))
    assert smap.base == base
    assert smap.ids == [1, 103, 120, 121, 123]
    assert all(m.known for m in smap.models)
    for m, b in zip(smap.models, img.models, strict=True):
        assert m.address == b.address
        assert m.length == b.mdef.fixed_length
    assert smap.find(123) is not None and smap.find(123).end == base + len(img.regs) - 2  # type: ignore[union-attr]


async def test_not_sunspec_names_the_bases_tried(serve: ServeFn) -> None:
    # registers at 40000 hold something else; 0 and 50000 are not mapped at all
    s = await serve([0x1234, 0x5678, 0, 0], base=40000)
    with pytest.raises(DiscoveryError) as ei:
        await discover(link_for(s))
    msg = str(ei.value)
    assert msg.startswith("dut: not a SunSpec device")
    assert "40000 (read 0x1234 0x5678)" in msg
    assert "0 (ILLEGAL DATA ADDRESS (2))" in msg
    assert "50000 (ILLEGAL DATA ADDRESS (2))" in msg


async def test_chain_that_never_ends(serve: ServeFn) -> None:
    # 150 well-formed vendor blocks and no end marker within max_models
    regs = chain(*[raw_block(65000 + i, [0, 0]) for i in range(150)])
    s = await serve(regs, base=40000)
    with pytest.raises(
        DiscoveryError, match=r"does not end: more than 100 models .* no end marker"
    ):
        await discover(link_for(s))


async def test_chain_running_off_the_map(serve: ServeFn) -> None:
    # 103 then nothing: no end marker, the next header is outside the device's map
    regs = chain(block(1), block(103), end=False)
    s = await serve(regs, base=40000)
    with pytest.raises(DiscoveryError) as ei:
        await discover(link_for(s))
    msg = str(ei.value)
    assert "broken at 40122 (after model 103 at 40070)" in msg
    assert "ILLEGAL DATA ADDRESS (2)" in msg


async def test_chain_running_off_the_address_space(serve: ServeFn) -> None:
    regs = chain(raw_block(65001, [0] * 10), end=False)
    regs[3] = 0xFFF0  # L of the vendor block: far past 65535
    s = await serve(regs, base=50000)
    with pytest.raises(DiscoveryError, match=r"model 65001 at 50002 .* L=65520, past the end"):
        await discover(link_for(s))


async def test_block_shorter_than_its_model(serve: ServeFn) -> None:
    regs = chain(block(1), block(103, length=30))
    s = await serve(regs, base=40000)
    with pytest.raises(DiscoveryError) as ei:
        await discover(link_for(s))
    msg = str(ei.value)
    assert "model 103 (inverter_three_phase) at 40070" in msg
    assert "L=30, shorter than its official fixed block of 50" in msg


async def test_longer_block_is_a_vendor_extension(serve: ServeFn) -> None:
    regs = chain(block(1), block(103, length=56), block(120))
    s = await serve(regs, base=40000)
    smap = await discover(link_for(s))
    assert [(m.id, m.length) for m in smap.models] == [(1, 66), (103, 56), (120, 26)]


async def test_unknown_model_is_kept_and_skipped(serve: ServeFn) -> None:
    regs = chain(block(1), raw_block(65099, [1, 2, 3, 4]), block(103))
    s = await serve(regs, base=40000)
    smap = await discover(link_for(s))
    assert smap.ids == [1, 65099, 103]
    vendor = smap.find(65099)
    assert vendor is not None and not vendor.known and vendor.length == 4
    assert smap.find(103).address == 40002 + 68 + 6  # type: ignore[union-attr]


async def test_wrong_unit_id_is_not_sunspec_with_a_hint(serve: ServeFn) -> None:
    s = await serve(inverter_image())
    link = ModbusLink.tcp(s.host, s.port, 9, timeout_s=0.5)
    with pytest.raises(DiscoveryError, match="is the unit id right"):
        await discover(link)


async def test_unreachable_device_is_not_reported_as_not_sunspec() -> None:
    link = ModbusLink.tcp("127.0.0.1", free_port(), 1, timeout_s=0.3)
    with pytest.raises(DeviceError) as ei:
        await discover(link)
    assert not isinstance(ei.value, DiscoveryError | DeviceTimeout)
    assert "cannot connect" in str(ei.value)
