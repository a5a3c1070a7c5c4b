"""``[model]``: how SUMMON loads a model (models/load.py). Imports only pydantic, so the loader and
the judges that load a model of their own can build one, and settings.py mounts it."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)$", re.IGNORECASE)


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
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="Load the weights in 4-bit (nf4, double-quantized) or 8-bit (int8) with bitsandbytes "
                            "(the quant extra) for PROBE, DISTILL, VERIFY and the optimizer's trials; the edit is "
                            "made on the dequantized weights and quantized again, and REBIRTH bakes the edit plan "
                            "into the full-precision source (docs/big-models.md)."
    )
    max_memory: dict[str, str] | None = Field(
        None, description="Memory per device for accelerate's device map, e.g. {0 = \"20GiB\", cpu = \"64GiB\"}: "
                          "what does not fit is offloaded to the CPU, then to model.offload_dir. An offloaded run "
                          "scores its edit with hooks and bakes it into the source checkpoint."
    )
    offload_dir: str | None = Field(
        None, description="Directory for the weights offloaded to disk (with model.max_memory); scratch space, "
                          "never the model's own directory."
    )

    @field_validator("max_memory")
    @classmethod
    def _sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty table: leave max_memory unset to load everything on one device")
        for device, size in value.items():
            if not (device.isdigit() or device in ("cpu", "mps", "disk")):
                raise ValueError(f"device {device!r}: a GPU index (0, 1, ...), cpu or disk")
            if not _SIZE.match(str(size).strip()):
                raise ValueError(f"{device} = {size!r}: a size such as \"20GiB\" or \"512MB\"")
        return value

    def device_max_memory(self) -> dict | None:
        """max_memory as accelerate takes it: GPU indices as ints."""
        if self.max_memory is None:
            return None
        return {int(k) if k.isdigit() else k: v for k, v in self.max_memory.items()}


__all__ = ["ModelSettings"]
