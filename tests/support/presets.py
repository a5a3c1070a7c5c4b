"""Small sizes for running a preset end to end on a tiny random model (tests/test_presets.py, tests/test_cuda.py)."""

SMALL = {"data": {"n_train": 24, "n_val": 4, "n_test": 4},
         "evaluate": {"max_new_tokens": 3, "kl_tokens": 2, "perplexity": False},
         # a random model has no refusal direction to pass Arditi's filters: open them (still read, so still checked)
         "layers": {"kl_threshold": 1e9, "induce_threshold": -1e9}}
STUDY_FAST = {"n_trials": 2, "n_startup_trials": 1, "refusal_tokens": 3}
RDO_FAST = {"directions": {"rdo": {"max_steps": 6, "target_tokens": 3, "batch_size": 4, "effective_batch_size": 4}}}
