"""A stand-in for the optional lm-eval package (tests/evaluate/test_evaluate.py, tests/commands/test_cli.py)."""

from __future__ import annotations


def fake_lm_eval(monkeypatch) -> list:
    """lm_eval and lm_eval.models.huggingface.HFLM stand-ins (the package is optional and downloads
    its datasets); returns the list the calls are recorded in."""
    import sys
    import types

    calls = []

    class HFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls.append(("HFLM", pretrained, tokenizer, batch_size))

    def simple_evaluate(model, tasks, limit):
        calls.append(("simple_evaluate", model, list(tasks), limit))
        return {"results": {t: {"alias": t, "acc,none": 0.25, "acc_stderr,none": 0.01} for t in tasks}}

    root, models, hf = (types.ModuleType(n) for n in ("lm_eval", "lm_eval.models", "lm_eval.models.huggingface"))
    root.simple_evaluate, hf.HFLM, root.models, models.huggingface = simple_evaluate, HFLM, models, hf
    for name, module in (("lm_eval", root), ("lm_eval.models", models), ("lm_eval.models.huggingface", hf)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls
