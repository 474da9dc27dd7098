"""The column mapping a record that fits no shape is missing: its keys renamed along common synonyms, each try
checked by parse_record itself, so a Dolly file (instruction, context, response) is told
`--columns context=input,response=output` and the same as an evertrain.toml [data.columns] table.

    evertrain check dolly.jsonl            # the refusal names the mapping; with it the file trains
"""

from __future__ import annotations

import itertools
import json
import re

from evertrain.config import FORMAT_KEYS
from evertrain.data.formats import parse_record

# Names datasets give a format key's content, the format key a mapping should prefer first in each group.
SYNONYMS = (
    ("completion", "output", "response", "answer", "target", "reply"),
    ("input", "context"),
    ("prompt", "instruction", "question", "query", "problem"),
    ("text", "content", "document", "passage"),
    ("messages", "conversations", "conversation", "dialog", "dialogue", "chat"),
    ("system", "system_prompt"),
)
MAX_TRIES = 4096  # mappings tried for one record: a record with many synonym keys is not searched whole


def suggest(obj: dict, columns: dict[str, str]) -> tuple[dict[str, str], str] | None:
    """(the whole mapping, the shape it gives) for a record that fits no shape, or None. Of the mappings that
    parse, the one that uses the most of the record's keys wins, then the one with the fewest renames."""
    sources = [key for key, value in obj.items() if value is not None and key not in columns]
    mapped = {t for s, t in columns.items() if obj.get(s) is not None}  # nulls count as absent
    options = [[None] + [t for t in _targets(key) if t not in mapped and t not in sources] for key in sources]
    keys = len(sources) + len(mapped)
    best, best_rank = None, None
    for choice in itertools.islice(itertools.product(*options), MAX_TRIES):
        renames = {s: t for s, t in zip(sources, choice) if t is not None}
        if not renames or len(set(renames.values())) < len(renames):
            continue  # nothing to suggest, or two keys onto one
        mapping = {**columns, **renames}
        try:
            record = parse_record(obj, mapping)
        except Exception:  # a mapping that fails in any way (a RecursionError too) is just not the one to suggest
            continue
        rank = (keys - len(record.ignored), -len(renames))
        if best_rank is None or rank > best_rank:
            best, best_rank = (mapping, record.kind), rank
    return best


def hint(obj, columns: dict[str, str]) -> str | None:
    """The suggestion as it is printed: the --columns option and the evertrain.toml table, or None."""
    found = suggest(obj, columns) if isinstance(obj, dict) else None
    if found is None:
        return None
    mapping, kind = found
    return (f"it fits as {kind} with --columns {','.join(f'{k}={v}' for k, v in mapping.items())}, "
            "or in evertrain.toml:\n" + "\n".join(["[data.columns]"] + toml_lines(mapping)))


def toml_lines(mapping: dict[str, str]) -> list[str]:
    """A [data.columns] table's lines: dataset field = "format key"."""
    return [f"{_toml_key(k)} = {json.dumps(v)}" for k, v in mapping.items()]


def _targets(key: str) -> tuple[str, ...]:
    name = key.lower()
    if "," in key or "=" in key:  # not expressible as --columns
        return ()
    group = next((g for g in SYNONYMS if name in g), ())
    return tuple(t for t in group if t in FORMAT_KEYS and t != key)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
