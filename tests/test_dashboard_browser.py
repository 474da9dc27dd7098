"""The dashboard in a real browser (Debian's headless chromium) on a run that trained two files: the loss
chart, the file table, the forgetting matrix and the evolution viewer show the run's real numbers and texts.

    apt-get install -y chromium && pytest tests/test_dashboard_browser.py
Without chromium the test is skipped, except under CI=true, where it fails.
"""

import json
import os
import shutil

from dashboard_run import Served, Tree, chromium, lines, trained_run, trained_workspace


def test_dashboard_shows_the_real_run(browser, tmp_path, tmp_path_factory, tiny_model):
    """A daemon workspace that trained two files: its metrics, ledger, evaluations and snapshots on the page."""
    run = trained_workspace(tmp_path_factory, tiny_model)
    metrics = lines(run / "logs" / "metrics.jsonl")
    evals = lines(run / "logs" / "evals.jsonl")
    snaps = sorted((run / "snapshots" / "evolution").glob("step-*.json"))
    assert len(snaps) >= 3 and evals, "the run must have snapshots and evaluations to show"
    # Not the defaults (first example, newest step): a file's example at an earlier step, chosen by the URL.
    chosen_snap = json.loads(snaps[len(snaps) // 2].read_text())
    example = next(e for e in chosen_snap["examples"] if e["source"] == "file")
    example_steps = [s for s in snaps if any(e["id"] == example["id"] for e in json.loads(s.read_text())["examples"])]

    with Served(run) as s:
        url = f"http://127.0.0.1:{s.port}/#example={example['id']}&step={chosen_snap['step']}"
        dom = Tree(chromium(browser, tmp_path / "profile", url, "--dump-dom")).root
        shot = tmp_path / "dashboard.png"
        chromium(browser, tmp_path / "profile", url, f"--screenshot={shot}", "--window-size=1400,2200")

    assert dom.find(tag="body").attrs.get("data-loaded") == "1", "the page never finished a poll"
    assert dom.find(id="error").attrs.get("hidden") is not None, dom.find(id="error").text()

    # Loss chart: every step of the run, drawn (uPlot made a canvas), both files' boundaries.
    chart = dom.find(id="loss-chart")
    assert chart.attrs["data-points"] == str(len(metrics))
    assert chart.attrs["data-last-step"] == str(metrics[-1]["step"])
    assert chart.attrs["data-files"] == "capitals.jsonl|colours.jsonl"
    assert chart.find_all("canvas")

    # File table: both files done, with the steps and global-step spans the run recorded.
    rows = dom.find(id="files").find_all("tr", data_state="done")
    by_name = {r.find(class_="name").text(): [td.text() for td in r.find_all("td")] for r in rows}
    assert set(by_name) == {"capitals.jsonl", "colours.jsonl"}
    for name in by_name:
        steps = [m["step"] for m in metrics if m["file_name"] == name]
        cells = by_name[name]
        assert f"{len(steps)} / {len(steps)}" in cells and f"{steps[0]}–{steps[-1]}" in cells, cells

    # Forgetting matrix: every evaluation's loss is a cell, in the row of its event and the column of its file.
    matrix = dom.find(id="forgetting")
    header = [th.text() for th in matrix.find_all("th", class_="col")]
    assert header == ["capitals.jsonl", "colours.jsonl"]
    for e in evals:
        row = matrix.find(tag="tr", data_row="before" if e.get("before_file") else e["after_file_name"])
        cells = row.find_all("td")
        cell = cells[header.index(e["file_name"])]
        assert cell.attrs["data-loss"] == f"{e['loss']:.4f}" and cell.text() == f"{e['loss']:.3f}"

    # Drift from the base model: a point for every measurement of the anchor set (one before any training).
    drift = lines(run / "logs" / "anchor.jsonl")
    assert len(drift) >= 3 and drift[0]["step"] == 0
    assert dom.find(id="drift-chart").attrs["data-points"] == str(len(drift))
    assert dom.find(id="drift-chart").find_all("canvas")
    assert dom.find(id="drift-empty").attrs.get("hidden") is not None

    # Evolution viewer: the chosen example at the chosen step, its tokens right/wrong as the snapshot says.
    ev = dom.find(id="evolution")
    assert (ev.attrs["data-example"], ev.attrs["data-step"]) == (example["id"], str(chosen_snap["step"]))
    assert dom.find(id="ev-expected").text() == example["expected"]
    assert dom.find(id="ev-input").text() == example["input"]
    tokens = dom.find(id="ev-tokens").find_all("span", class_="tok")
    assert [t.attrs["data-correct"] == "1" for t in tokens] == [t["correct"] for t in example["tokens"]]
    assert f"{round(100 * example['token_accuracy'])}% of {len(example['tokens'])} tokens right" in \
        dom.find(id="ev-scores").text()
    assert dom.find(id="ev-generation").text() == (example["generation"] or "(no generation in this snapshot)")
    history = [r for r in dom.find(id="ev-history").find_all("tr") if "data-step" in r.attrs]
    assert [int(r.attrs["data-step"]) for r in history] == sorted(
        (int(p.stem.split("-")[1]) for p in example_steps), reverse=True)
    assert "selected" in history[[int(r.attrs["data-step"]) for r in history].index(chosen_snap["step"])].attrs["class"]
    probe = dom.find(tag="option", value="probe-0")
    assert probe.text().startswith("probes.jsonl line 1: The capital of Peru is")

    # Checkpoints: the newest is the run's last step.
    newest = next(r for r in dom.find(id="checkpoints").find_all("tr") if "data-step" in r.attrs)
    assert newest.attrs["data-step"] == str(metrics[-1]["step"])

    assert shot.stat().st_size > 20_000  # a real picture, kept in the test's folder for a person to look at
    docs = os.environ.get("EVERTRAIN_DASHBOARD_SCREENSHOT")
    if docs:  # e.g. docs/dashboard.png for the README
        shutil.copy(shot, docs)


def test_dashboard_off_loopback_works_in_a_browser_with_the_printed_token(browser, tmp_path, tmp_path_factory,
                                                                          tiny_model):
    run = trained_run(tmp_path_factory, tiny_model)
    with Served(run, host="0.0.0.0", token="tok-for-the-test") as s:
        base = f"http://127.0.0.1:{s.port}/"
        refused = Tree(chromium(browser, tmp_path / "p1", base, "--dump-dom")).root
        dom = Tree(chromium(browser, tmp_path / "p2", base + "?token=tok-for-the-test", "--dump-dom")).root
    assert "token required" in refused.text() and not refused.find_all(id="loss-chart")
    # The token became a cookie: the page and every API call after it were let in.
    assert dom.find(tag="body").attrs.get("data-loaded") == "1"
    assert dom.find(id="loss-chart").attrs["data-points"] == str(len(lines(run / "logs" / "metrics.jsonl")))


def test_a_file_of_pairs_shows_its_accuracy_and_each_tracked_pair_its_margin(browser, tmp_path, tiny_model):
    """Demonstrations, then preference pairs: the matrix gives the pairs' held-out accuracy beside their loss,
    and the evolution viewer a tracked pair's margin (how far its chosen answer's reward is above the other's)."""
    from conftest import cli, write_jsonl
    from dashboard_run import COMMON

    run = tmp_path / "run"
    demos = [{"prompt": f"Say it ({i})", "completion": " yes."} for i in range(16)]
    pairs = [{"prompt": f"Is it good? ({i})", "chosen": " yes", "rejected": " no"} for i in range(16)]
    for name, rows in (("demos.jsonl", demos), ("pairs.jsonl", pairs)):
        assert cli("train", "--dataset", write_jsonl(tmp_path / name, rows), "--output-dir", run,
                   *COMMON(tiny_model), "--held-out-min-file", 1, "--beta", 0.5) == 0
    evals = [e for e in lines(run / "logs" / "evals.jsonl") if e["file_name"] == "pairs.jsonl"]
    snaps = sorted((run / "snapshots" / "evolution").glob("step-*.json"))
    last = json.loads(snaps[-1].read_text())
    pair = next(e for e in last["examples"] if e.get("margin") is not None)
    with Served(run) as s:
        url = f"http://127.0.0.1:{s.port}/#example={pair['id']}&step={last['step']}"
        dom = Tree(chromium(browser, tmp_path / "profile", url, "--dump-dom")).root

    matrix = dom.find(id="forgetting")
    header = [th.text() for th in matrix.find_all("th", class_="col")]
    assert header == ["demos.jsonl", "pairs.jsonl"]
    for e in evals:  # each evaluation of the pairs: its loss and accuracy in its cell
        row = matrix.find(tag="tr", data_row="before" if e.get("before_file") else e["after_file_name"])
        cell = row.find_all("td")[1]
        assert cell.text() == f"{e['loss']:.3f} · {round(100 * e['accuracy'])}%", cell.text()
        assert float(cell.attrs["data-accuracy"]) == e["accuracy"]
    demo_cell = matrix.find(tag="tr", data_row="pairs.jsonl").find_all("td")[0]
    assert "%" not in demo_cell.text() and demo_cell.attrs["data-accuracy"] == ""  # a token loss, no accuracy
    assert f"margin {pair['margin']:.3f}" in dom.find(id="ev-scores").text()
    assert dom.find(id="ev-generation").text() == (pair["generation"] or "(no generation in this snapshot)")
