"""`evertrain serve --release`: each accepted model exported to releases/step-N, `latest` moved to it, old ones
pruned, notify_command told; a failed export leaves nothing and the server goes on.

    pytest -q tests/test_serve_release.py
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, text_rows, write_jsonl
from daemon_helpers import drop, make_ws, rows, wait_for
from serve_helpers import ServedModel, ask

from evertrain import exits
from evertrain.locks import AlreadyRunning
from evertrain.serve.release import Releaser, ReleaseSettings
from evertrain.serve.versions import find_target
from evertrain.train import checkpoint

GATE_OFF = ("--forgetting-action", "off", "--anchor-size", "0")  # every file accepted, at once


def events_command(folder: Path) -> str:
    """A notify_command that writes each event it is given to a file of its own in `folder`."""
    folder.mkdir(exist_ok=True)
    return f"cat > $(mktemp {shlex.quote(str(folder))}/event-XXXXXX)"


def release_events(folder: Path) -> list[dict]:
    found = [json.loads(p.read_text()) for p in folder.iterdir() if p.stat().st_size]
    return sorted((e for e in found if e["event"] == "release"), key=lambda e: e["step"])


def listing(releases: Path) -> set[str]:
    return {p.name for p in releases.iterdir()}


def latest_is(releases: Path, step: int) -> bool:
    latest = releases / "latest"
    return latest.is_symlink() and os.readlink(latest) == f"step-{step}"


def weights(path: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def train(run: Path, tiny_model: Path, name: str, *extra) -> None:
    data = write_jsonl(run.parent / name, text_rows(8, name))
    assert cli("train", "--dataset", data, "--output-dir", run, "--model", tiny_model, "--batch-size", 4,
               "--held-out-fraction", 0, "--warmup-steps", 0, *GATE_OFF, *extra) == exits.OK


def test_each_accepted_model_is_released_latest_moves_old_ones_go_and_the_workspace_command_is_told(
        tmp_path, tiny_model):
    events = tmp_path / "events"
    ws = make_ws(tmp_path, tiny_model, "--notify-command", events_command(events), *GATE_OFF)
    releases = ws / "releases"
    drop(ws, "a.jsonl", rows(8, "a"))
    assert cli("run", ws, "--once") == 0
    steps = [find_target(ws).step]
    with ServedModel(ws, release=ReleaseSettings(keep=2)) as served:
        wait_for(lambda: latest_is(releases, steps[0]), what="the model served at start to be released")
        for tag in "bc":
            drop(ws, f"{tag}.jsonl", rows(8, tag))
            assert cli("run", ws, "--once") == 0  # the daemon trains while the server serves
            steps.append(find_target(ws).step)
            wait_for(lambda: latest_is(releases, steps[-1]), what=f"step {steps[-1]} to be released")
        assert ask(served.client(), "Hi").model == f"ws:step-{steps[-1]}"  # it answers with what it released
        wait_for(lambda: len(release_events(events)) == 3, what="the three release events")

    assert steps == sorted(set(steps))
    # keep=2: the oldest went; nothing half-written is left beside them.
    assert listing(releases) == {f"step-{steps[1]}", f"step-{steps[2]}", "latest", ".evertrain.lock"}
    newest = checkpoint.at_step(ws / "current_model", steps[-1])
    exported, trained = weights(releases / "latest"), weights(newest.path)
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert (releases / "latest" / "README.md").exists() and not (releases / "latest" / "optimizer.pt").exists()

    got = release_events(events)
    assert [e["step"] for e in got] == steps
    assert [e["path"] for e in got] == [str(releases.absolute() / f"step-{s}") for s in steps]
    assert [len(e["files"]) for e in got] == [1, 2, 3] and got[-1]["checkpoint"] == newest.name
    assert {e["kind"] for e in got} == {"full"} and {e["gguf"] for e in got} == {None}

    # A restart finds the newest released already: nothing is exported again, nobody told again.
    made = (releases / f"step-{steps[-1]}").stat().st_mtime_ns
    with ServedModel(ws, release=ReleaseSettings(keep=2)) as served:
        wait_for(lambda: served.server.releaser.last == releases / f"step-{steps[-1]}", what="the restart's pass")
    assert (releases / f"step-{steps[-1]}").stat().st_mtime_ns == made and len(release_events(events)) == 3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("lora") / "run"
    train(run, tiny_model, "notes.jsonl", "--lora", "--lora-r", 4, "--lora-alpha", 8)
    return run


def test_a_lora_run_releases_its_adapter_with_a_hub_base_or_refuses_at_start(lora_run, tmp_path, capsys):
    assert cli("serve", lora_run, "--port", 0, "--release") == exits.BAD_INPUT
    err = capsys.readouterr().err
    assert "the base model is the local folder" in err and "--release-base-id" in err and "--release-merge" in err
    assert cli("serve", lora_run, "--port", 0, "--release", "--release-base-id", "org/tiny",
               "--release-gguf") == exits.BAD_INPUT
    assert "--release-gguf writes a whole model; add --release-merge" in capsys.readouterr().err
    assert cli("serve", lora_run, "--port", 0, "--release-gguf") == exits.BAD_INPUT
    assert "--release-gguf needs --release" in capsys.readouterr().err
    assert cli("serve", lora_run, "--port", 0, "--release", "--release-keep", 0) == exits.BAD_INPUT
    assert "--release-keep must be at least 1" in capsys.readouterr().err
    assert not (lora_run / "releases").exists() or not any(p.name.startswith("step-")
                                                           for p in (lora_run / "releases").iterdir())

    events = tmp_path / "events"
    step = find_target(lora_run).step
    with ServedModel(lora_run, release=ReleaseSettings(base_id="org/tiny", notify_command=events_command(events))):
        wait_for(lambda: release_events(events), what="the adapter's release")
    out = lora_run / "releases" / "latest"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    ckpt = checkpoint.at_step(lora_run, step)
    assert (out / "adapter_model.safetensors").read_bytes() == (ckpt.path / "adapter_model.safetensors").read_bytes()
    assert not (out / "model.safetensors").exists()
    [event] = release_events(events)
    assert (event["kind"], event["step"], event["path"]) == ("adapter", step, str(out.parent.absolute() /
                                                                                   f"step-{step}"))


def test_a_lora_run_released_merged_with_gguf(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("releases"))
    events = tmp_path / "events"
    settings = ReleaseSettings(merge=True, gguf=True, quant="q8_0", notify_command=events_command(events))
    with ServedModel(run, release=settings):
        wait_for(lambda: release_events(events), what="the merged release")
    [event] = release_events(events)
    out = run / "releases" / "latest"
    assert event["kind"] == "merged" and event["gguf"] == str(run.absolute() / "releases" / f"step-{event['step']}"
                                                             / "model-q8_0.gguf")
    assert Path(event["gguf"]).stat().st_size > 0
    ckpt = checkpoint.at_step(run, event["step"])
    base = AutoModelForCausalLM.from_pretrained(json.loads((ckpt.path / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, ckpt.path).merge_and_unload().state_dict()
    exported = weights(out)
    assert exported.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(exported[k], merged[k])


def test_a_failed_export_leaves_nothing_the_server_serves_on_and_the_next_model_is_released(
        tmp_path, tiny_model, monkeypatch):
    from evertrain.export import card

    run = tmp_path / "run"
    train(run, tiny_model, "a.jsonl")
    releases = run / "releases"
    releases.mkdir()
    (releases / ".step-3.export-k2j4").mkdir()  # what a server killed mid-export leaves
    (releases / ".step-3.export-k2j4" / "model.safetensors").write_bytes(b"half")

    real = card.model_card
    monkeypatch.setattr(card, "model_card", lambda facts: (_ for _ in ()).throw(OSError("the card writer broke")))
    events = tmp_path / "events"
    with ServedModel(run, release=ReleaseSettings(notify_command=events_command(events))) as served:
        releaser = served.server.releaser
        wait_for(lambda: releaser.problem, what="the export to fail")
        assert "the card writer broke" in releaser.problem
        assert listing(releases) == {".evertrain.lock"}  # no step folder, no temporary one, no latest
        assert ask(served.client(), "Hi").choices[0].message.content is not None  # still answering

        monkeypatch.setattr(card, "model_card", real)
        train(run, tiny_model, "b.jsonl")
        step = find_target(run).step
        wait_for(lambda: latest_is(releases, step), what="the next accepted model's release")
        wait_for(lambda: release_events(events), what="its event")
    assert listing(releases) == {f"step-{step}", "latest", ".evertrain.lock"}
    assert [e["step"] for e in release_events(events)] == [step]  # the failed one told nobody


def test_pruning_keeps_what_latest_names_and_one_server_releases_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    releaser = Releaser(run, ReleaseSettings(keep=2))
    try:
        with pytest.raises(AlreadyRunning, match="releasing"):
            Releaser(run, ReleaseSettings())
        for step in (10, 20, 30, 40):
            (releaser.folder / f"step-{step}").mkdir()
        releaser.link(releaser.folder / "step-10")
        releaser.prune()
        assert listing(releaser.folder) == {"step-10", "step-30", "step-40", "latest", ".evertrain.lock"}
    finally:
        releaser.close()
    Releaser(run, ReleaseSettings()).close()  # the lock went with the server
