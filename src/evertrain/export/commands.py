"""The `export`, `lineage` and `chat` subcommands of `evertrain` (cli.py adds them with `add_commands`).

    evertrain export --help; evertrain lineage --help; evertrain chat --help
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from evertrain import exits

RUN_HELP = "a workspace or the --output-dir of `evertrain train`"


def add_commands(sub) -> None:
    from evertrain.export.gguf import QUANTS

    p = sub.add_parser("export", help="write a checkpoint as a clean Hugging Face folder (and GGUF) with its card")
    p.add_argument("run", type=Path, help=RUN_HELP)
    p.add_argument("out", type=Path, help="the folder to create (refused when it exists and is not empty)")
    add_step(p)
    p.add_argument("--merge", action="store_true", help="LoRA run: merge the adapter into the base (a full model)")
    p.add_argument("--gguf", action="store_true", help="also write OUT/model-QUANT.gguf (Llama architecture)")
    p.add_argument("--quant", choices=QUANTS, default="f16", help="GGUF tensor type (default: f16)")
    p.add_argument("--base-id", help="the base model's hub id, written into a LoRA adapter and the card "
                                     "(needed for an adapter, not with --merge, when the run's base is a local folder)")
    p.add_argument("--max-shard-size", default="5GB", help="weights are split into files of at most this size")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists and is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lineage", help="what a checkpoint was trained on, in order, and how (the model card's facts)")
    p.add_argument("run", type=Path, help=RUN_HELP)
    add_step(p)
    p.add_argument("--json", action="store_true", help="the facts as JSON (as in an export's evertrain_lineage.json)")
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("chat", help="talk to a checkpoint in the terminal (or answer one --prompt)")
    p.add_argument("run", type=Path, help=RUN_HELP)
    add_step(p)
    p.add_argument("--compare", help="a second checkpoint's step, or 'base': both answer every prompt")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.set_defaults(func=cmd_chat)


def add_step(p) -> None:
    p.add_argument("--step", type=int, help="the checkpoint of this global step (default: the newest complete one)")


def cmd_export(args) -> int:
    from evertrain.export import open_source
    from evertrain.export.export import export

    source = open_source(args.run, args.step)
    out = export(source, args.out, merge=args.merge, gguf=args.gguf, quant=args.quant, base_id=args.base_id,
                 force=args.force, max_shard_size=args.max_shard_size,
                 command=shlex.join(["evertrain", *args.argv]))
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"evertrain: exported {source.ckpt.name} (global step {source.step}) of {args.run} to {out}: {files}")
    return exits.OK


def cmd_lineage(args) -> int:
    from evertrain.export import card, open_source

    print(card.show(card.lineage(open_source(args.run, args.step)), args.json))
    return exits.OK


def cmd_chat(args) -> int:
    from evertrain.export import chat

    settings = chat.Settings()
    for name in ("temperature", "max_new_tokens"):
        try:
            settings.set(name, str(getattr(args, name)))
        except ValueError as e:
            print(f"evertrain: --{name.replace('_', '-')}: {e}", file=sys.stderr)
            return exits.BAD_INPUT
    compare = chat.parse_which(args.compare) if args.compare is not None else None
    talk = chat.Chat(args.run, args.step, compare, settings)
    talk.introduce()
    if args.prompt is not None:
        talk.answer(args.prompt)
    else:
        talk.loop()
    return exits.OK
