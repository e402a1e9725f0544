"""Print the mutation score of the last `mutmut run`, per module: killed / all mutants (a mutant no test reaches
counts as surviving), and list the survivors by function, for `make mutants`.

`--sample N` measures instead a random sample of N mutants per module (seeded, so the same sample again): mutmut
generates every mutant and maps tests to functions once, then runs only the sampled mutants, and the score comes
with its 95% interval. A full run is hours on 2 cores; a sample of 60 per module is about half an hour.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import random
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout", "segfault"}
MUTMUT = str(Path(sys.executable).parent / "mutmut")
# mutmut forks a child per mutant from a process that has run torch: with more than one OpenMP thread there, a
# child can block forever on a lock the fork copied (no CPU used, so mutmut's CPU-time limit never ends it)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def results() -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    out = subprocess.run(
        [MUTMUT, "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            found[name] = status.strip()
    return found


def module_of(name: str) -> str:
    return name.split(".x")[0].split(".xǁ")[0]


def wilson(killed: int, n: int) -> tuple[float, float]:
    """95% interval of a kill rate measured on n sampled mutants."""
    if n == 0:
        return 0.0, 1.0
    z, p = 1.96, killed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def sample(per_module: int, seed: int) -> set[str]:
    """Generate the mutants and the test map (a run that tests none), then test a seeded sample of each module's."""
    # mutmut generates the mutants and collects the test map before it filters by name; a name that matches
    # nothing then stops it (an assertion), having run no mutant
    subprocess.run([MUTMUT, "run", "--max-children", "2", "no-such-mutant"], capture_output=True, env=ENV)
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in sorted(results()):
        by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    picked = {n for names in by_module.values() for n in rng.sample(names, min(per_module, len(names)))}
    subprocess.run([MUTMUT, "run", "--max-children", "2", *sorted(picked)], capture_output=True, env=ENV)
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="mutants to test per module (default: report the last full run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    picked = sample(args.sample, args.seed) if args.sample else None
    found = {k: v for k, v in results().items() if picked is None or k in picked}
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, status in found.items():
        module = module_of(name)
        by_module[module]["all"] += 1
        if status in KILLED:
            by_module[module]["killed"] += 1
        else:
            survivors[module][name.rsplit("__mutmut_", 1)[0] + f" ({status})"] += 1
    total = sum(c["all"] for c in by_module.values())
    killed = sum(c["killed"] for c in by_module.values())
    rows = [*sorted(by_module.items()), ("all", collections.Counter(all=total, killed=killed))]
    for module, c in rows:
        low, high = wilson(c["killed"], c["all"])
        interval = f"  (95%: {low:.0%}-{high:.0%})" if picked is not None else ""
        print(f"{module:28s} {c['killed']:5d} / {c['all']:5d} killed  {c['killed'] / max(c['all'], 1):.1%}{interval}")
    for module, names in sorted(survivors.items()):
        print(f"\nsurvivors in {module}:")
        for fn, n in names.most_common():
            print(f"  {n:3d}  {fn}")


if __name__ == "__main__":
    main()
