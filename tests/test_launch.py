"""Several processes for real: `accelerate launch` with 2 CPU processes (gloo), signals, kills, elastic resume,
the daemon on two ranks, and two `train` on one folder.

Each launch costs seconds on 2 cores, so the runs are few and each proves several things; all are `slow`.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (CONTRADICTING, OLD, clean_env, cli, evertrain, free_port, text_rows, trained_steps,
                      write_jsonl)
from daemon_helpers import by_name, drop, make_ws, status, wait_for
from safetensors.torch import load_file as load_tensors

from evertrain.observe import trace
from evertrain.train import checkpoint

pytestmark = pytest.mark.slow
ACCELERATE = Path(sys.executable).with_name("accelerate")
# batch 1 x 2 processes = the same global batch of 2 as batch 1 x accumulation 2 in one process
TRAIN = ("--batch-size", "1", "--no-packing", "--trace", "--held-out-fraction", "0", "--save-steps", "0",
         "--learning-rate", "1e-3", "--warmup-steps", "0")


def finish_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once all have exited. Past `timeout`, every evertrain process under them
    writes its threads' stacks (SIGUSR1), all are killed, and the failure shows what each said and where it was."""
    from concurrent.futures import ThreadPoolExecutor, wait

    import psutil

    with ThreadPoolExecutor(len(procs)) as pool:  # read every pipe at once: a full one would stall its writer
        said = [pool.submit(proc.communicate) for proc in procs]
        if not wait(said, timeout).not_done:
            return [s.result() for s in said]
        under = [child for proc in procs if proc.poll() is None
                 for child in psutil.Process(proc.pid).children(recursive=True)]
        for child in under:
            child.send_signal(signal.SIGUSR1)
        time.sleep(2)  # the stacks are written from the signal handler; then nothing more can be learnt
        for p in [*under, *procs]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
    raise AssertionError(f"not all finished in {timeout}s:\n" + "\n".join(
        f"--- process {i} (exit {proc.returncode}):\n{s.result()[0][-3000:]}\n{s.result()[1][-6000:]}"
        for i, (proc, s) in enumerate(zip(procs, said))))


def launch(*args, processes: int = 2, env: dict | None = None, **popen) -> subprocess.Popen:
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "evertrain", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean_env(), **(env or {})}, start_new_session=True, **popen)


def exit_handlers_report_the_process_group(folder: Path) -> dict:
    """The environment of a launch whose ranks each write, from an exit handler, whether their process group was
    still up then: folder/rank-N (a sitecustomize module, which every Python process of the launch imports)."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(f"""
import atexit, os
def _report():
    import sys
    dist = sys.modules.get("torch.distributed")
    if "RANK" in os.environ and dist is not None:
        up = dist.is_available() and dist.is_initialized()
        with open(os.path.join({str(folder)!r}, "rank-" + os.environ["RANK"]), "w") as f:
            f.write("process group up" if up else "process group down")
atexit.register(_report)
""")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


def single(*args) -> subprocess.Popen:
    """One process, not a launch: `evertrain ARGS` started in a clean environment."""
    return evertrain(*args, wait=False, env=clean_env())


def interrupt_after(proc: subprocess.Popen, out: Path, steps: int, sig=signal.SIGTERM) -> tuple[int, str, str]:
    """Signal `proc` once `out` shows `steps` trained; its exit code and output."""
    try:
        wait_for(lambda: trained_steps(out) >= steps or proc.poll() is not None, 180, f"{steps} steps")
        assert proc.poll() is None, proc.communicate()
    except BaseException:
        stop_launch(proc)  # never leave ranks behind a failed test
        raise
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return proc.returncode, stdout, stderr


def workers(launcher_pid: int) -> list[int]:
    """The launcher's evertrain processes (its children running `-m evertrain`)."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-e"], capture_output=True, text=True).stdout
    kids = [line.split(None, 2) for line in out.splitlines()]
    return [int(pid) for pid, ppid, args in kids if int(ppid) == launcher_pid and "evertrain" in args]


def stop_launch(proc: subprocess.Popen) -> None:
    """After a failed check: SIGTERM to the launcher (it forwards it), then SIGKILL to any rank still there."""
    if proc.poll() is None:
        ranks = workers(proc.pid)
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def assert_no_debris(out: Path) -> None:
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*")), sorted(p.name for p in out.iterdir())


