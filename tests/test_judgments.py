"""Learning from judgments: preference pairs (DPO, IPO) and rated answers (KTO), in the same run as everything else.

The shapes TRL and LLaMA-Factory document; the losses and gradients against TRL's trainers and against a plain
implementation (tests/reference_losses.py) on the same batch and reference; such files through the real CLI and
the daemon: exactly once, metrics, held-out accuracy and margin, bitwise resume after kill -9.

    pytest -q tests/test_judgments.py
"""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from conftest import cli, write_jsonl

import reference_losses as plain
from evertrain.config import TrainConfig
from evertrain.data import IGNORE, Example
from evertrain.data.formats import parse_record
from evertrain.data.record import RecordError

U, A = {"role": "user", "content": "Is it blue?"}, {"role": "assistant", "content": "Yes."}
NO = {"role": "assistant", "content": "No."}


# ------------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("obj, kind", [
    ({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "preference"),                       # TRL
    ({"prompt": [U], "chosen": [A], "rejected": [NO]}, "chat_preference"),                    # TRL, chat
    ({"chosen": [U, A], "rejected": [U, NO]}, "chat_preference"),                             # TRL, implicit prompt
    ({"prompt": "Is it blue?", "chosen": [U, A], "rejected": [U, NO], "score_chosen": 8.0}, "chat_preference"),
    ({"conversations": [{"from": "human", "value": "Is it blue?"}],                           # LLaMA-Factory ShareGPT
      "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."}}, "sharegpt_preference"),
    ({"instruction": "Is it blue?", "input": "", "chosen": "Yes.", "rejected": "No."}, "alpaca_preference"),
])
def test_preference_shapes_become_a_pair_of_answers_to_one_prompt(obj, kind):
    r = parse_record(obj)
    assert (r.kind, r.objective) == (kind, "preference")
    chosen, rejected = r.sides
    if chosen.messages is not None:  # the same prompt, then each answer, of which only the answer trains
        assert chosen.messages[:-1] == rejected.messages[:-1] and chosen.train[-1] and not any(chosen.train[:-1])
        assert (chosen.messages[-1]["content"], rejected.messages[-1]["content"]) == ("Yes.", "No.")
    else:
        assert (chosen.prompt, chosen.completion, rejected.completion) == ("2+2=", "4", "5")


@pytest.mark.parametrize("obj, kind, good", [
    ({"prompt": "2+2=", "completion": "5", "label": False}, "feedback", False),                 # TRL KTO
    ({"prompt": [U], "completion": [A], "label": True}, "chat_feedback", True),                # TRL KTO, chat
    ({"messages": [U, A, U, NO], "label": False}, "messages_feedback", False),                 # LLaMA-Factory KTO
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go."}], "label": False},
     "sharegpt_feedback", False),
    ({"instruction": "Say hi", "output": "hi", "label": True}, "alpaca_feedback", True),
])
def test_feedback_shapes_rate_their_last_answer(obj, kind, good):
    r = parse_record(obj)
    assert (r.kind, r.objective, r.desirable) == (kind, "feedback", good)
    if r.messages is not None:  # the rated answer is the last assistant turn; the turns before it its prompt
        assert r.train == [False] * (len(r.messages) - 1) + [True]


@pytest.mark.parametrize("obj, message", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"},
     "chosen and rejected are the same answer: a pair teaches nothing without a choice"),
    ({"prompt": [U], "chosen": [A], "rejected": [A]},
     "chosen and rejected are the same answer: a pair teaches nothing without a choice"),
    ({"prompt": "Q", "chosen": " ", "rejected": "b"}, '"chosen" is empty'),
    ({"prompt": "Q", "completion": "A", "label": "yes"},
     "\"label\" rates the answer: it must be true or false (a JSON boolean), got 'yes'"),
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "Is it red?"}, NO]},
     'chosen and rejected share no prompt: their first turns differ (give it as "prompt")'),
    ({"chosen": [U, A, U, A], "rejected": [U, NO, U, NO]},
     "chosen and rejected differ before their answers: the chosen side has a user turn after where they part "
     "(the prompt must be the same for both)"),
    ({"chosen": "a", "rejected": "b"}, '"chosen" and "rejected" without a "prompt" must be conversations (lists of '
     'messages) that share their first turns; give the prompt as "prompt" otherwise'),
    ({"text": "plain", "label": True}, '"label" rates an answer: give it with "prompt" and "completion" (or '
     '"messages")'),
])
def test_a_bad_judgment_is_refused_with_its_reason(obj, message):
    with pytest.raises(RecordError) as refused:
        parse_record(obj)
    assert str(refused.value) == message


