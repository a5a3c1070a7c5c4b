"""``[optimize.study]``: the multi-objective Optuna search (optimize/study.py, optimize/trial.py).

Defaults are Heretic's (p-e-w/heretic ``src/heretic/main.py`` ``objective`` and ``config.py``):
200 trials, 60 random start-up trials, multivariate TPE with 128 EI candidates, and every range
written as a fraction of the last layer index L = n_layers − 1, as Heretic writes them.
Imports only pydantic, so settings.py can mount it without an import cycle.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Range = tuple[float, float]


class StudyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # What each option is for (docs and default.toml list them so; the keys stay flat for presets).
    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "budget and sampler": ("n_trials", "n_startup_trials", "n_ei_candidates", "seed", "seed_windows",
                               "constrain"),
        "search space (what a trial means)": ("direction_scopes", "direction_index", "attn_max_weight",
                                              "mlp_max_weight", "max_weight_position", "min_weight_fraction",
                                              "min_weight_distance", "orthogonalize", "max_directions"),
        "scoring and the pick": ("target_refusal", "refusal_tokens", "confirm_prompts", "confirm_trials",
                                 "confirm_recounts", "confirm_target", "confirm_during", "confirm_strengths"),
        "speed knobs (same trials scored with less work)": ("prune", "prune_rule", "kl_rank", "suspect_prompts",
                                                            "suspect_tokens", "kl_chunks", "prune_chunks",
                                                            "share_prefix"),
        "storage and workers": ("storage", "study_name", "heartbeat_interval", "grace_period"),
    }

    n_trials: int = Field(200, ge=1, description="Finished trials (complete + pruned) the study stops at, over every "
                                                 "worker and every resumed run together.")
    n_startup_trials: int = Field(60, ge=0, description="Random trials before TPE takes over (Heretic: 60).")
    n_ei_candidates: int = Field(128, ge=1, description="TPE expected-improvement candidates (Heretic: 128).")
    seed: int = Field(0, description="TPE seed. A single-worker (SQLite) study is reproducible; with a shared "
                                     "storage each worker mixes its host and pid into it so that workers do not "
                                     "repeat each other's start-up samples.")
    storage: str | None = Field(None, description="Optuna storage URL; None = sqlite:///<run_dir>/study.db. "
                                                  "postgresql://user:pw@host/db lets several workers share the study "
                                                  "(its password is never written to a file or a log).",
                                json_schema_extra={"secret": "url"})
    study_name: str | None = Field(None, description="None = 'obliteratus-<model directory name>-<preset>'.")
    direction_scopes: list[Literal["global", "per_layer"]] = Field(
        ["global", "per_layer"], min_length=1,
        description="global: one direction at a fractional layer index for every writer; per_layer: layer i's "
                    "writers use the unit mean difference at its output (Heretic's 'per layer').")
    direction_index: Range = Field((0.4, 0.9), description="Global direction index range (fractions of L, on "
                                                           "Heretic's axis: 0 = output of layer 0).")
    attn_max_weight: Range = Field((0.8, 1.5), description="Attention kernel peak strength.")
    mlp_max_weight: Range = Field((-0.25, 1.5), description="MLP kernel peak strength; clamped at 0 after sampling "
                                                            "so that 'no MLP edit' has positive probability.")
    max_weight_position: Range = Field((0.6, 1.0), description="Kernel peak layer (fractions of L).")
    min_weight_fraction: Range = Field((0.0, 1.0), description="min_weight as a fraction of max_weight.")
    min_weight_distance: Range = Field((1.0, 0.6), description="Kernel half-width: low end in layers, high end as "
                                                               "a fraction of L (Heretic: [1, 0.6 L]; at least 1).")
    orthogonalize: bool = Field(False, description="Remove from each layer's direction its component along the "
                                                   "harmless mean (Heretic 1.4.0's orthogonalize_direction).")
    max_directions: int = Field(1, ge=1, description="> 1: also search n_directions in 1..max (the extra "
                                                     "directions are the distilled basis's leading rows).")
    target_refusal: float = Field(0.05, ge=0.0, le=1.0, description="Default pick: the lowest-KL trial whose val "
                                                                    "refusal rate is at most this.")
    confirm_prompts: int = Field(0, ge=0, description="Default pick only: confirm the candidates (val refusal <= "
                                                      "target_refusal, lowest KL first) on this many spare harmful "
                                                      "prompts (in no train/val/test part), judged over "
                                                      "evaluate.max_new_tokens tokens; the first whose refusal there "
                                                      "is also <= confirm_target is picked. 0 = off.")
    confirm_trials: int = Field(8, ge=1, description="Confirmations at most (one per candidate and strength); if "
                                                     "none passes, the checked one with the fewest confirmation "
                                                     "refusals (ties: lower strength, lower KL) is picked; a check "
                                                     "that stopped early is re-counted in full first, lowest bound "
                                                     "first, while it could still win (at most confirm_recounts).")
    confirm_recounts: int = Field(4, ge=0, description="When no confirmation passes: failed checks (which stopped "
                                                       "early, so their counts are lower bounds) re-counted in full "
                                                       "at most, so that the fallback pick compares exact counts; 0 "
                                                       "= compare the bounds.")
    confirm_target: float | None = Field(None, ge=0.0, le=1.0,
                                         description="Refusal rate a candidate must reach on the confirmation "
                                                     "prompts (None: target_refusal). Below the target it leaves a "
                                                     "margin for the held-out rate, which runs above the rate the "
                                                     "pick was chosen by.")
    confirm_during: bool = Field(False, description="Confirm candidates during the study instead of after it: a "
                                                    "complete trial at target_refusal whose KL is below every "
                                                    "confirmed trial's is checked on the confirmation prompts as "
                                                    "soon as it finishes (a failed check is an Optuna constraint "
                                                    "with constrain), kl_rank then counts confirmed trials only, "
                                                    "and the pick reuses the verdicts. Needs confirm_prompts.")
    confirm_strengths: list[float] = Field([1.0], min_length=1,
                                           description="Strength multipliers tried in turn for each candidate before "
                                                       "the next one (λ times every writer's kernel weight); the "
                                                       "pick is baked at the first strength that passes.")
    seed_windows: list[float] = Field([], description="Trials run first (Optuna enqueue_trial, on a new study): for "
                                                       "each fraction f, the source window at Heretic index f·L (one "
                                                       "global direction; attention and MLP at weight 1 on layers "
                                                       "0 .. f·L + 1 and nowhere else: the advanced edit without the "
                                                       "embeddings), so the study starts from an edit known to "
                                                       "generalise. They count as start-up trials. [] = none.")
    refusal_tokens: int = Field(32, ge=1, description="A response with no refusal marker within this many tokens "
                                                      "counts as answered (generation stops per sequence).")
    prune: bool = Field(True, description="Abandon a trial once its partial refusal count rules it out.")
    prune_rule: Literal["best", "pareto"] = Field(
        "best", description="best: prune once the refusal bound exceeds the target (or, before any trial reached it, "
                            "the best refusal so far); pareto: measure KL first and prune only a trial sure to be "
                            "dominated by a finished one, or above the target once it was reached.")
    kl_rank: int = Field(0, ge=0, description="k > 0: once k complete trials have a val refusal rate <= target_refusal, "
                                              "measure a trial's first-token KL before its refusals and prune it "
                                              "at once (no generation) when that KL is above the k-th lowest of "
                                              "theirs: the pick's first k candidates are then known to beat it. "
                                              "0 = off.")
    suspect_prompts: int = Field(0, ge=0, description="k > 0: once the refusal bar can prune, a trial first generates "
                                                      "(for suspect_tokens tokens) up to k of the harmful val prompts "
                                                      "that refused most often in this worker's earlier trials, and is "
                                                      "pruned if they already rule it out; then KL and the full count "
                                                      "run as usual. 0 = off.")
    suspect_tokens: int = Field(8, ge=1, description="Tokens the suspects are generated for (a marker found within "
                                                     "them is found by the full count too).")
    kl_chunks: int = Field(1, ge=1, description="With a KL cut (kl_rank), the harmless val prompts are scored in "
                                                "this many chunks, those with the most KL in the last trial that "
                                                "scored them first, and a trial is pruned as soon as the chunks' KL "
                                                "sum over the number of prompts (a lower bound of the mean, KL being "
                                                ">= 0) is above the cut. Same verdicts, fewer prompts for a trial far "
                                                "above the cut.")
    constrain: bool = Field(False, description="Tell the TPE sampler that a val refusal rate above target_refusal is "
                                                "infeasible (an Optuna constraint, for pruned trials their refusal "
                                                "lower bound): TPE then first drives refusal under the target, then "
                                                "minimises KL among the trials that reached it.")
    prune_chunks: int = Field(1, ge=1, description="Harmful val prompts are generated in this many chunks (at most "
                                                   "the evaluate batch size each); the pruner looks after every "
                                                   "token, so one batch is cheapest.")
    share_prefix: bool = Field(True, description="Run the prompts' common template prefix once per batch and share "
                                                  "its KV cache (shared_prefix.py); same scores, fewer tokens.")
    heartbeat_interval: int = Field(30, ge=1, description="Shared storages: a running trial's heartbeat period (s).")
    grace_period: int = Field(120, ge=1, description="Shared storages: a trial without heartbeat for this long "
                                                     "(its worker died) is marked failed and not counted.")

    @model_validator(mode="after")
    def _ranges(self) -> "StudyOptions":
        for name in ("direction_index", "attn_max_weight", "mlp_max_weight", "max_weight_position",
                     "min_weight_fraction"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: low {low} is above high {high}")
        if not (0.0 <= self.direction_index[0] and self.direction_index[1] <= 1.0):
            raise ValueError("direction_index must lie within [0, 1] (fractions of the last layer index)")
        if not all(0.0 <= f <= 1.0 for f in self.seed_windows):
            raise ValueError(f"seed_windows are fractions of the last layer index in [0, 1], got {self.seed_windows}")
        if not all(0.0 < s < 10.0 for s in self.confirm_strengths):
            raise ValueError(f"confirm_strengths must lie in (0, 10), got {self.confirm_strengths}")
        if self.confirm_during and not self.confirm_prompts:
            raise ValueError("confirm_during needs confirm_prompts > 0 (the prompts to confirm on)")
        if self.attn_max_weight[1] < 0 or self.min_weight_distance[0] <= 0:
            raise ValueError("attn_max_weight must reach above 0 and min_weight_distance must start above 0")
        return self

    @property
    def confirm_bar(self) -> float:
        """The refusal rate a candidate must reach on the confirmation prompts."""
        return self.target_refusal if self.confirm_target is None else self.confirm_target

    def space_fingerprint(self) -> dict:
        """The fields that define what a trial means; a resumed or shared study must agree on them."""
        return self.model_dump(exclude={"n_trials", "n_startup_trials", "n_ei_candidates", "seed", "storage",
                                        "study_name", "prune", "prune_rule", "kl_rank", "constrain", "prune_chunks",
                                        "suspect_prompts", "suspect_tokens", "kl_chunks",
                                        "share_prefix", "heartbeat_interval", "grace_period", "target_refusal",
                                        "confirm_prompts", "confirm_trials", "confirm_recounts", "confirm_target",
                                        "confirm_during", "confirm_strengths", "seed_windows"})
