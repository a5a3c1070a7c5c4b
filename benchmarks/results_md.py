"""Rewrite one section of benchmarks/RESULTS.md: the text between ``<!-- begin NAME -->`` and
``<!-- end NAME -->``. Nothing else in RESULTS.md changes, and the file is replaced atomically
(a temporary file in the same folder, then ``os.replace``).

A benchmark script that owns a section takes ``--write-results``: it calls :func:`check_write` before
any work (the section must exist, and a partial run, one that does not cover everything the section
holds, is refused) and :func:`write_section` at the end with the text :func:`section_text` builds
(the command, the date, the machine line of :func:`machine_line`, then its tables).

    python benchmarks/results_md.py NAME FILE     # the section NAME := FILE's text ("-" = stdin)
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- begin {re.escape(name)} -->\n).*?(<!-- end {re.escape(name)} -->)", re.S)


def _check(name: str, text: str, path: Path) -> None:
    if len(_pattern(name).findall(text)) != 1:
        raise SystemExit(f"error: {path} has no single section {name!r} (<!-- begin {name} --> ... <!-- end {name} -->)")


def replace_section(name: str, body: str, path: Path | None = None) -> None:
    """Replace the text between the NAME markers of `path` (default RESULTS.md) with `body`, atomically;
    a missing section is an error."""
    path = Path(path or RESULTS)
    text = path.read_text("utf-8")
    _check(name, text, path)
    new = _pattern(name).sub(lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), text)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(new)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def sections(path: Path | None = None) -> list[str]:
    return re.findall(r"<!-- begin ([\w.-]+) -->", Path(path or RESULTS).read_text("utf-8"))


def check_write(name: str, partial: list[str], path: Path | None = None) -> None:
    """Before a benchmark runs with --write-results: its section `name` must exist in `path`, and
    `partial` (why this run does not cover the section's full set, one reason each) must be empty,
    so that a partial run never overwrites the full table."""
    path = Path(path or RESULTS)
    _check(name, path.read_text("utf-8"), path)
    if partial:
        raise SystemExit(f"error: --write-results replaces the whole {name!r} section of {path.name}, and this run "
                         f"covers only part of it ({'; '.join(partial)}). Run the full set, or leave out "
                         "--write-results (the tables are printed either way).")


def write_section(name: str, body: str, path: Path | None = None) -> None:
    """--write-results at the end of a run: the section `name` := `body`; says where it wrote."""
    path = Path(path or RESULTS)
    replace_section(name, body, path)
    print(f"wrote the {name!r} section of {path}")


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as the section's "Regenerate:" line shows it."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]])


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text("utf-8").splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine_line(device: str = "cpu", dtype: str | None = None) -> str:
    """The machine a section names: CPU model and core count, RAM, the GPU where `device` is CUDA
    ("auto": CUDA where there is one), Python, torch and transformers versions, and `dtype`."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        parts[0] += f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        parts.append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB)")
    parts += [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        parts.append("no transformers")
    if dtype:
        parts.append(str(dtype).replace("torch.", ""))
    return ", ".join(parts)


def paragraphs(lines: list[str]) -> list[str]:
    """Printed lines as section blocks: split at blank lines; a block of table rows (``|`` …) stays a
    table, any other block becomes a bullet list, one bullet a line."""
    blocks, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line.rstrip())
            continue
        if block:
            blocks.append("\n".join(block if block[0].startswith("|") else (f"- {b}" for b in block)))
        block = []
    return blocks


def section_text(what: str, *blocks: str, device: str = "cpu", dtype: str | None = None,
                 argv: list[str] | None = None) -> str:
    """A section as a script writes it: ``Regenerate: `COMMAND` (DATE)``, the machine line, `what`
    the run measured, then each block (tables, summary lines) as a paragraph of its own."""
    head = (f"Regenerate: `{command_line(argv)}` ({time.strftime('%Y-%m-%d')}). Machine: "
            f"{machine_line(device, dtype)}. {what.strip()}")
    return "\n\n".join([head, *(b.strip("\n") for b in blocks if b and b.strip())]) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python benchmarks/results_md.py NAME FILE  (sections: {', '.join(sections())})")
    source = sys.stdin.read() if sys.argv[2] == "-" else Path(sys.argv[2]).read_text("utf-8")
    replace_section(sys.argv[1], source)
