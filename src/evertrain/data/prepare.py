"""Building a token store: read, check and tokenize a file in one streaming pass.

Records are read one at a time, checked, and tokenized in batches of BATCH_RECORDS; the tokens go straight to
the store's files on disk. Every bad record is counted, and each distinct problem told once with how many
records it applies to and the first of their numbers (at most MAX_REPORTED_ERRORS problems; a record that fits no
shape gets the --columns it would fit with, when there is one). A file with any bad record fails whole, before
any of it trains, and leaves no store behind. Whatever else goes wrong inside one file (a RecursionError, a
MemoryError, a tokenizer's panic) fails that file alone, as a DataError naming the record being read when it
happened: a poison file must never take the daemon down.

    evertrain check FILE --model DIR
"""

from __future__ import annotations

from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from evertrain import faults
from evertrain.disk import is_full as is_disk_full
from evertrain.config import parse_columns
from evertrain.data import columns as suggestions
from evertrain.data.containers import BadRecord, ContainerError, open_records
from evertrain.data.examples import BATCH_CHARS, BATCH_RECORDS, MAX_REPORTED_ERRORS, Cancelled, DataError, layout
from evertrain.data.formats import FitsNoFormat, RecordError, parse_record
from evertrain.data.render import Encoded, NoChatTemplate, RecordFailed, Renderer
from evertrain.data.store import StoreWriter, TokenStore


SHOWN_NUMBERS = 5  # record numbers named for one problem; the rest are counted


class Problems:
    """The file's bad records, grouped by their reason: 175 records with one problem are one line."""

    def __init__(self, unit: str):
        self.unit, self.total = unit, 0
        self.numbers: dict[str, list[int]] = {}  # reason -> its first SHOWN_NUMBERS record numbers (1-based)
        self.counts: dict[str, int] = {}
        self.hints: dict[str, str] = {}

    def add(self, reason: str, index: int | None = None, hint=None) -> None:
        """One bad record (`index`, 0-based) or a problem of the whole file (None). `hint()`: advice for the
        reason, asked once, when the reason is first seen."""
        self.total += 1
        if reason not in self.counts:
            if len(self.counts) >= MAX_REPORTED_ERRORS:
                return  # counted in total only
            self.counts[reason], self.numbers[reason] = 0, []
            if hint and (advice := hint()):
                self.hints[reason] = advice
        self.counts[reason] += 1
        if index is not None and len(self.numbers[reason]) < SHOWN_NUMBERS:
            self.numbers[reason].append(index + 1)

    def add_many(self, reason: str, numbers: list[int], count: int) -> None:
        """`count` bad records with one reason, of which `numbers` (0-based) are the first."""
        for k in range(count):
            self.add(reason, numbers[k] if k < len(numbers) else None)

    def error(self, path: Path) -> DataError:
        lines = []
        for reason, count in self.counts.items():
            line = f"{self.where(self.numbers[reason], count)}: {reason}" if self.numbers[reason] else reason
            lines.append(line + (f"; {self.hints[reason]}" if reason in self.hints else ""))
        return DataError(path, lines, self.total, sum(self.counts.values()))

    def where(self, numbers: list[int], count: int) -> str:
        """line 4 / lines 2, 5 and 9 / lines 1, 2, 3, 4, 5 and 170 more (175 records)"""
        if count == 1:
            return f"{self.unit} {numbers[0]}"
        shown = ", ".join(map(str, numbers))
        if count == len(numbers):
            return f"{self.unit}s {shown.rpartition(', ')[0]} and {numbers[-1]}"
        return f"{self.unit}s {shown} and {count - len(numbers)} more ({count} records)"


