"""The thread governor: keeps the faster thread count, checks again when steps slow down, and stays
off where the run must be bitwise repeatable or the user chose the threads."""

from __future__ import annotations

import torch

from verydeepvae.train import threads
from verydeepvae.train.threads import ThreadGovernor, governor_wanted


class FakeMachine:
    """A 4-core machine on which a neighbour may hold cores: step times, the process's CPU time and
    the machine's idle time as the governor reads them, and the thread count it sets."""

    def __init__(self, cost: dict[int, float], neighbour: bool = False, proc_stat: bool = True):
        self.threads, self.cost, self.neighbour, self.proc_stat = 4, cost, neighbour, proc_stat
        self.now = self.cpu = self.idle = 0.0
        self.history: list[int] = []

    def clock(self) -> float:
        return self.now

    def cpu_clock(self) -> float:
        return self.cpu

    def machine(self) -> float | None:
        return self.idle if self.proc_stat else None

    def set_threads(self, n: int) -> None:
        self.threads = n

    def step(self) -> int:
        wall = self.cost[self.threads]
        share = 0.5 if self.neighbour and self.threads == 4 else 1.0  # the neighbour holds 2 cores
        self.now += wall
        self.cpu += self.threads * wall * share
        self.idle += 0.0 if self.neighbour else (4 - self.threads) * wall
        self.history.append(self.threads)
        return self.threads


def governed(machine: FakeMachine, monkeypatch) -> ThreadGovernor:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    return ThreadGovernor(True, clock=machine.clock, cpu_clock=machine.cpu_clock, machine=machine.machine,
                          set_threads=machine.set_threads)


def run(governor: ThreadGovernor, machine: FakeMachine, steps: int) -> list[str]:
    notes = []
    for _ in range(steps):
        result, note = governor.run_step(machine.step)
        assert result == machine.history[-1]
        if note:
            notes.append(note)
    return notes


def test_an_idle_machine_keeps_all_threads_and_never_tries_fewer(monkeypatch):
    machine = FakeMachine({4: 1.0, 2: 1.6})
    governor = governed(machine, monkeypatch)
    assert run(governor, machine, 300) == [] and set(machine.history) == {4}


def test_a_neighbour_makes_it_use_half_the_threads_and_its_leaving_all_again(monkeypatch):
    machine = FakeMachine({4: 1.0, 2: 1.6})
    governor = governed(machine, monkeypatch)
    run(governor, machine, 50)
    machine.neighbour, machine.cost = True, {4: 4.0, 2: 1.8}
    notes = run(governor, machine, 3 + 2 * threads.SETTLE + threads.PROBE_STEPS)
    assert governor.choice == 2 and machine.threads == 2  # within a few steps
    assert len(notes) == 1 and "threads 4 -> 2: 1.80 s/step against 4.00" in notes[0]
    assert "another process" in notes[0]
    run(governor, machine, 100)
    assert machine.history[-100:] == [2] * 100  # busy cores: it does not try all threads again
    machine.neighbour, machine.cost = False, {4: 1.0, 2: 1.6}
    notes = run(governor, machine, 3 + 2 * threads.SETTLE + threads.PROBE_STEPS + threads.FIRST_WAIT)
    assert governor.choice == 4 and len(notes) == 1 and "threads 2 -> 4" in notes[0] and "free again" in notes[0]
    assert governor.switches == 2


def test_a_misleading_signal_costs_less_and_less(monkeypatch):
    machine = FakeMachine({4: 1.0, 2: 1.6}, neighbour=True)  # looks busy, but all threads are faster
    governor = governed(machine, monkeypatch)
    assert run(governor, machine, 1000) == [] and governor.choice == 4
    probes = machine.history.count(2) // (threads.SETTLE + threads.PROBE_STEPS)
    assert 3 <= probes <= 10  # waits of 10, 20, 40, ... 400 steps between comparisons
    assert governor.wait == threads.LONGEST_WAIT


def test_without_machine_figures_it_tries_all_threads_now_and_then(monkeypatch):
    machine = FakeMachine({4: 4.0, 2: 1.8}, neighbour=True, proc_stat=False)
    governor = governed(machine, monkeypatch)
    run(governor, machine, 20)
    assert governor.choice == 2
    machine.neighbour, machine.cost = False, {4: 1.0, 2: 1.6}
    notes = run(governor, machine, 60)
    assert governor.choice == 4 and "free again" in notes[-1]


def test_a_small_difference_does_not_switch(monkeypatch):
    machine = FakeMachine({4: 1.0, 2: 0.98}, neighbour=True)
    governor = governed(machine, monkeypatch)
    assert run(governor, machine, 100) == [] and governor.choice == 4


def test_slow_steps_right_after_side_work_are_not_read_as_a_neighbour(monkeypatch):
    machine = FakeMachine({4: 1.0, 2: 1.6})
    governor = governed(machine, monkeypatch)
    run(governor, machine, 50)
    governor.settle_after_side_work()  # e.g. a validation just ran
    machine.neighbour, machine.cost = True, {4: 3.0, 2: 1.6}  # the next steps look busy...
    run(governor, machine, threads.SETTLE)
    machine.neighbour, machine.cost = False, {4: 1.0, 2: 1.6}  # ...and then no longer
    assert run(governor, machine, 50) == [] and set(machine.history) == {4}  # no comparison was made


def test_restore_gives_back_all_threads_after_a_switch(monkeypatch):
    machine = FakeMachine({4: 4.0, 2: 1.8}, neighbour=True)
    governor = governed(machine, monkeypatch)
    run(governor, machine, 20)
    assert governor.choice == 2 and machine.threads == 2
    governor.restore()
    assert machine.threads == 4


def test_disabled_governor_only_runs_the_step(monkeypatch):
    machine = FakeMachine({4: 4.0, 2: 0.1}, neighbour=True)
    governor = ThreadGovernor(False, clock=machine.clock, set_threads=machine.set_threads)
    assert run(governor, machine, 100) == [] and set(machine.history) == {4}


def test_governor_only_where_the_thread_count_may_change(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert governor_wanted(False, None, cpu, 1)
    assert not governor_wanted(True, None, cpu, 1)  # deterministic: bitwise repeatable runs
    assert not governor_wanted(False, 2, cpu, 1)  # threads_per_rank chosen
    assert not governor_wanted(False, None, cuda, 1)
    assert not governor_wanted(False, None, cpu, 2)  # several ranks
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not governor_wanted(False, None, cpu, 1)
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not governor_wanted(False, None, cpu, 1)


def test_training_runs_under_the_governor_and_says_when_it_changes_the_count(tmp_path, monkeypatch, capsys):
    """Wiring: with the signal forced to "busy" and any other count counted faster, a real run
    changes its thread count after a few steps, says so, finishes, and gives the process its
    thread count back (a second run in the same process starts from all threads)."""
    from conftest import write_ellipsoids
    from verydeepvae.cli import main

    if torch.get_num_threads() < 2:
        import pytest

        pytest.skip("one core: nothing to govern")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "BUSY", 10.0)
    monkeypatch.setattr(threads, "MARGIN", 1e6)
    before = torch.get_num_threads()
    write_ellipsoids(tmp_path / "data", 6)
    try:
        assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "data"), "--output-dir",
                     str(tmp_path / "run"), "--max-steps", "12", "--no-progress", "--set", "num_workers=0",
                     "--set", "quality_samples=0", "--set", "subjects_to_plot=0"]) == 0
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"threads {before} -> {max(1, before // 2)}" in log and "another process" in log
