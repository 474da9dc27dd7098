"""Never silently start over (issue 16, part 4), through the real CLI: when checkpoints exist and none loads,
`train` and `run` refuse with exit 2 naming each one's problem; only --from-base starts again from the base model,
says so (and, for the daemon, writes it in the ledger), and keeps the damaged checkpoints in damaged/.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_no_checkpoint.py
"""

from __future__ import annotations

import json

from conftest import cli, text_rows, write_jsonl
from daemon_helpers import assert_exactly_once, drop, ledger_rows, make_ws, rows

from evertrain.train import checkpoint


def damage_every_checkpoint(out) -> dict[str, str]:
    """Each checkpoint-* folder damaged another way; what the refusal must say about each."""
    found = sorted((p for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda p: int(p.name[11:]))
    assert len(found) == 3
    weights = found[0] / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    (found[1] / "optimizer.pt").unlink()
    (found[2] / checkpoint.STATE_FILE).write_text('{"global_step": 5, "evert')  # cannot even be ordered
    return {found[0].name: "model.safetensors does not match its sha256", found[1].name: "optimizer.pt is missing",
            found[2].name: "trainer_state.json is missing or does not parse"}


def assert_refused(text: str, out, why: dict[str, str]) -> None:
    assert f"no checkpoint in {out} loads" in text and "--from-base" in text and "Traceback" not in text
    for name, problem in why.items():
        assert f"{out / name}: {problem}" in text, (name, text)


def test_train_refuses_when_no_checkpoint_loads_and_from_base_starts_again(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    opts = ("--model", tiny_model, "--batch-size", 2, "--no-packing", "--held-out-fraction", 0, "--trace")
    assert cli("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(9)), "--output-dir", out, *opts,
               "--save-steps", 2, "--keep-checkpoints", 5) == 0
    why = damage_every_checkpoint(out)
    b = write_jsonl(tmp_path / "b.jsonl", text_rows(4, "b"))
    capsys.readouterr()
    assert cli("train", "--dataset", b, "--output-dir", out) == 2
    assert_refused(capsys.readouterr().err, out, why)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(why)  # nothing written, nothing moved

    assert cli("train", "--dataset", b, "--output-dir", out, *opts, "--from-base") == 0
    said = capsys.readouterr().out
    assert "starting again from the base model (--from-base)" in said and "resumed" not in said
    assert sorted(p.name for p in (out / checkpoint.DAMAGED_DIR).iterdir()) == sorted(why)  # kept, not deleted
    newest = checkpoint.newest_complete(out)
    # b's 2 steps from global step 0: the run started again, a is not part of it
    assert newest.step == 2 and [f["name"] for f in newest.state["evertrain"]["files"]] == ["b.jsonl"]
    assert not newest.state["evertrain"]["cursors"]
    # while a checkpoint loads, --from-base changes nothing: the run goes on
    c = write_jsonl(tmp_path / "c.jsonl", text_rows(2, "c"))
    assert cli("train", "--dataset", c, "--output-dir", out, "--from-base") == 0
    said = capsys.readouterr().out
    assert "starting again" not in said and f"resumed {newest.path}" in said
    assert checkpoint.newest_complete(out).step == 3


def test_run_refuses_when_no_checkpoint_loads_and_from_base_is_in_the_ledger(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model, "--save-steps", "1", "--keep-checkpoints", "3")
    drop(ws, "a.jsonl", rows(12, "a"))  # 3 steps, a checkpoint at each
    assert cli("run", ws, "--once") == 0
    model_dir = ws / "current_model"
    why = damage_every_checkpoint(model_dir)
    drop(ws, "b.jsonl", rows(4, "b"))
    capsys.readouterr()
    assert cli("run", ws, "--once") == 2
    assert_refused(capsys.readouterr().out, model_dir, why)
    assert [(r["original_name"], r["state"]) for r in ledger_rows(ws)] == [("a.jsonl", "done")]  # untouched

    assert cli("run", ws, "--once", "--from-base") == 0
    said = capsys.readouterr().out
    assert f"started again from the base model {tiny_model} (--from-base)" in said
    files = {r["original_name"]: r for r in ledger_rows(ws)}
    # a's training was in the lost checkpoints: it is trained again from the base model, then b
    assert [(n, r["state"], r["first_step"]) for n, r in files.items()] == [("a.jsonl", "done", 1),
                                                                           ("b.jsonl", "done", 4)]
    assert_exactly_once(ws, files["a.jsonl"], 12)
    assert_exactly_once(ws, files["b.jsonl"], 4)
    assert sorted(p.name for p in (model_dir / checkpoint.DAMAGED_DIR).iterdir()) == sorted(why)
    drop(ws, "c.jsonl", rows(4, "c"))
    assert cli("run", ws, "--once", "--from-base") == 0  # a checkpoint loads: it goes on, nothing is noted
    assert "started again" not in capsys.readouterr().out
    assert [(r["original_name"], r["first_step"]) for r in ledger_rows(ws)][2] == ("c.jsonl", 5)
    assert cli("status", ws, "--json") == 0
    events = json.loads(capsys.readouterr().out)["events"]
    assert [e["kind"] for e in events] == ["from-base"] and str(tiny_model) in events[0]["text"]
