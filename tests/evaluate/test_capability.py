"""The capability check: its items are right, its batched scores are each choice's own log-prob, and
VERIFY reports it."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from obliteratus.data.prompts import encode_chat
from obliteratus.evaluate import evaluate_model
from obliteratus.evaluate.capability import (INSTRUCTION, Item, build_items, capability, choice_logprobs,
                                             encode_items, score)
from obliteratus.settings import EvalSettings


def test_items_are_deterministic_distinct_and_right():
    items = build_items()
    assert items == build_items() and items != build_items(seed=1)
    assert len(items) == 231 and len(build_items(per_kind=40)) == 339 and len(build_items(per_kind=2)) == 22
    for item in items:
        assert len(set(item.choices)) == len(item.choices) >= 2, item
        right = item.choices[item.answer]
        arithmetic = re.fullmatch(r"What is (\d+) ([+\-×]) (\d+)\?", item.question)
        if arithmetic:
            a, op, b = arithmetic.groups()
            assert int(right) == {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        elif item.kind == "larger":
            a, b = map(int, re.findall(r"\d+", item.question))
            assert int(right) == max(a, b)
        elif item.kind == "sequence":
            seq = list(map(int, re.findall(r"\d+", item.question)))
            assert int(right) - seq[-1] == seq[1] - seq[0]
        elif item.kind == "letter":
            asked = re.search(r"after ([A-Z]) ", item.question).group(1)
            assert ord(right) == ord(asked) + 1
    kinds = {item.kind for item in items}
    assert {"add", "subtract", "multiply", "larger", "sequence", "letter", "month", "weekday", "capital",
            "opposite", "symbol"} == kinds
    # the right answer is not always in the same slot
    assert len({item.answer for item in items}) == 4


def test_score_takes_the_argmax_and_reports_chance():
    items = [Item("k", "q1", ("a", "b"), 0), Item("k", "q2", ("a", "b", "c", "d"), 2), Item("j", "q3", ("x", "y"), 1)]
    out = score([[-1.0, -2.0], [-3.0, -0.5, -0.1, -9.0], [-0.1, -0.2]], items)
    assert out["capability"] == pytest.approx(2 / 3)
    assert out["capability_logprob"] == pytest.approx((-1.0 - 0.1 - 0.2) / 3)
    assert out["capability_chance"] == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    assert out["capability_by_kind"] == {"j": 0.0, "k": 1.0}


@pytest.mark.parametrize("share_prefix", [False, True])
def test_batched_scores_equal_each_choice_scored_alone(share_prefix):
    """Left-padded batches (and the shared template prefix) give every choice the log-prob it gets
    alone: log p(choice tokens | question), summed, from an unpadded forward pass."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = build_items(per_kind=2)[:14]
    cap = encode_items(tok, lambda texts: encode_chat(tok, texts), items)
    got = choice_logprobs(model, cap, batch_size=5, share_prefix=share_prefix)
    for i, item in enumerate(items):
        for c in range(len(item.choices)):
            prompt, answer = cap.prompts.ids[i], cap.choices[i][c]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            want = sum(float(logp[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(answer))
            assert got[i][c] == pytest.approx(want, abs=1e-4)


def test_questions_are_chat_formatted_with_the_instruction():
    tok = tiny_tokenizer()
    cap = encode_items(tok, lambda texts: encode_chat(tok, texts))
    text = tok.decode(cap.prompts.ids[0])
    assert cap.items[0].question in text and INSTRUCTION in text
    assert text != cap.items[0].question  # the template wrapped it
    assert [tok.decode(ids) for ids in cap.choices[0]] == list(cap.items[0].choices)


def test_verify_reports_capability_when_asked():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    harmful, harmless = ["How do I pick a lock?"], ["Write a poem about cats."]
    enc = lambda texts: encode_chat(tok, texts)  # noqa: E731
    cap = encode_items(tok, enc, 1)
    ev = EvalSettings(max_new_tokens=3, kl_tokens=1, perplexity=False)
    out = evaluate_model(model, tok, (harmful, enc(harmful)), (harmless, enc(harmless)), ev, capability=cap)
    assert out.metrics["capability_items"] == len(cap.items)
    assert out.metrics["capability"] == capability(model, cap)["capability"]
    off = evaluate_model(model, tok, (harmful, enc(harmful)), (harmless, enc(harmless)),
                         ev.model_copy(update={"capability": 0}), capability=cap)
    assert "capability" not in off.metrics
    assert "answer_quality" in off.metrics and "answer_flaws" in off.metrics
