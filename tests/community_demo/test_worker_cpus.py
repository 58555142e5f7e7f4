"""Community workers pinned one per core (community.community_demo.worker_cpus / _pin)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from community.community_demo import usable_cpus, worker_cpus


def test_one_core_each_while_there_are_enough() -> None:
    assert worker_cpus(2, [0, 1]) == [0, 1]
    assert worker_cpus(2, [0, 1, 2, 3]) == [0, 1]
    # a container's share need not start at 0 nor be contiguous
    assert worker_cpus(3, [2, 5, 7]) == [2, 5, 7]


def test_no_pinning_when_oversubscribed_or_on_one_core() -> None:
    assert worker_cpus(3, [0, 1]) == [None, None, None]
    assert worker_cpus(1, [0]) == [None]


def test_usable_cpus_is_this_process_mask() -> None:
    cpus = usable_cpus()
    assert cpus and cpus == sorted(set(cpus))
    if hasattr(os, "sched_getaffinity"):
        assert set(cpus) == os.sched_getaffinity(0)


@pytest.mark.skipif(len(usable_cpus()) < 2 or not sys.platform.startswith("linux"),
                    reason="pinning is only observable with two or more cores (Linux)")
def test_pin_moves_every_thread_including_those_started_before() -> None:
    cpu = usable_cpus()[-1]
    script = textwrap.dedent(f"""
        import json, os, threading
        from community.community_demo import _pin
        gate = threading.Event()
        early = threading.Thread(target=gate.wait)  # like numpy's BLAS pool: there before
        early.start()
        _pin({cpu})
        late = threading.Thread(target=gate.wait)  # started after: inherits the mask
        late.start()
        masks = {{t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}}
        gate.set()
        print(json.dumps(masks))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    masks = json.loads(out.stdout)
    assert len(masks) >= 3  # main, early, late
    assert all(m == [cpu] for m in masks.values()), masks
