#!/usr/bin/env python3
"""Fail when a Rust function is longer than a limit (default 100 lines).

A function that long mixes concerns (issue 12 found a 171-line `run` and a 305-line
`Config::parse` in edge-netd); the limit keeps the next one from growing back. A
function's length is counted from the line of its `fn` (attributes and doc comments
not included) to the line of its closing brace, so the figure matches what an editor
shows. Test functions count too: a long test is as hard to read as long code.

Text only, the standard library only (CI installs nothing for it): comments, strings
and char literals are blanked before braces are matched.

Usage: scripts/check_fn_length.py [--max N] [--top K] PATH ...
Exit 0 when every function is within the limit, 1 otherwise (each offender printed as
file:line: fn name: N lines); --top K also lists the K longest.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_module_cycles import ROOT, matching_brace, strip  # noqa: E402

FN = re.compile(r"\bfn\s+([A-Za-z_][A-Za-z0-9_]*)")


def functions(file: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length in lines) of every fn with a body in `file`."""
    text = strip(file.read_text())
    out = []
    for m in FN.finditer(text):
        # the body starts at the first `{` after the signature; a `;` first means a
        # declaration without a body (trait method, extern)
        i = m.end()
        while i < len(text) and text[i] not in "{;":
            i += 1
        if i >= len(text) or text[i] == ";":
            continue
        end = matching_brace(text, i)
        first = text.count("\n", 0, m.start()) + 1
        last = text.count("\n", 0, end - 1) + 1
        out.append((m.group(1), first, last - first + 1))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--max", type=int, default=100)
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    found = []
    for p in args.paths:
        files = sorted(p.rglob("*.rs")) if p.is_dir() else [p]
        for f in files:
            if "target" in f.parts:
                continue
            for name, line, n in functions(f):
                found.append((n, f.resolve(), line, name))
    found.sort(key=lambda x: (-x[0], str(x[1]), x[2]))
    rel = lambda f: f.relative_to(ROOT) if f.is_relative_to(ROOT) else f  # noqa: E731
    over = [x for x in found if x[0] > args.max]
    for n, f, line, name in over:
        print(f"{rel(f)}:{line}: fn {name}: {n} lines (limit {args.max})")
    if args.top:
        print(f"longest {args.top}:")
        for n, f, line, name in found[: args.top]:
            print(f"  {n:4} {rel(f)}:{line}: fn {name}")
    paths = " ".join(str(p) for p in args.paths)
    if over:
        print(f"function length: {len(over)} over {args.max} lines in {paths}")
        return 1
    longest = found[0][0] if found else 0
    print(f"function length: {len(found)} functions in {paths}, none over {args.max} (longest {longest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
