"""How many CPU threads a training process uses, chosen phase by phase from what its steps see.

On an idle machine every core helps, and the OpenMP threads wait for each other by spinning for
a bounded time (``process_defaults``).  As soon as another process holds a core, the thread that
shares it with that process makes every parallel region wait for it: on 2 cores, preset ``32``
batch 2 in bf16 took 2.9 s per step with 2 threads and a neighbour spinning on one core, against
1.4 s with 1 thread (and 0.75 s idle; ``docs/performance.md``).  No setting known at start is right
for a multi-day run on a shared machine, so the governor watches two cheap signals:

- with all threads, the share of the step's wall time for which its threads had a core (process
  CPU time / wall time / threads): near 1 when the cores are ours, about 0.5 with a neighbour on
  one of 2 cores; below ``BUSY`` it times a few steps with half the threads and keeps the faster;
- with fewer threads, the idle time of the whole machine (``/proc/stat``): when the cores it gave
  up are idle again, it times a few steps with all threads (elsewhere: now and then).

A comparison that keeps the count is not repeated for a while (the wait doubles up to
``LONGEST_WAIT`` steps), so a machine where the signal misleads pays little.

The thread count changes the order of floating-point sums (oneDNN and ATen split reductions by
thread), so a run whose thread count changed is not bitwise the same as one that kept it.  The
governor therefore stays off when the run asks for bitwise repeatability (``deterministic``),
when the user fixed the thread count (``threads_per_rank`` or ``OMP_NUM_THREADS``), off the CPU,
and with several processes (each rank's threads are planned by its launcher).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from typing import Callable

import torch

SETTLE = 3  # steps ignored at the start and after each change of thread count
FIRST_WAIT = 10  # steps between a comparison that kept the count and the next (doubles each time)
LONGEST_WAIT = 400
PROBE_STEPS = 3  # steps timed with the other count, after SETTLE steps
BUSY = 0.75  # with all threads: below this share of time on a core, try fewer
FREE = 0.7  # with fewer threads: this share of the given-up cores idle, try all
MARGIN = 0.95  # the other count must be at least 5 % faster to be kept


def governor_wanted(deterministic: bool, threads_per_rank: int | None, device: torch.device,
                    world_size: int) -> bool:
    """Whether the thread count may change during this run (see the module docstring)."""
    return (device.type == "cpu" and world_size == 1 and not deterministic and not threads_per_rank
            and "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1)


def machine_idle_seconds() -> float | None:
    """Idle CPU seconds of the whole machine since boot, summed over its cores (Linux's
    ``/proc/stat``); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        idle = float(fields[4]) + float(fields[5])  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None
    return idle / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


class ThreadGovernor:
    """Times each training step and switches between all threads and half of them.

    ``run_step`` wraps one training step; it returns the step's result and, when the thread count
    changed after it, one line saying why (for the console and the log)."""

    def __init__(self, enabled: bool, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time,
                 machine: Callable[[], float | None] = machine_idle_seconds,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.enabled, self.clock, self.cpu_clock, self.machine = enabled, clock, cpu_clock, machine
        self.set_threads = set_threads
        self.full = torch.get_num_threads()
        self.choice = self.full  # the thread count kept between comparisons
        # (seconds, signal) of the latest steps with ``choice`` threads; the signal is the on-core
        # share with all threads, the machine's idle cores with fewer (None: not known here)
        self.recent: deque[tuple[float, float | None]] = deque(maxlen=3)
        self.settle = SETTLE
        self.wait = FIRST_WAIT
        self.countdown = 0  # steps until a signal may start a comparison
        self.probe: list[float] | None = None  # step times with the other count, while comparing
        self.switches = 0

    def settle_after_side_work(self) -> None:
        """Ignores the next few steps: right after a validation, checkpoint or figure the first
        steps run slow while the data worker refills its queue and memory is reused, and read as a
        neighbour (the calibration of ``bench/quality.py`` once switched to one thread on them)."""
        self.settle = max(self.settle, SETTLE)

    def restore(self) -> None:
        """Gives the process back the thread count it had before the run: a later run in the same
        process (``bench/quality.py``'s calibration, then its training; a notebook) starts from all
        threads, not from the count the last neighbour left behind."""
        if self.enabled:
            self.set_threads(self.full)

    @property
    def other(self) -> int:
        return max(1, self.full // 2) if self.choice == self.full else self.full

    def run_step(self, step: Callable[[], object]) -> tuple[object, str | None]:
        if not self.enabled:
            return step(), None
        watching = self.settle == 0 and self.probe is None  # this step's signal will be used
        by_machine = watching and self.choice != self.full
        start, cpu = self.clock(), self.cpu_clock()
        idle = self.machine() if by_machine else None
        result = step()
        seconds = max(self.clock() - start, 1e-9)
        if not watching:
            signal = None
        elif by_machine:
            after = self.machine()
            signal = None if idle is None or after is None else (after - idle) / seconds
        else:
            signal = (self.cpu_clock() - cpu) / seconds / self.choice
        return result, self._record(seconds, signal)

    def _record(self, seconds: float, signal: float | None) -> str | None:
        if self.settle > 0:
            self.settle -= 1
            return None
        if self.probe is not None:
            self.probe.append(seconds)
            return self._finish_probe() if len(self.probe) == PROBE_STEPS else None
        self.recent.append((seconds, signal))
        self.countdown -= 1
        if len(self.recent) < 3 or self.countdown > 0 or not self._worth_comparing():
            return None
        self.probe, self.settle = [], SETTLE
        self.set_threads(self.other)
        return None

    def _worth_comparing(self) -> bool:
        signals = [signal for _, signal in self.recent]
        if None in signals:  # no machine-wide figures here: compare now and then
            return True
        if self.choice == self.full:
            return statistics.median(signals) < BUSY
        return statistics.median(signals) >= FREE * (self.full - self.choice)

    def _finish_probe(self) -> str | None:
        mine = statistics.median(seconds for seconds, _ in self.recent)
        theirs = statistics.median(self.probe)
        other, self.probe = self.other, None
        self.recent.clear()
        if theirs < MARGIN * mine:
            before, self.choice = self.choice, other
            self.wait = self.countdown = FIRST_WAIT
            self.switches += 1
            why = ("another process seems to be using the CPU" if other < before
                   else "the CPU seems free again")
            return f"threads {before} -> {other}: {theirs:.2f} s/step against {mine:.2f} with {before} ({why})"
        self.set_threads(self.choice)
        self.settle = SETTLE
        self.countdown = self.wait
        self.wait = min(2 * self.wait, LONGEST_WAIT)
        return None
