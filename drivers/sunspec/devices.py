"""SunSpec devices as natures: :class:`SunSpecMeter`, :class:`SunSpecInverter`,
:class:`SunSpecBattery` (the Protocols of :mod:`drivers.natures`).

Each poll reads only the models that change (coalesced into as few Modbus requests as the map
allows); nameplate/settings models are read at the first poll and again every
``static_refresh_s`` domain seconds, so a device that comes back with other ratings is noticed.

Sign conventions of the devices, and how they become ours (+ import, + charge, + generation):

* meter (models 201-204, 211-214): SunSpec meters report ``W`` positive when real power flows
  from the grid into the site (import) and negative on export: taken as is.
* inverter (101-103, 111-113): ``W`` is AC output, positive when generating: taken as is.
* battery (802): ``W`` is "total power flowing to/from the battery bank"; the specification does
  not fix the sign. We assume power flowing INTO the battery is positive (charging), which is
  also our convention (and firmware_sim's); a device that reports discharge as positive is
  handled with ``w_charge_positive=False``. Without model 802, a storage inverter's 10x ``W``
  (AC output, + = out of the battery) is taken as discharge.
"""

from __future__ import annotations

from collections.abc import Sequence

from drivers.clock import Clock, WallClock
from drivers.natures import (
    BatteryReading,
    DeviceError,
    InverterReading,
    MeterReading,
)
from drivers.sunspec.discovery import SunSpecMap
from drivers.sunspec.reader import ModelValues, RegisterLink, SunSpecReader, WriteRefused

METER_MODELS = (201, 202, 203, 204, 211, 212, 213, 214)
INVERTER_MODELS = (101, 102, 103, 111, 112, 113)
BATTERY_MODELS = (124, 802)

STATIC_REFRESH_S = 600.0

_INV_POINTS = ("W", "DCW", "WH", "St")
_METER_POINTS = ("W", "WphA", "WphB", "WphC", "TotWhImp", "TotWhExp", "PhV", "PhVphA", "Hz")

#: The points a poll decodes, per model (decoding every point of every model each cycle would
#: cost more CPU than the Modbus exchange itself).
POLL_POINTS: dict[int, tuple[str, ...]] = {
    **{m: _INV_POINTS for m in INVERTER_MODELS},
    **{m: _METER_POINTS for m in METER_MODELS},
    120: ("WRtg", "WHRtg"),
    121: ("WMax",),
    123: ("WMaxLimPct", "WMaxLim_Ena", "WMaxLimPct_RvrtTms"),
    124: ("WChaMax", "StorCtl_Mod", "MinRsvPct", "ChaState", "InWRte", "OutWRte",
          "InOutWRte_RvrtTms"),
    802: ("SoC", "WHRtg", "WChaRteMax", "WDisChaRteMax", "W", "SoH"),
}


def _poll_points(ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    return {i: POLL_POINTS[i] for i in ids if i in POLL_POINTS}


class _SunSpecDevice:
    """Shared plumbing: a reader over a discovered map, a clock, and the static-model cache."""

    kind = "device"

    def __init__(
        self,
        link: RegisterLink,
        smap: SunSpecMap,
        *,
        name: str | None = None,
        clock: Clock | None = None,
        static_refresh_s: float = STATIC_REFRESH_S,
    ) -> None:
        self.link = link
        self.smap = smap
        self.reader = SunSpecReader(link, smap)
        self.name = name or link.name
        self.clock: Clock = clock or WallClock()
        self.static_refresh_s = static_refresh_s
        self._static_at: float | None = None
        self._static: dict[int, ModelValues] = {}

    def _has(self, model_id: int) -> bool:
        loc = self.smap.find(model_id)
        return loc is not None and loc.known

    def _err(self, msg: str) -> DeviceError:
        return DeviceError(self.name, msg)

    async def _poll(self, dynamic: Sequence[int], static: Sequence[int]) -> dict[int, ModelValues]:
        """Read ``dynamic`` models, plus ``static`` ones when due, in one coalesced plan,
        decoding only the points in :data:`POLL_POINTS`."""
        now = self.clock.now()
        due = self._static_at is None or now - self._static_at >= self.static_refresh_s
        wanted = list(dynamic) + (list(static) if due else [])
        got = await self.reader.read(*wanted, points=_poll_points(wanted)) if wanted else {}
        if due:
            self._static = {i: got[i] for i in static}
            self._static_at = now
        out = dict(self._static)
        out.update({i: got[i] for i in dynamic})
        return out

    def invalidate_static(self) -> None:
        """Re-read the nameplate/settings models at the next poll."""
        self._static_at = None

    async def close(self) -> None:
        """Close the device's Modbus connection."""
        await self.link.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, models={self.smap.ids})"


def _req(mv: ModelValues, point: str, device: str) -> float:
    v = mv.num(point)
    if v is None:
        raise DeviceError(device, f"model {mv.id} point {point} is not implemented (or not "
                                  f"a finite number, or its scale factor is not implemented), "
                                  f"but hems needs it")
    return v