def test_a_file_that_mixes_what_it_teaches_is_refused_naming_the_odd_lines(tmp_path, tiny_model, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(6)]
    rows[2] = {"prompt": "q", "completion": "plain"}
    rows[4] = {"prompt": "q", "completion": "rated", "label": True}
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    assert cli("check", f, "--model", tiny_model) == 2
    err = capsys.readouterr().err
    assert "line 3: a plain example among preference pairs: a file teaches one way" in err
    assert "line 5: a rated answer among preference pairs" in err


def test_check_shows_a_pair_with_the_tokens_each_answer_trains(tmp_path, tiny_model, capsys):
    f = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}] * 2)
    assert cli("check", f, "--model", tiny_model) == 0
    out = capsys.readouterr().out
    assert "2 preference pairs (preference 2)" in out
    assert "chosen:\n2+2=⟦4<|im_end|>⟧\nrejected:\n2+2=⟦5<|im_end|>⟧" in out


# ------------------------------------------------------------------------------------------------- the losses

def model_pair(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # away from the initialisation, so the reference differs from the model
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, copy.deepcopy(model)


def pair_example(prompt, chosen, rejected, reference, line=0) -> Example:
    c, r = prompt + chosen, prompt + rejected
    labels = [IGNORE] * len(prompt) + chosen + [IGNORE] * len(prompt) + rejected
    return Example(line=line, format="", input_ids=c + r, labels=labels, objective="preference", split=len(c),
                   reference=tuple(reference))


def rated_example(prompt, answer, good, kl_answer, reference, line=0) -> Example:
    return Example(line=line, format="", input_ids=prompt + answer, labels=[IGNORE] * len(prompt) + answer,
                   objective="feedback", desirable=good, kl=(prompt + kl_answer, [IGNORE] * len(prompt) + kl_answer),
                   reference=tuple(reference))


def evertrain_loss(model, rows, **settings):
    from evertrain.train.objectives import Counts, Objectives, Sums

    config = TrainConfig(**settings)
    acc = types.SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    return Objectives(config, acc).loss(model, rows, Counts.of(rows), 0, Sums())


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a: torch.Tensor, b: torch.Tensor, model_a, model_b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.backward()
    b.backward()
    ga, gb = grads(model_a), grads(model_b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=n)


PAIRS = [([5, 6, 7], [8, 9], [10]), ([11, 12], [13], [14, 15, 16]), ([17, 18, 19, 20], [21, 22], [23, 24])]
REF_PAIRS = [(-9.5, -4.0), (-3.2, -11.0), (-7.7, -6.6)]
RATED = [([5, 6, 7], [8, 9], True), ([11, 12], [13], False), ([17, 18, 19, 20], [21, 22], True),
         ([25, 26], [27, 28, 29], False)]
REF_RATED = [(-9.5, -8.1), (-3.2, -6.0), (-7.7, -12.3), (-13.0, -2.4)]


@pytest.mark.parametrize("loss, settings", [("sigmoid", {}), ("sigmoid", {"rpo_alpha": 0.5}), ("ipo", {})])
def test_preference_losses_and_gradients_equal_a_plain_implementation(tiny_model, loss, settings):
    ev_model, ref_model = model_pair(tiny_model)
    rows = [[pair_example(p, c, r, ref, k)] for k, ((p, c, r), ref) in enumerate(zip(PAIRS, REF_PAIRS))]
    ours = evertrain_loss(ev_model, rows, beta=0.3, preference_loss=loss, **settings)
    if loss == "ipo":
        theirs = plain.ipo(ref_model, PAIRS, REF_PAIRS, beta=0.3)
    else:
        theirs = plain.dpo(ref_model, PAIRS, REF_PAIRS, beta=0.3, sft_weight=settings.get("rpo_alpha", 0.0))
    assert_same(ours, theirs, ev_model, ref_model)


def test_packed_pairs_give_the_loss_of_pairs_alone(tiny_model):
    """Two pairs in one row (positions restart at each sequence) are two pairs in two rows."""
    model, other = model_pair(tiny_model)
    examples = [pair_example(p, c, r, ref, k) for k, ((p, c, r), ref) in enumerate(zip(PAIRS, REF_PAIRS))]
    packed = evertrain_loss(model, [examples[:2], examples[2:]], beta=0.3)
    alone = evertrain_loss(other, [[e] for e in examples], beta=0.3)
    assert_same(packed, alone, model, other)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_feedback_loss_and_gradients_equal_a_plain_implementation(tiny_model, weights):
    ev_model, ref_model = model_pair(tiny_model)
    rows = [[rated_example(p, a, good, RATED[k - 1][1], ref, k)]
            for k, ((p, a, good), ref) in enumerate(zip(RATED, REF_RATED))]
    ours = evertrain_loss(ev_model, rows, beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1])
    theirs = plain.kto(ref_model, RATED, REF_RATED, beta=0.2, desirable_weight=weights[0],
                       undesirable_weight=weights[1])
    assert_same(ours, theirs, ev_model, ref_model)


