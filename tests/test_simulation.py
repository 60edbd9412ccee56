"""The fault simulator in CI: many seeded schedules, exact replays, and a checker that bites.

``tests/simulation.py`` is the simulator (see its docstring). Here:

* a batch of seeds runs across the machine's cores (``CLUSTERSESS_SIM_SEEDS`` schedules,
  default 1000, from ``CLUSTERSESS_SIM_START``); a failing seed is printed with the command
  that replays it;
* the same seed run twice gives the same history, event for event (replays are exact);
* a protocol broken on purpose (a backup that acknowledges without applying) is caught,
  so the checker is not vacuous.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import pytest

from tests import simulation

SEEDS = int(os.environ.get("CLUSTERSESS_SIM_SEEDS", "1000"))
START = int(os.environ.get("CLUSTERSESS_SIM_START", "0"))
#: virtual seconds of faults per schedule (the settling and the checks come on top)
DURATION = float(os.environ.get("CLUSTERSESS_SIM_DURATION", "12"))


def _run(seed: int) -> tuple[int, list[str]]:
    errors, _ = simulation.run_seed(seed, duration=DURATION)
    return seed, errors


@pytest.mark.timeout(900)
def test_seeded_fault_schedules_keep_every_invariant() -> None:
    seeds = range(START, START + SEEDS)
    workers = max(1, min(4, os.cpu_count() or 1))
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(_run, seeds, chunksize=8)
    failed = [(seed, errors) for seed, errors in results if errors]
    report = "\n".join(
        f"seed {seed}: {errors[0]}\n  replay: python -m tests.simulation --seed {seed} --duration {DURATION:g}"
        for seed, errors in failed[:10]
    )
    assert not failed, f"{len(failed)} of {SEEDS} schedules broke an invariant:\n{report}"


def test_a_seed_replays_exactly() -> None:
    first = simulation.run_seed(12345, duration=6.0)
    second = simulation.run_seed(12345, duration=6.0)
    assert first[1] == second[1] and len(first[1]) > 20


def test_the_checker_catches_a_backup_that_acknowledges_without_applying(monkeypatch: Any) -> None:
    from clustersess.cluster import messages as m
    from clustersess.cluster.replication import Replication

    def careless(self: Replication, member: Any, env: m.Envelope) -> None:
        self.ctx.outbox.send(self.ctx.channel(member.name), m.Ack(env.seq))  # applies nothing

    monkeypatch.setattr(Replication, "on_replicate", careless)
    caught = [seed for seed in range(4) if simulation.run_seed(2 * seed, duration=6.0)[0]]
    assert caught, "a backup that stores nothing went unnoticed by the checker"
