"""Rewrite one section of benchmarks/RESULTS.md: the text between ``<!-- begin NAME -->`` and
``<!-- end NAME -->``. A benchmark script that formats its own table calls
:func:`replace_section`; nothing else in RESULTS.md changes.

    python benchmarks/results_md.py NAME FILE     # the section NAME := FILE's text ("-" = stdin)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the text between the NAME markers of `path` with `body`; a missing section is an error."""
    text = path.read_text("utf-8")
    pattern = re.compile(rf"(<!-- begin {re.escape(name)} -->\n).*?(<!-- end {re.escape(name)} -->)", re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"error: {path} has no single section {name!r} (<!-- begin {name} --> ... <!-- end {name} -->)")
    new = pattern.sub(lambda m: m.group(1) + body.strip("\n") + "\n" + m.group(2), text)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, "utf-8")
    tmp.replace(path)


def sections(path: Path = RESULTS) -> list[str]:
    return re.findall(r"<!-- begin ([\w.-]+) -->", path.read_text("utf-8"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python benchmarks/results_md.py NAME FILE  (sections: {', '.join(sections())})")
    source = sys.stdin.read() if sys.argv[2] == "-" else Path(sys.argv[2]).read_text("utf-8")
    replace_section(sys.argv[1], source)
