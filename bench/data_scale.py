"""Real data at scale: preparing 30k / 300k / 1M generated chat examples, and reaching the first optimizer step.

The examples are OpenAI-style JSONL lines made by a seeded generator (`write_chat_file`): 1 to 4 user/assistant
pairs, a system prompt on most, about 12% with tool calls (a top-level `tools` list, an assistant turn with
`tool_calls` and null content, a `tool` result, then the final answer), and two extra keys per line ("id",
"source") that evertrain ignores and counts. The generator is a stream: the first N lines of every file are the
same, so the 30k file is the head of the 300k file, which is the head of the 1M file.

Every measured case runs in its own fresh subprocess (its peak RSS is that process's own ru_maxrss, and no store,
cache or page of Python heap leaks from one case to the next):

  prepare  `data.load_file` into an empty store folder (cold): read, parse, render with the chat template,
           tokenize, write the token store. Seconds and examples/s.
  bare     the baseline, in the same run and on the same examples: every conversation is first rendered with
           `tokenizer.apply_chat_template(messages, tools=..., tokenize=False)` (untimed; the texts are checked
           to be exactly the ones evertrain renders, and the token counts to match its store), then the clock
           runs over `tokenizer(texts[i:i+512], add_special_tokens=False)["input_ids"]` for every batch.
           ratio = bare seconds / prepare seconds on the same examples (goal >= 0.7).
  train    (tiny model) setup + prepare + exactly one optimizer step, in a fresh output folder ("cold": no
           store, no checkpoint), then again in the same folder ("warm": resuming the file interrupted after one
           step, its token store present). Time from before `setup` to the first step's record, and
           peak RSS; RSS is compared with the same run on a 1,000-example file (goal: +< 300 MB at 1M).

For the tiny tokenizer (byte-level, so ~1 token per byte) and the embedded SmolLM2-135M-Instruct's; TrainConfig
defaults (max_length 1024, batch 8, packing). Train runs are repeated (--rounds, medians), because peak RSS moves
by tens of MB from one run to the next (thread timing, the kernel's reclaim of page cache).

The machine is shared: before each case the driver waits for it to be quiet, measures the CPU that other
processes used during the case (from /proc/stat, less the case's own), runs a disturbed case again (--noise,
--tries) and prints that figure beside every result. It also prints which evertrain source every case ran (a
hash of src/evertrain), and warns when the tree changed during the run.

    .venv/bin/python bench/data_scale.py                                   # 30k and 300k, tiny and smol
    .venv/bin/python bench/data_scale.py --sizes 30000,300000,1000000      # the 1M case too (opt-in, long)
    .venv/bin/python bench/data_scale.py --sizes 1000000 --tokenizers tiny --bare-max 300000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RSS_REFERENCE = 1000   # examples in the file whose peak RSS the others are compared with
BARE_BATCH = 512       # texts per call of the bare tokenizer

# ------------------------------------------------------------------------------------------------- the data

WORDS = ("the a of to and in is that for it with as on was be by this are from or at an which have not but "
         "they you we can will has more one all their there been if would about when what so your time into "
         "than other some could them these two then its only also after first new use way may any work data "
         "model file step value error result function request server client table query index memory cache "
         "thread process signal buffer network packet latency token vector matrix gradient optimizer layer "
         "weight bias loss batch epoch schedule warmup checkpoint resume storage bucket region account policy "
         "invoice customer order payment refund shipping address weather forecast temperature humidity wind "
         "river mountain forest garden kitchen recipe flour butter sugar oven minutes degrees Paris London Tokyo "
         "Berlin Madrid Lisbon Kraków Zürich São café naïve résumé jalapeño 2024 42 3.14 1,000 17% $25 #3 "
         "(see above) e.g. i.e. etc. however therefore because although meanwhile instead usually carefully "
         "quickly slowly quietly exactly roughly nearly simply clearly").split()
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in as few words as the question allows.",
    "You are an expert software engineer. Explain your reasoning step by step and show code when useful.",
    "You are a customer support agent for an online shop. Be polite, precise and brief.",
    "You are a travel planner. Suggest practical itineraries with times and prices.",
    "You are a cooking assistant. Give recipes with quantities in grams and oven temperatures in °C.",
    "Tu es un assistant serviable qui répond en français.",
    "You are a data analyst. When you are unsure, say so, and propose how to check.",
)
TOOLS = {
    "get_weather": {"description": "Current weather for a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                                                                              "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}},
    "search_orders": {"description": "Find a customer's orders", "parameters": {
        "type": "object", "properties": {"customer_id": {"type": "string"}, "status": {"type": "string"}},
        "required": ["customer_id"]}},
    "run_sql": {"description": "Run a read-only SQL query", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    "convert_currency": {"description": "Convert an amount between currencies", "parameters": {
        "type": "object", "properties": {"amount": {"type": "number"}, "from": {"type": "string"},
                                         "to": {"type": "string"}}, "required": ["amount", "from", "to"]}},
}
CITIES = ("Paris", "Lisbon", "Tokyo", "Zürich", "São Paulo", "Nairobi", "Oslo", "Lima")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(lo, hi))
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(".?!.")


def _text(rng: random.Random, sentences: tuple[int, int], words: tuple[int, int] = (3, 15)) -> str:
    n = rng.randint(*sentences)
    parts = [_sentence(rng, *words) for _ in range(n)]
    if n > 3 and rng.random() < 0.3:  # a paragraph break or a list now and then
        k = rng.randrange(1, n)
        parts[k] = "\n\n- " + parts[k]
    return " ".join(parts)


def _arguments(rng: random.Random, name: str) -> dict:
    if name == "get_weather":
        return {"city": rng.choice(CITIES), "unit": rng.choice(["celsius", "fahrenheit"])}
    if name == "search_orders":
        return {"customer_id": f"C{rng.randrange(10**6):06d}", "status": rng.choice(["open", "shipped", "any"])}
    if name == "run_sql":
        return {"query": f"SELECT {rng.choice(['id', 'total', 'name'])} FROM {rng.choice(['orders', 'users'])} "
                         f"WHERE total > {rng.randrange(1000)} LIMIT {rng.randint(1, 50)}"}
    return {"amount": round(rng.uniform(1, 5000), 2), "from": rng.choice(["EUR", "USD", "JPY"]),
            "to": rng.choice(["GBP", "CHF", "BRL"])}


def make_example(rng: random.Random, i: int) -> dict:
    """One chat example (a JSON object) in OpenAI format, a few hundred SmolLM2 tokens typically."""
    messages = []
    if rng.random() < 0.8:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    line: dict = {"id": f"ex-{i:07d}", "source": rng.choice(("forum", "docs", "synthetic", "support"))}
    pairs = rng.choice((1, 1, 2, 2, 3, 4))
    if rng.random() < 0.12:
        names = rng.sample(sorted(TOOLS), rng.randint(1, 2))
        line["tools"] = [{"type": "function", "function": {"name": n, **TOOLS[n]}} for n in names]
        call_id = f"call_{rng.getrandbits(48):012x}"
        name = names[0]
        messages.append({"role": "user", "content": _text(rng, (1, 3))})
        messages.append({"role": "assistant", "content": None, "tool_calls": [{
            "id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps(_arguments(rng, name))}}]})
        messages.append({"role": "tool", "tool_call_id": call_id,
                         "content": json.dumps({"ok": True, "result": _text(rng, (1, 2))})})
        messages.append({"role": "assistant", "content": _text(rng, (2, 5))})
        pairs -= 1
    for _ in range(pairs):
        messages.append({"role": "user", "content": _text(rng, (1, 3))})
        messages.append({"role": "assistant", "content": _text(rng, (1, 6) if pairs > 2 else (2, 10))})
    line["messages"] = messages
    return line


def write_chat_file(path: Path, n: int, seed: int = 0) -> None:
    """n examples, streamed to disk (a 1M file is ~0.9 GB); the same seed gives the same head for any n."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(make_example(rng, i), ensure_ascii=False) + "\n")
    tmp.rename(path)


