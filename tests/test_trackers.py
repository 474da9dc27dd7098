"""Trackers through accelerate: Trainer-style tags, the run's settings as hyperparameters once, and one tracker
run per evertrain run across files and restarts. Read back with TensorBoard's EventAccumulator (and MLflow's
client, when mlflow is installed).

    pytest -q tests/test_trackers.py
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import cli, text_rows, write_jsonl

OPTS = ("--batch-size", 2, "--no-packing", "--held-out-fraction", 0.2, "--learning-rate", 1e-3, "--warmup-steps", 0)


def train_two(tmp_path, tiny_model, *extra):
    """Two files, each its own `evertrain train` call (a restart in between): one run."""
    out = tmp_path / "run"
    for tag in "ab":
        assert cli("train", "--dataset", write_jsonl(tmp_path / f"{tag}.jsonl", text_rows(10, tag)), "--output-dir",
                   out, "--model", tiny_model, *OPTS, *extra) == 0
    return out


def test_tensorboard_gets_trainer_tags_and_hyperparameters_once_in_one_run(tmp_path, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = train_two(tmp_path, tiny_model)
    root = out / "logs" / "tensorboard" / "evertrain"
    acc = EventAccumulator(str(root))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/a.jsonl/loss", "eval/b.jsonl/loss"} <= tags
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 9))  # 8 rows per file, 2 per step: one run, its steps continuing
    assert [e.value for e in acc.Scalars("train/learning_rate")] == [pytest.approx(1e-3)] * 8
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train/loss")] == [pytest.approx(m["loss"]) for m in metrics]

    runs = [d for d in root.iterdir() if list(d.glob("events.out.tfevents.*"))]
    assert len(runs) == 1, runs  # the hyperparameters were logged once, though `train` started twice
    hp = EventAccumulator(str(runs[0]))
    hp.Reload()
    content = hp.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["learning_rate"].number_value == pytest.approx(1e-3)
    assert hparams["batch_size"].number_value == 2 and hparams["report_to"].string_value == "tensorboard"
    first = json.loads((out / "logs" / "tracker_run.json").read_text())
    assert first["name"].startswith("evertrain-")


def test_report_to_none_and_trackers_that_are_not_there(tmp_path, tiny_model, capsys):
    f = write_jsonl(tmp_path / "a.jsonl", text_rows(4))
    out = tmp_path / "none"
    assert cli("train", "--dataset", f, "--output-dir", out, "--model", tiny_model, "--report-to", "none") == 0
    assert not (out / "logs" / "tensorboard").exists() and (out / "logs" / "metrics.jsonl").is_file()
    capsys.readouterr()
    assert cli("train", "--dataset", f, "--output-dir", tmp_path / "x", "--model", tiny_model,
               "--report-to", "tensorbored") == 2
    assert "report_to tensorbored: not a tracker; choose from tensorboard, wandb" in capsys.readouterr().err
    missing = next((n for n in ("wandb", "aim", "trackio") if importlib.util.find_spec(n) is None), None)
    if missing is not None:
        assert cli("train", "--dataset", f, "--output-dir", tmp_path / "y", "--model", tiny_model,
                   "--report-to", missing) == 2
        err = capsys.readouterr().err
        assert f"report_to {missing}: the {missing} package is not installed" in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_gets_one_run_with_its_metrics_and_params(tmp_path, tiny_model, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # evertrain asks for the file store it chose
    out = train_two(tmp_path, tiny_model, "--report-to", "mlflow")
    client = MlflowClient(tracking_uri=(out / "logs" / "mlruns").absolute().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "evertrain"]
    (run,) = client.search_runs([experiment.experiment_id])
    record = json.loads((out / "logs" / "tracker_run.json").read_text())
    assert run.info.run_id == record["ids"]["mlflow"] and run.info.run_name == record["name"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))
    assert {"eval/a.jsonl/loss", "eval/b.jsonl/loss", "train/learning_rate"} <= set(run.data.metrics)
    assert float(run.data.params["learning_rate"]) == pytest.approx(1e-3)
