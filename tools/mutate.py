"""`make mutate`: mutmut over the modules that carry the guarantees, one pass per group of modules (TESTING.md).

mutmut reads a single `[tool.mutmut]` from ./pyproject.toml, so one test selection would serve every module, and the
slow tests that cover the data modules would also run for every checkpoint mutant. Each pass therefore runs in its
own folder, build/mutate/NAME/, holding a copy of src/, tests/ and pyproject.toml whose `[tool.mutmut]` is the root
one with that pass's `only_mutate` and tests (`[tool.evertrain.mutate.NAME]` in pyproject.toml). A pass may name
`mutants` (mutmut's name globs) to check only some functions of a file; the others count as not checked.

    .venv/bin/python tools/mutate.py               # every pass, then one summary line per pass
    .venv/bin/python tools/mutate.py resume        # one pass
    .venv/bin/python tools/mutate.py --summary     # the summary of the last runs, running nothing
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")


def passes() -> dict[str, dict]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = data["tool"]["mutmut"]
    out = {"data": {"only_mutate": base["only_mutate"], "tests": base["pytest_add_cli_args_test_selection"]}}
    out.update(data["tool"]["evertrain"]["mutate"])
    return out


def pass_pyproject(spec: dict) -> str:
    """The root pyproject.toml with its [tool.mutmut] replaced by the pass's."""
    text = (ROOT / "pyproject.toml").read_text()
    base = tomllib.loads(text)["tool"]["mutmut"]
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    table = dict(base, only_mutate=spec["only_mutate"], pytest_add_cli_args_test_selection=spec["tests"])
    return text + "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


def statuses(folder: Path) -> dict[str, str]:
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=folder, capture_output=True, text=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def summary(name: str, spec: dict, folder: Path) -> list[str]:
    """One line per module: its mutants by status (only the functions the pass names, if it names some)."""
    import fnmatch

    found = statuses(folder)
    globs = spec.get("mutants")
    by_module = collections.defaultdict(collections.Counter)
    for key, status in found.items():
        chosen = not globs or any(fnmatch.fnmatch(key, g) for g in globs)
        by_module[re.match(r"(.*?)\.x[_\u01c1]", key)[1]][status if chosen else "outside the pass's functions"] += 1
    lines = []
    for module, counts in sorted(by_module.items()):
        checked = sum(n for s, n in counts.items() if s != "outside the pass's functions")
        rest = "".join(f", {n} {s}" for s, n in sorted(counts.items()) if s not in ("killed", "survived"))
        lines.append(f"{name}: {module}: {checked} mutants, {counts['killed']} killed, {counts['survived']} survived"
                     + rest)
    return lines


def run_pass(name: str, spec: dict, max_children: int) -> None:
    folder = ROOT / "build" / "mutate" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for sub in ("src", "tests"):
        shutil.copytree(ROOT / sub, folder / sub, ignore=ignore)
    (folder / "pyproject.toml").write_text(pass_pyproject(spec))
    print(f"== mutate {name}: {', '.join(spec['only_mutate'])}", flush=True)
    # A test's subprocess (`python -m evertrain ...`) imports the mutated copy too, not wherever the editable
    # install points (mutmut only fixes sys.path in its own process); it runs the mutant under test, by its
    # MUTANT_UNDER_TEST, though mutmut counts only the tests that call the function in its process.
    # (Made now: a folder missing when Python starts stays skipped for the whole process, mutmut's own included.)
    (folder / "mutants" / "src").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(folder / "mutants" / "src"),
                                                                     os.environ.get("PYTHONPATH")])))
    subprocess.run([str(MUTMUT), "run", "--max-children", str(max_children), *spec.get("mutants", [])], cwd=folder,
                   env=env)
    for line in (f"    {k}: {v}" for k, v in statuses(folder).items() if v != "killed"):
        print(line)


def main(argv: list[str]) -> int:
    all_passes = passes()
    only_summary = "--summary" in argv
    names = [a for a in argv if not a.startswith("--")] or list(all_passes)
    unknown = set(names) - set(all_passes)
    if unknown:
        print(f"unknown pass {sorted(unknown)}; the passes are {list(all_passes)}", file=sys.stderr)
        return 2
    if not only_summary:
        for name in names:
            run_pass(name, all_passes[name], int(os.environ.get("MUTATE_CHILDREN", "2")))
    print()
    for name in names:
        folder = ROOT / "build" / "mutate" / name
        print("\n".join(summary(name, all_passes[name], folder)) if (folder / "mutants").is_dir()
              else f"{name}: not run")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