def test_sigterm_to_the_launcher_then_2_1_4_2_processes_mid_file_keep_the_global_batch_and_exactly_once(
        tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(40))  # global batch 4: 10 steps
    out, whole = tmp_path / "run", tmp_path / "whole"
    # batch 1 x 2 processes x accumulation 2: a global batch of 4
    args = ("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN,
            "--gradient-accumulation", 2)
    rng = random.Random(os.environ.get("EVERTRAIN_KILL_SEED", "launch"))

    # 2 processes, SIGTERM to the launcher at a random moment: every rank stops at the same step boundary.
    code, stdout, stderr = interrupt_after(launch(*args), out, rng.randint(1, 3))
    # accelerate's launcher (>= 1.16) reports the signal it forwarded as 128 + SIGTERM; the ranks exited 130.
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "checkpointed at the step boundary" in stdout and " done: " not in stdout
    first = checkpoint.newest_complete(out)
    assert first.step == trained_steps(out) < 10
    assert {p.name for p in first.path.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert first.state["run"]["global_batch"] == 4
    assert_no_debris(out)

    # 1 process: the accumulation doubles to keep the global batch, and says so.
    code, stdout, _ = interrupt_after(single(*args), out, first.step + 1, signal.SIGINT)
    assert code == 130
    assert "gradient accumulation 2 -> 4, to keep the run's global batch of 4" in stdout
    assert "resumes at its step" in stdout

    # 4 processes: no accumulation at all; SIGTERM at another random moment.
    resumed = checkpoint.newest_complete(out).step
    code, stdout, _ = interrupt_after(launch(*args, processes=4), out, resumed + rng.randint(1, 2))
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "gradient accumulation 2 -> 1" in stdout and "checkpointed at the step boundary" in stdout
    assert checkpoint.newest_complete(out).step == trained_steps(out) < 10
    assert_no_debris(out)

    # 2 processes again, to the end.
    proc = launch(*args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    final = checkpoint.newest_complete(out)
    assert final.step == 10 and final.state["run"]["global_batch"] == 4
    records = trace.read(out / "trace.jsonl")
    assert [r["step"] for r in records if "step" in r] == list(range(1, 11))
    assert dict(next(iter(trace.coverage(out / "trace.jsonl").values()))) == {i: 1 for i in range(40)}

    # The same weights as one uninterrupted process with that global batch (the ranks' sums differ in order only).
    assert cli("train", "--dataset", data, "--output-dir", whole, "--model", tiny_model, *TRAIN,
               "--gradient-accumulation", 4) == 0
    a = load_tensors(checkpoint.final_path(whole, 10) / "model.safetensors")
    b = load_tensors(final.path / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_a_global_batch_no_accumulation_can_keep_is_refused_with_the_numbers(tmp_path, tiny_model, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(12))
    out = tmp_path / "run"
    assert cli("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN,
               "--batch-size", 3) == 0  # global batch 3
    proc = launch("train", "--dataset", write_jsonl(tmp_path / "b.jsonl", text_rows(6, "b")), "--output-dir", out,
                  "--batch-size", 3)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "global batch of 3 rows per optimizer step; 2 process(es) x batch_size 3 = 6" in stderr
    assert "RunMismatch" not in stderr  # one clear line from each rank, no traceback of ours
    assert checkpoint.newest_complete(out).step == 4  # nothing trained


def test_kill_9_of_one_rank_ends_the_launch_and_a_restart_resumes_exactly_once(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(300))
    out = tmp_path / "run"
    args = ("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN, "--save-steps", "5")
    proc = launch(*args)
    wait_for(lambda: trained_steps(out) >= 12 or proc.poll() is not None, 180, "steps")
    victim = workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    proc.communicate(timeout=120)  # bounded: the launcher ends the other rank rather than wait on it
    assert proc.returncode != 0
    assert not workers(proc.pid)  # no orphaned rank
    saved = checkpoint.newest_complete(out).step
    assert saved >= 5, saved
    # A restart (one process is enough to show it) resumes from the newest complete checkpoint.
    # The old trace may show steps the kill never committed: wait for steps past them, so the restart has resumed.
    code, stdout, _ = interrupt_after(single(*args), out, trained_steps(out) + 2, signal.SIGINT)
    assert code == 130 and f"resumed {checkpoint.final_path(out, saved)}" in stdout
    steps = [r["step"] for r in trace.read(out / "trace.jsonl") if "step" in r]
    assert steps == list(range(1, len(steps) + 1))  # committed history only: no step twice
    counts = next(iter(trace.coverage(out / "trace.jsonl").values()))
    assert set(counts.values()) == {1} and len(counts) == 2 * len(steps)
    assert time.monotonic() - start < 600


def test_a_second_train_on_the_same_folder_is_refused_with_the_holder(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(300))
    out = tmp_path / "run"
    first = single("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN)
    try:
        wait_for(lambda: trained_steps(out) >= 2 or first.poll() is not None, 120, "the first train")
        second = evertrain("train", "--dataset", data, "--output-dir", out, env=clean_env(), timeout=120)
        assert second.returncode == 2
        assert f"another evertrain train (pid {first.pid}) is running on {out}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()  # kill -9: the lock it held is gone with it
        first.wait()
    third = single("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN)
    code, stdout, _ = interrupt_after(third, out, trained_steps(out) + 1, signal.SIGINT)
    assert code == 130 and "another evertrain" not in stdout


def test_the_daemon_on_two_processes_trains_dropped_files_exactly_once_and_obeys_pause_and_urgent(
        tmp_path, tiny_model):
    ws = make_ws(tmp_path, tiny_model, "--batch-size", "1")
    drop(ws, "a.jsonl", [{"text": f"a line {i}"} for i in range(6)])
    drop(ws, "bad.jsonl", '{"text": "fine"}\n{"text": broken\n')  # fails on every rank alike; the daemon goes on
    drop(ws, "long.jsonl", [{"text": f"long line {i}: " + "ab " * (i % 5)} for i in range(3000)])
    daemon = launch("run", ws)
    model = ws / "current_model"
    try:
        wait_for(lambda: status(ws).get("pid") or daemon.poll() is not None, 180, "the daemon to start")
        wait_for(lambda: by_name(ws).get("long.jsonl", {}).get("state") == "training"
                 and (status(ws).get("file_step") or 0) >= 3 or daemon.poll() is not None, 180, "long to train")
        assert cli("pause", ws) == 0
        wait_for(lambda: status(ws).get("state") == "paused" or daemon.poll() is not None, 120, "paused")
        held = checkpoint.newest_complete(model).step
        assert trained_steps(model) == held  # both ranks stopped at that step, checkpointed
        assert cli("resume", ws) == 0
        wait_for(lambda: trained_steps(model) >= held + 3 or daemon.poll() is not None, 120, "training to go on")
        drop(ws, "now.jsonl", [{"text": f"urgent line {i}"} for i in range(4)], folder="inbox/urgent")
        wait_for(lambda: by_name(ws).get("urgent/now.jsonl", {}).get("state") == "done" or daemon.poll() is not None, 180,
                 "the urgent file")
        assert cli("stop", ws) == 0
        stdout, stderr = daemon.communicate(timeout=180)
        assert daemon.returncode == 0, stderr[-3000:]
    finally:
        stop_launch(daemon)
    files = by_name(ws)
    assert files["a.jsonl"]["state"] == "done" and files["urgent/now.jsonl"]["state"] == "done"
    assert files["bad.jsonl"]["state"] == "failed" and "line 2" in files["bad.jsonl"]["error"]
    assert files["long.jsonl"]["state"] == "queued" and files["long.jsonl"]["steps_trained"] > 0  # pre-empted
    cov = {sha: dict(c) for sha, c in trace.coverage(model / "trace.jsonl").items()}
    assert cov[files["a.jsonl"]["sha256"]] == {i: 1 for i in range(6)}
    assert cov[files["urgent/now.jsonl"]["sha256"]] == {i: 1 for i in range(4)}
    assert set(cov[files["long.jsonl"]["sha256"]].values()) == {1}
    records = [r for r in trace.read(model / "trace.jsonl") if "step" in r]
    assert all(sorted(mb["rank"] for mb in r["micro_batches"]) == [0, 1] for r in records)  # both ranks trained
    assert stdout.count("evertrain: daemon starting") == 1  # the main process alone speaks
    assert "long.jsonl pre-empted by an urgent file" in stdout


def test_two_machines_on_loopback_train_one_file_exactly_once(tmp_path, tiny_model):
    """`torchrun --nnodes 2` as two launches of one process each: what two machines sharing a folder run."""
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(24))  # global batch 4: 6 steps
    out, port = tmp_path / "run", free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    nodes = [subprocess.Popen(
        [str(torchrun), "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--master_addr",
         "127.0.0.1", "--master_port", str(port), "-m", "evertrain", "train", "--dataset", str(data),
         "--output-dir", str(out), "--model", str(tiny_model), *TRAIN, "--batch-size", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()) for n in (0, 1)]
    results = finish_all(nodes)
    assert [node.returncode for node in nodes] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert " done: " in results[0][0] and " done: " not in results[1][0]  # the global main process reports
    assert checkpoint.newest_complete(out).step == 6
    records = [r for r in trace.read(out / "trace.jsonl") if "step" in r]
    assert all(sorted(mb["rank"] for mb in r["micro_batches"]) == [0, 1] for r in records)
    assert dict(next(iter(trace.coverage(out / "trace.jsonl").values()))) == {i: 1 for i in range(24)}


def launch_fsdp(*args, env: dict | None = None) -> subprocess.Popen:
    cmd = [str(ACCELERATE), "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "evertrain", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**clean_env(), **(env or {})}, start_new_session=True)


@pytest.mark.parametrize("mode", ["--full", "--lora"])
def test_fsdp2_on_two_processes_equals_one_process_and_resumes_after_kill_9_mid_file(tmp_path, tiny_model, mode):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(40))  # global batch 2 x 2 = 4: 10 steps
    # FSDP has no anchor set (anchor.build) and one process has one: compared without the default anchor replay.
    opts = ("--dataset", data, "--model", tiny_model, mode, *TRAIN, "--batch-size", 2, "--save-steps", 3,
            "--no-anchor-replay")
    weights = "adapter_model.safetensors" if mode == "--lora" else "model.safetensors"

    whole = launch_fsdp("train", "--output-dir", tmp_path / "fsdp", *opts)
    stdout, stderr = whole.communicate(timeout=300)
    assert whole.returncode == 0, stderr[-3000:]
    ckpt = checkpoint.newest_complete(tmp_path / "fsdp")
    assert ckpt.step == 10 and ckpt.state["run"]["sharding"] == "fsdp2"
    # the optimizer's shards, one per process, inside the same atomic checkpoint (and in its manifest)
    assert sorted(p.name for p in (ckpt.path / "optimizer").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert "optimizer/__1_0.distcp" in ckpt.state["manifest"] and not (ckpt.path / "optimizer.pt").exists()

    # one process, the same global batch, no sharding: the same weights
    assert cli("train", "--output-dir", tmp_path / "one", *opts, "--batch-size", 4) == 0
    a = load_tensors(checkpoint.newest_complete(tmp_path / "one").path / weights)
    b = load_tensors(ckpt.path / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

    # kill -9 of a rank in the middle of the file, then the same command: equal to the uninterrupted run
    cut = tmp_path / "cut"
    killed = launch_fsdp("train", "--output-dir", cut, *opts, env={"EVERTRAIN_FAULT": "mid-step:7"})
    killed.communicate(timeout=300)  # every rank dies inside its 7th step
    assert killed.returncode != 0 and checkpoint.newest_complete(cut).step == 6
    resumed = launch_fsdp("train", "--output-dir", cut, *opts)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumes at its step 6/10" in stdout, stderr[-3000:]
    c = load_tensors(checkpoint.newest_complete(cut).path / weights)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-6)
    assert dict(next(iter(trace.coverage(cut / "trace.jsonl").values()))) == {i: 1 for i in range(40)}
    assert_no_debris(cut)

    # a sharded run is not resumed unsharded (its optimizer state is in shards): refused with the reason
    refused = evertrain("train", "--output-dir", tmp_path / "fsdp", "--dataset",
                        write_jsonl(tmp_path / "b.jsonl", text_rows(4, "b")), env=clean_env())
    assert refused.returncode == 2 and "sharding: run has 'fsdp2', asked 'none'" in refused.stderr


def test_deepspeed_or_fsdp1_asked_for_is_refused_not_run_as_something_else(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(8))
    cmd = [str(ACCELERATE), "launch", "--use_fsdp", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "evertrain", "train", "--dataset", str(data), "--output-dir", str(tmp_path / "run"),
           "--model", str(tiny_model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert proc.returncode != 0
    assert "add --fsdp_version 2" in proc.stderr
    assert "src/evertrain/" not in proc.stderr  # a line, not a traceback through our code
    assert checkpoint.newest_complete(tmp_path / "run") is None


def test_a_signal_that_reaches_one_rank_only_stops_every_rank_at_the_same_step(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "data.jsonl", text_rows(300))
    out = tmp_path / "run"
    proc = launch("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN)
    try:
        wait_for(lambda: trained_steps(out) >= 3 or proc.poll() is not None, 180, "steps")
        ranks = workers(proc.pid)
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGTERM)  # a supervisor's kill, not the launcher's: the other rank never hears it
        stdout, stderr = proc.communicate(timeout=120)
    except BaseException:
        stop_launch(proc)
        raise
    assert "interrupted" in stdout and " done: " not in stdout, stderr[-2000:]
    stopped = checkpoint.newest_complete(out)
    assert stopped.step == trained_steps(out) < 150  # both ranks stopped after the same step, and saved it
    assert {p.name for p in stopped.path.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    assert_no_debris(out)


def test_the_forgetting_gate_rolls_back_every_rank_to_the_checkpoint_before_the_file(tmp_path, tiny_model):
    """Two ranks judge one verdict (the main process's, broadcast) and undo the file together: one rejection,
    the checkpoint before the file back as the newest, the undone steps gone from the trace."""
    out = tmp_path / "run"
    opts = ("--output-dir", out, "--model", tiny_model, "--batch-size", "2", "--no-packing", "--epochs", "6",
            "--learning-rate", "3e-3", "--warmup-steps", "0", "--held-out-fraction", "0.2", "--trace",
            "--save-steps", "4", "--keep-checkpoints", "1", "--forgetting-action", "rollback",
            "--replay-fraction", "0", "--no-anchor-replay")  # the default replay keeps the gate shut here
    first = launch("train", "--dataset", write_jsonl(tmp_path / "old.jsonl", OLD), *opts,
                   env=exit_handlers_report_the_process_group(tmp_path / "at-exit"))
    assert first.wait(600) == 0, first.stderr.read()
    # Each rank ended through collective.end_process with its process group still up (tracker closing once took
    # it down on each rank alone, and a rank then aborted in the interpreter's teardown, now and then).
    assert sorted(p.name for p in (tmp_path / "at-exit").glob("rank-*")) == ["rank-0", "rank-1"]
    assert {p.read_text() for p in (tmp_path / "at-exit").glob("rank-*")} == {"process group up"}
    before = checkpoint.newest_complete(out)
    second = launch("train", "--dataset", write_jsonl(tmp_path / "new.jsonl", CONTRADICTING), *opts)
    _stdout, stderr = second.communicate(timeout=600)
    assert second.returncode == 1 and "exitcode  : 7" in stderr, stderr  # the ranks exited 7 (REJECTED); torchrun says 1
    assert stderr.count("REJECTED by the forgetting gate") == 1, stderr
    after = checkpoint.newest_complete(out)
    assert after.step == before.step and [c.step for c in checkpoint.candidates(out)] == [before.step]
    files = after.state["evertrain"]["files"]
    assert [(f["name"], f["status"]) for f in files] == [("old.jsonl", "done"), ("new.jsonl", "rejected")]
    assert {rec["file"] for rec in trace.read(out / "trace.jsonl") if "step" in rec} == {files[0]["sha256"]}


def test_a_full_disk_under_two_processes_stops_every_rank_at_once_and_resumes_exactly_once(tmp_path, tiny_model):
    """The main process's checkpoint write fails for room: every process learns it at once and exits 6 (not at the
    launch's collective timeout); the newest complete checkpoint stays the newest and a restart trains on."""
    data = write_jsonl(tmp_path / "a.jsonl", text_rows(24))  # global batch 2 x 1 = 2: 12 steps
    out = tmp_path / "run"
    opts = ("train", "--dataset", data, "--output-dir", out, "--model", tiny_model, *TRAIN, "--save-steps", "2")
    full = launch(*opts, env={"EVERTRAIN_FAULT": "enospc:checkpoint-write:2"})  # the second checkpoint's write
    _stdout, stderr = full.communicate(timeout=300)
    # Every rank exits 6 (DISK_FULL) at once; the launcher ends the rest as soon as the first one has, so a rank
    # still on its way out may be reported as SIGTERM'd instead.
    assert full.returncode == 1 and "exitcode  : 6" in stderr, stderr[-3000:]
    ours = stderr.split("torch/distributed/elastic")[0]  # what the ranks said, before the launcher's own report
    assert ours.count("evertrain: disk full in") == 1 and "Traceback" not in ours, stderr[:6000]
    assert [c.step for c in checkpoint.candidates(out)] == [2]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]  # the partial one was removed
    resumed = launch(*opts)
    _stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "resumes at its step 2/12" in _stdout + stderr, stderr[-3000:]
    assert dict(next(iter(trace.coverage(out / "trace.jsonl").values()))) == {i: 1 for i in range(24)}


def test_a_launched_process_ends_with_its_exit_code_after_its_threads_and_exit_handlers(tmp_path):
    """collective.end_process, the end of every process of a launch: what an exit would have done first (a
    thread still writing, an exit handler flushing) is done, and the code is the one asked for."""
    script = f"""
import atexit, threading, time
from pathlib import Path
from evertrain import collective
out = Path({str(tmp_path)!r})
atexit.register(lambda: (out / "exit-handler").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
print("to stdout, buffered", end="")
collective.end_process(7)
raise SystemExit("not reached")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert done.returncode == 7 and done.stdout == "to stdout, buffered", done.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "exit-handler").read_text() == "ran"