class SunSpecMeter(_SunSpecDevice):
    """Site meter: SunSpec model 201-204 (or float 211-214). One Modbus read per poll."""

    kind = "meter"

    def __init__(
        self,
        link: RegisterLink,
        smap: SunSpecMap,
        *,
        name: str | None = None,
        clock: Clock | None = None,
        static_refresh_s: float = STATIC_REFRESH_S,
    ) -> None:
        super().__init__(link, smap, name=name, clock=clock, static_refresh_s=static_refresh_s)
        loc = smap.first_of(METER_MODELS)
        if loc is None:
            raise self._err(f"no SunSpec meter model (201-204, 211-214) in {smap.ids}")
        self.model_id = loc.id

    async def read(self) -> MeterReading:
        m = (await self._poll([self.model_id], []))[self.model_id]
        phases = (m.num("WphA"), m.num("WphB"), m.num("WphC"))
        v = m.num("PhV")
        if v is None:
            v = m.num("PhVphA")
        return MeterReading(
            ts=self.clock.now(),
            site_w=_req(m, "W", self.name),
            phases_w=phases,
            import_wh=m.num("TotWhImp"),
            export_wh=m.num("TotWhExp"),
            voltage_v=v,
            freq_hz=m.num("Hz"),
        )


class SunSpecInverter(_SunSpecDevice):
    """PV inverter: 101-103 (or 111-113) for output, 120 nameplate (WRtg), 121 settings (WMax),
    123 immediate controls (WMaxLimPct with its revert timer)."""

    kind = "inverter"

    def __init__(
        self,
        link: RegisterLink,
        smap: SunSpecMap,
        *,
        name: str | None = None,
        clock: Clock | None = None,
        static_refresh_s: float = STATIC_REFRESH_S,
    ) -> None:
        super().__init__(link, smap, name=name, clock=clock, static_refresh_s=static_refresh_s)
        loc = smap.first_of(INVERTER_MODELS)
        if loc is None:
            raise self._err(f"no SunSpec inverter model (101-103, 111-113) in {smap.ids}")
        if not (self._has(120) or self._has(121)):
            raise self._err(f"inverter has neither model 120 (WRtg) nor 121 (WMax): {smap.ids}")
        self.model_id = loc.id
        self._static_ids = [i for i in (120, 121) if self._has(i)]
        self._dynamic_ids = [self.model_id] + ([123] if self._has(123) else [])

    async def read(self) -> InverterReading:
        ms = await self._poll(self._dynamic_ids, self._static_ids)
        inv = ms[self.model_id]
        wrtg = ms[120].num("WRtg") if 120 in ms else None
        wmax = ms[121].num("WMax") if 121 in ms else None
        rated = wrtg if wrtg is not None else wmax
        max_w = wmax if wmax is not None else wrtg
        if rated is None or max_w is None:
            raise self._err("inverter reports neither WRtg (120) nor WMax (121)")
        ctl = ms.get(123)
        st = inv.get("St")
        return InverterReading(
            ts=self.clock.now(),
            ac_w=_req(inv, "W", self.name),
            dc_w=inv.num("DCW"),
            rated_w=rated,
            max_w=max_w,
            limit_pct=ctl.num("WMaxLimPct") if ctl else None,
            limit_enabled=bool(ctl and ctl.get("WMaxLim_Ena") == 1),
            limit_revert_s=ctl.num("WMaxLimPct_RvrtTms") if ctl else None,
            energy_wh=inv.num("WH"),
            state=st if isinstance(st, int) else None,
        )

    def _need_123(self) -> None:
        if not self._has(123):
            raise WriteRefused(self.name, "inverter has no model 123: its power cannot be limited")

    async def set_limit_pct(self, pct: float, revert_s: float) -> None:
        """Limit AC output to ``pct`` % of WMax; the inverter reverts after ``revert_s`` s.
        Writes WMaxLimPct, WMaxLimPct_RvrtTms, then WMaxLim_Ena=1; all read back."""
        self._need_123()
        if not 0.0 <= pct <= 100.0:
            raise WriteRefused(self.name, f"limit {pct:g} % outside 0..100 %")
        if not 0.0 <= revert_s <= 65534:
            raise WriteRefused(self.name, f"revert time {revert_s:g} s outside 0..65534 s")
        await self.reader.write(
            123,
            {"WMaxLimPct": pct, "WMaxLimPct_RvrtTms": round(revert_s), "WMaxLim_Ena": 1},
        )

    async def clear_limit(self) -> None:
        """WMaxLim_Ena = 0 (disabled), read back."""
        self._need_123()
        await self.reader.write(123, {"WMaxLim_Ena": 0})