@pytest.fixture
def trl():
    """TRL's trainers make accelerate's process-wide state their way (on CPU, their precision): put back as it
    was, so that an `evertrain train` later in this process makes its own."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def trl_trainer(kind: str, model, tokenizer, rows, tmp_path, **settings):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    common = dict(output_dir=str(tmp_path / kind), per_device_train_batch_size=len(rows), report_to=[],
                  use_cpu=True, max_length=256, precompute_ref_log_probs=True, **settings)
    if kind == "dpo":
        return DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    return KTOTrainer(model=model, args=KTOConfig(train_sampling_strategy="sequential", **common),
                      train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


@pytest.mark.parametrize("loss_type, weights", [(["sigmoid"], None), (["sigmoid", "sft"], [1.0, 0.5]),
                                                (["ipo"], None)])
def test_preference_loss_equals_trls_dpo_trainer(tiny_model, tmp_path, loss_type, weights, trl):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ev_model, trl_model = model_pair(tiny_model)
    rows = [{"prompt": f"Is {i} even?", "chosen": " yes" if i % 2 == 0 else " no",
             "rejected": " no, it is not" if i % 2 == 0 else " yes"} for i in range(4)]
    trainer = trl_trainer("dpo", trl_model, tokenizer, rows, tmp_path, beta=0.25, loss_type=loss_type,
                          loss_weights=weights)
    data = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs = trainer._compute_loss(trainer.model, trainer.data_collator(data), False)
    ours = evertrain_loss(ev_model, [[pair_example(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"],
                                                   (d["ref_chosen_logps"], d["ref_rejected_logps"]), k)]
                                     for k, d in enumerate(data)],
                          beta=0.25, preference_loss=loss_type[0], rpo_alpha=weights[1] if weights else 0.0)
    assert_same(ours, theirs, ev_model, trainer.model)


def test_feedback_loss_equals_trls_kto_trainer(tiny_model, tmp_path, trl):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ev_model, trl_model = model_pair(tiny_model)
    rows = [{"prompt": f"Say hi {i}", "completion": " hi" if i % 3 else " go away", "label": bool(i % 3)}
            for i in range(6)]
    trainer = trl_trainer("kto", trl_model, tokenizer, rows, tmp_path, beta=0.2, desirable_weight=1.2,
                          undesirable_weight=0.8)
    data = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs = trainer._compute_loss(trainer.model, trainer.data_collator(data), False)
    ours = evertrain_loss(ev_model, [[rated_example(d["prompt_ids"], d["completion_ids"], d["label"],
                                                    d["KL_completion_ids"], (d["ref_logps"], d["ref_KL_logps"]), k)]
                                     for k, d in enumerate(data)],
                          beta=0.2, desirable_weight=1.2, undesirable_weight=0.8)
    assert_same(ours, theirs, ev_model, trainer.model)


# ------------------------------------------------------------------------------------------------- the benchmark

@pytest.mark.slow
def test_the_preference_benchmark_measures_both_contenders_on_the_same_pairs():
    """bench/preference.py --case dpo on the tiny model: evertrain and TRL's DPOTrainer each in a process, each with
    its figures; the same pairs in the same steps (their per-step losses agree), the same held-out accuracy."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(root / "bench" / "preference.py"), "--model", "tiny", "--case", "dpo",
                           "--rounds", "1", "--pairs", "8", "--held-out", "4"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    number = r"([\d,.]+)"
    figures = {name: [float(x.replace(",", "")) for x in found] for name, *found in re.findall(
        rf"round 1: (evertrain|TRL): median step {number} tok/s, whole training {number} tok/s, peak {number} MiB, "
        rf"held-out accuracy {number} margin (-?[\d.]+)", proc.stdout)}
    assert set(figures) == {"evertrain", "TRL"}, proc.stdout
    for step, whole, peak, accuracy, _margin in figures.values():
        assert step > 0 and whole > 0 and peak > 100 and 0 <= accuracy <= 1
    assert figures["evertrain"][3:] == pytest.approx(figures["TRL"][3:], abs=1e-3)
    assert float(re.search(r"per-step losses differ by at most ([\d.]+)", proc.stdout)[1]) < 1e-3
    assert re.search(r"^\| \*\*median\*\* \| \*\*[\d,]+ tok/s\*\* \| \*\*[\d,]+ tok/s\*\* \| \*\*[\d.]+\*\* \|",
                     proc.stdout, re.M), proc.stdout
    assert len(re.findall(r"^- .*: (PASS|FAIL)$", proc.stdout, re.M)) == 4
