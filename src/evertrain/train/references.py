"""The reference of a preference or feedback file: the run's own past, not a second model.

A pair is judged against the model as it stood when its file began (DPO's and KTO's reference model). Its
log-probabilities are computed once, at the file's first step, for every example of the file (held-out ones too,
which later evaluations need): a pair's chosen and rejected answers, a rated answer and its KL sequence. They are
kept in RUN/references/<sha256>-<step>.npy (step: the global step the file began after) with a CRC-32 beside
them, read back at every resume, so an interrupted file resumes against the same reference, bitwise, and no copy
of the model stays in memory. A reference that is lost or damaged is computed again only while its file has not
trained a step (the model is still what it was); after that it cannot be, and the file fails with the reason.

    evertrain train --dataset PAIRS.jsonl --output-dir DIR    # then: ls DIR/references/
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from evertrain.data import Example, FileData
from evertrain.data.packing import collate
from evertrain.files import fsync_dir, write_bytes_atomic, write_text_atomic
from evertrain.runs import Run
from evertrain.train.objectives import segment_logp, token_logps
from evertrain.train.session import LostReference

ROWS = 8  # examples per forward pass


def path_of(run: Run, sha256: str, began_after: int) -> Path:
    return run.references / f"{sha256}-{began_after}.npy"


def attach(session, data: FileData, cursor, first_time: bool) -> None:
    """Give a preference or feedback file its reference: computed now (its first step is next), else read back.
    Every process holds it; the main one writes it, before any checkpoint can record the file's cursor."""
    if data.objective == "supervised":
        return
    path = path_of(session.run, data.sha256, cursor.first_step - 1)
    values = None if first_time else read(path)
    if values is None or len(values) != len(data.store):
        if not first_time and cursor.file_step > 0:
            raise LostReference(f"its reference (the model as it stood when it began, at global step "
                                f"{cursor.first_step - 1}) is missing or damaged in {path.parent}, and "
                                f"{cursor.file_step} of its steps were trained since: it cannot be computed again")
        values = compute(session, data)
        if session.is_main:
            write(path, values)
        session.accelerator.wait_for_everyone()
    data.examples.reference = values
    for e in data.held_out:
        e.reference = tuple(values[e.index].tolist())


def compute(session, data: FileData) -> np.ndarray:
    """[examples of the store, 2]: each example's reference log-probabilities, under the model as it stands
    (on every process: each computes a share, or all of it under FSDP, where every process takes part in every
    forward pass)."""
    acc, store = session.accelerator, data.store
    n, world, rank = len(store), acc.num_processes, acc.process_index
    values = torch.zeros((n, 2), dtype=torch.float64, device=acc.device)
    model = session.model if session.sharded else acc.unwrap_model(session.model)
    chunked = session.objectives.use_chunks(model)
    was_training = model.training
    model.eval()
    starts = range(0, n, ROWS)
    mine = starts if session.sharded else starts[rank::world]
    with torch.no_grad(), acc.autocast():
        for start in mine:
            batch = [store.example(i) for i in range(start, min(start + ROWS, n))]
            for k, pair in enumerate(logps(model, batch, session.tokenizer.pad_token_id, acc.device, chunked)):
                values[start + k] = torch.tensor(pair, dtype=torch.float64)
    model.train(was_training)
    if world > 1 and not session.sharded:
        torch.distributed.all_reduce(values)
    return values.cpu().numpy()


def logps(model, examples: list[Example], pad_id: int, device, chunked: bool) -> list[tuple[float, float]]:
    """Per example: a pair's chosen and rejected log-probabilities, or a rated answer's and its KL sequence's."""
    batch = collate([[e] for e in examples], pad_id, device)
    rows = token_logps(model, batch, chunked=chunked)
    out = []
    for k, e in enumerate(examples):
        if e.split:
            (a, b), (c, d) = e.segments
            out.append((float(segment_logp(rows[k], e, 0, a, b)), float(segment_logp(rows[k], e, 0, c, d))))
        else:
            out.append((float(segment_logp(rows[k], e, 0, 0, len(e.input_ids))), 0.0))
    rated = [(k, e) for k, e in enumerate(examples) if e.kl is not None]
    if rated:
        kl = [Example(line=e.line, format="", input_ids=e.kl[0], labels=e.kl[1]) for _k, e in rated]
        kl_rows = token_logps(model, collate([[x] for x in kl], pad_id, device), chunked=chunked)
        for j, ((k, _e), x) in enumerate(zip(rated, kl)):
            out[k] = (out[k][0], float(segment_logp(kl_rows[j], x, 0, 0, len(x.input_ids))))
    return out


def write(path: Path, values: np.ndarray) -> None:
    """The values and, written last, their CRC-32: a reader finds the pair whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, values)
    write_bytes_atomic(path, buffer.getvalue())
    write_text_atomic(_meta(path), json.dumps({"crc32": zlib.crc32(buffer.getvalue()), "shape": list(values.shape)}))
    fsync_dir(path.parent)


def read(path: Path) -> np.ndarray | None:
    """The values at `path`, or None when they are missing or do not match their CRC-32."""
    try:
        meta = json.loads(_meta(path).read_text())
        raw = path.read_bytes()
        if zlib.crc32(raw) != meta["crc32"]:
            return None
        return np.load(path)
    except (OSError, ValueError, KeyError):
        return None


def prune(run: Run, keep: set[str]) -> None:
    """Remove the references of files no longer open (`keep`: the names of those still needed)."""
    if run.references.is_dir():
        for p in run.references.iterdir():
            if p.name.removesuffix(".json").removesuffix(".crc") not in keep and not p.name.startswith("."):
                p.unlink(missing_ok=True)


def _meta(path: Path) -> Path:
    return path.with_name(path.name + ".crc.json")
