#!/usr/bin/env python3
"""Cost per request relative to the baseline, measured side by side.

``bench.py`` runs one server at a time, so its ratios compare moments: on this VM, whose
speed drifts by tens of per cent within a minute, even its paired per-round ratios
scatter by ±0.1. This script runs the no-session baseline and a contender **at the same
time**: both servers pinned to CPU 0 (the kernel shares it between them), each driven by
its own ``wrk`` on CPU 1. Whatever the machine does hits both alike, and the script
compares what each server spent per request (CPU time from ``/proc`` over requests
served): ``baseline CPU per request / contender CPU per request``. An A/A run
(``--only baseline``: the baseline against a second baseline) came out at 0.99-1.02 in
every round.

For a clustered contender the ratio covers the node wrk drives (its peer runs on CPU 1).
Servers restart every round, as in ``bench.py``, whose contenders, apps and helpers this
reuses.

With ``--against TREE`` the other side is not the baseline but the same contender run
from another checkout of this repository (a git worktree of an earlier commit): the
before/after comparison of a change, in one run, on the same core at the same moments.
The cost ratio is then TREE's CPU per request over this tree's (above 1: this tree is
cheaper).

    python3 loadtests/cost_ratio.py                                  # clustersess, read and write, 6 rounds x 3 s
    python3 loadtests/cost_ratio.py --only clustersess,clustersess-sync --tests read
    git worktree add /tmp/before <commit>
    python3 loadtests/cost_ratio.py --only clustersess-sync --tests write --against /tmp/before
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
from typing import Any

import bench

TARGETS = bench.TARGETS


def side_by_side(
    base: bench.Running, other: bench.Running, test: str, *, duration: int, connections: int, lua: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One concurrent wrk run against each server; adds ``cpu_us`` (the driven server's)."""
    before = [base.procs[0].cpu_seconds(), other.procs[0].cpu_seconds()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(bench.run_wrk, run.port, f"/{test}", run.cookie, duration=duration, connections=connections, lua=lua)
            for run in (base, other)
        ]
        results = [r.result() for r in runs]
    for res, run, cpu0 in zip(results, (base, other), before):
        res["cpu_us"] = (run.procs[0].cpu_seconds() - cpu0) / max(res["requests"], 1) * 1e6
    return results[0], results[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="clustersess", help="comma-separated contenders of bench.py (default clustersess)")
    parser.add_argument("--tests", default=",".join(bench.TESTS), help="comma-separated: read,write (default both)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds, each with fresh servers (default 6)")
    parser.add_argument("--duration", type=int, default=3, help="whole seconds per measured run (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of unmeasured load first (default 1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections per server (default 32)")
    parser.add_argument(
        "--against", metavar="TREE", help="compare with the same contender from another checkout, not the baseline"
    )
    args = parser.parse_args(argv)
    if args.against and not os.path.isfile(os.path.join(args.against, "clustersess", "__init__.py")):
        raise SystemExit(f"--against {args.against}: not a checkout of this repository")
    side = "before" if args.against else "baseline"
    names = args.only.split(",")
    unknown = [n for n in names if n not in bench.CONTENDERS]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; see bench.py --list")
    tests = [t for t in bench.TESTS if t in args.tests.split(",")]
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {(n, t): [] for n in names for t in tests}
    with tempfile.TemporaryDirectory(prefix="clustersess-cost-") as tmp:
        lua = os.path.join(tmp, "report.lua")
        with open(lua, "w") as f:
            f.write(bench.WRK_LUA)
        wrk = {"connections": args.connections, "lua": lua}
        with bench.services_running(["baseline", *names], tmp) as (ctx, _services):
            for rnd in range(args.rounds):
                for name in names:
                    # The baseline gets its own fresh process per pairing; "baseline" as the
                    # contender is the A/A check.
                    first = name if args.against else "baseline"
                    with bench.running([first], ctx, tmp, f"r{rnd + 1}a", args.against) as a, bench.running(
                        [name], ctx, tmp, f"r{rnd + 1}b"
                    ) as b:
                        base, other = a[first], b[name]
                        for test in tests:
                            if args.warmup > 0:
                                side_by_side(base, other, test, duration=args.warmup, **wrk)
                            rb, ro = side_by_side(base, other, test, duration=args.duration, **wrk)
                            cost = rb["cpu_us"] / ro["cpu_us"]
                            share = ro["rps"] / rb["rps"]
                            ratios[name, test].append((cost, share))
                            print(
                                f"  round {rnd + 1}/{args.rounds}  {name:<18} {test:<5}"
                                f" {side} {rb['rps']:7.0f} req/s {rb['cpu_us']:6.1f} us/req |"
                                f" {ro['rps']:7.0f} req/s {ro['cpu_us']:6.1f} us/req | cost ratio {cost:.3f}",
                                file=sys.stderr,
                                flush=True,
                            )
    against = f" ({args.against})" if args.against else ""
    print(
        f"\nside by side on CPU 0, {args.rounds} rounds x {args.duration} s, wrk -t1 -c{args.connections} each on CPU 1;"
        f" cost ratio = {side}{against} CPU per request / contender CPU per request\n"
    )
    print("| contender | test | cost ratio (median) | min | max | req/s ratio (median) |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, test), rows in ratios.items():
        costs = [c for c, _ in rows]
        target = None if args.against else TARGETS.get((name, test))
        mark = "" if target is None else f" ({'meets' if statistics.median(costs) >= target else 'misses'} {target:.2f}x)"
        print(
            f"| {bench.CONTENDERS[name].label} | {test} | {statistics.median(costs):.3f}{mark} | {min(costs):.3f} |"
            f" {max(costs):.3f} | {statistics.median(s for _, s in rows):.3f} |"
        )


if __name__ == "__main__":
    main()