def build_store(path: Path, tokenizer, config, target: Path, *, progress=None, should_stop=None) -> TokenStore:
    try:
        columns = parse_columns(config.columns)
        records = open_records(path, config.max_line_bytes, config.max_json_depth, config.text_sample_by)
    except (ContainerError, ValueError) as e:
        raise DataError(path, [str(e)]) from None
    faults.hit("prepare")
    windowed = config.long_text == "window"
    renderer = Renderer(tokenizer, config.max_length, window_overlap=config.window_overlap if windowed else None,
                        max_text_chars=config.max_line_bytes)
    unit = records.unit
    problems, formats, ignored = Problems(unit), Counter(), Counter()
    teaches: dict[str, list[int]] = {}  # objective -> its first records (0-based): a file teaches one way
    counts: Counter = Counter()         # records per objective
    untrainable: list[int] = []         # judgments an answer of which max_length cut away entirely
    last = -1  # the last record read: where an unexpected failure is reported
    batch: list = []
    numbers: list[int] = []
    size = [0]  # characters in the batch

    # Tokenizing a batch (Rust, GIL released) overlaps with reading and rendering the next one.
    pool, pending = ThreadPoolExecutor(max_workers=1), deque()

    def write(recs, nums, encoded) -> None:
        encoded, lost = trainable(encoded, {o for o, r in enumerate(recs) if r.objective != "supervised"})
        for o in lost:
            untrainable.append(nums[o])
        writer.add(encoded, nums, [r.kind for r in recs], [r.desirable for r in recs])
        formats.update(r.kind for r in recs)
        for r in recs:
            ignored.update(r.ignored)
            teaches.setdefault(r.objective, [])
        for r, n in zip(recs, nums):
            seen = teaches[r.objective]
            if len(seen) < SHOWN_NUMBERS:
                seen.append(n)
        counts.update(r.objective for r in recs)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            recs, nums, future = pending.popleft()
            try:
                encoded = future.result()
            except Exception as e:  # the tokenizer itself failed: find the record, one at a time
                for rec, number in zip(recs, nums):
                    try:
                        write([rec], [number], renderer.encode([rec]))
                    except Exception as e1:
                        problems.add(str(e1 or e), number)
                continue
            if not problems.total:
                write(recs, nums, encoded)

    def flush() -> None:
        if batch and not problems.total:  # once the file has failed, only checking goes on
            for recs, nums, rendered in _render(renderer, batch, numbers, problems):
                pending.append((recs, nums, pool.submit(renderer.tokenize, rendered)))
                drain(keep=1)
        batch.clear()
        numbers.clear()
        size[0] = 0
        if progress:
            progress(records.fraction())
        if should_stop and should_stop():
            raise Cancelled(str(path))

    writer = StoreWriter(target)
    try:
        try:
            for index, value in records:
                last = index
                if isinstance(value, BadRecord):
                    problems.add(value.reason, index)
                    continue
                try:
                    rec = parse_record(value, columns)
                except FitsNoFormat as e:
                    problems.add(str(e), index, lambda: suggestions.hint(value, columns))
                    continue
                except RecordError as e:
                    problems.add(str(e), index)
                    continue
                except Exception as e:  # e.g. a RecursionError in a nested JSON string: this record alone
                    problems.add(one_line(e), index)
                    continue
                if renderer.template is None and any(s.messages is not None for s in (rec.sides or (rec,))):
                    raise DataError(path, [f"{unit} {index + 1} is a conversation, but the model's tokenizer has "
                                           "no chat template: pass --chat-template chatml (a built-in ChatML "
                                           "template) or --chat-template FILE.jinja"])
                batch.append(rec)
                numbers.append(index)
                size[0] += rec.size()
                if len(batch) >= BATCH_RECORDS or size[0] >= BATCH_CHARS:
                    flush()
            flush()
            drain(keep=0)
        except ContainerError as e:
            problems.add(str(e))
        except (Cancelled, DataError):
            raise
        except Exception as e:  # the boundary: anything else the data code meets fails this file alone
            if is_disk_full(e):
                raise  # not the file's fault: the daemon waits for room, the file stays queued
            problems.add((f"stopped after {unit} {last + 1}: " if last >= 0 else "") + one_line(e))
        if len(counts) > 1:  # the fewer ones are the odd ones out, named by their numbers
            most = counts.most_common(1)[0][0]
            for objective, n in counts.items():
                if objective != most:
                    problems.add_many(f"{WHAT[objective][0]} among {WHAT[most][1]}: a file teaches one way (split "
                                      "it into one file of each)", teaches[objective], n)
        if not problems.total and not writer.records:
            problems.add("the file holds no examples (it is empty or only blank lines)" if not untrainable else
                         "no record is left to train: max_length cut away an answer of every one")
        if problems.total:
            raise problems.error(path)
        return writer.commit({"source": path.name, "unit": unit, "formats": dict(formats), "ignored": dict(ignored),
                              "max_length": config.max_length, "layout": layout(config, path),
                              "objective": next(iter(counts), "supervised"),
                              "untrainable": {"count": len(untrainable), "first": sorted(untrainable)[:SHOWN_NUMBERS]},
                              "unrendered_tool_calls": renderer.unrendered_tool_calls})
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


WHAT = {"supervised": ("a plain example", "plain examples"), "preference": ("a preference pair", "preference pairs"),
        "feedback": ("a rated answer", "rated answers")}


def trainable(enc: Encoded, judged: set[int]) -> tuple[Encoded, list[int]]:
    """The batch without the judgments that have nothing left to train: a pair one of whose answers, or a rated
    answer that, max_length cut away entirely (its prompt alone fills it; TRL drops these too). Plain examples
    are kept as they are (a truncated one still trains its prompt's tokens nowhere: counted as truncated).
    `judged`: the owners (batch positions) that are judgments. Returns the batch kept and the owners dropped."""
    if not judged:
        return enc, []
    starts = np.concatenate([[0], np.cumsum(enc.lengths)])
    cum = np.concatenate([[0], np.cumsum(enc.mask, dtype=np.int64)])
    split_at = starts[:-1] + np.where(enc.splits > 0, enc.splits, enc.lengths)
    first, second = cum[split_at] - cum[starts[:-1]], cum[starts[1:]] - cum[split_at]
    is_judged = np.isin(enc.owners, np.fromiter(judged, dtype=np.int64))
    keep = ~is_judged | ((first > 0) & ((enc.splits == 0) | (second > 0)))
    if keep.all():
        return enc, []
    spans = [np.arange(starts[k], starts[k + 1]) for k in np.flatnonzero(keep)]
    tokens = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
    kept = Encoded(enc.ids[tokens], enc.mask[tokens], enc.lengths[keep], enc.truncated[keep], enc.owners[keep],
                   enc.parts[keep], enc.splits[keep])
    return kept, sorted(set(enc.owners[~keep].tolist()))


def one_line(e: BaseException) -> str:
    """An unexpected exception as one line of a file's problems: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _render(renderer: Renderer, batch: list, numbers: list[int], problems: Problems):
    """Yield (records, numbers, rendered) for the batch; a record the template rejects is a problem."""
    try:
        yield list(batch), list(numbers), renderer.render(batch)
        return
    except NoChatTemplate:
        raise
    except Exception:  # find which records fail, one at a time (rare: a failing batch only)
        pass
    for rec, number in zip(batch, numbers):
        try:
            rendered = renderer.render([rec])
        except NoChatTemplate:
            raise
        except Exception as e:
            problems.add(str(e), number)
            continue
        if not problems.total:
            yield [rec], [number], rendered
