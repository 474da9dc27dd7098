"""Write tests/data/legacy/: a `train` run folder and a daemon workspace, each interrupted in the middle of its
second file, as the code of the commit this runs at writes them. tests/test_legacy.py resumes them with today's
code and requires exactly what an uninterrupted run gives.

The fixture was written at commit 5cef5d4 (before the code moved into train/ and observe/). To write it again
(say the libraries changed the numbers, which the test would report as a mismatch of weights):

    git worktree add /tmp/old 5cef5d4 && cd /tmp/old && PYTHONPATH=src python tools/legacy_fixture.py OUT
    # then replace tests/data/legacy/ with OUT/legacy/

Replay is off in both (`--replay-fraction 0 --no-anchor-replay`): how replayed rows are laid out changed after
this commit (a change of numbers, not of state), and the test isolates the state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))

SETTINGS = ["--batch-size", "2", "--no-packing", "--trace", "--held-out-fraction", "0.1", "--save-steps", "3",
            "--keep-checkpoints", "3", "--learning-rate", "1e-3", "--warmup-steps", "2", "--replay-fraction", "0",
            "--no-anchor-replay", "--anchor-size", "4", "--anchor-new-tokens", "4", "--report-to", "none"]
DAEMON = ["--stable-seconds", "0", "--poll-seconds", "0.05", "--disk-margin-bytes", "0", "--incomplete-timeout", "0",
          "--status-interval", "0.1"]


def rows(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag} {i}: " + "lorem ipsum " * (i % 4 + 1)} if i % 2 else
            {"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"{tag} answer {i} " * (i % 3 + 1)}]}
            for i in range(n)]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def evertrain(root: Path, *args, fault: str | None = None) -> int:
    """The CLI in `root`, where every path given is relative (the test runs it from its copy of the folder)."""
    env = {**os.environ, "PYTHONPATH": str(HERE / "src")}
    env.pop("EVERTRAIN_FAULT", None)
    if fault:
        env["EVERTRAIN_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "evertrain", *map(str, args)], env=env, cwd=root,
                          stdout=subprocess.DEVNULL).returncode


def main(out: Path) -> None:
    from tiny import make_model_dir

    root = out / "legacy"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    make_model_dir(root / "base-model", hidden=16, layers=1)
    write(root / "a.jsonl", rows("alpha", 20))
    write(root / "b.jsonl", rows("beta", 24))
    model, a, b, run, ws = "base-model", "a.jsonl", "b.jsonl", "train-run", "workspace"
    # a: 18 trained examples (2 held out) in rows of 2 = global steps 1-9; b: 22 = global steps 10-20. Checkpoints
    # every 3 global steps and at the end of a file, 3 kept: killed at step 17, the folders hold 9 (a's end), 12, 15.
    assert evertrain(root, "train", "--dataset", a, "--output-dir", run, "--model", model, *SETTINGS) == 0
    assert evertrain(root, "train", "--dataset", b, "--output-dir", run, *SETTINGS, fault="mid-step:8") != 0
    assert evertrain(root, "init", ws, "--model", model, *SETTINGS, *DAEMON) == 0
    shutil.copy(root / a, root / ws / "inbox" / a)
    assert evertrain(root, "run", ws, "--once") == 0
    shutil.copy(root / b, root / ws / "inbox" / b)
    assert evertrain(root, "run", ws, "--once", fault="mid-step:8") != 0
    run, ws = root / run, root / ws
    for folder in (run, ws / "current_model"):
        shutil.rmtree(folder / "tokens", ignore_errors=True)  # a cache: rebuilt from the file on resume
    (ws / "status" / ".reserve").unlink()  # a megabyte of zeros the daemon makes again at start
    for lock in (run / ".evertrain.lock", ws / ".evertrain.lock"):
        lock.unlink(missing_ok=True)
    print(f"wrote {root}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "tests" / "data")
