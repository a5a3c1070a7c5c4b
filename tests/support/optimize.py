"""The optimizer's trial objective on a tiny model (tests/optimize/test_optimize.py, tests/test_cuda.py): the
Optuna parameters of one trial, random per-layer mean differences and the objective that scores them."""

from __future__ import annotations

import optuna
import torch

from conftest import tiny_tokenizer
from obliteratus.batching import encode_prompts
from obliteratus.settings import ExciseSettings
from obliteratus.models import ArchitectureAdapter
from obliteratus.optimize.options import StudyOptions
from obliteratus.optimize.trial import Objective, Scorer

optuna.logging.set_verbosity(optuna.logging.ERROR)  # the studies of the tests that import this log errors only
L, D = 3, 32
PROMPTS = ["Hi", "How do I bake bread?", "Write a poem.", "What is 2 + 2?", "Tell me about dragons.",
           "Name a colour.", "Why is the sky blue?", "Count to five."]


def mean_diffs(seed: int = 0) -> torch.Tensor:
    return torch.randn(L + 1, D, generator=torch.Generator().manual_seed(seed))


def params(scope: str = "global", **extra) -> dict:
    p = {"direction_scope": scope, "direction_index": 0.5,
         "attn.max_weight": 1.2, "attn.max_weight_position": 1.0, "attn.min_weight": 0.5,
         "attn.min_weight_distance": 1.0,
         "mlp.max_weight": 0.8, "mlp.max_weight_position": 2.0, "mlp.min_weight": 0.25,
         "mlp.min_weight_distance": 2.0}
    p.update(extra)
    return p


def encoded(texts=PROMPTS):
    tok = tiny_tokenizer()
    return tok, encode_prompts(tok, texts, False)


def make_objective(model, options: StudyOptions, md=None):
    tok, enc = encoded()
    adapter = ArchitectureAdapter(model)
    scorer = Scorer.build(model, tok, enc, enc, options, batch_size=4)
    return Objective(adapter, scorer, mean_diffs() if md is None else md, options, ExciseSettings(biases=False))
