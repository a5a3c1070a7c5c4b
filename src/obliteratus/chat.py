"""Conversation: what ``obliteratus chat MODEL`` (streamed, multi-turn) and ``obliteratus compare A B``
(both models' answers side by side with a judge's verdicts) run; the verbs are commands/chat.py.

Streaming is a manual decoding loop over the KV cache: each step feeds the last token, picks the
next one greedily (temperature 0) or by sampling softmax(logits / T) restricted to the smallest
set of tokens whose probability reaches top_p, and prints the newly decoded text. A token whose
bytes end mid-character (decoded text ending in U+FFFD) is held back until the character is
complete. The chat history is re-rendered through the tokenizer's chat template every turn (a
plain "User:/Assistant:" transcript when it has none), with the options' template kwargs and
response prefix as PROBE and VERIFY use data.template_kwargs and data.response_prefix. ``/reset`` clears the history, ``/exit``
(or end of input) quits. The loop takes a ``read`` and a ``write`` function so it can be driven
by tests.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from .batching import check_lengths, encode_plain, encode_rendered, max_positions
from .data.prompts import apply_template, encode_chat, format_prompts
from .errors import ConfigError, PromptError
from .evaluate.generate import decode, eos_ids, generate
from .evaluate.judges import JudgeSpec
from .evaluate.judges.reasoning import opens_reasoning
from .models import ALIASES
from .models.load import resolve_source, summon
from .settings import DataSettings, ModelSettings
from .models.placement import input_device


class ChatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int = Field(256, ge=1, description="Tokens generated per reply at most.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; otherwise sample softmax(logits / T).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (with temperature > 0).")
    system: str | None = Field(None, description="System message placed before the conversation.")
    seed: int = Field(0, description="Sampling seed.")
    template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the chat "
                                            "template, as data.template_kwargs (e.g. enable_thinking = false).")
    response_prefix: str = Field("", description="Text after the generation prompt, as data.response_prefix.")


class CompareOptions(BaseModel):
    """``obliteratus compare``'s options (the CLI options are generated from them: commands/options.py)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    judge: str = Field("markers", description="Refusal judge (obliteratus judge --help lists them).")
    column: str = Field("prompt", description="Prompt column in .jsonl/.csv files.")
    max_new_tokens: int = Field(128, ge=1, description="Greedy tokens per answer.")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the chat "
                                            "template, as data.template_kwargs (e.g. enable_thinking = false).")
    response_prefix: str = Field("", description="Text after the generation prompt, as data.response_prefix.")


