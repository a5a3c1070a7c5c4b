"""Prompt sets: built-in lists, file/dataset loaders, deterministic splits, chat formatting."""

from .prompts import Split, builtin_path, dedupe, format_prompts, heldout_text, load_prompts, split_prompts

__all__ = ["Split", "builtin_path", "dedupe", "format_prompts", "heldout_text", "load_prompts", "split_prompts"]
