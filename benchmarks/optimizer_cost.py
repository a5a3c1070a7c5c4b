"""The cost of ONE optimizer trial, our design vs the audited design (same process, prompts, parameters).

Prints seconds per trial, peak extra memory, passes through the model, and
each design's refusal count and first-token KL (a consistency check: both score the same edit).

    python benchmarks/optimizer_cost.py                               # demo model, 32 + 32 val prompts
    python benchmarks/optimizer_cost.py --model /tmp/tiny-qwen --n-val 4 --n-train 8
    python benchmarks/optimizer_cost.py --device cuda --dtype bfloat16 --repeats 3 --json cost.json
    python benchmarks/optimizer_cost.py --n-val 32 --write-results    # also replace RESULTS.md's section

--write-results replaces the "optimizer-cost" section of benchmarks/RESULTS.md (results_md.py): the
demo model on the CPU, both designs as they are by default. Its GPU table ("optimizer-cost-gpu")
gathers the runs of several model shapes, which no single run covers: paste it with results_md.py.

Ours (optimize/trial.py ``Objective``): the edit is applied as activation hooks
(``excise.hook_form.ablated``), no weight is copied or written; KL from one batched forward pass per
batch at the first answer token against base log-probs computed ONCE per study (``Scorer.build``,
timed separately here); refusals by batched generation that stops each sequence once the marker
judge has decided (``evaluate.early.judge_batches``, in ``prune_chunks`` chunks; pruning is off
here so both designs do all the work).

Audited (the original OBLITERATUS trial loop): (a) clone the weight and bias of every writer the
trial edits with non-zero strength, for rollback; (b) edit them in place with ``excise()``;
(c) for each harmful val prompt, one at a time, greedy ``model.generate`` of the full
``--refusal-tokens`` budget (stopping only at EOS), decode, marker judge; (d) for each harmless val
prompt, one at a time, a plain forward pass (HF default: logits at every position) for the
first-token log-probs, against base log-probs recomputed in every trial with the unedited model
(before the edit) because that code had no once-per-study baseline (``--audited-base-once``
computes them once, outside the timing); (e) restore the weights from the clones. After every run
of either design the model is checked to be bit-identical to before (sha256 of every parameter
and buffer).

Time: time.perf_counter around the whole trial, after a warm-up forward pass and a short generation
(and after Scorer.build), median over ``--repeats`` runs whose order alternates. Memory: peak RSS
above the RSS at the start of the run, sampled every 2 ms by a background thread (psutil, else
/proc/self/statm), after freed heap memory is handed back to the OS; on CUDA also the peak of
torch.cuda.memory_allocated above its start. Passes: batched forward passes and generate calls,
and "model calls" = every call of the model's forward (prefills and decoding steps).

Setup as ``obliteratus optimize`` (optimize/strategy.py): preset ``optimized``, but with
``directions.contrast = "prompts"`` (the trial only needs the harmful-minus-harmless mean
differences; the refusal labelling is skipped). Only the validation prompts are scored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time

import torch

import results_md
from obliteratus.batching import Encoded

MIB = 2**20
SECTION = "optimizer-cost"  # of benchmarks/RESULTS.md


# --------------------------------------------------------------------------- measurement helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim, best effort), so
    each design's RSS increase is measured from the same clean start rather than from memory the
    allocator kept after the previous design."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rss_reader():
    """A function returning this process's resident set size in bytes (psutil, else /proc/self/statm)."""
    try:
        import psutil

        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * page

        return read


class PeakMemory:
    """Peak RSS above the RSS at entry, sampled every `interval` s by a background thread; on CUDA
    also the peak of torch.cuda.memory_allocated above its value at entry."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval, self.read = device, interval, _rss_reader()
        self.start = self.peak = 0
        self.cuda_extra: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self.start = self.peak = self.read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.cuda_extra = torch.cuda.max_memory_allocated() - self._cuda_start
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def extra(self) -> int:
        return self.peak - self.start


class CallCounter:
    """Counts calls of the model's forward (a prefill or one decoding step each)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.n += 1


