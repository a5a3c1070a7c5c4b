"""The answer of a thinking model's response: the text after its reasoning block.

Every judge reads the answer only (:meth:`.base.Judge.__call__` splits each response here first), so
a refusal phrase the model weighs in its reasoning ("I'm sorry, I cannot… but the user asks for
fiction, so") is not counted, and a refusal in the answer is. Forms recognised:

* ``<think>…</think>ANSWER`` and ``<thinking>…</thinking>ANSWER`` (Qwen3, SmolLM3, DeepSeek-R1
  distills), wherever the block sits; its tags are left out of the answer.
* A response that starts inside a block the prompt opened (DeepSeek-R1 distills end the generation
  prompt with ``<think>\\n``): ``…</think>ANSWER``. When the caller says where generation started
  (`opened`, from the prompt: :func:`opens_reasoning`) that is used; when it does not (None), a
  closing tag before any opening one means the text before it was reasoning.
* gpt-oss's harmony channels, ``<|channel|>analysis<|message|>…<|end|><|start|>assistant<|channel|>
  final<|message|>ANSWER<|return|>``, and the same decoded without its special tokens (what VERIFY's
  decode gives): ``analysis…assistantfinalANSWER``. The decoded form is recognised only when the
  response starts with ``analysis`` directly followed by a character that is neither whitespace nor
  a lower-case letter (``analysisWe need to…``), which a plain answer never does.

A response that ends inside its reasoning (generation stopped mid-thought: the token budget was
too small) has no answer yet. That is not a refusal, nor an answer: :class:`Reasoned.unanswered`
says so, and ``Judge.__call__`` counts such a response as not refused, gives it no score (NaN),
flags it in ``Verdicts.unanswered`` and warns. A response with none of these forms is returned
unchanged. Pure string functions: no tokenizer, no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPENERS = ("<think>", "<thinking>", "<|channel|>analysis<|message|>")  # a prompt ending with one opened reasoning

# An opening or closing think tag, or the start of gpt-oss's final channel (raw or decoded): one scan finds them all.
_MARKER = re.compile(r"<(/?)think(?:ing)?>|(<\|channel\|>final[^<]*<\|message\|>|assistantfinal)")
# A response that opens a harmony message: raw (the channel marker, left for the scan) or decoded ("analysis" skipped).
_HARMONY = re.compile(r"\s*(?:(?=<\|channel\|>)|analysis(?=[^\sa-z]))")
_HARMONY_END = re.compile(r"<\|(?:return|end|call)\|>")


@dataclass(frozen=True)
class Reasoned:
    """One response split in its reasoning and its answer (see the module docstring)."""

    reasoning: str
    answer: str
    unclosed: bool  # the response ends inside a reasoning block

    @property
    def unanswered(self) -> bool:
        """Generation stopped inside the reasoning before any answer: no answer yet."""
        return self.unclosed and not self.answer.strip()


def split_reasoning(response: str, opened: bool | None = None) -> Reasoned:
    """`response` split in reasoning and answer. `opened`: whether the prompt left a reasoning block
    open, so that generation started inside it (:func:`opens_reasoning`); None = unknown, then a
    closing tag that comes before any opening one closes a block the prompt opened."""
    harmony = _HARMONY.match(response)
    inside = True if harmony else bool(opened)
    pos = harmony.end() if harmony else 0
    guess = opened is None and not harmony
    reasoning: list[str] = []
    answer: list[str] = []
    found = bool(harmony) or bool(opened)
    for m in _MARKER.finditer(response, pos):
        (reasoning if inside else answer).append(response[pos:m.start()])
        pos = m.end()
        opening, final = m.group(1) == "", m.group(2) is not None
        if not final and opening:
            inside = True
        elif inside:
            inside = False
        elif guess and not found and not final:  # a closing tag first: the prompt opened the block
            reasoning, answer = answer, []
        else:  # a closing tag (or "assistantfinal") outside any reasoning: plain text
            answer.append(m.group(0))
            continue
        found = True
    (reasoning if inside else answer).append(response[pos:])
    if not found:
        return Reasoned("", response, False)
    text = "".join(answer)
    if harmony:
        text = _HARMONY_END.split(text, 1)[0]
    return Reasoned("".join(reasoning).strip(), text.strip(), inside)


def answer_part(response: str, opened: bool | None = None) -> str:
    """The answer of `response`, its reasoning block left out ("" while the reasoning is unfinished);
    `response` itself when it has no reasoning block."""
    return split_reasoning(response, opened).answer


def opens_reasoning(prompt: str) -> bool:
    """Whether the formatted prompt ends inside a reasoning block (a template or a response prefix
    opened it: DeepSeek-R1 distills end the generation prompt with ``<think>\\n``), so that the
    response starts inside it."""
    return prompt.rstrip().endswith(OPENERS)


__all__ = ["OPENERS", "Reasoned", "answer_part", "opens_reasoning", "split_reasoning"]
