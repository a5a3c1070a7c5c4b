"""Options of ``obliteratus analyze`` (analysis/analyze.py): one typed model holds their defaults;
the CLI options are generated from it (commands/options.py). Imports only pydantic."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AnalyzeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: str = Field("basic", description="Preset (name or .toml file) whose data/probe settings to use.")
    n_train: int = Field(64, description="Train prompts per class (directions, probes); sets data.n_train.")
    n_test: int = Field(32, description="Held-out prompts per class (probe accuracy, projections); sets data.n_test.")
    layers: list[int] | None = Field(None, description="Layers (resid_pre axis) to analyse; default all.")
    layer: int | None = Field(None, description="The direction's layer (default: largest train effect size).")
    probe_method: str = Field("logistic", description="Linear probe: logistic | diff_means.")
    patch_prompts: int = Field(4, ge=1, description="Prompts per class for activation patching.")
    patch_layers: list[int] | None = Field(None, description="Layers to patch (default 5 spread).")
    top_k: int = Field(20, ge=1, description="Tokens per side in the logit lens.")


__all__ = ["AnalyzeOptions"]