def digest(model) -> str:
    """sha256 over every parameter and buffer (names and raw bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(name.encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --------------------------------------------------------------------------- the two designs

def ours(loaded, scorer, q, plan, ex) -> dict:
    """One trial as Objective.__call__ runs it (no pruning)."""
    from obliteratus.optimize.trial import trial_hooks

    times = {}
    with trial_hooks(loaded.adapter, q, plan, ex):
        t0 = time.perf_counter()
        kl = scorer.kl()
        t1 = time.perf_counter()
        rate, tokens = scorer.refusal(None)
        t2 = time.perf_counter()
    times.update(kl=t1 - t0, refusal=t2 - t1)
    n = len(scorer.harmful.ids)
    return {"refusals": round(rate * n), "kl_first": kl, "tokens_generated": tokens, "breakdown": times}


@torch.inference_mode()
def one_at_a_time_logprobs(model, encoded: Encoded, last_only: bool) -> list[torch.Tensor]:
    """First-answer-token log-probs [vocab] float64 per prompt, one unpadded prompt per forward pass."""
    device = next(model.parameters()).device
    rows = []
    for ids in encoded.ids:
        input_ids = torch.tensor([ids], device=device)
        kwargs = {"logits_to_keep": 1} if last_only else {}
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs).logits
        rows.append(torch.log_softmax(logits[0, -1].double(), -1).cpu())
    return rows


@torch.inference_mode()
def audited(loaded, harmful: Encoded, harmless: Encoded, q, plan, ex, tokens: int, base_once: list | None,
            last_only: bool) -> dict:
    """One trial of the audited design: clone the strong writers, excise in place, score one prompt
    at a time (full-budget generation, per-prompt forward passes, base recomputed), restore."""
    from transformers import GenerationConfig

    from obliteratus.evaluate.generate import eos_ids
    from obliteratus.evaluate.judges import markers
    from obliteratus.evaluate.kl import kl_rows
    from obliteratus.excise.apply import excise
    from obliteratus.excise.plan import resolve

    model, tokenizer, adapter = loaded.model, loaded.tokenizer, loaded.adapter
    device = next(model.parameters()).device
    times = {}
    t = time.perf_counter()
    base = base_once if base_once is not None else one_at_a_time_logprobs(model, harmless, last_only)
    times["base"] = time.perf_counter() - t

    t = time.perf_counter()
    edits, _ = resolve(adapter, q, ex.lam, plan, attention=ex.attention, mlp=ex.mlp, embeddings=ex.embeddings,
                       experts=ex.experts)
    backup = []  # (param, clone): the strong layers' weights (and biases)
    for e in edits:
        for param in (e.writer.weight, e.writer.bias):
            if param is not None:
                backup.append((param, param.detach().clone()))
    times["clone"] = time.perf_counter() - t
    cloned = sum(c.numel() * c.element_size() for _, c in backup)

    try:
        t = time.perf_counter()
        excise(adapter, q, ex, plan=plan)
        sync(device)
        times["excise"] = time.perf_counter() - t

        t = time.perf_counter()
        stop = eos_ids(model, tokenizer)
        config = GenerationConfig(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=sorted(stop) or None)
        refusals, generated = 0, 0
        for ids in harmful.ids:
            input_ids = torch.tensor([ids], device=device)
            seq = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=config)
            new = seq[0, len(ids):].tolist()
            for j, tok in enumerate(new):
                if tok in stop:
                    new = new[:j + 1]
                    break
            generated += len(new)
            refusals += markers.is_refusal(tokenizer.decode(new, skip_special_tokens=True))
        times["refusal"] = time.perf_counter() - t

        t = time.perf_counter()
        now = one_at_a_time_logprobs(model, harmless, last_only)
        kl = float(torch.stack([kl_rows(b, n) for b, n in zip(base, now)]).mean())
        times["kl"] = time.perf_counter() - t
    finally:
        t = time.perf_counter()
        for param, clone in backup:
            param.copy_(clone)
        del backup
        sync(device)
        times["restore"] = time.perf_counter() - t
    return {"refusals": refusals, "kl_first": kl, "tokens_generated": generated, "breakdown": times,
            "cloned_mib": cloned / MIB, "writers_edited": len(edits)}


# --------------------------------------------------------------------------- main

def fixed_params(n_layers: int, scope: str) -> dict:
    """A fixed, mid-range trial (Heretic's parameter names, L = n_layers - 1)."""
    last = n_layers - 1
    params = {"direction_scope": scope, "direction_index": 0.6 * last}
    for c, peak in (("attn", 1.0), ("mlp", 0.8)):
        params.update({f"{c}.max_weight": peak, f"{c}.max_weight_position": 0.8 * last, f"{c}.min_weight": 0.5,
                       f"{c}.min_weight_distance": max(1.0, 0.4 * last)})
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="alias, local HF directory, .gguf file or hub id")
    parser.add_argument("--n-val", type=int, default=32, help="val prompts per class scored by the trial")
    parser.add_argument("--n-train", type=int, default=128, help="train prompts per class (mean differences)")
    parser.add_argument("--refusal-tokens", type=int, default=32, help="generation budget per harmful prompt")
    parser.add_argument("--batch-size", type=int, default=None, help="our batch size (default: evaluate.batch_size)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each design (median reported); the order "
                                                               "alternates: ours first on even runs")
    parser.add_argument("--scope", default="global", choices=["global", "per_layer"], help="the trial's direction scope")
    parser.add_argument("--audited-base-once", action="store_true",
                        help="audited design: base log-probs once, outside the timing (default: per trial)")
    parser.add_argument("--audited-last-logits", action="store_true",
                        help="audited design: logits_to_keep=1 in its forward passes (default: HF's full logits)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers to this file")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also replace the {SECTION!r} section of benchmarks/RESULTS.md (the demo model on the "
                             "CPU, the default designs)")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, partial_run(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    import transformers

    from obliteratus.settings import resolve_settings
    from obliteratus.models.load import summon
    from obliteratus.optimize.base import mean_differences, study_options
    from obliteratus.optimize.trial import Scorer, plan_from_params
    from obliteratus.pipeline import Reporter, prepare_prompts, probe
    from obliteratus.presets import load_preset

    overrides = {"model": {"dtype": args.dtype, "device": args.device},
                 "data": {"n_train": args.n_train, "n_val": args.n_val},
                 "directions": {"contrast": "prompts"}}
    if args.batch_size:
        overrides["evaluate"] = {"batch_size": args.batch_size}
    settings = resolve_settings(load_preset("optimized"), overrides)
    options = study_options(settings, {"refusal_tokens": args.refusal_tokens, "prune": False})
    ex, ev = settings.excise, settings.evaluate

    t0 = time.perf_counter()
    loaded = summon(args.model, settings.model)
    t_summon = time.perf_counter() - t0
    model, adapter = loaded.model, loaded.adapter
    device, dtype = loaded.device, next(model.parameters()).dtype
    n_layers = adapter.n_layers
    t0 = time.perf_counter()
    prompts = prepare_prompts(loaded.tokenizer, settings)
    cache = probe(loaded, prompts, settings, Reporter())
    mean_diffs = mean_differences(loaded, cache, settings, prompts)  # [L+1, d]
    del cache
    t_setup = time.perf_counter() - t0
    harmful, harmless = prompts.encoded["harmful.val"], prompts.encoded["harmless.val"]
    params = fixed_params(n_layers, args.scope)
    q, plan = plan_from_params(params, mean_diffs, n_layers)

    # warm-up: one forward pass and a 2-token generation on one prompt
    ids = torch.tensor([harmless.ids[0]], device=device)
    model(input_ids=ids, logits_to_keep=1)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                   pad_token_id=loaded.tokenizer.pad_token_id)
    sync(device)

    # once per study: the Scorer's base log-probs (ours) -- not part of a trial
    t0 = time.perf_counter()
    scorer = Scorer.build(model, loaded.tokenizer, harmful, harmless, options, ev.batch_size)
    sync(device)
    t_scorer = time.perf_counter() - t0
    base_once, t_base_once = None, None
    if args.audited_base_once:
        t0 = time.perf_counter()
        base_once = one_at_a_time_logprobs(model, harmless, args.audited_last_logits)
        t_base_once = time.perf_counter() - t0

    before = digest(model)
    counter = CallCounter(model)
    runs = {"ours": [], "audited": []}
    order = []
    designs = {
        "ours": lambda: ours(loaded, scorer, q, plan, ex),
        "audited": lambda: audited(loaded, harmful, harmless, q, plan, ex, options.refusal_tokens, base_once,
                                   args.audited_last_logits),
    }
    for r in range(args.repeats):
        for name in (("ours", "audited") if r % 2 == 0 else ("audited", "ours")):
            order.append(name)
            counter.n = 0
            release_freed_memory()
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                out = designs[name]()
                sync(device)
                seconds = time.perf_counter() - start
            after = digest(model)
            assert after == before, f"{name}: the model's parameters changed during the trial"
            out.update(seconds=seconds, rss_extra_mib=mem.extra / MIB, model_calls=counter.n,
                       cuda_extra_mib=None if mem.cuda_extra is None else mem.cuda_extra / MIB, unchanged=True)
            runs[name].append(out)
            print(f"run {r + 1}/{args.repeats} {name}: {seconds:.2f} s", flush=True)
    counter.handle.remove()

    n_h, n_s = len(harmful.ids), len(harmless.ids)
    size = min(ev.batch_size, max(1, math.ceil(n_h / options.prune_chunks)))
    passes = {
        "ours": {"forward": math.ceil(n_s / ev.batch_size), "generate": math.ceil(n_h / size)},
        "audited": {"forward": n_s * (1 if args.audited_base_once else 2), "generate": n_h},
    }
    summary = {}
    for name, rs in runs.items():
        cuda = [x["cuda_extra_mib"] for x in rs if x["cuda_extra_mib"] is not None]
        summary[name] = {
            "seconds": statistics.median(x["seconds"] for x in rs),
            "rss_extra_mib": statistics.median(x["rss_extra_mib"] for x in rs),
            "cuda_extra_mib": statistics.median(cuda) if cuda else None,
            "forward_passes": passes[name]["forward"], "generate_calls": passes[name]["generate"],
            "model_calls": rs[0]["model_calls"], "tokens_generated": rs[0]["tokens_generated"],
            "refusals": rs[0]["refusals"], "kl_first": rs[0]["kl_first"],
            "breakdown_s": {k: statistics.median(x["breakdown"][k] for x in rs) for k in rs[0]["breakdown"]},
        }
    summary["audited"].update(cloned_mib=runs["audited"][0]["cloned_mib"],
                              writers_edited=runs["audited"][0]["writers_edited"])
    o, a = summary["ours"], summary["audited"]
    ratio_t = a["seconds"] / o["seconds"]
    ratio_m = a["rss_extra_mib"] / o["rss_extra_mib"] if o["rss_extra_mib"] > 0 else float("inf")
    ratio_c = (a["cuda_extra_mib"] / o["cuda_extra_mib"] if o["cuda_extra_mib"] else None) \
        if device.type == "cuda" else None

    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    report: list[str] = []  # the lines printed below, which --write-results writes too

    def say(text: str = "") -> None:
        print(text)
        report.append(text)

    say()
    say(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
        f"torch threads={torch.get_num_threads()} device={device}{gpu} load average={load}")
    say(f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
    say(f"model: {args.model} ({loaded.path})  {n_layers} layers, d={adapter.d_model}, {params_m:.1f}M params, "
        f"{str(dtype).replace('torch.', '')}; summon {t_summon:.1f} s, probe + mean differences {t_setup:.1f} s")
    say(f"prompts: train {len(prompts.harmful.train)} + {len(prompts.harmless.train)} (contrast 'prompts'); "
        f"trial scores val {n_h} harmful ({harmful.n_tokens} tokens) for refusal, {n_s} harmless "
        f"({harmless.n_tokens} tokens) for KL; refusal budget {options.refusal_tokens} tokens, marker judge; "
        f"our batch size {ev.batch_size}, generation chunks of {size}")
    say(f"trial params: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in params.items()})}")
    say(f"edit: {a['writers_edited']} writers with non-zero strength (audited clones {a['cloned_mib']:.1f} MiB)")
    say(f"order: {' -> '.join(order)}; {args.repeats} repeat(s), medians of time and peak memory; "
        "freed heap memory is returned to the OS (malloc_trim) before each run")
    say(f"once per study (not in the trial): our Scorer base log-probs {t_scorer:.2f} s (batched)"
        + (f"; audited base log-probs {t_base_once:.2f} s (--audited-base-once)" if base_once is not None else
           "; the audited design recomputes its base log-probs in every trial (no once-per-study baseline)"))
    say()
    mem_head = "peak extra RSS (MiB)" + (" | peak extra CUDA (MiB)" if device.type == "cuda" else "")
    say(f"| design | seconds per trial | {mem_head} | forward/generate passes | model calls | tokens generated "
        f"| refusals | KL first token |")
    say("|---|---|---|" + ("---|" if device.type == "cuda" else "") + "---|---|---|---|---|")
    labels = {"ours": "ours (hooks, batched, early stop, base once)",
              "audited": "audited (clone + excise + restore, one prompt at a time, full budget"
                         + (", base once)" if args.audited_base_once else ", base per trial)")}
    for name in ("ours", "audited"):
        s = summary[name]
        mem = f"{s['rss_extra_mib']:.1f}" + (f" | {s['cuda_extra_mib']:.1f}" if device.type == "cuda" else "")
        say(f"| {labels[name]} | {s['seconds']:.3f} | {mem} | {s['forward_passes']} fwd + {s['generate_calls']} gen "
            f"| {s['model_calls']} | {s['tokens_generated']} | {s['refusals']}/{n_h} | {s['kl_first']:.6f} |")
    say()
    for name in ("ours", "audited"):
        say(f"breakdown {name} (s): " + ", ".join(f"{k} {v:.3f}" for k, v in summary[name]["breakdown_s"].items()))
    say(f"model unchanged after every run of both designs: yes (sha256 {before[:16]}…)")
    say(f"consistency: refusals ours {o['refusals']}/{n_h} vs audited {a['refusals']}/{n_h}; KL first token ours "
        f"{o['kl_first']:.6f} vs audited {a['kl_first']:.6f} (|diff| {abs(o['kl_first'] - a['kl_first']):.2e}). "
        "Hooks equal the weight edit and early stop changes no verdict within the same token budget (a marker, "
        "once generated, stays); differences come only from batched left-padded vs unpadded numerics.")
    say(f"ratio (audited / ours): time {ratio_t:.1f}×, memory {ratio_m:.1f}×"
        + (f", CUDA memory {ratio_c:.1f}×" if ratio_c is not None else ""))

    if args.json:
        record = {
            "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "device": str(device) + gpu, "load_average": load, "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__},
            "model": {"source": args.model, "path": loaded.path, "n_layers": n_layers, "d_model": adapter.d_model,
                      "params_m": params_m, "dtype": str(dtype)},
            "prompts": {"n_train": len(prompts.harmful.train), "n_val_harmful": n_h, "n_val_harmless": n_s,
                        "tokens_harmful": harmful.n_tokens, "tokens_harmless": harmless.n_tokens},
            "refusal_tokens": options.refusal_tokens, "batch_size": ev.batch_size, "generation_chunk": size,
            "params": params, "order": order, "repeats": args.repeats,
            "audited_base_once": args.audited_base_once, "audited_last_logits": args.audited_last_logits,
            "scorer_build_s": t_scorer, "audited_base_once_s": t_base_once, "summon_s": t_summon, "setup_s": t_setup,
            "summary": summary, "runs": runs,
            "ratio": {"time": ratio_t, "rss": ratio_m, "cuda": ratio_c},
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.write_results:
        what = (f"One process, the {args.model} model, the same trial parameters and the same {n_h} harmful + {n_s} "
                f"harmless validation prompts for both designs, {options.refusal_tokens}-token refusal budget, marker "
                "judge; what each design does, the trial, the timings and the checks are below.")
        results_md.write_section(SECTION, results_md.section_text(what, *results_md.paragraphs(report),
                                                                  device=str(device), dtype=str(dtype)))


def partial_run(args) -> list[str]:
    """Why this run does not cover the optimizer-cost section (empty: it does)."""
    why = []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        why.append("a GPU run: the runs of several shapes on a GPU are the 'optimizer-cost-gpu' section; paste that "
                   "table with `python benchmarks/results_md.py optimizer-cost-gpu FILE` (--device cpu for this one)")
    if args.model != "demo":
        why.append(f"--model {args.model}: the section is the demo model's")
    if args.audited_base_once or args.audited_last_logits:
        why.append("--audited-base-once / --audited-last-logits: the section's audited design computes base log-probs "
                   "in every trial, with HF's full logits")
    if args.scope != "global":
        why.append(f"--scope {args.scope}: the section's trial edits one global direction")
    return why


if __name__ == "__main__":
    main()