class SunSpecBattery(_SunSpecDevice):
    """Storage: 124 (basic storage controls) and 802 (battery) where present; 120 WHRtg when 802
    is absent."""

    kind = "battery"

    def __init__(
        self,
        link: RegisterLink,
        smap: SunSpecMap,
        *,
        w_charge_positive: bool = True,
        name: str | None = None,
        clock: Clock | None = None,
        static_refresh_s: float = STATIC_REFRESH_S,
    ) -> None:
        super().__init__(link, smap, name=name, clock=clock, static_refresh_s=static_refresh_s)
        if not self._has(802) and not self._has(124):
            raise self._err(f"no SunSpec storage model (124, 802) in {smap.ids}")
        inv = smap.first_of(INVERTER_MODELS)
        self._inv_id: int | None = None
        if not self._has(802):
            # No battery model: a storage inverter's AC output (10x W, + = out of the battery)
            # is the battery power, discharge positive.
            if inv is None:
                raise self._err(f"battery power unknown: neither model 802 nor an inverter "
                                f"model (101-103) in {smap.ids}")
            if not self._has(120):
                raise self._err(f"battery capacity unknown: neither 802 nor 120 WHRtg in "
                                f"{smap.ids}")
            self._inv_id = inv.id
        self.w_sign = 1.0 if w_charge_positive else -1.0
        self._dynamic_ids = [i for i in (124, 802) if self._has(i)]
        if self._inv_id is not None:
            self._dynamic_ids.append(self._inv_id)
        self._static_ids = [120] if self._has(120) and not self._has(802) else []

    async def read(self) -> BatteryReading:
        ms = await self._poll(self._dynamic_ids, self._static_ids)
        b = ms.get(802)
        s = ms.get(124)
        npl = ms.get(120)
        soc = b.num("SoC") if b else None
        if soc is None and s is not None:
            soc = s.num("ChaState")
        cap = b.num("WHRtg") if b else None
        if cap is None and npl is not None:
            cap = npl.num("WHRtg")
        wchamax = s.num("WChaMax") if s else None
        max_ch = b.num("WChaRteMax") if b else None
        max_dis = b.num("WDisChaRteMax") if b else None
        if max_ch is None:
            max_ch = wchamax
        if max_dis is None:
            max_dis = wchamax
        missing = [n for n, v in (("SoC", soc), ("capacity WHRtg", cap),
                                  ("max charge W", max_ch), ("max discharge W", max_dis))
                   if v is None]
        if missing:
            raise self._err(f"battery does not report {', '.join(missing)}")
        assert soc is not None and cap is not None and max_ch is not None and max_dis is not None
        if b is not None:
            w = self.w_sign * _req(b, "W", self.name)
        else:
            assert self._inv_id is not None
            w = -_req(ms[self._inv_id], "W", self.name)
        mode = s.get("StorCtl_Mod") if s else None
        return BatteryReading(
            ts=self.clock.now(),
            w=w,
            soc_pct=soc,
            capacity_wh=cap,
            max_charge_w=max_ch,
            max_discharge_w=max_dis,
            reserve_pct=s.num("MinRsvPct") if s else None,
            ctl_mode=mode if isinstance(mode, int) else 0,
            in_rate_pct=s.num("InWRte") if s else None,
            out_rate_pct=s.num("OutWRte") if s else None,
            revert_s=s.num("InOutWRte_RvrtTms") if s else None,
            soh_pct=b.num("SoH") if b else None,
        )

    async def set_power(self, w: float, revert_s: float) -> None:
        """Hold the battery at ``w`` W (+ charge, - discharge) with the model 124 rate window:
        StorCtl_Mod = 3 (both limits active) and InWRte = -OutWRte = w / WChaMax * 100, so the
        window is the single point ``w``; the device reverts after ``revert_s``. |w| beyond
        WChaMax is clamped to 100 %. All points are read back."""
        if not self._has(124):
            raise WriteRefused(self.name, "battery has no model 124: its power cannot be set")
        if not 0.0 <= revert_s <= 65534:
            raise WriteRefused(self.name, f"revert time {revert_s:g} s outside 0..65534 s")
        s = self.reader.last.get(124) or (await self.reader.read(124))[124]
        wchamax = s.num("WChaMax")
        if not wchamax or wchamax <= 0:
            raise WriteRefused(self.name, f"WChaMax is {wchamax!r}: cannot express a power in %")
        pct = min(100.0, abs(w) / wchamax * 100.0)
        in_pct, out_pct = (pct, -pct) if w >= 0 else (-pct, pct)
        # Rates and timer first, then the mode that makes them active.
        await self.reader.write(
            124,
            {
                "OutWRte": out_pct,
                "InWRte": in_pct,
                "InOutWRte_RvrtTms": round(revert_s),
                "StorCtl_Mod": 3,
            },
        )

    async def release(self) -> None:
        """StorCtl_Mod = 0: the battery returns to its own mode now."""
        if not self._has(124):
            raise WriteRefused(self.name, "battery has no model 124")
        await self.reader.write(124, {"StorCtl_Mod": 0})
