"""Jailbreak-contrastive direction: blend the refusal direction with the harmful-vs-jailbroken one.

Two estimates of "what makes the model refuse":

    r_refuse = unit(μ_harmful − μ_harmless)      differs in refusal *and* in topic (harm content)
    r_jb     = unit(μ_harmful − μ_jailbreak)     same requests, wrapped in jailbreak templates: the
                                                 topic is held fixed, refusal is (partly) switched off,
                                                 but the wrapper text adds its own style features
    r        = unit((1 − α) r_refuse + α r_jb)

Each estimate's confound (topic in the first, template style in the second) is unrelated to the
other's, so blending them keeps their shared refusal component and dilutes both confounds.
The default α = 0.5 weighs the two unit vectors equally: with no measurement of which confound is
larger, equal weight minimises the worst case, and it keeps the result from being dominated by the
jailbreak set, which is usually smaller and template-specific. α = 0 is plain difference of means.

The jailbreak set is the harmful prompts wrapped in :func:`load_jailbreak_templates` (each contains
``{prompt}`` once), so the pipeline must probe a third set: the method registers with
``needs_model=True`` and its ``fit`` takes the activations as the keyword ``jailbreak``.

Reference: the jailbreak-contrast option of OBLITERATUS (``use_jailbreak_contrast``); the idea that
successful jailbreaks suppress the refusal direction is from Arditi et al. 2024 (their adversarial-suffix analysis) and Ball et al.
2024, "Understanding Jailbreak Success: A Study of Latent Space Dynamics in LLMs".
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ActivationError, PromptError
from ..probe import collect
from .base import Basis, FitContext, register_direction_method

PLACEHOLDER = "{prompt}"


class JailbreakConfig(BaseModel):
    """Options of ``[directions.jailbreak]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    alpha: float = Field(0.5, ge=0.0, le=1.0, description=(
        "weight of the harmful-vs-jailbroken direction in the blend (0 = difference of means, 1 = only the "
        "jailbreak contrast)"))


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ActivationError(f"jailbreak: {what} means coincide: no direction to extract")
    return v / norm


def jailbreak_contrastive(harmful: torch.Tensor, harmless: torch.Tensor, jailbreak: torch.Tensor,
                          alpha: float = 0.5) -> torch.Tensor:
    """[n, d], [m, d], [j, d] -> [1, d] unit vector, float32."""
    mu_h = harmful.double().mean(0)  # [d]
    r_refuse = _unit(mu_h - harmless.double().mean(0), "harmful and harmless")  # [d]
    r_jb = _unit(mu_h - jailbreak.double().mean(0), "harmful and jailbreak-wrapped harmful")  # [d]
    blend = (1.0 - alpha) * r_refuse + alpha * r_jb  # [d]
    return _unit(blend, "the blended (opposite) directions")[None, :].float()


def fit_jailbreak(harmful: torch.Tensor, harmless: torch.Tensor, k: int = 1, options: JailbreakConfig | None = None,
                  *, jailbreak: torch.Tensor | None = None) -> torch.Tensor:
    """Registered fit: like every method, plus the activations of the jailbreak-wrapped harmful prompts."""
    if jailbreak is None:
        raise ActivationError(
            "jailbreak direction method needs the activations of jailbreak-wrapped harmful prompts "
            "(fit(..., jailbreak=[j, d])); the pipeline probes them for methods registered with needs_model=True")
    if jailbreak.shape[-1] != harmful.shape[-1]:
        raise ActivationError(f"jailbreak activations have width {jailbreak.shape[-1]}, harmful {harmful.shape[-1]}")
    return jailbreak_contrastive(harmful, harmless, jailbreak, (options or JailbreakConfig()).alpha)


def load_jailbreak_templates(path: str | Path | None = None) -> list[str]:
    """Templates, one per non-empty line (default: the built-in set); each must contain ``{prompt}`` once."""
    if path is None:
        path = Path(str(resources.files("obliteratus.data") / "prompts" / "jailbreak_templates.txt"))
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptError(f"jailbreak template file not found: {path}")
    templates = []
    for lineno, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.count(PLACEHOLDER) != 1:
            raise PromptError(f"{path}:{lineno}: a jailbreak template must contain {PLACEHOLDER} exactly once, "
                              f"found {line.count(PLACEHOLDER)}")
        templates.append(line)
    if not templates:
        raise PromptError(f"{path}: no jailbreak templates")
    return templates


def wrap_prompts(prompts: list[str], templates: list[str]) -> list[str]:
    """Wrap prompt i in template i mod len(templates) (str.replace, so braces in prompts are safe)."""
    return [templates[i % len(templates)].replace(PLACEHOLDER, p) for i, p in enumerate(prompts)]


def fit_in_pipeline(ctx: FitContext) -> Basis:
    """Probe the harmful train prompts wrapped in the jailbreak templates (a third set), then blend."""
    probe = ctx.settings.probe
    wrapped = ctx.encode(wrap_prompts(ctx.harmful_texts, load_jailbreak_templates()))
    acts = collect(ctx.loaded.adapter, wrapped, probe.positions, probe.batch_size, share_prefix=probe.share_prefix)
    return Basis(fit_jailbreak(ctx.positive, ctx.negative, ctx.k, ctx.options,
                               jailbreak=acts[:, ctx.position, ctx.layer]))


register_direction_method(
    "jailbreak",
    "diff of means blended with the harmful vs jailbreak-wrapped-harmful direction (probes a third set)",
    fit_jailbreak,
    max_directions=1,
    options=JailbreakConfig,
    needs_model=True,
    pipeline_fit=fit_in_pipeline,
)
