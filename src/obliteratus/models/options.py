"""``[model]``: how SUMMON loads a model (models/load.py). Imports only pydantic, so the loader and
the judges that load a model of their own can build one, and settings.py mounts it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelSettings(BaseModel):
    # the config of settings.Section, the base of the other sections of the run settings
    # allow_inf_nan=False and the rest as settings.Section (every section of the run settings)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto = float32 on CPU, the checkpoint's dtype (or bfloat16) on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available (device_map='auto' over several GPUs), else CPU."
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the checkpoint.")
    allow_pickle: bool = Field(
        False, description="Load PyTorch pickle weights (pytorch_model.bin) when a checkpoint has no safetensors; "
                           "unpickling can run code hidden in the file, so only for sources you trust."
    )
    cpu_pack: Literal["auto", "off"] = Field(
        "auto", description="auto: on the CPU, float32 Linear layers multiply with a oneDNN-packed copy of their "
                            "weight (models/packed.py: same results, one more copy of the weights in memory; skipped "
                            "when that copy would not fit); off: plain GEMM (timings: "
                            "docs/journal/option-measurements.md)."
    )


__all__ = ["ModelSettings"]
