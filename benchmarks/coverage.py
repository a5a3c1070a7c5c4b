"""Which model types of the installed transformers can be abliterated exactly: architecture discovery
(src/obliteratus/models/discover.py) on a tiny random model of every type in the causal-LM and
image-text-to-text mappings.

    python benchmarks/coverage.py                         # every type (about 10 minutes on the 2-core box)
    python benchmarks/coverage.py --types gemma3,olmo2    # a few types
    python benchmarks/coverage.py --json /tmp/coverage.json

For each (mapping, model type): build the type's default config offline (``AutoConfig.for_model``),
shrink it (``tiny_config``: hidden size 64, 2 layers or one of each layer type, 4 experts, vocab 512,
and the same for nested text / vision / audio configs), instantiate it on the CPU with a seeded
random init (``reinit``), run ``discover`` and the exactness check (``projection_bound``: after
projecting a random unit d out of every found writer and the embeddings, max over layers and tokens
of |h·d|/‖h‖ of each decoder layer's output). Encoder-decoder types (``config.is_encoder_decoder``)
and encoder-only types (the type also has a masked-LM head) are skipped with the reason.

Prints one row per type: model type, mapping, instantiated?, in today's table (models/adapters.py)?,
discovered?, exactness bound, the layer kinds discovery saw, and why not (one line); then the counts.
Nothing is downloaded. ``tests/support/decoder_types.py`` imports ``tiny_config``, ``encoder_only`` and ``reinit``
from here and runs every type through ``ArchitectureAdapter`` (which falls back to discovery for the
types its table lacks) and the edit.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from obliteratus.errors import UnsupportedArchitectureError
from obliteratus.models.adapters import spec_for
from obliteratus.models.discover import discover, projection_bound

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, MOE_INTER, EXPERTS, TOPK, VOCAB = 64, 4, 2, 16, 96, 32, 4, 2, 512
MAX_LAYERS = 4  # one of each layer type, up to this many
SECONDS = 120  # per type (the slowest, kimi_linear and bailing_hybrid, take 35 s on the 2-core box)

# Field names (across config classes) -> the tiny value. Set where the field exists and is not None.
FIELDS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (HIDDEN, ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "embed_dim", "hidden_dim", "word_embed_proj_dim",
              "n_embed", "text_hidden_size", "projection_dim", "output_hidden_size")),
    (HEADS, ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "decoder_attention_heads",
             "num_attn_heads", "encoder_attention_heads", "linear_num_heads")),
    (KV_HEADS, ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv",
                "num_kv_groups", "linear_num_key_heads")),
    (HEAD_DIM, ("head_dim", "attention_head_dim", "kv_channels", "head_size", "mamba_d_head", "mamba_head_dim",
                "mamba_headdim", "linear_key_head_dim", "linear_value_head_dim", "v_head_dim", "global_head_dim",
                "qk_head_dim", "kv_lora_rank", "attention_head_size", "linear_head_dim")),
    (INTER, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "inner_hidden_size", "decoder_ffn_dim",
             "mlp_dim", "intermediate_dim", "mlp_hidden_size", "ff_dim", "dense_intermediate_size", "encoder_ffn_dim")),
    (MOE_INTER, ("moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                 "shared_intermediate_size", "expert_intermediate_size", "moe_ffn_hidden_size", "moe_dim",
                 "expert_dim", "moe_latent_size", "q_lora_rank")),
    (EXPERTS, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts",
               "n_experts")),
    (TOPK, ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts", "moe_k", "n_activated_experts",
            "num_experts_per_token", "top_k_experts")),
    (VOCAB, ("vocab_size", "unpadded_vocab_size")),  # (Inkling 2's lm_head width is unpadded_vocab_size)
    (8, ("state_size", "ssm_state_size", "mamba_d_state", "d_state", "qk_rope_head_dim", "qk_nope_head_dim",
         "time_step_rank", "mamba_dt_rank", "rotary_dim", "index_head_dim")),
    (1, ("n_group", "topk_group", "n_groups", "mamba_n_groups", "n_shared_experts", "first_k_dense_replace",
         "num_expert_group", "num_shared_experts")),
    (2, ("index_n_heads",)),
    (4, ("linear_num_value_heads",)),
    (256, ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length")),
    (64, ("sliding_window", "attention_chunk_size", "mamba_chunk_size", "chunk_size")),
)


def _dbrx(config) -> None:
    # DbrxAttention reads attn_config.rope_theta, which the default attention config lacks (a real
    # checkpoint's config.json has it); the value is the model's own
    config.attn_config.rope_theta = config.rope_parameters["rope_theta"]
    config.attn_config.clip_qkv = 8.0  # its attention clamps q/k/v to ±clip_qkv and fails on the default None


def _per_layer_rope(config) -> None:
    # the rotary embedding looks its parameters up per layer type, and the default config holds none
    # (real checkpoints list one entry per type)
    config.rope_parameters = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in set(config.layer_types)}


# Where a generic tiny config cannot run, each with why: a dict of fields set on the config of that
# model type (top level or nested) after shrinking, or a function that fixes it.
OVERRIDES: dict[str, dict | Callable[[Any], None]] = {
    # the default layer_types are all Mamba, and transformers cannot build the attention mask without
    # an attention layer; real Granite 4 hybrids mix both
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2},
    # the default config has no layer_types at all; LFM2 checkpoints alternate short convolutions and attention
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "dbrx": _dbrx,  # (reasons in the functions above)
    # the default config stores attention_hidden_size = its 4096 hidden size (None -> hidden_size at init, so
    # shrinking hidden_size leaves it): the cached (generation) path then sizes its state 4096 wide
    "rwkv": {"attention_hidden_size": HIDDEN},
    "cohere_compass_text": _per_layer_rope,
    # every hybrid layer's shared transformer block is tied to the first one's, and transformers refuses a
    # tie with nothing to tie into: two hybrid layers (Zamba checkpoints have 13), a Mamba layer between
    # (and its attention reads the concatenation [hidden, embeddings]: a width the config derives once, from
    # the default hidden size)
    "zamba": {"layers_block_type": ["hybrid", "linear_attention", "hybrid"], "num_hidden_layers": 3,
              "attention_hidden_size": 2 * HIDDEN},
    "zamba2": {"attention_hidden_size": 2 * HIDDEN, "num_query_groups": KV_HEADS},  # the same derived widths
    # the model width and depth are embedding_dim and num_blocks here (hidden_size / num_hidden_layers are copies)
    # (qk_dim_factor 0.5 gives 32-wide keys, which the config rounds to 64 for its cache and the layers do not)
    "xlstm": {"embedding_dim": HIDDEN, "num_blocks": 2, "qk_dim_factor": 1.0},
    # the 2 kept layers would be all recurrent, and generation cannot build an attention mask from a cache
    # of linear layers only; real checkpoints mix attention in
    "bamba": {"attn_layer_indices": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    # the map from image-token names to ids comes with the tokenizer and is None by default; the model
    # looks the image token (and Emu3 its end-of-line token) up in it at construction
    "chameleon": {"vocabulary_map": {"<image>": VOCAB - 2}},
    "emu3": {"vocabulary_map": {"<image>": VOCAB - 2, "<|extra_200|>": VOCAB - 3}},
    # which layers are dense and which sparse is listed per layer and None by default (no rule derives it)
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    # the 3-D (multimodal RoPE) positions look up the vision-start token, which these thinker configs lack
    # (the full Omni checkpoints' thinker_config has it: 151652, moved into the tiny vocabulary below)
    "qwen2_5_omni_thinker": {"vision_start_token_id": 151652},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 151652},
    # ERNIE's multimodal RoPE sections are (height, width, time), height = width (Qwen's are (time, height, width))
    "ernie4_5_vl_moe_text": lambda config: config.rope_parameters.update(mrope_section=[3, 3, 2]),
    # the indexed-attention (QSA) layers' indexer sizes are None by default, and a real checkpoint sets them
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    # the decoder builds a sliding-window mask whatever its layer types are, and the window is None by default
    "step3p7": lambda config: setattr(config.text_config, "sliding_window", 64),
    # the deep-stack projectors (vision layer -> LLM layer) and the Q-Former's query / window sides are set by
    # the checkpoint and None by default, and the spatial sampling targets LLM layers 12-21: one projector pair,
    # the tiny model's last layer
    "granite4_vision": {"deepstack_layer_map": [(0, 0)], "spatial_target_layers": [1, 1, 1, 1],
                        "downsample_rate": "2/4"},
}
# None means "absent" here, not "use a default": left as it is.
KEEP_NONE = ("sliding_window", "attention_chunk_size", "moe_latent_size", "q_lora_rank", "rotary_dim")
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers",
                "encoder_layers")
# Mamba-2 mixers need heads × head dim = expand × hidden size.
MAMBA_HEADS = ("mamba_n_heads", "mamba_num_heads")


def _sub_configs(config) -> list:
    from transformers import PretrainedConfig

    return [v for v in vars(config).values() if isinstance(v, PretrainedConfig)]


def _pick_layers(columns: list[list], n_min: int) -> list[int]:
    """Indices of the layers to keep: the first layer of each distinct combination of the per-layer
    values (so that a hybrid keeps every layer type), up to MAX_LAYERS, then more to reach n_min."""
    n_old = len(columns[0]) if columns else n_min
    seen, keep = set(), []
    for i in range(n_old):
        key = json.dumps([c[i] for c in columns], sort_keys=True, default=str)
        if key not in seen and len(keep) < MAX_LAYERS:
            seen.add(key)
            keep.append(i)
    for i in range(n_old):
        if len(keep) >= n_min:
            break
        if i not in keep:
            keep.append(i)
    return sorted(keep)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def shrink(config, layers: int = 2) -> None:
    """Set the size fields that exist on `config` and every nested config to tiny values, in place.

    Reads and writes the config's own attribute dict: a property (derived from other fields) is left
    to compute itself, and a per-layer attribute (transformers' heterogeneous configs) is set in
    every layer's override too."""
    store = vars(config)
    old_layers = next((store[f] for f in LAYER_FIELDS if _is_int(store.get(f))), None)
    hetero = store.get("_heterogeneity_spec")
    overrides = getattr(hetero, "per_layer_overrides", None) if hetero is not None else None
    per_layer = {k: v for k, v in store.items()
                 if old_layers and old_layers > 1 and isinstance(v, (list, tuple, str)) and len(v) == old_layers
                 and not k.startswith("_") and k != "architectures"}
    columns = [list(v) for v in per_layer.values()]
    if isinstance(overrides, dict) and old_layers:
        columns.append([overrides.get(i, {}) for i in range(old_layers)])
    keep = _pick_layers(columns, layers) if old_layers else []
    n = len(keep) if old_layers else layers

    def tiny(name: str, value):
        for target, names in FIELDS:
            if name in names and (_is_int(value) or (value is None and name not in KEEP_NONE)):
                return target
        return value

    for name, value in list(store.items()):
        store[name] = tiny(name, value)
    for name in LAYER_FIELDS:
        if _is_int(store.get(name)):
            store[name] = n
    for k, v in per_layer.items():
        cut = [v[i] for i in keep]
        store[k] = "".join(cut) if isinstance(v, str) else type(v)(cut)
    if isinstance(overrides, dict) and old_layers:
        hetero.per_layer_overrides = {j: {k: tiny(k, x) for k, x in overrides[i].items()}
                                      for j, i in enumerate(keep) if i in overrides}
    if old_layers and _is_int(store.get("num_kv_shared_layers")):  # a count of the last layers (KV sharing)
        first = old_layers - store["num_kv_shared_layers"]
        store["num_kv_shared_layers"] = sum(1 for i in keep if i >= first)
    for k, v in list(store.items()):  # lists of layer indices: the kept layers, renumbered
        if old_layers and k not in per_layer and "layer" in k and isinstance(v, list) and v and all(map(_is_int, v)):
            store[k] = [j for j, i in enumerate(keep) if i in v]
    expand = store.get("mamba_expand") or store.get("expand")
    if _is_int(expand):  # Mamba-2 mixers need heads × head dim = expand × hidden size
        for name in MAMBA_HEADS:
            if name in store:
                store[name] = expand * HIDDEN // HEAD_DIM
        if _is_int(store.get("num_heads")) and "n_groups" in store:  # Mamba-2 configs call them num_heads
            store["num_heads"] = expand * HIDDEN // HEAD_DIM
        if "mamba_d_ssm" in store:  # Falcon-H1: the mixer's inner width
            store["mamba_d_ssm"] = expand * HIDDEN
    if _is_int(store.get("kv_lora_rank")):  # MLA: one key/value head per query head, rotary part = head_dim
        store["num_key_value_heads"] = HEADS if "num_key_value_heads" in store else None
        if hetero is not None and isinstance(getattr(hetero, "per_layer_overrides", None), dict):
            for layer in hetero.per_layer_overrides.values():  # dots3's sliding-window layers override the heads
                if "num_key_value_heads" in layer:
                    layer["num_key_value_heads"] = layer.get("num_attention_heads", HEADS)
        if "head_dim" in store and _is_int(store.get("qk_rope_head_dim")):
            # (the rotary embedding's width is head_dim × partial_rotary_factor: Mistral 4 rotates half of it)
            rope = store.get("rope_parameters") if isinstance(store.get("rope_parameters"), dict) else {}
            factor = rope.get("partial_rotary_factor", store.get("partial_rotary_factor", 1.0)) or 1.0
            store["head_dim"] = int(store["qk_rope_head_dim"] / factor)
    rope = store.get("rope_parameters")
    if isinstance(rope, dict):  # multimodal RoPE splits the rotary half-dimension into (time, height, width)
        factor = rope.get("partial_rotary_factor", store.get("partial_rotary_factor", 1.0)) or 1.0
        half = int(HEAD_DIM * factor) // 2
        rope["mrope_section"] = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    fix = OVERRIDES.get(store.get("model_type", getattr(config, "model_type", "")), {})
    if callable(fix):
        fix(config)
    else:
        store.update(fix)
    for name, value in list(store.items()):  # special token ids must lie inside the tiny vocabulary
        if name.startswith("_") or not ("token_id" in name or "token_index" in name):
            continue
        if _is_int(value) and value >= VOCAB:
            store[name] = VOCAB - 1 - (value % 16)
        elif isinstance(value, list) and any(_is_int(x) and x >= VOCAB for x in value):
            store[name] = [VOCAB - 1 - (x % 16) if _is_int(x) and x >= VOCAB else x for x in value]
    for sub in _sub_configs(config):
        kind = type(sub).__name__.lower()  # a vision or audio tower gets one layer (Granite4VisionTextConfig is text)
        shrink(sub, layers=1 if ("vision" in kind or "audio" in kind) and "text" not in kind else layers)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    shrink(config)
    return config


def encoder_only(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def reinit(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every matrix ~ N(0, 0.15²), every bias ~ N(0, 0.05²), every other parameter (norm gains, SSM
    decays) its init plus N(0, 0.1²): HF's 0.02 init makes a tiny model nearly constant, and unit
    norm gains would hide what a post-writer norm does to the projection."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            if p.ndim >= 2:
                p.copy_(noise * 0.15)
            elif name.endswith("bias"):
                p.copy_(noise * 0.05)
            else:
                p.add_(noise * 0.1)
    return model


@dataclass
class Row:
    model_type: str
    mapping: str
    instantiated: str = "-"
    table: str = "no"
    discovered: str = "-"
    bound: float | None = None
    kinds: str = ""
    why: str = ""
    seconds: float = 0.0


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"


def check(model_type: str, mapping: str, seed: int = 0) -> Row:
    import transformers as tf

    row = Row(model_type, mapping)
    t0 = time.perf_counter()
    try:
        spec_for(model_type)
        row.table = "yes"
    except UnsupportedArchitectureError:
        row.table = "no"
    try:
        config = tiny_config(model_type)
    except Exception as err:  # noqa: BLE001 - the row reports it
        row.instantiated, row.why = "no", f"config: {_one_line(err)}"
        return row
    if getattr(config, "is_encoder_decoder", False) or getattr(getattr(config, "text_config", None),
                                                                 "is_encoder_decoder", False):
        row.instantiated, row.why = "skip", "encoder-decoder"
        return row
    if encoder_only(model_type):
        row.instantiated, row.why = "skip", "encoder-only (it has a masked-LM head)"
        return row
    auto = tf.AutoModelForCausalLM if mapping == "causal-lm" else tf.AutoModelForImageTextToText
    model = None
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS)
    try:
        try:
            torch.manual_seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto.from_config(config)
            model = reinit(model.float(), seed).eval().requires_grad_(False)
            row.instantiated = "yes"
        except _Timeout:
            row.instantiated, row.why = "no", f"instantiation took over {SECONDS} s"
            return row
        except Exception as err:  # noqa: BLE001 - the row reports it
            row.instantiated, row.why = "no", _one_line(err)
            return row
        try:
            found = discover(model, seed=seed)
            row.discovered = "yes"
            row.kinds = ",".join(sorted(set(found.layer_kinds))) + (" post-norm" if found.post_writer_norm else "")
            row.bound = projection_bound(model, found, seed=seed + 1)
        except _Timeout:
            row.discovered, row.why = "no", f"discovery took over {SECONDS} s"
        except Exception as err:  # noqa: BLE001 - the row reports it
            row.discovered, row.why = "no", _one_line(err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        del model
        gc.collect()
        row.seconds = time.perf_counter() - t0
    return row


def main() -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )
    import transformers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--types", help="comma-separated model types (default: every type of both mappings)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    wanted = set(args.types.split(",")) if args.types else None
    jobs = [(t, "causal-lm") for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]
    jobs += [(t, "image-text-to-text") for t in sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)]
    jobs = [j for j in jobs if wanted is None or j[0] in wanted]
    torch.set_num_threads(1)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # every tiny config trips a size warning or two
    try:
        rows = _run(jobs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


def _run(jobs: list[tuple[str, str]]) -> list[Row]:
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    header = (f"{'model type':<28} {'mapping':<18} {'inst':<5} {'table':<5} {'disc':<5} {'bound':>8} {'s':>5}  "
              "kinds / why not")
    print(header)
    print("-" * len(header))
    rows = []
    t0 = time.perf_counter()
    for model_type, mapping in jobs:
        row = check(model_type, mapping)
        rows.append(row)
        bound = "-" if row.bound is None else f"{row.bound:.1e}"
        print(f"{row.model_type:<28} {row.mapping:<18} {row.instantiated:<5} {row.table:<5} {row.discovered:<5} "
              f"{bound:>8} {row.seconds:>5.1f}  {row.kinds}{'  ' if row.kinds and row.why else ''}{row.why[:200]}",
              flush=True)
    print(f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    for mapping in ("causal-lm", "image-text-to-text"):
        ms = [r for r in rows if r.mapping == mapping]
        if not ms:
            continue
        skipped = [r for r in ms if r.instantiated == "skip"]
        decoders = [r for r in ms if r.instantiated != "skip"]
        inst = [r for r in decoders if r.instantiated == "yes"]
        table = [r for r in decoders if r.table == "yes"]
        disc = [r for r in decoders if r.discovered == "yes"]
        exact = [r for r in disc if r.bound is not None and r.bound <= 1e-4]
        post = [r for r in disc if r.kinds.endswith("post-norm")]

        def pct(xs):
            return f"{len(xs)}/{len(decoders)} ({100 * len(xs) / max(len(decoders), 1):.0f} %)"

        print(f"{mapping}: {len(ms)} types, {len(skipped)} skipped (encoder-decoder or encoder-only), "
              f"{len(decoders)} decoder types: instantiated {pct(inst)}, in today's table {pct(table)}, "
              f"discovered {pct(disc)}, exact (bound <= 1e-4) {pct(exact)}, with post-writer norms (bound "
              f"reported) {pct(post)}")
    return rows


if __name__ == "__main__":
    main()
