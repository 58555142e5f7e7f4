"""Planning in a child process (``use_plan_process``): the community workers' way to keep long
plans from holding the interpreter lock their fast loops need. Real child processes, real
solves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import BrokenExecutor
from pathlib import Path

import numpy as np
import pytest

import gateway.planner as planner_mod
from gateway.daemon import Gateway
from gateway.planner import Planner, close_plan_executor, in_plan_thread, use_plan_process

from .helpers import DAY, T0, ManualClock, planner_config, seed_history, site_state

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def plan_process() -> Iterator[None]:
    """This test process plans in a child at nice 7; the thread again afterwards."""
    close_plan_executor()
    use_plan_process(7, 96, 900.0)
    try:
        yield
    finally:
        close_plan_executor()
        planner_mod._process = None


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    seed_history(str(tmp_path / "gw.db"), T0 - 7 * DAY, T0)
    g = Gateway(planner_config(str(tmp_path / "gw.db")), ManualClock(T0))
    await g.open()
    g.live = site_state(T0, 1500.0)
    yield g
    g.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has exited
    except FileNotFoundError:
        return True


async def test_the_child_makes_the_plan_the_thread_makes(gw: Gateway) -> None:
    gw.planner = Planner(gw.cfg)
    assert await gw.planner.plan_once(gw)
    on_thread = gw.planner.last
    assert on_thread is not None
    close_plan_executor()
    use_plan_process(7, 96, 900.0)
    try:
        child = await in_plan_thread(os.getpid)
        assert child != os.getpid()
        assert await in_plan_thread(os.nice, 0) == 7  # lowered after the warm-up
        gw.planner = Planner(gw.cfg)
        assert await gw.planner.plan_once(gw)
        in_child = gw.planner.last
        assert in_child is not None and in_child.plan.source == "lp"
        np.testing.assert_allclose(in_child.plan.battery_w, on_thread.plan.battery_w,
                                   atol=1e-3)
        np.testing.assert_allclose(in_child.inputs.load_w, on_thread.inputs.load_w)
        assert await in_plan_thread(os.getpid) == child  # one child for every job
    finally:
        close_plan_executor()
        planner_mod._process = None
    assert _gone(child) or await _eventually_gone(child)
    assert await in_plan_thread(os.getpid) == os.getpid()  # the thread again


async def _eventually_gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if _gone(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_dead_child_is_replaced(plan_process: None) -> None:
    first = await in_plan_thread(os.getpid)
    os.kill(first, signal.SIGKILL)
    assert await _eventually_gone(first)
    with pytest.raises(BrokenExecutor):
        for _ in range(50):  # the pool may notice the death only at the next job
            await in_plan_thread(os.getpid)
            await asyncio.sleep(0.05)
    second = await in_plan_thread(os.getpid)
    assert second not in (first, os.getpid())
    assert await in_plan_thread(os.nice, 0) == 7


def test_the_child_leaves_with_its_parent(tmp_path: Path) -> None:
    # A parent that dies without closing its executor (killed, crashed) must not leave the
    # planning child waiting for jobs forever.
    code = (
        "import asyncio, os\n"
        "from gateway.planner import in_plan_thread, use_plan_process\n"
        "use_plan_process(3, 8, 900.0)\n"
        "print(asyncio.run(in_plan_thread(os.getpid)), flush=True)\n"
        "os._exit(0)\n"
    )
    # Into a file, not a pipe: a child left behind would hold a pipe open, and the run with it.
    with open(tmp_path / "out.txt", "w") as f:
        rc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=f, timeout=120)
    assert rc.returncode == 0
    child = int((tmp_path / "out.txt").read_text().split()[-1])
    end = time.monotonic() + 10.0
    while not _gone(child) and time.monotonic() < end:
        time.sleep(0.1)
    assert _gone(child), f"planning child {child} outlived its parent"


def test_use_plan_process_is_checked(plan_process: None) -> None:
    with pytest.raises(ValueError, match="nice"):
        use_plan_process(20, 96, 900.0)
    asyncio.run(in_plan_thread(os.getpid))  # the child now exists
    with pytest.raises(RuntimeError, match="before the first"):
        use_plan_process(5, 96, 900.0)
