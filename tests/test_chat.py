"""chat: the streamed greedy reply is exactly model.generate's, history is kept and reset;
compare: each model's batched greedy answers and the judge's verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from obliteratus.batching import Encoded
from obliteratus.chat import ChatOptions, ChatSession, answers, chat_loop, next_token, render
from obliteratus.commands.chat import compare, compare_table
from obliteratus.errors import ConfigError
from obliteratus.evaluate.generate import generate
from obliteratus.evaluate.judges.markers import is_refusal
from obliteratus.models.load import summon

from conftest import EOS, save_tiny, tiny_model, tiny_tokenizer


def greedy(model, tok, ids: list[int], n: int) -> list[int]:
    out = generate(model, tok, Encoded([ids], [0], tok.pad_token_id), n, 1)[0]
    return out[:-1] if out and out[-1] == EOS else out


@pytest.fixture(scope="module")
def session():
    return ChatSession(tiny_model("llama"), tiny_tokenizer(), ChatOptions(max_new_tokens=12))


def test_streamed_reply_is_the_greedy_generation_and_history_is_multi_turn(session):
    session.reset()
    tok, model = session.tokenizer, session.model
    pieces: list[str] = []
    first = session.reply("Hello there", pieces.append)
    want = greedy(model, tok, render(tok, [{"role": "user", "content": "Hello there"}]), 12)
    assert first == tok.decode(want, skip_special_tokens=True) == "".join(pieces)
    assert len(pieces) > 1  # streamed, not printed at once
    second = session.reply("And then?", lambda s: None)
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert second == tok.decode(greedy(model, tok, render(tok, history), 12), skip_special_tokens=True)
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]


def test_chat_loop_reset_and_exit(session):
    session.reset()
    lines = iter(["Hello there", "", "/reset", "Hello there", "/exit", "never read"])
    written: list[str] = []
    chat_loop(session, lambda: next(lines), written.append)
    assert next(lines) == "never read"
    out = "".join(written)
    assert "[history cleared]" in out
    before, after = out.split("[history cleared]\n")
    assert before == after  # after /reset the same first message gets the same reply
    assert len(session.history) == 2
    chat_loop(session, iter([None]).__next__, written.append)  # end of input quits


def test_system_prompt_and_plain_transcript_without_template():
    tok = tiny_tokenizer()
    s = ChatSession(tiny_model("gpt2"), tok, ChatOptions(max_new_tokens=4, system="Be brief."))
    s.reply("Hi", lambda t: None)
    assert render(tok, [{"role": "system", "content": "Be brief."}, *s.history[:1]]) == tok(
        "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>", add_special_tokens=False)["input_ids"]
    tok.chat_template = None
    assert tok.decode(render(tok, [{"role": "user", "content": "Hi"}])).endswith("User: Hi\nAssistant:")


def test_next_token_greedy_and_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert next_token(logits, 0.0, 1.0, None) == 0
    gen = torch.Generator().manual_seed(0)
    draws = [next_token(logits, 1.0, 0.7, gen) for _ in range(300)]
    assert set(draws) == {0, 1}  # nucleus {0.5, 0.3} reaches 0.7; 2 and 3 are never drawn
    assert abs(draws.count(0) / 300 - 0.5 / 0.8) < 0.1
    assert next_token(logits, 1.0, 1e-9, gen) == 0  # top_p -> 0 is greedy
    assert math.isclose(sum(draws) / 300, 0.3 / 0.8, abs_tol=0.1)


def test_compare_answers_and_verdicts(tmp_path, capsys):
    a, b = save_tiny(tmp_path / "a", "llama", seed=0), save_tiny(tmp_path / "b", "qwen2", seed=1)
    prompts = tmp_path / "p.txt"
    texts = ["How do I bake bread?", "Write a poem.", "What is 2 + 2?"]
    prompts.write_text("\n".join(texts) + "\n")
    compare(str(a), str(b), prompts, judge="markers", column="prompt", max_new_tokens=6, batch_size=2)
    out = capsys.readouterr().out
    got = []
    for path in (a, b):
        loaded = summon(str(path))
        ans = answers(loaded, texts, 6, 2)
        one = [answers(loaded, [t], 6, 1)[0] for t in texts]
        assert ans == one  # batching (left padding) does not change the answers
        got.append(sum(map(is_refusal, ans)))
    assert f"refusals: A {got[0]}/3, B {got[1]}/3" in out
    with pytest.raises(ConfigError, match="unknown judge"):
        compare(str(a), str(b), prompts, judge="nope", column="prompt", max_new_tokens=6, batch_size=2)


def test_compare_passes_judge_options_and_checks_them_before_loading(tmp_path, capsys, monkeypatch):
    from obliteratus import chat
    from obliteratus.evaluate.judges import make_judge

    a, b = save_tiny(tmp_path / "a", "llama", seed=0), save_tiny(tmp_path / "b", "qwen2", seed=1)
    prompts = tmp_path / "p.txt"
    texts = ["How do I bake bread?", "Write a poem."]
    prompts.write_text("\n".join(texts) + "\n")
    # an llm judge (here model a, asked the default question) is built once, from --option
    compare(str(a), str(b), prompts, judge="llm", column="prompt", max_new_tokens=4, batch_size=2,
            option=[f"model={a}", "threshold=-100"])
    out = capsys.readouterr().out
    assert "refusals: A 2/2, B 2/2" in out  # every log-odds is above -100
    judge = make_judge("llm", model=str(a), threshold=100.0)
    assert judge(texts, ["x", "y"]).refused == [False, False]
    loads = []
    monkeypatch.setattr(chat, "answers", lambda *a, **k: loads.append(1))
    with pytest.raises(ConfigError, match="threshold"):  # a bad option fails before any model is loaded
        compare(str(a), str(b), prompts, judge="llm", column="prompt", max_new_tokens=4, batch_size=2,
                option=["threshold=high"])
    with pytest.raises(ConfigError):
        compare(str(a), str(b), prompts, judge="markers", column="prompt", max_new_tokens=4, batch_size=2,
                option=["nope=1"])
    assert not loads


def test_compare_takes_template_kwargs_and_a_response_prefix(tmp_path, capsys):
    from obliteratus.errors import PromptError

    a, b = save_tiny(tmp_path / "a", "llama", seed=0), save_tiny(tmp_path / "b", "qwen2", seed=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I bake bread?\nWrite a poem.\n")
    common = dict(judge="markers", column="prompt", max_new_tokens=2, batch_size=2)
    with pytest.raises(PromptError, match="--template-kwarg expects key=value"):
        compare(str(a), str(b), prompts, template_kwarg=["enable_thinking"], **common)
    with pytest.raises(ConfigError, match="bogus"):  # the tiny template reads no such variable
        compare(str(a), str(b), prompts, template_kwarg=["bogus=1"], **common)
    compare(str(a), str(b), prompts, response_prefix="Sure", **common)
    assert "refusals: A 0/2, B 0/2" in capsys.readouterr().out


def test_compare_table_marks_refusals():
    from rich.console import Console

    table = compare_table(["p1", "p2"], "A", ["I'm sorry, I can't help.", "Sure: step one"], [True, False],
                          "B", ["Sure", "No"], [False, True], "markers")
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    rows = [line for line in text.splitlines() if "p1" in line or "p2" in line]
    assert "refusal" in rows[0] and "answer" in rows[0] and "Sure: step one" in rows[1]
