"""trace.jsonl: which records of which file every optimizer step trained (the proof of exactly-once coverage).

One line per optimizer step, written from the evidence each process takes after a micro-batch's backward pass
(train/loop.py `evidence`: a micro-batch that never reached the model is missing from it):
  {"step": N, "file": "<sha256>", "examples": [the ids of the examples, all micro-batches],
   "micro_batches": [{"rank": R, "index": M, "examples": [...], "tokens": T}, ...], "replay": [[sha256, n], ...]}
An example's id is its 0-based record number, or "N/K" for window K of record N when a long text was split into
windows (every window is trained once, so a windowed record shows once per window).
Plus one line per file with held-out records: {"file": "<sha256>", "held_out": [record numbers]}.
A resume rewrites the trace to hold only committed history: steps after the resumed checkpoint are dropped.

    python -m evertrain.observe.trace OUTPUT_DIR/trace.jsonl    # summarise coverage per file
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from evertrain import faults
from evertrain.files import append_json_line, read_records, write_text_atomic


class Trace:
    def __init__(self, path: Path):
        self.path = Path(path)

    def truncate(self, global_step: int, known_files: set[str]) -> None:
        """Drop what no checkpoint committed: steps after `global_step`, held-out lines of unknown files."""
        if not self.path.exists():
            return
        kept = [rec for rec in read(self.path)
                if ("step" in rec and rec["step"] <= global_step)
                or ("held_out" in rec and rec["file"] in known_files)]
        write_text_atomic(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))

    def write(self, record: dict) -> None:
        append_json_line(self.path, record)

    def held_out(self, sha256: str, lines: list[int]) -> None:
        if lines:
            self.write({"file": sha256, "held_out": sorted(lines)})

    def step(self, accelerator, global_step: int, sha256: str, seen: list[dict]) -> None:
        """One trace line for an optimizer step, built from every process's micro-batch evidence (every process
        calls it; the main one writes)."""
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            seen = gather_object(seen)
        if not accelerator.is_main_process:
            return
        record = {"step": global_step, "file": sha256,
                  "examples": sorted((x for mb in seen for x in mb["examples"]), key=in_file_order),
                  "micro_batches": [{k: mb[k] for k in ("rank", "index", "examples", "tokens")} for mb in seen]}
        replay_lines = sorted((pair for mb in seen for pair in mb["replay"]),
                              key=lambda pair: (pair[0], in_file_order(pair[1])))
        if replay_lines:
            record["replay"] = replay_lines
        faults.hit("trace-write")
        self.write(record)


def read(path: Path) -> list[dict]:
    return read_records(path)


def in_file_order(example_id) -> tuple[int, int]:
    """A sort key for example ids: by record, a whole record, or its windows in order ("12/0", "12/1")."""
    line, _, part = str(example_id).partition("/")
    return int(line), int(part) if part else -1


def coverage(path: Path) -> dict[str, Counter]:
    """For every file: how many times each example id (a line, or a window "line/window") was trained."""
    out: dict[str, Counter] = {}
    for rec in read(path):
        if "step" in rec:
            out.setdefault(rec["file"], Counter()).update(rec["examples"])
    return out


if __name__ == "__main__":
    import sys

    for sha, counts in coverage(Path(sys.argv[1])).items():
        print(f"{sha[:12]}  {len(counts)} examples  trained {dict(Counter(counts.values()))} times")
