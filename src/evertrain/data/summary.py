"""What a file will teach: its summary and one example with the trained tokens marked.

    evertrain check FILE [--model DIR] [--chat-template chatml] [--columns a=prompt,b=completion]
"""

from __future__ import annotations

from itertools import groupby

from evertrain.data import IGNORE, FileData

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around trained text: rare in real data, visible in any terminal


def describe(data: FileData, max_length: int) -> str:
    examples = counted(data.records + len(data.held_out_lines), len(data.examples) + len(data.held_out), data)
    lines = [f"{data.name}: {examples} ({kinds(data)}), {data.tokens:,} tokens, "
             f"{data.truncated:,} truncated to {max_length}, {len(data.held_out):,} held out, "
             f"{len(data.rows):,} rows"]
    lines += [f"warning: {w}" for w in data.warnings]
    if data.ignored:
        lines.append("ignored keys (not trained): " + ", ".join(f"{k} ({v:,})" for k, v in data.ignored.most_common()))
    return "\n".join(lines)


def kinds(data: FileData) -> str:
    """The shapes the file's records came in, most common first: "chat 30, alpaca 2"."""
    return ", ".join(f"{k} {v:,}" for k, v in data.formats.most_common())


def counted(records: int, examples: int, data: FileData) -> str:
    """"20 examples", "20 examples in 1,234 windows" when long texts were split (each window trains apart),
    "20 preference pairs" or "20 rated answers" for the files that teach by judgment."""
    what = {"preference": "preference pairs", "feedback": "rated answers"}.get(data.objective, "examples")
    return f"{records:,} {what}" + (f" in {examples:,} windows" if data.windows else "")


def marked(example, tokenizer) -> str:
    """The example's text with every trained stretch between ⟦ and ⟧; a preference pair's two answers, each
    under its name; a rated answer with its rating."""
    if example.split:
        chosen, rejected = example.segments
        return "\n".join(f"{name}:\n" + _marked(example.input_ids[a:b], example.labels[a:b], tokenizer)
                         for name, (a, b) in (("chosen", chosen), ("rejected", rejected)))
    text = _marked(example.input_ids, example.labels, tokenizer)
    if example.desirable is not None:
        return f"rated {'good' if example.desirable else 'bad'}:\n{text}"
    return text


def _marked(input_ids, labels, tokenizer) -> str:
    out = []
    pairs = zip(input_ids, labels)
    for trained, group in groupby(pairs, key=lambda p: p[1] != IGNORE):
        text = tokenizer.decode([t for t, _ in group], skip_special_tokens=False)
        out.append(f"{OPEN}{text}{CLOSE}" if trained else text)
    return "".join(out)