def render(tokenizer, messages: list[dict], template_kwargs: dict | None = None,
           response_prefix: str = "") -> list[int]:
    """Token ids of the conversation ending with the assistant turn's opening, then `response_prefix`
    (data.response_prefix); `template_kwargs` go to the chat template (data.template_kwargs). The
    messages' text is plain text: a special-token string typed in it never becomes a control token."""
    if getattr(tokenizer, "chat_template", None):
        def text_of(contents: list[str]) -> str:
            return apply_template(tokenizer, [{**m, "content": c} for m, c in zip(messages, contents)],
                                  template_kwargs) + response_prefix

        ids = encode_rendered(tokenizer, text_of, [m["content"] for m in messages], "message")
        return ids if ids is not None else tokenizer(text_of([m["content"] for m in messages]),
                                                     add_special_tokens=False)["input_ids"]
    if template_kwargs:
        raise ConfigError(f"template kwargs {template_kwargs} are for a chat template, and this tokenizer has none")
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    text = "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
    ids = encode_plain(tokenizer, text, add_special_tokens=True)  # the transcript has no control tokens of its own
    return ids + (tokenizer(response_prefix, add_special_tokens=False)["input_ids"] if response_prefix else [])


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits [vocab] -> token id: argmax, or a sample from the top-p set of softmax(logits / T)."""
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # [vocab]
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # tokens before the mass reached top_p, and the one reaching it
    sorted_p = sorted_p * keep
    pick = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)
    return int(order[pick])


@torch.inference_mode()
def stream_reply(model, tokenizer, ids: list[int], on_text: Callable[[str], None], options: ChatOptions) -> list[int]:
    """Generate after `ids`, calling `on_text` with each newly complete piece of text; returns the new
    token ids (without the stop token)."""
    stop = eos_ids(model, tokenizer)
    device = input_device(model)
    gen = torch.Generator().manual_seed(options.seed) if options.temperature > 0 else None
    # transformers >= 5.x names the KV cache argument `cache` (older: `past_key_values`)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x, past, out, shown = torch.tensor([ids], device=device), None, [], ""
    for _ in range(options.max_new_tokens):
        step = model(input_ids=x, use_cache=True, **{key: past})
        past = getattr(step, key)
        tok = next_token(step.logits[0, -1].float().cpu(), options.temperature, options.top_p, gen)
        if tok in stop:
            break
        out.append(tok)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd") and text.startswith(shown):
            on_text(text[len(shown):])
            shown = text
        x = torch.tensor([[tok]], device=device)
    text = tokenizer.decode(out, skip_special_tokens=True)
    if text.startswith(shown) and text != shown:
        on_text(text[len(shown):])
    return out


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    options: ChatOptions = field(default_factory=ChatOptions)
    history: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        self.history.clear()

    def reply(self, user: str, on_text: Callable[[str], None]) -> str:
        head = [{"role": "system", "content": self.options.system}] if self.options.system else []
        self.history.append({"role": "user", "content": user})
        ids = render(self.tokenizer, head + self.history, self.options.template_kwargs, self.options.response_prefix)
        positions = max_positions(self.model)
        if positions is not None and len(ids) + self.options.max_new_tokens > positions:
            self.history.pop()
            raise PromptError(f"the conversation is {len(ids)} tokens; with max_new_tokens = "
                              f"{self.options.max_new_tokens} the model's {positions} positions are exceeded: "
                              "/reset the history or send a shorter message")
        new = stream_reply(self.model, self.tokenizer, ids, on_text, self.options)
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": text})
        return text


def chat_loop(session: ChatSession, read: Callable[[], Optional[str]], write: Callable[[str], None]) -> None:
    """Read user lines until ``/exit`` or end of input (`read` returns None); stream each reply."""
    while True:
        line = read()
        if line is None or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            write("[history cleared]\n")
            continue
        try:
            session.reply(text, write)
        except PromptError as err:  # too long for the model: say so and keep chatting
            write(f"[{err}]\n")
            continue
        write("\n")


# -- compare ---------------------------------------------------------------------------------------

def answers(loaded, prompts: list[str], max_new_tokens: int, batch_size: int, system: str | None = None,
            template_kwargs: dict | None = None, response_prefix: str = "") -> list[str]:
    """Greedy answers of one model to `prompts` (chat template when the tokenizer has one, with
    `template_kwargs`; then `response_prefix`), batched."""
    tok = loaded.tokenizer
    enc = encode_chat(tok, prompts, True, system, template_kwargs, response_prefix)
    cap = DataSettings.model_fields["max_prompt_tokens"].default
    positions = max_positions(loaded.model)
    limit, why = cap, f"the cap of {cap} prompt tokens"
    if positions is not None and positions - max_new_tokens < limit:
        limit, why = positions - max_new_tokens, f"the model's {positions} positions less --max-new-tokens"
    check_lengths(enc, prompts, limit, why)
    return decode(tok, generate(loaded.model, tok, enc, max_new_tokens, batch_size))


def compare_models(model_a: str, model_b: str, texts: list[str], settings: ModelSettings, spec: JudgeSpec,
                   judge_options: dict, max_new_tokens: int, batch_size: int, template_kwargs: dict | None = None,
                   response_prefix: str = ""):
    """Both models' greedy answers to `texts` (one model in memory at a time), then the judge's
    verdicts on their answers (a reasoning block left out): (answers of A, answers of B, A refused,
    B refused). A missing second model fails before the first one is loaded and run."""
    for name in (model_a, model_b):
        if name not in ALIASES:
            resolve_source(name)
    results, opened = [], []
    for name in (model_a, model_b):  # one model in memory at a time
        loaded = summon(name, settings)
        results.append(answers(loaded, texts, max_new_tokens, batch_size, None, template_kwargs, response_prefix))
        opened.append([opens_reasoning(t) for t in format_prompts(loaded.tokenizer, texts, True, None,
                                                                  template_kwargs, response_prefix)])
        del loaded
    judged_by = spec.create(**judge_options)  # after the two models are gone (an llm judge loads its own)
    va, vb = (judged_by(texts, r, o).refused for r, o in zip(results, opened))  # True = refusal
    return results[0], results[1], va, vb


__all__ = ["ChatOptions", "ChatSession", "CompareOptions", "answers", "chat_loop", "compare_models", "next_token",
           "render", "stream_reply"]
