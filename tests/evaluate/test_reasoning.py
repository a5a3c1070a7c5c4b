"""Thinking models (issue 26): the answer after a reasoning block (``<think>``, ``<thinking>``, gpt-oss
harmony, raw and decoded), judges that read that answer only (a refusal inside the reasoning is not
counted, one in the answer is), a response cut off mid-thought counted as no answer, and the
early-stopping refusal count (evaluate/early.py), which must neither decide nor stop on a refusal
phrase inside the reasoning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from conftest import EOS, PAD, tiny_model, tiny_tokenizer
from obliteratus.chat import ChatOptions, ChatSession, render
from obliteratus.data.prompts import encode_chat, format_prompts
from obliteratus.errors import ConfigError, PromptError
from obliteratus.evaluate import early
from obliteratus.evaluate.judges import Judge, Verdicts, make_judge
from obliteratus.evaluate.judges.reasoning import answer_part, opens_reasoning, split_reasoning
from obliteratus.evaluate.judges.rows import score_calibration

REFUSAL = "I'm sorry, but I cannot help with that."
THOUGHT_REFUSAL = "The user asks for a story. I'm sorry, I cannot... no: fiction is fine."
ANSWER = "Sure, here is the story: once upon a time."

# Qwen3's switch, reduced to the tiny tokenizer's turn format: enable_thinking = false writes an empty
# reasoning block after the generation prompt.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
# DeepSeek-R1 distills: the generation prompt opens the reasoning block, with no switch.
OPENING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)


def tokenizer_with(template: str):
    tok = tiny_tokenizer()
    tok.chat_template = template
    return tok


# ------------------------------------------------------------------ one formatted prompt for PROBE, VERIFY and chat


def test_chat_renders_the_prompt_probe_and_verify_encode():
    tok = tokenizer_with(THINKING_TEMPLATE)
    kwargs, prefix = {"enable_thinking": False}, "Answer:"
    want = encode_chat(tok, ["hi"], True, "Be brief.", kwargs, prefix).ids[0]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert render(tok, messages, kwargs, prefix) == want
    assert tok.decode(want).endswith("<|assistant|><think>\n\n</think>\n\nAnswer:")
    assert render(tok, messages) == encode_chat(tok, ["hi"], True, "Be brief.").ids[0]  # defaults: as before
    typo = ChatOptions(max_new_tokens=2, template_kwargs={"enable_thinkin": 1})  # a prefix of the real name
    session = ChatSession(tiny_model("llama"), tok, typo)
    with pytest.raises(ConfigError, match="never reads 'enable_thinkin'"):
        session.reply("hi", lambda text: None)


# ------------------------------------------------------------------ answer_part


@pytest.mark.parametrize("response, reasoning, answer", [
    (f"<think>\n{THOUGHT_REFUSAL}\n</think>\n\n{ANSWER}", THOUGHT_REFUSAL, ANSWER),
    (f"<thinking>{THOUGHT_REFUSAL}</thinking>{REFUSAL}", THOUGHT_REFUSAL, REFUSAL),
    (f"{THOUGHT_REFUSAL}\n</think>\n\n{ANSWER}", THOUGHT_REFUSAL, ANSWER),  # the prompt opened <think>
    (f"<|channel|>analysis<|message|>{THOUGHT_REFUSAL}<|end|><|start|>assistant<|channel|>final<|message|>"
     f"{ANSWER}<|return|>", None, ANSWER),  # gpt-oss harmony, special tokens kept
    (f"<|channel|>final<|message|>{REFUSAL}<|return|>", "", REFUSAL),  # harmony without analysis
    (f"analysis{THOUGHT_REFUSAL}assistantfinal{ANSWER}", THOUGHT_REFUSAL, ANSWER),  # decoded harmony
    (f"analysisWe need to check. assistantanalysisStill.assistantfinal{REFUSAL}", None, REFUSAL),
])
def test_answer_part_leaves_out_the_reasoning(response, reasoning, answer):
    parts = split_reasoning(response)
    assert answer_part(response) == parts.answer == answer
    assert not parts.unclosed and not parts.unanswered
    if reasoning is not None:
        assert parts.reasoning == reasoning


@pytest.mark.parametrize("response, opened", [
    (f"<think>\n{THOUGHT_REFUSAL}", None),  # stopped mid-thought
    (f"<thinking>{THOUGHT_REFUSAL}", None),
    (THOUGHT_REFUSAL, True),  # the prompt opened the block and it never closed
    (f"<|channel|>analysis<|message|>{THOUGHT_REFUSAL}", None),
    (f"analysis{THOUGHT_REFUSAL}", None),
])
def test_an_unclosed_reasoning_block_has_no_answer_yet(response, opened):
    parts = split_reasoning(response, opened)
    assert parts.unclosed and parts.unanswered and parts.answer == ""


@pytest.mark.parametrize("response", [
    ANSWER, REFUSAL, "", "analysis of the data shows a trend.", "Analysis: fine.", "assistantfinal is a word here.",
])
def test_a_response_without_reasoning_is_unchanged(response):
    parts = split_reasoning(response, None)
    assert parts.answer == response and parts.reasoning == "" and not parts.unclosed


def test_a_known_start_decides_what_a_lone_closing_tag_means():
    text = f"{THOUGHT_REFUSAL}</think>{ANSWER}"
    assert answer_part(text) == ANSWER  # unknown: a closing tag first means the prompt opened the block
    assert answer_part(text, opened=True) == ANSWER
    assert answer_part(text, opened=False) == text  # known not to: plain text
    assert answer_part("Write </think> in your parser.", False) == "Write </think> in your parser."
    assert answer_part(f"<think>a</think>{ANSWER}<think>more", False) == ANSWER  # an answer came before


def test_opens_reasoning_reads_the_end_of_the_formatted_prompt():
    assert opens_reasoning("<|assistant|><think>\n")
    assert opens_reasoning("<|start|>assistant<|channel|>analysis<|message|>")
    assert not opens_reasoning("<|assistant|><think>\n\n</think>\n\n")
    assert not opens_reasoning("<|user|>explain <think> tags\n<|assistant|>")
    (opening,) = format_prompts(tokenizer_with(OPENING_TEMPLATE), ["hi"])
    (closed,) = format_prompts(tokenizer_with(THINKING_TEMPLATE), ["hi"], template_kwargs={"enable_thinking": False})
    assert opens_reasoning(opening) and not opens_reasoning(closed)


# ------------------------------------------------------------------ judges read the answer


@pytest.mark.parametrize("judge", ["markers", "prefix"])
def test_a_refusal_inside_the_reasoning_is_not_counted_and_one_in_the_answer_is(judge):
    responses = [
        f"<think>\n{THOUGHT_REFUSAL}\n</think>\n\n{ANSWER}",  # refusal words only in the reasoning
        f"<think>\nThe user wants a story; that is fine.\n</think>\n\n{REFUSAL}",  # refusal in the answer
        f"{THOUGHT_REFUSAL}</think>{ANSWER}",  # the template opened <think>
        f"analysis{THOUGHT_REFUSAL}assistantfinal{ANSWER}",  # gpt-oss, decoded
        f"<|channel|>analysis<|message|>Fine.<|end|><|start|>assistant<|channel|>final<|message|>{REFUSAL}<|return|>",
        ANSWER, REFUSAL,  # no reasoning: as before
    ]
    verdicts = make_judge(judge)(["p"] * len(responses), responses)
    assert verdicts.refused == [False, True, False, False, True, False, True]
    assert verdicts.unanswered == [False] * len(responses)
    assert make_judge(judge).judge(["p"], [responses[0]]).refused == [True]  # the raw method sees what it is given


def test_a_response_cut_off_mid_thought_is_no_answer_not_a_refusal():
    responses = [f"<think>\n{THOUGHT_REFUSAL}", THOUGHT_REFUSAL, f"<think>{THOUGHT_REFUSAL}</think>", REFUSAL]
    with pytest.warns(UserWarning, match="2 of 4 responses stopped inside their reasoning"):
        verdicts = make_judge("markers")(["p"] * 4, responses, [False, True, False, False])
    # unanswered: not refused; an empty answer after a finished reasoning is the markers judge's refusal
    assert verdicts.refused == [False, False, True, True]
    assert verdicts.unanswered == [True, True, False, False]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unanswered: no warning
        assert make_judge("markers")(["p"], [THOUGHT_REFUSAL]).refused == [True]  # unknown start: all answer


def test_a_scoring_judge_scores_the_answer_and_gives_no_answer_no_score():
    seen = []

    class Length(Judge):  # score = answer length, refused when longer than 10 characters
        def judge(self, prompts, responses):
            seen.extend(responses)
            return Verdicts([len(r) > 10 for r in responses], [float(len(r)) for r in responses])

    with pytest.warns(UserWarning, match="1 of 3"):
        verdicts = Length()(["a", "b", "c"], [f"<think>{THOUGHT_REFUSAL}</think>ok", "<think>still", REFUSAL])
    assert seen == ["ok", REFUSAL]  # answers only; the unanswered row is never judged
    assert verdicts.refused == [False, False, True]
    assert verdicts.scores[0] == 2.0 and math.isnan(verdicts.scores[1]) and verdicts.scores[2] == len(REFUSAL)
    with pytest.warns(UserWarning):
        assert Length()(["a"], ["<think>x"]) == Verdicts([False], None, [True])


def test_calibration_leaves_out_the_rows_without_a_score():
    scores, labels = [0.1, 0.2, 0.8, 0.9, 0.3, 0.7, math.nan], [False, False, True, True, False, True, True]
    assert score_calibration(scores, labels) == score_calibration(scores[:-1], labels[:-1])
    with pytest.raises(PromptError, match="only 2 of 3 rows have a score"):
        score_calibration([0.1, 0.9, math.nan], [False, True, True])


# ------------------------------------------------------------------ early-stopping refusal counting


def scripted(model, tok, replies: dict[str, str]):
    """`model.generate` replaced by one that writes, token by token, the reply of the prompt that holds
    each key, asking the stopping criteria after every token as transformers does."""
    def generate(input_ids, attention_mask, generation_config, stopping_criteria, **kwargs):
        rows = [next(tok.encode(r, add_special_tokens=False) + [EOS] for k, r in replies.items()
                     if k in tok.decode(ids)) for ids in input_ids.tolist()]
        seqs, done = input_ids, torch.zeros(len(rows), dtype=torch.bool)
        for t in range(generation_config.max_new_tokens):
            step = [[PAD if d else (row[t] if t < len(row) else PAD)] for row, d in zip(rows, done.tolist())]
            seqs = torch.cat([seqs, torch.tensor(step)], 1)
            done = done | stopping_criteria(seqs, None)
            if done.all():
                break
        return seqs

    model.generate = generate
    return model


@pytest.mark.parametrize("template, kwargs, prefix", [
    (OPENING_TEMPLATE, {}, ""),  # the template opens <think>: replies start inside the reasoning
    (THINKING_TEMPLATE, {}, "<think>\n"),  # a response prefix opens it
])
def test_early_counting_neither_decides_nor_stops_on_a_refusal_inside_the_reasoning(template, kwargs, prefix):
    tok = tokenizer_with(template)
    replies = {"story": f"{THOUGHT_REFUSAL}</think>{ANSWER}", "bomb": f"Risky.</think>{REFUSAL} More text.",
               "slow": f"{THOUGHT_REFUSAL} and so on and so on"}
    model = scripted(tiny_model("llama"), tok, replies)
    enc = encode_chat(tok, ["write a story", "build a bomb", "slow thinker"], True, None, kwargs, prefix)
    budget = 300
    with pytest.warns(UserWarning, match="stopped inside the reasoning"):
        verdicts = early.judge(model, tok, enc, budget, 4)
    assert verdicts.refused == [False, True, False]
    story, bomb, _ = (len(tok.encode(r, add_special_tokens=False)) for r in replies.values())
    assert verdicts.tokens[0] == story + 1  # ran to its EOS: the refusal words in its reasoning did not stop it
    assert verdicts.tokens[1] == len(tok.encode("Risky.</think>I'm sorry", add_special_tokens=False)) < bomb
    assert verdicts.tokens[2] == len(tok.encode(replies["slow"], add_special_tokens=False)) + 1  # EOS, no answer


def test_early_counting_of_a_model_that_opens_its_own_reasoning():
    tok = tokenizer_with(THINKING_TEMPLATE)  # thinking on: the model writes <think> itself
    replies = {"story": f"<think>{THOUGHT_REFUSAL}</think>{ANSWER}", "bomb": f"<think>Risky.</think>{REFUSAL}"}
    model = scripted(tiny_model("llama"), tok, replies)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        verdicts = early.judge(model, tok, encode_chat(tok, ["a story", "a bomb"]), 200, 4)
    assert verdicts.refused == [False, True]
    assert verdicts.tokens[0] == len(tok.encode(replies["story"], add_special_tokens=False)) + 1
    assert verdicts.tokens[1] == len(tok.encode("<think>Risky.</think>I'm sorry", add_special_tokens=False))
