"""Simulated SunSpec devices: register images kept in step with :class:`HomePhysics`.

Three devices, as three boxes on a LAN would present themselves:

* inverter: models 1, 103 (three-phase), 120 (nameplate), 121 (settings), 123 (controls);
* battery:  models 1, 124 (storage controls), 802 (battery base);
* meter:    models 1, 203 (three-phase wye meter).

Each image is built from the official model definitions (:func:`firmware_sim.image.build_image`)
with realistic scale factors, several negative (``Hz_SF=-2``, ``V_SF=-1``, ``A_SF=-2``,
``WMaxLimPct_SF=-2``, ``InOutWRte_SF=-2``, ``ChaState_SF=-1``), and many points left "not
implemented" as a real device leaves them (phase-to-phase voltages of the inverter, VAr ratings,
per-phase energies, cell voltages...).

Sign conventions on the wire are the hems ones (:mod:`drivers.natures`): meter ``W`` ``+`` import /
``-`` export (``TotWhImp``/``TotWhExp`` count each direction), inverter ``W`` ``+`` generation,
battery (802) ``W`` and ``A`` ``+`` charging / ``-`` discharging.

Served by pymodbus 3.16's simulator: ``SimDevice(id=unit, simdata=[SimData(...)], action=...)``.
The async ``action`` hook runs on every request whose addresses are valid. On a read it advances
the physics and re-encodes only the models the request touches; on a write it validates every
touched point and answers with a Modbus exception when the write is bad:

* a point that is read-only or not implemented by this device -> ``ILLEGAL_ADDRESS`` (unless the
  write leaves its registers unchanged, so read-modify-write of a whole block works);
* a value out of range (``WMaxLimPct`` > 100 %, ``InWRte`` outside -100..100, ``StorCtl_Mod``
  bits above 3, a "not implemented" sentinel, a partially written 32-bit point...) ->
  ``ILLEGAL_VALUE``.

Good writes act on the physics at ``clock.now()`` (with their revert timers in domain time).
A request for another unit id gets ``GATEWAY_NO_RESPONSE`` (0x0B), as a Modbus TCP gateway answers.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers import inproc
from drivers.clock import Clock
from drivers.inproc import DropConnection, NoReply
from drivers.sunspec.models import PointDef, decode_raw, encode_raw, int_to_regs, scale
from firmware_sim.faults import DeviceFaults, FaultKind
from firmware_sim.home import HomePhysics, HomeState
from firmware_sim.image import RegisterImage, build_image, raw_range

INVERTER = "inverter"
BATTERY = "battery"
METER = "meter"
KINDS = (INVERTER, BATTERY, METER)

NOMINAL_V = 230.0
BATTERY_NOMINAL_V = 51.2
INVERTER_DC_V = 380.0
INVERTER_EFFICIENCY = 0.97  # DC -> AC, for the DC points only

# Counters start at plausible non-zero values: an acc32 of 0 reads as "not implemented".
METER_IMPORT0_WH = 3_000_000.0
METER_EXPORT0_WH = 1_000_000.0
INVERTER_WH0 = 5_000_000.0


def sf_for(max_abs: float, ptype: str = "int16") -> int:
    """Smallest scale factor >= 0 with which ``max_abs`` fits the register type."""
    _, hi = raw_range(ptype)
    sf = 0
    while max_abs / 10.0**sf > hi:
        sf += 1
    return sf


@dataclass(frozen=True, slots=True)
class Slot:
    """A pre-located point for fast scaled writes (scale factors of a device never change)."""

    i: int
    size: int
    sf: int
    lo: int
    hi: int
    p: PointDef
    mul: float = 1.0  # 10 ** -sf, worked out once (the same float as computing it per put)


def _slot(img: RegisterImage, model_id: int, point: str) -> Slot:
    p, i = img.locate(model_id, point)
    sf = img.sf_of(model_id, point)
    sf = 0 if sf is None else sf
    lo, hi = raw_range(p.type)
    return Slot(i, p.size, sf, lo, hi, p, 10.0 ** (-sf))


def put(regs: list[int], s: Slot, value: float | None) -> None:
    """Write a scaled value (saturating at the type's range) or ``None`` (the sentinel)."""
    if value is None:
        regs[s.i : s.i + s.size] = encode_raw(s.p, None)
        return
    raw = round(value * s.mul) if s.sf else round(value)
    raw = s.lo if raw < s.lo else s.hi if raw > s.hi else raw
    if s.size == 1:
        regs[s.i] = raw & 0xFFFF
    else:
        regs[s.i : s.i + s.size] = int_to_regs(raw, s.size)


Validator = Callable[[float], bool]


def _in(lo: float, hi: float) -> Validator:
    return lambda v: lo <= v <= hi


def _common(
    mn: str, md: str, sn: str, unit: int
) -> tuple[int, dict[str, int | float | str | None]]:
    return (1, {"Mn": mn, "Md": md, "Opt": "", "Vr": "0.1.0", "SN": sn, "DA": unit})


class SimulatedDevice:
    """One SunSpec device over the home physics. Subclasses lay out the image and refresh it."""

    kind: str = ""

    def __init__(self, physics: HomePhysics, unit: int = 1, base: int = 40000) -> None:
        if not 1 <= unit <= 247:
            raise ValueError(f"{self.kind}: unit id {unit} outside 1..247")
        if base not in (0, 40000, 50000):
            raise ValueError(f"{self.kind}: SunSpec base {base} is not 0, 40000 or 50000")
        self.physics = physics
        self.clock: Clock = physics.clock
        self.unit = unit
        self.image = self._build(base)
        self.regs = self.image.regs
        self.faults = DeviceFaults(self, self.clock)
        #: the pymodbus server(s) serving this device, for dropping connections
        self.servers: list[Any] = []
        self.reads = 0
        self.writes = 0
        self.rejected = 0
        # (start index, end index, model id, point) of every point, for write validation
        self._points: list[tuple[int, int, int, PointDef]] = [
            (blk.address - base + p.offset, blk.address - base + p.offset + p.size, blk.mdef.id, p)
            for blk in self.image.models
            for p in blk.mdef.points
        ]
        self._points.sort(key=lambda x: x[0])
        self._starts = [x[0] for x in self._points]  # a write looks only at points it touches
        # dynamic models: (start index, end index, refresh function)
        self._dynamic: list[tuple[int, int, Callable[[HomeState], None]]] = []
        for mid, fn in self._refreshers().items():
            a, b = self.image.span(mid)
            self._dynamic.append((a - base, b - base, fn))
        self._writable = self._writable_points()
        self.refresh(0, len(self.regs))

    # ---- to be provided by each device ------------------------------------------------------
    def _build(self, base: int) -> RegisterImage:
        raise NotImplementedError

    def _refreshers(self) -> dict[int, Callable[[HomeState], None]]:
        raise NotImplementedError

    def _writable_points(self) -> dict[tuple[int, str], Validator]:
        return {(1, "DA"): _in(1, 247)}

    def _apply_writes(self, written: set[tuple[int, str]]) -> None:
        """Act on the physics for the points just written (image already updated)."""

    def default_out_of_range(self) -> dict[tuple[int, str], float]:
        return {}

    def default_ratings_change(self) -> dict[str, float]:
        return {}

    def apply_ratings(self, ratings: Mapping[str, float] | None) -> None:
        raise ValueError(f"{self.kind}: ratings cannot change on this device")

    # ---- pymodbus glue ---------------------------------------------------------------------
    def sim_devices(self) -> list[SimDevice]:
        """The pymodbus devices to serve: this one, and a catch-all (id 0) for wrong unit ids."""
        block = [SimData(address=self.image.base, values=list(self.regs),
                         datatype=DataType.REGISTERS)]
        devs = [SimDevice(id=self.unit, simdata=block, action=self.action)]
        other = [SimData(address=self.image.base, count=len(self.regs), values=0,
                         datatype=DataType.REGISTERS)]
        devs.append(SimDevice(id=0, simdata=other, action=self._wrong_unit))
        return devs

    async def modbus_request(
        self, unit: int, function_code: int, address: int, count: int,
        values: list[int] | None,
    ) -> list[int] | int:
        """The same request, answered in process (:mod:`drivers.inproc`): what the pymodbus
        server would answer, through the same :meth:`action` hook and the same faults (no reply
        = :class:`~drivers.inproc.NoReply`, drop = :class:`~drivers.inproc.DropConnection`)."""
        if unit != self.unit:
            return int(ExcCodes.GATEWAY_NO_RESPONSE)
        if function_code not in (3, 4, 16):
            return int(ExcCodes.ILLEGAL_FUNCTION)
        limit = 123 if function_code == 16 else 125
        if not 1 <= count <= limit:
            return int(ExcCodes.ILLEGAL_VALUE)
        if address < self.image.base or address + count > self.image.base + len(self.regs):
            return int(ExcCodes.ILLEGAL_ADDRESS)
        active = self.faults.current()
        if active:
            if FaultKind.DROP in active:
                raise DropConnection(f"{self.kind}: drop fault")
            if FaultKind.TIMEOUT in active:
                raise NoReply(f"{self.kind}: timeout fault")  # the client times out
        buf = [0] * count
        code = await self.action(function_code, address, address, count, buf, values)
        if code is not None:
            return int(code)
        return [] if values is not None else buf

    async def _wrong_unit(self, *_: Any) -> ExcCodes | None:
        return ExcCodes.GATEWAY_NO_RESPONSE

    def trace_packet(self, sending: bool, data: bytes) -> bytes:
        """Server byte-stream hook: swallows replies (``timeout``), drops connections (``drop``)."""
        active = self.faults.current()
        if not active:
            return data
        if sending and FaultKind.TIMEOUT in active:
            return b""  # transport.write(b"") sends nothing: the client times out
        if not sending and FaultKind.DROP in active:
            asyncio.get_running_loop().call_soon(self.drop_connections)
        return data

    def drop_connections(self) -> int:
        """Close every client connection of this device's server(s)."""
        n = inproc.disconnect(self)
        for srv in self.servers:
            for conn in list(srv.active_connections.values()):
                conn.close()
                n += 1
        return n

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus SimDevice hook: refresh on reads, validate and apply writes."""
        active = self.faults.current()
        frozen = False
        if active:
            if FaultKind.TIMEOUT in active or FaultKind.DROP in active:
                return ExcCodes.DEVICE_BUSY  # never sent: the reply is swallowed / conn closed
            exc = active.get(FaultKind.EXCEPTION)
            if exc is not None and exc.code is not None:
                return exc.code
            frozen = FaultKind.FROZEN in active
        lo = address - self.image.base
        hi = lo + count
        if set_values is not None:
            # No refresh first: a write is judged against what the client last read (a block
            # written back unchanged must match those values), and applying it commands the
            # physics, which integrates up to now by itself.
            code = self.write(lo, [int(v) for v in set_values])
            if code is not None:
                self.rejected += 1
                return code
            self.writes += 1
            return None
        self.reads += 1
        if not frozen:
            self.refresh(lo, hi)
        oor = active.get(FaultKind.OUT_OF_RANGE) if active else None
        if oor is not None:
            for (mid, point), v in oor.values.items():
                self.image.set(mid, point, v)
        off = address - start_address
        current_registers[off : off + count] = self.regs[lo:hi]
        return None

    # ---- reads --------------------------------------------------------------------------------
    def refresh(self, lo: int, hi: int) -> None:
        """Re-encode the dynamic models overlapping register indices ``[lo, hi)``."""
        state: HomeState | None = None
        for a, b, fn in self._dynamic:
            if a < hi and lo < b:
                if state is None:
                    state = self.physics.register_state()
                fn(state)

    # ---- writes -------------------------------------------------------------------------------
    def write(self, lo: int, values: list[int]) -> ExcCodes | None:
        """Validate a write of ``values`` at register index ``lo``; apply it if good."""
        hi = lo + len(values)
        written: set[tuple[int, str]] = set()
        covered = 0
        # From the last point starting at or before ``lo`` (it may reach into the write).
        first = max(0, bisect.bisect_right(self._starts, lo) - 1)
        for a, b, mid, p in itertools.islice(self._points, first, None):
            if a >= hi:
                break
            if b <= lo:
                continue
            if a < lo or b > hi:
                return ExcCodes.ILLEGAL_VALUE  # part of a multi-register point
            covered += b - a
            new = values[a - lo : b - lo]
            key = (mid, p.name)
            validator = self._writable.get(key)
            if validator is None:
                if new == self.regs[a:b]:
                    continue  # unchanged: tolerated (read-modify-write of a block)
                return ExcCodes.ILLEGAL_ADDRESS
            raw = decode_raw(p, new)
            if raw is None or isinstance(raw, str):
                return ExcCodes.ILLEGAL_VALUE
            sf = self.image.sf_of(mid, p.name) if p.sf is not None else 0
            v = scale(raw, sf)
            if v is None or not validator(v):
                return ExcCodes.ILLEGAL_VALUE
            written.add(key)
        if covered != len(values):
            # SunS marker or end marker: not points, never writable
            return ExcCodes.ILLEGAL_ADDRESS
        old = self.regs[lo:hi]
        self.regs[lo:hi] = values
        try:
            self._apply_writes(written)
        except ValueError:
            self.regs[lo:hi] = old
            return ExcCodes.ILLEGAL_VALUE
        return None


# ================================================================================== inverter


class InverterDevice(SimulatedDevice):
    """PV inverter: models 1, 103, 120, 121, 123."""

    kind = INVERTER

    def _build(self, base: int) -> RegisterImage:
        cfg = self.physics.config
        rated = cfg.inverter_rated_w
        wsf = sf_for(rated * 1.5)
        self.wsf = wsf
        return build_image(
            [
                _common("hems", "SunSpec PV inverter (simulated)",
                        f"INV-{cfg.home_index:05d}", self.unit),
                (103, {
                    "A_SF": -2, "V_SF": -1, "W_SF": wsf, "Hz_SF": -2, "VA_SF": wsf,
                    "VAr_SF": wsf, "PF_SF": -1, "WH_SF": 0, "DCA_SF": -2, "DCV_SF": -1,
                    "DCW_SF": wsf, "Tmp_SF": -1, "Evt1": 0, "Evt2": 0,
                }),
                (120, {
                    "DERTyp": 4, "WRtg_SF": wsf, "VARtg_SF": wsf, "ARtg_SF": -1,
                }),
                (121, {
                    "WMax_SF": wsf, "VRef": 2300, "VRef_SF": -1, "VAMax_SF": wsf,
                    "ECPNomHz": 5000, "ECPNomHz_SF": -2,
                }),
                (123, {
                    "WMaxLimPct_SF": -2, "WMaxLimPct_WinTms": 0, "WMaxLimPct_RvrtTms": 0,
                    "WMaxLimPct_RmpTms": round(cfg.inverter_ramp_s), "WMaxLim_Ena": 0,
                    "WMaxLimPct": 10000,
                }),
            ],
            base=base,
        )

    def _refreshers(self) -> dict[int, Callable[[HomeState], None]]:
        img = self.image
        s = {n: _slot(img, 103, n) for n in (
            "A", "AphA", "AphB", "AphC", "PhVphA", "PhVphB", "PhVphC", "W", "Hz", "VA", "VAr",
            "PF", "WH", "DCA", "DCV", "DCW", "TmpCab", "St")}
        r120 = {n: _slot(img, 120, n) for n in ("WRtg", "VARtg", "ARtg")}
        r121 = {n: _slot(img, 121, n) for n in ("WMax", "VAMax")}
        r123 = {n: _slot(img, 123, n) for n in ("WMaxLimPct", "WMaxLim_Ena")}
        regs = self.regs
        inv = self.physics.inverter

        def m103(st: HomeState) -> None:
            w = st.pv_w
            ph_a = w / 3.0 / NOMINAL_V
            hz = 50.0 + 0.02 * math.sin(st.t / 60.0)
            put(regs, s["A"], 3 * ph_a)
            for n in ("AphA", "AphB", "AphC"):
                put(regs, s[n], ph_a)
            put(regs, s["PhVphA"], NOMINAL_V + 1.0)
            put(regs, s["PhVphB"], NOMINAL_V)
            put(regs, s["PhVphC"], NOMINAL_V - 0.5)
            put(regs, s["W"], w)
            put(regs, s["Hz"], hz)
            put(regs, s["VA"], w)
            put(regs, s["VAr"], 0.0)
            put(regs, s["PF"], 100.0)
            put(regs, s["WH"], INVERTER_WH0 + st.pv_wh)
            dcw = w / INVERTER_EFFICIENCY
            put(regs, s["DCW"], dcw)
            put(regs, s["DCV"], INVERTER_DC_V if dcw > 0 else 0.0)
            put(regs, s["DCA"], dcw / INVERTER_DC_V)
            put(regs, s["TmpCab"], 30.0 + 15.0 * w / inv.rated_w)
            if st.pv_avail_w <= 0:
                state = 2  # SLEEPING
            elif w < st.pv_avail_w - 1.0:
                state = 5  # THROTTLED
            else:
                state = 4  # MPPT
            regs[s["St"].i] = state

        def m120(_: HomeState) -> None:
            put(regs, r120["WRtg"], inv.rated_w)
            put(regs, r120["VARtg"], inv.rated_w)
            put(regs, r120["ARtg"], inv.rated_w / 3.0 / NOMINAL_V)

        def m121(_: HomeState) -> None:
            put(regs, r121["WMax"], inv.wmax_w)
            put(regs, r121["VAMax"], inv.rated_w)

        def m123(_: HomeState) -> None:
            put(regs, r123["WMaxLimPct"], inv.pct)
            regs[r123["WMaxLim_Ena"].i] = 1 if inv.enabled else 0

        return {103: m103, 120: m120, 121: m121, 123: m123}

    def _writable_points(self) -> dict[tuple[int, str], Validator]:
        inv = self.physics.inverter
        w = super()._writable_points()
        w.update({
            (121, "WMax"): lambda v: 0 < v <= inv.rated_w,
            (123, "WMaxLimPct"): _in(0, 100),
            (123, "WMaxLimPct_WinTms"): _in(0, 65534),
            (123, "WMaxLimPct_RvrtTms"): _in(0, 65534),
            (123, "WMaxLimPct_RmpTms"): _in(0, 65534),
            (123, "WMaxLim_Ena"): lambda v: v in (0, 1),
        })
        return w

    def _apply_writes(self, written: set[tuple[int, str]]) -> None:
        img = self.image
        if (121, "WMax") in written:
            self.physics.set_wmax(img.get(121, "WMax") or 0.0)
        lim = {"WMaxLimPct", "WMaxLimPct_RvrtTms", "WMaxLimPct_RmpTms", "WMaxLim_Ena"}
        names = {n for m, n in written if m == 123} & lim
        if names:
            self.physics.command_inverter_limit(
                pct=img.get(123, "WMaxLimPct") if "WMaxLimPct" in names else None,
                enabled=bool(img.get_raw(123, "WMaxLim_Ena")) if "WMaxLim_Ena" in names
                else None,
                revert_s=img.get(123, "WMaxLimPct_RvrtTms")
                if "WMaxLimPct_RvrtTms" in names else None,
                ramp_s=img.get(123, "WMaxLimPct_RmpTms")
                if "WMaxLimPct_RmpTms" in names else None,
            )

    def default_out_of_range(self) -> dict[tuple[int, str], float]:
        return {(103, "W"): 32767.0 * 10.0**self.wsf}

    def default_ratings_change(self) -> dict[str, float]:
        return {"w_rtg": round(self.physics.config.inverter_rated_w * 0.6)}

    def apply_ratings(self, ratings: Mapping[str, float] | None) -> None:
        rated = self.physics.config.inverter_rated_w if ratings is None else ratings["w_rtg"]
        self.physics.set_ratings(inverter_rated_w=rated)
        self.refresh(0, len(self.regs))


# =================================================================================== battery


class BatteryDevice(SimulatedDevice):
    """Battery / storage: models 1, 124, 802."""

    kind = BATTERY

    def _build(self, base: int) -> RegisterImage:
        cfg = self.physics.config
        pmax = max(cfg.battery_max_charge_w, cfg.battery_max_discharge_w)
        wsf = sf_for(pmax * 1.5)
        whsf = sf_for(cfg.battery_wh, "uint16")
        ah = cfg.battery_wh / BATTERY_NOMINAL_V
        self.wsf = wsf
        return build_image(
            [
                _common("hems", "SunSpec storage (simulated)", f"BAT-{cfg.home_index:05d}",
                        self.unit),
                (124, {
                    "WChaMax_SF": wsf, "StorCtl_Mod": 0, "MinRsvPct_SF": -1,
                    "ChaState_SF": -1, "StorAval_SF": -1, "InBatV_SF": -1,
                    "OutWRte": 10000, "InWRte": 10000, "InOutWRte_SF": -2,
                    "InOutWRte_WinTms": 0, "InOutWRte_RvrtTms": 0, "ChaGriSet": 1,
                }),
                (802, {
                    "AHRtg": round(ah * 10), "AHRtg_SF": -1,
                    "WHRtg": round(cfg.battery_wh / 10.0**whsf), "WHRtg_SF": whsf,
                    "WChaDisChaMax_SF": wsf, "SoCMax": 1000, "SoCMin": 0, "SoC_SF": -1,
                    "SoH": 100, "SoH_SF": 0, "LocRemCtl": 0, "Typ": 4, "State": 3,
                    "Evt1": 0, "Evt2": 0, "VMax": 576, "VMin": 440, "V_SF": -1,
                    "AMax_SF": -1, "A_SF": -1, "W_SF": wsf, "CtrlHb": 0, "AlmRst": 0,
                }),
            ],
            base=base,
        )

    def _refreshers(self) -> dict[int, Callable[[HomeState], None]]:
        img = self.image
        r124 = {n: _slot(img, 124, n) for n in (
            "WChaMax", "StorCtl_Mod", "MinRsvPct", "ChaState", "StorAval", "InBatV", "ChaSt",
            "OutWRte", "InWRte")}
        r802 = {n: _slot(img, 802, n) for n in (
            "WChaRteMax", "WDisChaRteMax", "SoCRsvMin", "SoC", "NCyc", "ChaSt", "Hb", "V", "A",
            "AChaMax", "ADisChaMax", "W")}
        regs = self.regs
        ph = self.physics
        sto = ph.storage
        cap = ph.capacity_wh

        def volts(soc: float) -> float:
            return 48.0 + 6.0 * soc / 100.0

        def cha_st(st: HomeState) -> int:
            if st.battery_w > 0:
                return 4  # CHARGING
            if st.battery_w < 0:
                return 3  # DISCHARGING
            if st.soc_pct >= 99.999:
                return 5  # FULL
            if st.soc_pct <= sto.reserve_pct + 1e-3:
                return 2  # EMPTY
            return 6  # HOLDING

        def m124(st: HomeState) -> None:
            put(regs, r124["WChaMax"], sto.wchamax_w)
            regs[r124["StorCtl_Mod"].i] = sto.mode
            put(regs, r124["MinRsvPct"], sto.reserve_pct)
            put(regs, r124["ChaState"], st.soc_pct)
            aval = max(0.0, st.soc_pct - sto.reserve_pct) / 100.0 * cap / BATTERY_NOMINAL_V
            put(regs, r124["StorAval"], aval)
            put(regs, r124["InBatV"], volts(st.soc_pct))
            regs[r124["ChaSt"].i] = cha_st(st)
            put(regs, r124["OutWRte"], sto.out_pct)
            put(regs, r124["InWRte"], sto.in_pct)

        def m802(st: HomeState) -> None:
            v = volts(st.soc_pct)
            put(regs, r802["WChaRteMax"], sto.wchamax_w)
            put(regs, r802["WDisChaRteMax"], sto.max_discharge_w)
            put(regs, r802["SoCRsvMin"], sto.reserve_pct)
            put(regs, r802["SoC"], st.soc_pct)
            put(regs, r802["NCyc"], st.discharge_wh / cap if cap > 0 else 0.0)
            regs[r802["ChaSt"].i] = cha_st(st)
            regs[r802["Hb"].i] = int(st.t) % 0xFFFF
            put(regs, r802["V"], v)
            put(regs, r802["A"], st.battery_w / v)
            put(regs, r802["AChaMax"], sto.wchamax_w / BATTERY_NOMINAL_V)
            put(regs, r802["ADisChaMax"], sto.max_discharge_w / BATTERY_NOMINAL_V)
            put(regs, r802["W"], st.battery_w)

        return {124: m124, 802: m802}

    def _writable_points(self) -> dict[tuple[int, str], Validator]:
        w = super()._writable_points()
        w.update({
            (124, "WChaMax"): lambda v: 0 < v <= self._max_rating(),
            (124, "StorCtl_Mod"): lambda v: v in (0, 1, 2, 3),
            (124, "MinRsvPct"): _in(0, 100),
            (124, "OutWRte"): _in(-100, 100),
            (124, "InWRte"): _in(-100, 100),
            (124, "InOutWRte_WinTms"): _in(0, 65534),
            (124, "InOutWRte_RvrtTms"): _in(0, 65534),
            (124, "ChaGriSet"): lambda v: v in (0, 1),
            (802, "SoCRsvMin"): _in(0, 100),
            (802, "CtrlHb"): _in(0, 65535),
            (802, "AlmRst"): _in(0, 65535),
        })
        return w

    def _max_rating(self) -> float:
        f = self.faults.current().get(FaultKind.RATINGS_CHANGE)
        if f is not None:
            return f.ratings["w_cha_max"]
        return self.physics.config.battery_max_charge_w

    def _apply_writes(self, written: set[tuple[int, str]]) -> None:
        img = self.image
        ph = self.physics
        if (124, "WChaMax") in written:
            ph.set_wchamax(img.get(124, "WChaMax") or 0.0)
        if (124, "MinRsvPct") in written:
            ph.set_reserve_pct(img.get(124, "MinRsvPct") or 0.0)
        if (802, "SoCRsvMin") in written:
            ph.set_reserve_pct(img.get(802, "SoCRsvMin") or 0.0)
        names = {n for m, n in written if m == 124} & {
            "StorCtl_Mod", "InWRte", "OutWRte", "InOutWRte_RvrtTms"}
        if names:
            mode = img.get_raw(124, "StorCtl_Mod")
            ph.command_storage(
                mode=int(mode) if "StorCtl_Mod" in names and isinstance(mode, int) else None,
                in_pct=img.get(124, "InWRte") if "InWRte" in names else None,
                out_pct=img.get(124, "OutWRte") if "OutWRte" in names else None,
                revert_s=img.get(124, "InOutWRte_RvrtTms")
                if "InOutWRte_RvrtTms" in names else None,
            )

    def default_out_of_range(self) -> dict[tuple[int, str], float]:
        return {(124, "ChaState"): 250.0, (802, "SoC"): 250.0}

    def default_ratings_change(self) -> dict[str, float]:
        return {"w_cha_max": round(self.physics.config.battery_max_charge_w * 0.5)}

    def apply_ratings(self, ratings: Mapping[str, float] | None) -> None:
        cfg = self.physics.config
        if ratings is None:
            self.physics.set_ratings(battery_max_w=cfg.battery_max_charge_w)
            self.physics.storage.max_discharge_w = cfg.battery_max_discharge_w
        else:
            self.physics.set_ratings(battery_max_w=ratings["w_cha_max"])
        self.refresh(0, len(self.regs))


# ===================================================================================== meter


class MeterDevice(SimulatedDevice):
    """Site meter at the connection point: models 1, 203."""

    kind = METER

    def _build(self, base: int) -> RegisterImage:
        cfg = self.physics.config
        # The site imports at most the household's peak plus a charging battery and exports at
        # most a full inverter plus a discharging battery: size the scale factor on that, so a
        # typical home keeps 1 W resolution (W_SF = 0).
        lp = self.physics.load_profile
        load_peak = float(np.max(np.asarray(lp.values))) * lp.scale * 1.1
        peak = max(
            load_peak + cfg.battery_max_charge_w,
            cfg.inverter_rated_w + cfg.battery_max_discharge_w,
        )
        wsf = sf_for(peak)
        self.wsf = wsf
        return build_image(
            [
                _common("hems", "SunSpec meter (simulated)", f"MTR-{cfg.home_index:05d}",
                        self.unit),
                (203, {
                    "A_SF": -2, "V_SF": -1, "Hz_SF": -2, "W_SF": wsf, "TotWh_SF": 0,
                    "Evt": 0,
                }),
            ],
            base=base,
        )

    def _refreshers(self) -> dict[int, Callable[[HomeState], None]]:
        img = self.image
        r = {n: _slot(img, 203, n) for n in (
            "A", "AphA", "AphB", "AphC", "PhV", "PhVphA", "PhVphB", "PhVphC", "PPV",
            "PhVphAB", "PhVphBC", "PhVphCA", "Hz", "W", "WphA", "WphB", "WphC", "TotWhExp",
            "TotWhImp")}
        regs = self.regs
        volts = (NOMINAL_V + 1.0, NOMINAL_V, NOMINAL_V - 0.5)

        def m203(st: HomeState) -> None:
            amps = [abs(w) / v for w, v in zip(st.phases_w, volts, strict=True)]
            put(regs, r["A"], sum(amps))
            put(regs, r["AphA"], amps[0])
            put(regs, r["AphB"], amps[1])
            put(regs, r["AphC"], amps[2])
            put(regs, r["PhV"], sum(volts) / 3.0)
            put(regs, r["PhVphA"], volts[0])
            put(regs, r["PhVphB"], volts[1])
            put(regs, r["PhVphC"], volts[2])
            ll = NOMINAL_V * math.sqrt(3.0)
            put(regs, r["PPV"], ll)
            put(regs, r["PhVphAB"], ll)
            put(regs, r["PhVphBC"], ll)
            put(regs, r["PhVphCA"], ll)
            put(regs, r["Hz"], 50.0 + 0.02 * math.sin(st.t / 60.0))
            put(regs, r["W"], st.site_w)
            put(regs, r["WphA"], st.phases_w[0])
            put(regs, r["WphB"], st.phases_w[1])
            put(regs, r["WphC"], st.phases_w[2])
            put(regs, r["TotWhImp"], METER_IMPORT0_WH + st.import_wh)
            put(regs, r["TotWhExp"], METER_EXPORT0_WH + st.export_wh)

        return {203: m203}

    def default_out_of_range(self) -> dict[tuple[int, str], float]:
        return {(203, "W"): 32767.0 * 10.0**self.wsf}


def build_devices(
    physics: HomePhysics, units: tuple[int, int, int] = (1, 1, 1), base: int = 40000
) -> dict[str, SimulatedDevice]:
    """The devices of one home (no inverter without PV, no battery without a battery)."""
    cfg = physics.config
    out: dict[str, SimulatedDevice] = {}
    if cfg.has_pv:
        out[INVERTER] = InverterDevice(physics, units[0], base)
    if cfg.has_battery:
        out[BATTERY] = BatteryDevice(physics, units[1], base)
    out[METER] = MeterDevice(physics, units[2], base)
    return out
