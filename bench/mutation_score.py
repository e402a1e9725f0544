"""Print the mutation score of the last `mutmut run`, per module: killed / all mutants (a mutant no test reaches
counts as surviving), and list the survivors by function, for `make mutants`."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

KILLED = {"killed", "timeout", "segfault"}


def results() -> dict[str, str]:
    """mutant name -> status, from `mutmut results --all true`."""
    out = subprocess.run(
        [str(Path(sys.executable).parent / "mutmut"), "results", "--all", "true"],
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


def main() -> None:
    found = results()
    by_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    survivors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, status in found.items():
        module = name.split(".x")[0].split(".xǁ")[0]
        by_module[module]["all"] += 1
        if status in KILLED:
            by_module[module]["killed"] += 1
        else:
            survivors[module][name.rsplit("__mutmut_", 1)[0] + f" ({status})"] += 1
    total = sum(c["all"] for c in by_module.values())
    killed = sum(c["killed"] for c in by_module.values())
    for module, c in sorted(by_module.items()):
        print(f"{module:28s} {c['killed']:5d} / {c['all']:5d} killed  {c['killed'] / c['all']:.1%}")
    print(f"{'all':28s} {killed:5d} / {total:5d} killed  {killed / max(total, 1):.1%}")
    for module, names in sorted(survivors.items()):
        print(f"\nsurvivors in {module}:")
        for fn, n in names.most_common():
            print(f"  {n:3d}  {fn}")


if __name__ == "__main__":
    main()
