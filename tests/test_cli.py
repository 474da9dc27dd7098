"""The command line without rough edges: progress and the run's log, --version, --config, no abbreviations, one
line per expected failure, a closed pipe, `run --once`'s summary and exit code, the environment in docs/options.md.

    pytest -q tests/test_cli.py
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from conftest import cli, evertrain, text_rows, write_jsonl
from daemon_helpers import drop, make_ws, rows

from evertrain import __version__, exits
from evertrain.train import checkpoint

ROOT = Path(__file__).parent.parent


def test_version_and_no_abbreviated_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli("--version")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"evertrain {__version__}"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(2))
    for command in (("train", "--dataset", f, "--output-dir", tmp_path / "out", "--lr", "1e-4"),
                    ("init", tmp_path / "ws", "--stable", "0"), ("check", f, "--exam", "2")):
        with pytest.raises(SystemExit) as e:
            cli(*command)
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ws").exists()


def test_train_logs_what_it_prints_and_says_durations_as_people_do(tmp_path, tiny_model, capsys):
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(12))
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--batch-size", 4,
               "--no-packing", "--log-steps", 1) == 0
    printed = capsys.readouterr().out
    log = (out / "logs" / "evertrain.log").read_text()
    steps = [line for line in printed.splitlines() if line.startswith("  step ")]
    assert len(steps) == 3  # not a terminal: plain lines, no bar
    done = next(line for line in printed.splitlines() if " done: " in line)
    assert re.search(r", (\d+m )?\d+s, checkpoint ", done), done
    for line in steps + [done]:
        assert line in log


def test_train_shows_a_progress_bar_on_a_terminal(tmp_path, tiny_model):
    out = tmp_path / "run"
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(24))
    main, child = pty.openpty()
    proc = evertrain("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--batch-size", 2,
                     "--no-packing", "--log-steps", 1, wait=False, stdout=child, env={**os.environ, "COLUMNS": "160"})
    os.close(child)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(main)
    assert proc.wait(120) == 0, proc.stderr.read()
    text = screen.decode("utf-8", "replace")
    assert "━" in text and "tok/s" in text and re.search(r"step \d+ .*a\.jsonl", text)
    assert "\n  step " not in text.replace("\r", "")  # the bar, not the plain lines, on a terminal
    assert not re.search(r"\d:\d\d:\d\d", text)  # time left as "4m 5s", never rich's 0:04:05
    log = (out / "logs" / "evertrain.log").read_text()
    assert len([line for line in log.splitlines() if "  step " in line]) == 12  # the log has every line


def test_train_config_file_is_the_workspace_toml_and_options_win(tmp_path, tiny_model, capsys):
    settings = tmp_path / "train.toml"
    settings.write_text(f'[train]\nmodel = "{tiny_model}"\nbatch_size = 3\nlearning_rate = 0.001\npacking = false\n'
                        '\n[data.columns]\nquestion = "prompt"\nanswer = "completion"\n')
    f = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(7)])
    out = tmp_path / "run"
    assert cli("train", "--dataset", f, "--output-dir", out, "--config", settings, "--learning-rate", 0.002) == 0
    saved = json.loads((checkpoint.newest_complete(out).path / "evertrain_config.json").read_text())
    assert (saved["batch_size"], saved["learning_rate"], saved["packing"]) == (3, 0.002, False)
    assert saved["columns"] == "question=prompt,answer=completion" and saved["model"] == str(tiny_model)
    assert checkpoint.newest_complete(out).step == 3  # 7 examples / batch 3

    capsys.readouterr()
    for text, says in (("[train]\nbatch_sise = 3\n", "train.toml [train]: unknown setting(s) batch_sise"),
                       ("[daemon]\npoll_seconds = 1.0\n", "unknown section(s) daemon; known: [train], [data.columns]"),
                       ("[train\n", "train.toml: not valid TOML")):
        settings.write_text(text)
        assert cli("train", "--dataset", f, "--output-dir", tmp_path / "other", "--config", settings) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "other", "--config", tmp_path / "nope.toml") == 2
    assert "nope.toml: cannot read it" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["missing-folder", "empty-folder", "not-a-model"])
def test_a_wrong_model_is_one_line_and_exit_2(tmp_path, model):
    target = tmp_path / model
    if model != "missing-folder":
        target.mkdir()
    if model == "not-a-model":
        (target / "config.json").write_text("{not json")
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(2))
    proc = evertrain("train", "--dataset", f, "--output-dir", tmp_path / "run", "--model", target, wait=False,
                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == exits.BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evertrain: cannot load the tokenizer of ") and str(target) in err


def test_output_into_a_closed_pipe_ends_quietly(tmp_path, tiny_model):
    f = write_jsonl(tmp_path / "many.jsonl", text_rows(3000))
    check = evertrain("check", f, "--model", tiny_model, "--examples", 3000, wait=False)
    check.stdout.read(100)
    check.stdout.close()  # `| head -c 100`
    assert check.wait(120) == 0 and check.stderr.read() == ""

    out = tmp_path / "run"
    train = evertrain("train", "--dataset", write_jsonl(tmp_path / "a.jsonl", text_rows(40)), "--output-dir", out,
                      "--model", tiny_model, "--batch-size", 2, "--no-packing", "--log-steps", 1, wait=False)
    train.stdout.readline()
    train.stdout.close()  # `| head -1`: training goes on to its end, the log file gets every line
    assert train.wait(120) == 0
    assert train.stderr.read() == ""
    assert checkpoint.newest_complete(out).step == 20
    assert " done: " in (out / "logs" / "evertrain.log").read_text()


def test_run_once_sums_up_every_file_and_exits_5_when_one_failed(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    drop(ws, "good.jsonl", rows(6, "g"))
    assert cli("run", ws, "--once") == 0
    capsys.readouterr()
    drop(ws, "bad.jsonl", '{"text": "fine"}\n{"text": 7}\n')
    drop(ws, "again.jsonl", rows(6, "g"))
    drop(ws, "new.jsonl", rows(3, "n"))
    assert cli("run", ws, "--once") == exits.FILES_FAILED
    out = capsys.readouterr().out
    summary = dict(re.fullmatch(r"  (\S+) \(id \d+\): (.*)", line).groups()
                   for line in out[out.index("evertrain: summary: 3 file(s):"):].splitlines()[1:4])
    assert summary["bad.jsonl"].startswith("failed: ") and "line 2" in summary["bad.jsonl"]
    assert summary["again.jsonl"].startswith("duplicate: same content")
    assert summary["new.jsonl"] == "done: 1/1 steps, global steps 3-3"
    assert "  good.jsonl (id" not in out  # done in an earlier call
    assert cli("run", ws, "--once") == 0 and "evertrain: summary: 0 file(s)" in capsys.readouterr().out


def test_status_says_durations_in_hours_and_minutes(tmp_path, tiny_model, capsys):
    ws = make_ws(tmp_path, tiny_model)
    assert cli("status", ws) == 0
    capsys.readouterr()
    (ws / "status" / "training_status.json").write_text(json.dumps(
        {"state": "training", "eta_file_seconds": 4320.4, "eta_queue_seconds": 65.0, "updated_at": 0}))
    assert cli("status", ws) == 0
    out = capsys.readouterr().out
    assert re.search(r"eta_file_seconds\s*│\s*1h 12m", out) and re.search(r"eta_queue_seconds\s*│\s*1m 5s", out)


def test_every_environment_variable_read_is_in_the_options_page():
    src = subprocess.run(["grep", "-rhoE", r"environ(\.get\(|\[)\"[A-Z_]+\"|\"[A-Z_]+\" in os\.environ", str(ROOT / "src")],
                         capture_output=True, text=True, check=True).stdout
    names = set(re.findall(r'"([A-Z_]+)"', src))
    assert {"EVERTRAIN_FAULT", "EVERTRAIN_CACHE", "RANK", "LOCAL_RANK"} <= names
    page = (ROOT / "docs" / "options.md").read_text()
    section = page[page.index("## Environment variables"):]
    assert [n for n in sorted(names) if f"`{n}`" not in section] == []
