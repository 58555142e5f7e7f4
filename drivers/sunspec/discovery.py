"""SunSpec discovery: find the ``SunS`` marker, then walk the model chain to its end marker.

A SunSpec device maps, from a base address (40000, else 0, else 50000), the two registers
``SunS`` and then a chain of models, each ``ID, L, <L registers>``, ended by ``0xFFFF``. The walk
reads only the two header registers of each model; it is done once per connection.

What can go wrong gets one clear :class:`DiscoveryError` (a :class:`DeviceError`) naming the
device and what was found: no marker at any base (the bases tried and what each answered), a
chain that never ends (more than ``max_models`` models, or running off the address space), a
model shorter than its official fixed block, a Modbus exception or short read mid-chain.
Unknown model ids (vendor models, models without an official definition) are kept in the map
with ``known=False`` and skipped by decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from drivers.natures import DeviceError, DeviceRejected, DeviceTimeout
from drivers.sunspec.models import (
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDefinitionError,
    load_model,
)

DEFAULT_BASES = (40000, 0, 50000)


class HoldingReader(Protocol):
    """What discovery and decoding need from a link (a :class:`~drivers.modbus.ModbusLink`)."""

    name: str
    where: str

    async def read_holding(self, address: int, count: int) -> list[int]: ...


class DiscoveryError(DeviceError):
    """The device is not (well-formed) SunSpec: the message says what was found where."""


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """One model in a device's chain: ``address`` is the absolute address of its ID register;
    ``length`` is its ``L`` (registers after ID and L)."""

    id: int
    address: int
    length: int
    known: bool = True
    name: str = ""

    @property
    def size(self) -> int:
        """Registers occupied, ID and L included."""
        return self.length + 2

    @property
    def end(self) -> int:
        """First address after the model."""
        return self.address + self.length + 2


@dataclass(frozen=True, slots=True)
class SunSpecMap:
    """Where each model of a device lives."""

    base: int
    models: tuple[ModelLocation, ...]

    def find(self, model_id: int) -> ModelLocation | None:
        """The first instance of ``model_id``, or None."""
        for m in self.models:
            if m.id == model_id:
                return m
        return None

    def first_of(self, ids: Sequence[int]) -> ModelLocation | None:
        """The first model in the chain whose id is in ``ids``."""
        for m in self.models:
            if m.id in ids:
                return m
        return None

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self.models]


def _hex(regs: Sequence[int]) -> str:
    return " ".join(f"0x{r:04X}" for r in regs)


async def find_base(link: HoldingReader, bases: Sequence[int] = DEFAULT_BASES) -> int:
    """The first of ``bases`` that holds the ``SunS`` marker."""
    tried: list[str] = []
    timeouts = 0
    last_timeout: DeviceTimeout | None = None
    for base in bases:
        try:
            regs = await link.read_holding(base, 2)
        except DeviceTimeout as e:
            timeouts += 1
            tried.append(f"{base} (no reply)")
            last_timeout = e
            continue
        except DeviceRejected as e:
            tried.append(f"{base} ({e.reason.split(' reading')[0]})")
            continue
        if tuple(regs) == SUNS_MARKER:
            return base
        tried.append(f"{base} (read {_hex(regs)})")
    if last_timeout is not None and timeouts == len(bases):
        raise last_timeout
    raise DiscoveryError(
        link.name,
        f"not a SunSpec device at {link.where}: no 'SunS' marker at base "
        + ", ".join(tried)
        + " (is this a SunSpec device, and is the unit id right?)",
    )


def _check_length(
    link: HoldingReader, model_id: int, address: int, length: int
) -> tuple[bool, str]:
    """(known, name); raises if the block is shorter than the official fixed block."""
    try:
        mdef = load_model(model_id)
    except ModelDefinitionError:
        return False, ""
    if length < mdef.fixed_length:
        raise DiscoveryError(
            link.name,
            f"model {model_id} ({mdef.name}) at {address} on {link.where} has length "
            f"L={length}, shorter than its official fixed block of {mdef.fixed_length} registers",
        )
    # Longer than the fixed block: repeating-group instances or a vendor extension of the
    # model; both are legal, the extra registers are decoded as groups where they fit.
    return True, mdef.name


async def discover(
    link: HoldingReader,
    bases: Sequence[int] = DEFAULT_BASES,
    max_models: int = 100,
) -> SunSpecMap:
    """Find the SunSpec base and walk the model chain to the end marker ``0xFFFF``."""
    base = await find_base(link, bases)
    models: list[ModelLocation] = []
    addr = base + 2
    while True:
        if addr + 2 > 0x10000:
            raise DiscoveryError(
                link.name,
                f"SunSpec model chain on {link.where} runs past the end of the address space "
                f"(next header would be at {addr}) without the end marker 0xFFFF",
            )
        try:
            mid, length = await link.read_holding(addr, 2)
        except DeviceRejected as e:
            after = (
                f"after model {models[-1].id} at {models[-1].address}" if models else "after SunS"
            )
            raise DiscoveryError(
                link.name,
                f"SunSpec model chain on {link.where} broken at {addr} ({after}): "
                f"{e.reason}; no end marker 0xFFFF",
            ) from None
        if mid == END_MODEL_ID:
            return SunSpecMap(base=base, models=tuple(models))
        if len(models) >= max_models:
            raise DiscoveryError(
                link.name,
                f"SunSpec model chain on {link.where} does not end: more than {max_models} "
                f"models from base {base} (last model id {mid} at {addr}), no end marker 0xFFFF",
            )
        if addr + 2 + length > 0x10000:
            raise DiscoveryError(
                link.name,
                f"model {mid} at {addr} on {link.where} claims length L={length}, past the "
                f"end of the address space",
            )
        known, name = _check_length(link, mid, addr, length)
        models.append(ModelLocation(mid, addr, length, known, name))
        addr += 2 + length