# ------------------------------------------------------------------------------------------------- cases (one process each)

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def rss_now() -> dict:
    """This process's resident memory now, MB: all of it, anonymous (heap), and file-backed (mapped files)."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    except OSError:
        return {}
    return {k: int(status[f"Rss{k}" if k != "all" else "VmRSS"].split()[0]) / 1024 for k in ("all", "Anon", "File")}


def load_tokenizer(which: str, model_dir: str):
    from evertrain import models

    return models.load_tokenizer(model_dir if which == "tiny" else None)


def config_for(which: str, model_dir: str):
    from evertrain.config import TrainConfig

    return TrainConfig(model=model_dir if which == "tiny" else None)


def case_prepare(args) -> dict:
    from evertrain import data

    tok, config = load_tokenizer(args.tokenizer, args.model_dir), config_for(args.tokenizer, args.model_dir)
    store_dir = Path(args.store)
    shutil.rmtree(store_dir, ignore_errors=True)
    store_dir.mkdir(parents=True)
    rss0 = peak_rss_mb()
    t0 = time.perf_counter()
    fd = data.load_file(Path(args.file), tok, config, store_dir=store_dir)
    seconds = time.perf_counter() - t0
    n = len(fd.examples) + len(fd.held_out)
    out = {"seconds": seconds, "examples": n, "store_tokens": fd.store.meta["tokens"], "trained_tokens": fd.tokens,
           "truncated": fd.truncated, "rows": len(fd.rows), "formats": dict(fd.formats), "ignored": dict(fd.ignored),
           "rss_before_mb": rss0, "peak_rss_mb": peak_rss_mb()}
    shutil.rmtree(store_dir, ignore_errors=True)
    return out


def chat_texts(path: Path, tok, limit: int) -> list[str]:
    """Every conversation of the file rendered with apply_chat_template: the messages exactly as evertrain hands
    them to the template (formats.parse_record: content "" beside tool calls; arguments as objects)."""
    from evertrain.data.formats import parse_record
    from evertrain.data.render import _template_message

    texts = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f):
            if limit and k >= limit:
                break
            rec = parse_record(json.loads(line))
            texts.append(tok.apply_chat_template([_template_message(m) for m in rec.messages], tools=rec.tools,
                                                 tokenize=False))
    return texts


def check_same_texts(path: Path, tok, config, texts: list[str], sample: int = 2000) -> None:
    """The baseline must tokenize what evertrain tokenizes: compare with its Renderer on the first examples."""
    from evertrain.data.formats import parse_record
    from evertrain.data.render import Renderer

    with open(path, encoding="utf-8") as f:
        records = [parse_record(json.loads(line)) for _, line in zip(range(sample), f)]
    ours = Renderer(tok, config.max_length).render(records).chats
    bad = [k for k, (a, b) in enumerate(zip(ours, texts)) if a != b]
    if bad:
        raise SystemExit(f"the baseline's texts differ from evertrain's at examples {bad[:5]}: not like with like")


def case_bare(args) -> dict:
    tok, config = load_tokenizer(args.tokenizer, args.model_dir), config_for(args.tokenizer, args.model_dir)
    t0 = time.perf_counter()
    texts = chat_texts(Path(args.file), tok, args.limit)
    render_seconds = time.perf_counter() - t0
    check_same_texts(Path(args.file), tok, config, texts)
    tokens = capped = 0
    seconds = 0.0
    for i in range(0, len(texts), BARE_BATCH):
        t0 = time.perf_counter()
        ids = tok(texts[i:i + BARE_BATCH], add_special_tokens=False)["input_ids"]
        seconds += time.perf_counter() - t0  # the clock runs over the tokenizer calls only
        for x in ids:
            tokens += len(x)
            capped += min(len(x), config.max_length)
    return {"seconds": seconds, "examples": len(texts), "tokens": tokens, "capped_tokens": capped,
            "render_seconds": render_seconds, "peak_rss_mb": peak_rss_mb()}


def case_train(args) -> dict:
    """setup + prepare + one optimizer step; a second call on the same folder resumes (store present)."""
    t_import = time.perf_counter()
    from evertrain.runs import Run
    from evertrain.train import loop
    from evertrain.train.session import STOP
    from evertrain.train.setup import setup

    config = config_for("tiny", args.model_dir)
    t_import = time.perf_counter() - t_import
    stamps = {}

    def decide(record) -> str:  # train one step, then stop (fit checkpoints the interruption)
        stamps.setdefault("first_step", time.perf_counter())
        phases.setdefault("first_step", {**rss_now(), "peak": peak_rss_mb()})
        return STOP

    phases = {"imported": {**rss_now(), "peak": peak_rss_mb()}}
    t0 = time.perf_counter()
    session = setup(config, Run.at(Path(args.out)))
    t_setup = time.perf_counter()
    phases["setup"] = {**rss_now(), "peak": peak_rss_mb()}
    fd = loop.prepare(session, Path(args.file))
    t_prepare = time.perf_counter()
    phases["prepare"] = {**rss_now(), "peak": peak_rss_mb()}
    result = loop.drive(loop.fit(session, fd), decide)
    t_end = time.perf_counter()
    phases["end"] = {**rss_now(), "peak": peak_rss_mb()}
    if result.steps != 1 or result.status != "interrupted":
        raise SystemExit(f"expected one step and an interruption, got {result}")
    return {"first_step_s": stamps["first_step"] - t0, "setup_s": t_setup - t0, "prepare_s": t_prepare - t_setup,
            "fit_to_first_step_s": stamps["first_step"] - t_prepare, "total_s": t_end - t0,
            "import_s": t_import, "examples": len(fd.examples) + len(fd.held_out), "rows": len(fd.rows),
            "global_step": result.step_after, "peak_rss_mb": peak_rss_mb(), "rss_phases_mb": phases}


# ------------------------------------------------------------------------------------------------- the driver

def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def code_fingerprint() -> str:
    """A hash of evertrain's source as it is now: a tree others edit can change between two cases of one run."""
    h = hashlib.sha256()
    for f in sorted((ROOT / "src" / "evertrain").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_case(case: str, **options) -> dict:
    """One case in a fresh process; `others_cores`: the CPU other processes used meanwhile, in cores on average;
    `code`: the fingerprint of evertrain's source the case ran (read just before it starts)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = code_fingerprint()
    busy0, mine0, t0 = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    busy1, mine1, wall = busy_cpu_seconds(), children_cpu_seconds(), time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"case {case} {options} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (mine1 - mine0)) / wall
    if code_fingerprint() != code:
        code += "+changed-during-the-case"
    return {**out, "others_cores": others, "wall_s": wall, "cpu_s": mine1 - mine0, "code": code,
            "started": time.strftime("%H:%M:%S", time.localtime(time.time() - wall))}


def wait_quiet(noise: float, limit: float) -> float:
    """Wait (at most `limit` s) until the machine has used at most `noise` cores in two 3-s windows in a row;
    returns the seconds waited. The driver itself sleeps meanwhile, so all that CPU is other processes'."""
    t0, calm = time.perf_counter(), 0
    while calm < 2 and time.perf_counter() - t0 < limit:
        b0 = busy_cpu_seconds()
        time.sleep(3)
        b1 = busy_cpu_seconds()
        if b0 is None:
            return 0.0
        calm = calm + 1 if (b1 - b0) / 3 <= noise else 0
    return time.perf_counter() - t0


def quiet_case(case: str, tries: int, noise: float, wait: float, before=None, **options) -> dict:
    """run_case on a quiet machine (waiting up to `wait` s for one), again (up to `tries` runs in all) while other
    processes used more than `noise` cores during it; the quietest run is kept. `before()` resets what a case
    needs (a fresh output folder)."""
    best = None
    for attempt in range(tries):
        waited = wait_quiet(noise, wait)
        if waited > 10:
            print(f"  (waited {waited:.0f} s for other processes to finish)", flush=True)
        if before:
            before()
        r = run_case(case, **options)
        if best is None or (r["others_cores"] or 0) < (best["others_cores"] or 0):
            best = r
        if r["others_cores"] is None or r["others_cores"] <= noise:
            break
        print(f"  ({case} disturbed: other processes used {r['others_cores']:.2f} cores on average"
              + (", running it again)" if attempt + 1 < tries else ", no tries left: figure kept, marked)"),
              flush=True)
    best["tries"] = attempt + 1
    return best


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 \
        else str(n)


def noise_note(r: dict) -> str:
    others = "?" if r["others_cores"] is None else f"{r['others_cores']:.2f}"
    return f"started {r['started']}, other processes {others} cores" + (f", try {r['tries']}" if r["tries"] > 1 else "")


def check_prepare(n: int, prep: dict) -> None:
    """The counts evertrain reports must be the generator's: every line one `messages` example, 2 keys ignored."""
    want = {"examples": n, "formats": {"messages": n}, "ignored": {"id": n, "source": n}}
    got = {k: prep[k] for k in want}
    if got != want:
        raise SystemExit(f"evertrain's counts for the {label(n)} file are wrong: got {got}, expected {want}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="30000,300000", help="examples per generated file (1000000: opt-in)")
    p.add_argument("--tokenizers", default="tiny,smol", help="tiny (byte-level, tests/tiny.py), smol (SmolLM2)")
    p.add_argument("--workdir", default="", help="keep the files here (default: a temporary folder, removed)")
    p.add_argument("--bare-max", type=int, default=0,
                   help="baseline on at most this many examples of a file (0: all); with a cap the ratio compares "
                        "preparation of the file that size (the generator's head) with the bare tokenizer on it")
    p.add_argument("--rounds", type=int, default=3,
                   help="cold + warm train runs per size (peak RSS varies by tens of MB from run to run): medians")
    p.add_argument("--noise", type=float, default=0.15,
                   help="a case during which other processes used more than this many cores (on average) is run again")
    p.add_argument("--wait", type=float, default=900,
                   help="before each case, wait up to this many seconds for the machine to be quiet (see --noise)")
    p.add_argument("--tries", type=int, default=3, help="runs of a disturbed case at most; the quietest is kept")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: prepare, bare, train")
    p.add_argument("--json-out", default="", help="also write every figure to this JSON file")
    # one case, in its own process (the driver calls these)
    p.add_argument("--case", choices=("prepare", "bare", "train"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps({"prepare": case_prepare, "bare": case_bare, "train": case_train}[args.case](args)))
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    tokenizers = [t for t in args.tokenizers.split(",") if t]
    skip = set(args.skip.split(",")) - {""}
    scratch = None if args.workdir else tempfile.TemporaryDirectory(prefix="evertrain-data-scale-")
    work = Path(args.workdir or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"sizes": sizes, "tokenizers": tokenizers, "cpus": os.cpu_count(), "git_head": git_head(),
                     "code": code_fingerprint(), "prepare": {}, "bare": {}, "train": {}}
    print(f"evertrain at {results['git_head']}, source fingerprint {results['code']}; {os.cpu_count()} CPUs", flush=True)
    try:
        from tiny import make_model_dir

        model_dir = work / "tiny-model"
        if not (model_dir / "config.json").exists():
            make_model_dir(model_dir)
        files = {}
        for n in sorted({RSS_REFERENCE, *sizes}):
            files[n] = work / f"chat-{label(n)}.jsonl"
            if not files[n].exists():
                t0 = time.perf_counter()
                write_chat_file(files[n], n)
                print(f"generated {files[n].name}: {n:,} examples, {files[n].stat().st_size / 1e6:,.0f} MB in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)

        common = {"model_dir": model_dir, "tries": args.tries, "noise": args.noise, "wait": args.wait}
        for n in sizes:
            for tok in tokenizers:
                key = f"{tok}/{n}"
                if "prepare" not in skip:
                    prep = quiet_case("prepare", file=files[n], tokenizer=tok, store=work / "store", **common)
                    check_prepare(n, prep)
                    results["prepare"][key] = prep
                    print(f"prepare {tok:4} {label(n):>4}: {prep['seconds']:7.1f} s, "
                          f"{n / prep['seconds']:8,.0f} ex/s, {prep['store_tokens']:,} tokens "
                          f"({prep['truncated']:,} truncated), peak RSS {prep['peak_rss_mb']:,.0f} MB "
                          f"[{noise_note(prep)}]", flush=True)
                if "bare" not in skip:
                    limit = args.bare_max if args.bare_max and args.bare_max < n else 0
                    bare = quiet_case("bare", file=files[n], tokenizer=tok, limit=limit, **common)
                    results["bare"][key] = bare
                    prep = results["prepare"].get(key)
                    if prep and not limit and bare["capped_tokens"] != prep["store_tokens"]:
                        raise SystemExit(f"{key}: the bare tokenizer gave {bare['capped_tokens']:,} tokens (capped at "
                                         f"max_length), evertrain's store {prep['store_tokens']:,}: not like with like")
                    print(f"bare    {tok:4} {label(n):>4}: {bare['seconds']:7.1f} s on {bare['examples']:,} examples, "
                          f"{bare['examples'] / bare['seconds']:8,.0f} ex/s (rendering them first took "
                          f"{bare['render_seconds']:.0f} s, untimed) [{noise_note(bare)}]", flush=True)
        if "train" not in skip:
            for n in sorted({RSS_REFERENCE, *sizes}):
                out = work / f"run-{label(n)}"
                results["train"][n] = []
                for k in range(args.rounds):
                    cold = quiet_case("train", file=files[n], out=out,
                                      before=lambda: shutil.rmtree(out, ignore_errors=True), **common)
                    warm = quiet_case("train", file=files[n], out=out, **common)  # each try resumes the one before
                    if warm["global_step"] <= cold["global_step"]:
                        raise SystemExit(f"the warm run did not resume: global step {cold['global_step']} -> "
                                         f"{warm['global_step']}")
                    results["train"][n].append({"cold": cold, "warm": warm})
                    print(f"train   tiny {label(n):>4} ({k + 1}/{args.rounds}): first step cold {cold['first_step_s']:.1f}"
                          f" s (prepare {cold['prepare_s']:.1f} s) [{noise_note(cold)}], warm {warm['first_step_s']:.2f}"
                          f" s (setup {warm['setup_s']:.2f}, prepare {warm['prepare_s']:.2f}, fit "
                          f"{warm['fit_to_first_step_s']:.2f}) [{noise_note(warm)}]; peak RSS {cold['peak_rss_mb']:,.0f}"
                          f" / {warm['peak_rss_mb']:,.0f} MB", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
        report(results, sizes, tokenizers)
        codes = {r["code"] for part in ("prepare", "bare") for r in results[part].values()} | {
            r[side]["code"] for rounds in results["train"].values() for r in rounds for side in ("cold", "warm")}
        if codes - {results["code"]}:
            print(f"\nWARNING: evertrain's source changed during this run (fingerprints {sorted(codes)}, at the start "
                  f"{results['code']}): the figures above do not all measure the same code")
        else:
            print(f"\nevery case ran evertrain {results['git_head']} (source fingerprint {results['code']})")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    finally:
        if scratch is not None:
            scratch.cleanup()


def cores(r: dict) -> str:
    return "?" if r.get("others_cores") is None else f"{r['others_cores']:.2f}"


def report(results: dict, sizes: list[int], tokenizers: list[str]) -> None:
    if results["prepare"] or results["bare"]:
        print("\npreparation (cold, empty store) against the bare batched tokenizer on the same examples "
              "(goal: ratio >= 0.7)")
        print("| tokenizer | examples | tokens | prepare | prepare ex/s | bare tokenizer | bare ex/s | ratio | "
              "prepare peak RSS | other processes' CPU (prepare / bare) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for tok in tokenizers:
            for n in sizes:
                prep, bare = results["prepare"].get(f"{tok}/{n}"), results["bare"].get(f"{tok}/{n}")
                if not prep:
                    continue
                cells = [tok, f"{n:,}", f"{prep['store_tokens'] / 1e6:,.1f}M", f"{prep['seconds']:.1f} s",
                         f"{n / prep['seconds']:,.0f}"]
                if bare:
                    rate = bare["examples"] / bare["seconds"]
                    # same examples: seconds against seconds; a capped baseline: rate against rate
                    ratio = prep["seconds"] and rate and (n / prep["seconds"]) / rate
                    on = "" if bare["examples"] == n else f" (first {bare['examples']:,})"
                    cells += [f"{bare['seconds']:.1f} s{on}", f"{rate:,.0f}", f"**{ratio:.2f}**"]
                else:
                    cells += ["-", "-", "-"]
                cells.append(f"{prep['peak_rss_mb']:,.0f} MB")
                cells.append(" / ".join(cores(r) for r in (prep, bare) if r))
                print("| " + " | ".join(cells) + " |")
    if results["train"]:
        def med(rounds: list, side: str, key: str) -> float:
            return statistics.median(r[side][key] for r in rounds)

        def spread(rounds: list, side: str, key: str, fmt: str) -> str:
            values = [r[side][key] for r in rounds]
            return "" if len(values) < 2 else f" ({format(min(values), fmt)}-{format(max(values), fmt)})"

        ref = results["train"].get(RSS_REFERENCE)
        rounds = max(len(r) for r in results["train"].values())
        print(f"\ntiny model: setup + prepare + one optimizer step, in a fresh process; medians of {rounds} round(s), "
              f"(min-max); peak RSS against the {RSS_REFERENCE:,}-example file (goal at 1M: +< 300 MB); first step "
              f"resuming with the store present (goal at 300k: < 3 s)")
        print("| examples | first step, cold | of which prepare | first step, warm (resume) | warm: setup / prepare "
              "/ fit | peak RSS cold | vs 1k | peak RSS warm | vs 1k | other processes' CPU (max, cold / warm) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n, r in sorted(results["train"].items()):
            d_cold = med(r, "cold", "peak_rss_mb") - med(ref, "cold", "peak_rss_mb") if ref else float("nan")
            d_warm = med(r, "warm", "peak_rss_mb") - med(ref, "warm", "peak_rss_mb") if ref else float("nan")
            busy = [max((x[side]["others_cores"] or 0) for x in r) for side in ("cold", "warm")]
            print(f"| {n:,} | {med(r, 'cold', 'first_step_s'):.1f} s | {med(r, 'cold', 'prepare_s'):.1f} s "
                  f"| **{med(r, 'warm', 'first_step_s'):.2f} s**{spread(r, 'warm', 'first_step_s', '.2f')} "
                  f"| {med(r, 'warm', 'setup_s'):.2f} / {med(r, 'warm', 'prepare_s'):.2f} / "
                  f"{med(r, 'warm', 'fit_to_first_step_s'):.2f} s "
                  f"| {med(r, 'cold', 'peak_rss_mb'):,.0f} MB{spread(r, 'cold', 'peak_rss_mb', ',.0f')} "
                  f"| **{d_cold:+,.0f} MB** | {med(r, 'warm', 'peak_rss_mb'):,.0f} MB"
                  f"{spread(r, 'warm', 'peak_rss_mb', ',.0f')} | {d_warm:+,.0f} MB | {busy[0]:.2f} / {busy[1]:.2f} |")

if __name__ == "__main__":
    main()
