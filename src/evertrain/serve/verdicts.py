"""A verdict on a served answer: the body of POST /v1/feedback checked, and what a rating or a correction becomes,
its line in a training file (feedback.py collects the lines into files).

    pytest -q tests/test_serve_feedback.py -k "shape or bad"
"""

from __future__ import annotations

import json

from evertrain.data.formats import parse_record
from evertrain.data.record import RecordError
from evertrain.serve.api import BadRequest


def parse_feedback(body: dict) -> tuple[str, str | None, str | None]:
    """(id, rating, correction) of a POST /v1/feedback body; BadRequest naming the field that is wrong."""
    response_id, rating, correction = body.get("id"), body.get("rating"), body.get("correction")
    if not isinstance(response_id, str) or not response_id:
        raise BadRequest("'id' must be the id of an answer this server gave (the 'id' of its response)", "id")
    if rating is None and correction is None:
        raise BadRequest("give a 'rating' (\"good\" or \"bad\"), a 'correction' (the answer it should have given), "
                         "or both", "rating")
    if rating is not None and rating not in ("good", "bad"):
        raise BadRequest(f"'rating' must be \"good\" or \"bad\", not {str(rating)[:40]!r}", "rating")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise BadRequest("'correction' must be a non-empty string: the answer it should have given", "correction")
    if rating == "good" and correction is not None:
        raise BadRequest("a correction says the answer was wrong: rate it \"bad\" with its correction, or leave "
                         "'rating' out", "rating")
    return response_id, rating, correction


def rating_line(row, good: bool) -> str:
    """A rated answer (KTO): LLaMA-Factory's messages + label for a chat answer, TRL's prompt/completion/label
    for a completion; the answer's id beside them (not trained: it keeps two files of equal ratings apart)."""
    if not row["answer"].strip():
        raise BadRequest(f"the answer {row['id']!r} is empty: there is nothing to rate (a correction can be given)",
                         "rating", "empty_answer")
    if row["messages"] is not None:
        record = {"messages": json.loads(row["messages"]) + [{"role": "assistant", "content": row["answer"]}],
                  "label": good}
    else:
        record = {"prompt": row["prompt"], "completion": row["answer"], "label": good}
    return trainable({**record, "id": row["id"]}, "rating")


def correction_line(row, correction: str) -> str:
    """A demonstration of the answer it should have given; earlier assistant turns of the conversation are
    context only (weight 0): the correction alone is trained."""
    if row["messages"] is not None:
        earlier = [dict(m, weight=0) if m["role"] == "assistant" else m for m in json.loads(row["messages"])]
        record = {"messages": earlier + [{"role": "assistant", "content": correction}]}
    else:
        record = {"prompt": row["prompt"], "completion": correction}
    return trainable({**record, "id": row["id"]}, "correction")


def trainable(record: dict, param: str) -> str:
    """The record's JSONL line, once the data reader takes it: one bad line would fail its whole file."""
    try:
        parse_record(record)
    except RecordError as e:
        raise BadRequest(f"this {param} cannot become training data: {e}", param, "not_trainable") from None
    return json.dumps(record, ensure_ascii=False)


def file_bytes(rows) -> bytes:
    return "".join(r["line"] + "\n" for r in rows).encode()
