"""A capability check that runs offline on a CPU in about half a minute (31 s for the 0.5B demo model
on 2 cores): 231 multiple-choice items (arithmetic, sequences, alphabet and calendar order, capitals,
opposites, chemical symbols) scored by log-probability, so an edit that damages what the model knows
shows up next to KL and perplexity.

Each item is asked as a chat turn ("What is 47 + 38? Reply with the answer only.") and every
choice is scored as the assistant's answer: the sum of the log-probs of its tokens, teacher-forced
after the chat-formatted question (the `acc` of multiple-choice harnesses such as lm-eval). The
item counts as right when the correct choice scores highest. No text is generated and no judge is
involved.

The items are built here, seeded (:func:`build_items`): the arithmetic and order items from
number and letter ranges, the fact items from the small tables below, each fact item's wrong
choices drawn from the other answers of its table. They are not a benchmark of general ability
(the demo 0.5B model gets most of them right); they are a fixed yardstick on which the same model
before and after an edit can be compared item by item. Chance is reported with the accuracy: the
mean of 1 / (number of choices).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..batching import Encoded
from ..models.placement import input_device
from ..shared_prefix import cache_keyword, forward_inputs, returned_cache, text_model

INSTRUCTION = "Reply with the answer only."

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("India", "New Delhi"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Turkey", "Ankara"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Hungary", "Budapest"),
    ("Denmark", "Copenhagen"),
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("early", "late"),
    ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("rich", "poor"),
    ("wet", "dry"), ("young", "old"), ("hard", "soft"), ("loud", "quiet"), ("thick", "thin"), ("high", "low"),
    ("win", "lose"), ("buy", "sell"), ("push", "pull"), ("inside", "outside"), ("first", "last"),
    ("true", "false"), ("heavy", "light"), ("begin", "end"), ("clean", "dirty"), ("near", "far"),
    ("day", "night"), ("north", "south"), ("sweet", "sour"),
)
SYMBOLS = (
    ("hydrogen", "H"), ("helium", "He"), ("carbon", "C"), ("nitrogen", "N"), ("oxygen", "O"), ("sodium", "Na"),
    ("magnesium", "Mg"), ("aluminium", "Al"), ("silicon", "Si"), ("sulfur", "S"), ("chlorine", "Cl"),
    ("potassium", "K"), ("calcium", "Ca"), ("iron", "Fe"), ("copper", "Cu"), ("zinc", "Zn"), ("silver", "Ag"),
    ("gold", "Au"), ("lead", "Pb"), ("mercury", "Hg"),
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Item:
    kind: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the correct choice


def _numeric(kind: str, question: str, right: int, wrong: list[int], rng: random.Random) -> Item:
    seen, others = {right}, []
    for w in wrong:
        if w not in seen and w >= 0:
            seen.add(w)
            others.append(w)
    choices = [right, *others[:3]]
    rng.shuffle(choices)
    return Item(kind, question, tuple(map(str, choices)), choices.index(right))


def _table(kind: str, template: str, pairs: tuple[tuple[str, str], ...], rng: random.Random) -> list[Item]:
    answers = sorted({b for _, b in pairs})
    items = []
    for key, right in pairs:
        choices = [right, *rng.sample([a for a in answers if a != right], 3)]
        rng.shuffle(choices)
        items.append(Item(kind, template.format(key), tuple(choices), choices.index(right)))
    return items


def build_items(per_kind: int = 24, seed: int = 0) -> list[Item]:
    """The item set: `per_kind` items of each generated kind (addition, subtraction, multiplication,
    larger number, next in a sequence, next letter) and up to `per_kind` of each table's (months,
    weekdays, capitals, opposites, chemical symbols): 231 items at the default 24. The same
    (per_kind, seed) gives the same items, choices and order."""
    rng = random.Random(seed)
    items: list[Item] = []
    for _ in range(per_kind):
        a, b = rng.randint(12, 98), rng.randint(12, 98)
        s = a + b
        items.append(_numeric("add", f"What is {a} + {b}?", s, [s + 1, s - 1, s + 10, s - 10], rng))
    for _ in range(per_kind):
        a, b = rng.randint(40, 99), rng.randint(11, 39)
        d = a - b
        items.append(_numeric("subtract", f"What is {a} - {b}?", d, [d + 1, d - 1, d + 10, d - 10], rng))
    for _ in range(per_kind):
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        p = a * b
        items.append(_numeric("multiply", f"What is {a} × {b}?", p, [a * (b + 1), (a + 1) * b, p + 2, p - 2], rng))
    for _ in range(per_kind):
        a, b = rng.sample(range(101, 999), 2)
        items.append(_numeric("larger", f"Which number is larger, {a} or {b}?", max(a, b), [min(a, b)], rng))
    for _ in range(per_kind):
        start, step = rng.randint(1, 30), rng.randint(2, 9)
        seq = [start + i * step for i in range(4)]
        nxt = start + 4 * step
        items.append(_numeric("sequence", f"What number comes next: {', '.join(map(str, seq))}, ...?", nxt,
                              [nxt + 1, nxt - 1, nxt + step, seq[-1]], rng))
    for _ in range(per_kind):
        i = rng.randint(1, 23)
        right = LETTERS[i + 1]
        wrong = [LETTERS[i - 1], LETTERS[i + 2], LETTERS[(i + 5) % 26]]
        choices = [right, *dict.fromkeys(w for w in wrong if w != right)]
        rng.shuffle(choices)
        items.append(Item("letter", f"Which letter comes right after {LETTERS[i]} in the English alphabet?",
                          tuple(choices), choices.index(right)))
    for kind, cycle in (("month", MONTHS), ("weekday", DAYS)):
        what = "month" if kind == "month" else "day of the week"
        for i, name in list(enumerate(cycle))[:per_kind]:
            right = cycle[(i + 1) % len(cycle)]
            choices = [right, cycle[(i - 1) % len(cycle)], cycle[(i + 2) % len(cycle)], cycle[(i + 3) % len(cycle)]]
            rng.shuffle(choices)
            items.append(Item(kind, f"Which {what} comes right after {name}?", tuple(choices), choices.index(right)))
    items += _table("capital", "What is the capital city of {}?", CAPITALS, rng)[:per_kind]
    items += _table("opposite", "What is the opposite of the word \"{}\"?", OPPOSITES, rng)[:per_kind]
    items += _table("symbol", "What is the chemical symbol of {}?", SYMBOLS, rng)[:per_kind]
    return items


@dataclass
class CapabilitySet:
    """The items with their questions chat-formatted and tokenized (:func:`encode_items`)."""

    items: list[Item]
    prompts: Encoded  # one row per item: the question, chat-formatted, ending where the answer starts
    choices: list[list[list[int]]]  # per item, per choice: the answer's token ids


def encode_items(tokenizer, encode, items: list[Item] | int = 24) -> CapabilitySet:
    """`encode(texts) -> Encoded` formats and tokenizes questions as the run does its prompts
    (data.prompts.encode_texts with the run's settings); `items` are the items or build_items' per_kind."""
    items = build_items(items) if isinstance(items, int) else items
    prompts = encode([f"{item.question} {INSTRUCTION}" for item in items])
    choices = [[tokenizer(c, add_special_tokens=False)["input_ids"] for c in item.choices] for item in items]
    if any(not ids for per_item in choices for ids in per_item):
        raise ValueError("capability: a choice tokenizes to no tokens")
    return CapabilitySet(items, prompts, choices)


def _sum_logprobs(logp: torch.Tensor, tokens: list[int]) -> float:
    """Σ_t logp[t, tokens[t]] for the positions predicting `tokens` ([len(tokens), vocab])."""
    return float(logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None]).sum())


def _plain(model, cap: CapabilitySet, batch_size: int, device) -> list[list[float]]:
    """One left-padded row per (item, choice): the question and the choice, teacher-forced."""
    rows = [(i, c) for i, per_item in enumerate(cap.choices) for c in range(len(per_item))]
    prompts = Encoded.from_ids([cap.prompts.ids[i] for i, _ in rows], cap.prompts.pad_id)
    suffix = [cap.choices[i][c] for i, c in rows]
    keep = max(map(len, suffix)) + 1
    scores: list[list[float]] = [[0.0] * len(per_item) for per_item in cap.choices]
    for batch in prompts.batches(batch_size, device, suffix=suffix):
        logp = torch.log_softmax(model(**forward_inputs(model, batch), logits_to_keep=keep).logits.float(), dim=-1)
        for j, row in enumerate(batch.index):
            i, c = rows[row]
            n = len(suffix[row])
            scores[i][c] = _sum_logprobs(logp[j, -(n + 1):-1], suffix[row])
    return scores


def _cached(model, cap: CapabilitySet, batch_size: int, device) -> list[list[float]]:
    """Each question runs once (the prompts' common prefix once per batch, shared_prefix.py); its KV
    cache is repeated for its choices, which run after it, right-padded. Items are batched with
    items of the same number of choices."""
    scores: list[list[float]] = [[0.0] * len(per_item) for per_item in cap.choices]
    key = cache_keyword(model.forward)
    groups: dict[int, list[int]] = {}
    for i, per_item in enumerate(cap.choices):
        groups.setdefault(len(per_item), []).append(i)
    for n, items in groups.items():
        enc = Encoded.from_ids([cap.prompts.ids[i] for i in items], cap.prompts.pad_id)
        prefix = enc.common_prefix() or None
        for batch in enc.batches(max(1, batch_size // n), device, prefix=prefix):
            kwargs = forward_inputs(model, batch)
            kwargs["use_cache"] = True
            out = model(**kwargs, logits_to_keep=1)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts every choice's first token
            choices = [cap.choices[items[row]][c] for row in batch.index for c in range(n)]
            width = max(map(len, choices)) - 1  # tokens after the first are fed; the last predicts nothing
            later = None
            if width > 0:
                cache = returned_cache(out)
                cache.batch_repeat_interleave(n)
                ids = torch.full((len(choices), width), cap.prompts.pad_id, dtype=torch.long)
                mask = torch.zeros((len(choices), width), dtype=torch.long)
                for r, tokens in enumerate(choices):
                    ids[r, :len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
                    mask[r, :len(tokens) - 1] = 1
                ids, mask = ids.to(device), mask.to(device)
                past_mask = batch.full_mask.repeat_interleave(n, 0)
                start = batch.position_ids[:, -1:].repeat_interleave(n, 0) + 1
                later = torch.log_softmax(model(input_ids=ids, attention_mask=torch.cat([past_mask, mask], 1),
                                                position_ids=start + torch.arange(width, device=device),
                                                use_cache=True, **{key: cache}).logits.float(), dim=-1)
            for j, row in enumerate(batch.index):
                for c in range(n):
                    r = j * n + c
                    tokens = choices[r]
                    total = float(first[j, tokens[0]])
                    if len(tokens) > 1:
                        total += _sum_logprobs(later[r, :len(tokens) - 1], tokens[1:])
                    scores[items[row]][c] = total
    return scores


@torch.inference_mode()
def choice_logprobs(model, cap: CapabilitySet, batch_size: int = 64, share_prefix: bool = False) -> list[list[float]]:
    """Per item, per choice: the summed log-prob of the choice's tokens after the question. With
    `share_prefix` (shared_prefix.can_share_prefix: this model gives the same log-probs when it goes
    on from a cache across padding) each question runs once and its cache serves its choices; else
    every (question, choice) pair is a row of its own. Both give the same numbers."""
    model = text_model(model)
    device = input_device(model)
    return (_cached if share_prefix else _plain)(model, cap, batch_size, device)


def score(scores: list[list[float]], items: list[Item]) -> dict[str, object]:
    """Accuracy (argmax choice = answer), the mean log-prob of the right answer, chance, and the
    accuracy per kind, from :func:`choice_logprobs`' output."""
    right = [max(range(len(s)), key=s.__getitem__) == item.answer for s, item in zip(scores, items)]
    kinds: dict[str, list[bool]] = {}
    for item, ok in zip(items, right):
        kinds.setdefault(item.kind, []).append(ok)
    n = max(len(items), 1)
    return {"capability": sum(right) / n,
            "capability_logprob": sum(s[item.answer] for s, item in zip(scores, items)) / n,
            "capability_chance": sum(1 / len(item.choices) for item in items) / n,
            "capability_items": len(items),
            "capability_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())}}


def capability(model, cap: CapabilitySet, batch_size: int = 64, share_prefix: bool = False) -> dict[str, object]:
    """Run the check on `model`: :func:`score` of :func:`choice_logprobs`."""
    return score(choice_logprobs(model, cap, batch_size, share_prefix), cap.items)


__all__ = ["CapabilitySet", "INSTRUCTION", "Item", "build_items", "capability", "choice_logprobs", "encode_items",
           "score"]
