#!/usr/bin/env python3
"""Fail on any module import cycle in any crate of the workspace.

A cycle (a.rs uses b.rs, which uses a.rs) means neither module owns what they share: the
fix is to move the shared type to the module that owns it (see shared/STYLE.md, "No
module cycles"). rustc accepts cycles, so this is checked here, in CI (.ci/run).

How it reads the code (text only, no compiler; the standard library only, so CI needs
nothing installed):
- Every crate root of every workspace member (src/lib.rs, src/main.rs, src/bin/*.rs,
  tests/*.rs, examples/*.rs, benches/*.rs) is followed through its `mod x;` declarations,
  file and inline ones, giving the module tree.
- A module's edges are the paths it names with `crate::`, `super::` or `self::`, in `use`
  trees and in code alike, each resolved to the deepest module it names. A path that
  ends at an item an ancestor re-exports (`pub use crate::m::Item`) goes to `m`.
- Containment is not an edge: a parent naming its child, or a child naming an ancestor
  (`use super::*` in a test module), is how modules nest, not a dependency between
  peers. The test module inside a file counts as that file.
- Cycles are the strongly connected components of what is left.

Usage: scripts/check_module_cycles.py [CRATE_DIR ...]   (default: every workspace member)
Exit 0 when there is no cycle, 1 otherwise; each cycle is printed with one file:line per
edge, so it can be read without running anything else.

Known cycles, not yet broken, are listed in scripts/module_cycles.allow (one line each, as
this script prints them after "cycle in "). They are still printed, but only a new cycle,
or a listed one that no longer exists (so the list only shrinks), fails the check.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Module:
    path: tuple[str, ...]  # () is the crate root
    file: Path
    # paths named in this module: (segments after the anchor, resolved start, line)
    refs: list[tuple[tuple[str, ...], tuple[str, ...], int]] = field(default_factory=list)
    # `pub use` re-exports: item name -> full path of what it names
    reexports: dict[str, tuple[str, ...]] = field(default_factory=dict)


def strip(src: str) -> str:
    """Blank out comments, strings and char literals, keeping every newline (so line
    numbers hold) and every brace outside them (so nesting holds)."""
    out: list[str] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(src, i)) and (i == 0 or not _ident(src[i - 1])):
            end = src.find('"' + m.group(1), m.end())
            j = n if end < 0 else end + 1 + len(m.group(1))
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append(re.sub(r"[^\n]", " ", src[i : j + 1]))
            i = j + 1
        elif c == "'" and (m := re.compile(r"'(\\.[^']*|[^\\'])'").match(src, i)):
            out.append(" " * (m.end() - i))
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _ident(c: str) -> bool:
    return c.isalnum() or c == "_"


MOD_DECL = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?mod\s+(r#)?([A-Za-z_][A-Za-z0-9_]*)\s*([;{])")
USE_ITEM = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+([^;]*);")
PATH = re.compile(r"(?<![A-Za-z0-9_:])((?:crate|super|self)(?:\s*::\s*[A-Za-z_][A-Za-z0-9_]*)+)")


def expand_use(tree: str) -> list[list[str]]:
    """`a::{b, c::{d as e}, f::*}` -> [[a,b], [a,c,d], [a,f,*]] (renames dropped)."""
    tree = re.sub(r"\s+", " ", tree).strip()

    def parse(s: str, i: int) -> tuple[list[list[str]], int]:
        paths: list[list[str]] = []
        prefix: list[str] = []
        tok = ""
        while i < len(s):
            c = s[i]
            if c == "{":
                inner, i = parse(s, i + 1)
                paths += [prefix + p for p in inner]
                prefix, tok = [], ""
                continue
            if c == "}":
                if tok or prefix:
                    paths.append(prefix + ([tok] if tok else []))
                return paths, i + 1
            if c == ",":
                if tok or prefix:
                    paths.append(prefix + ([tok] if tok else []))
                prefix, tok = [], ""
            elif s.startswith("::", i):
                prefix.append(tok)
                tok = ""
                i += 2
                continue
            elif s.startswith(" as ", i):
                j = i + 4
                while j < len(s) and s[j] not in ",}":
                    j += 1
                i = j
                continue
            elif c != " ":
                tok += c
            i += 1
        if tok or prefix:
            paths.append(prefix + ([tok] if tok else []))
        return paths, i

    return [[seg.strip() for seg in p if seg.strip()] for p in parse(tree, 0)[0]]


class Crate:
    def __init__(self, root_file: Path):
        self.root_file = root_file
        self.modules: dict[tuple[str, ...], Module] = {}
        self._load(root_file, (), True)

    def _load(self, file: Path, path: tuple[str, ...], owns_dir: bool) -> None:
        text = strip(file.read_text())
        # the directory its child module files live in
        child_dir = file.parent if owns_dir else file.parent / file.stem
        self._scan(text, file, path, child_dir, 0, len(text))

    def _scan(self, text: str, file: Path, path: tuple[str, ...], child_dir: Path, lo: int, hi: int) -> None:
        mod = self.modules.setdefault(path, Module(path, file))
        i = lo
        inline: list[tuple[int, int]] = []  # (start, end) of inline module bodies
        while True:
            m = MOD_DECL.search(text, i, hi)
            if not m:
                break
            name = m.group(2)
            if m.group(3) == ";":
                for cand, owns in ((child_dir / f"{name}.rs", False), (child_dir / name / "mod.rs", True)):
                    if cand.exists():
                        self._load(cand, path + (name,), owns)
                        break
                i = m.end()
            else:
                end = matching_brace(text, m.end() - 1)
                # an inline `mod tests { use super::*; }` is part of its file: same module
                sub = path if name == "tests" else path + (name,)
                if sub != path:
                    self._scan(text, file, sub, child_dir / name, m.end(), end)
                    inline.append((m.end(), end))
                i = end if sub != path else m.end()
        # references outside inline child modules
        pieces, pos = [], lo
        for s, e in inline:
            pieces.append((pos, s))
            pos = e
        pieces.append((pos, hi))
        for s, e in pieces:
            self._refs(text, mod, s, e)

    def _refs(self, text: str, mod: Module, lo: int, hi: int) -> None:
        seg = text[lo:hi]
        line_at = lambda off: text.count("\n", 0, lo + off) + 1  # noqa: E731
        for m in USE_ITEM.finditer(seg):
            for p in expand_use(m.group(2)):
                if p and p[0] in ("crate", "super", "self"):
                    mod.refs.append((tuple(p), mod.path, line_at(m.start())))
                    if m.group(1) and p[-1] not in ("*", "self"):
                        mod.reexports[p[-1]] = resolve_anchor(tuple(p), mod.path) or ()
        # paths in code (outside use items, already counted)
        code = USE_ITEM.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), seg)
        for m in PATH.finditer(code):
            p = tuple(s.strip() for s in m.group(1).split("::"))
            mod.refs.append((p, mod.path, line_at(m.start())))

    def target(self, p: tuple[str, ...], frm: tuple[str, ...]) -> tuple[str, ...] | None:
        """The deepest module path `p` (named in module `frm`) reaches."""
        full = resolve_anchor(p, frm)
        if full is None:
            return None
        cur: tuple[str, ...] = ()
        for s in full:
            if cur + (s,) in self.modules:
                cur = cur + (s,)
            else:
                # an item re-exported by the module reached so far: follow it once
                re_path = self.modules[cur].reexports.get(s)
                if re_path:
                    return self.target(("crate",) + re_path, ())
                break
        return cur

    def edges(self) -> dict[tuple[str, ...], dict[tuple[str, ...], tuple[Path, int]]]:
        out: dict[tuple[str, ...], dict[tuple[str, ...], tuple[Path, int]]] = {m: {} for m in self.modules}
        for mod in self.modules.values():
            for p, frm, line in mod.refs:
                t = self.target(p, frm)
                if t is None or t == frm or is_prefix(t, frm) or is_prefix(frm, t):
                    continue
                out[frm].setdefault(t, (mod.file, line))
        return out


def resolve_anchor(p: tuple[str, ...], frm: tuple[str, ...]) -> tuple[str, ...] | None:
    """`crate::a::b` / `super::a` / `self::a` named in `frm` -> path from the crate root."""
    if not p:
        return None
    if p[0] == "crate":
        return p[1:]
    base = list(frm)
    rest = list(p)
    if rest[0] == "self":
        rest = rest[1:]
    while rest and rest[0] == "super":
        if not base:
            return None
        base.pop()
        rest = rest[1:]
    return tuple(base + rest)


def is_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def sccs(graph: dict[tuple[str, ...], dict[tuple[str, ...], tuple[Path, int]]]) -> list[list[tuple[str, ...]]]:
    """Tarjan's algorithm; only components with more than one module."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    on: set = set()
    out: list[list[tuple[str, ...]]] = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def crate_roots(member: Path) -> list[Path]:
    roots = [member / "src" / f for f in ("lib.rs", "main.rs") if (member / "src" / f).exists()]
    for sub in ("src/bin", "tests", "examples", "benches"):
        d = member / sub
        if d.is_dir():
            roots += sorted(d.glob("*.rs"))
            roots += sorted(p for p in d.glob("*/main.rs"))
    return roots


def members() -> list[Path]:
    ws = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    return [ROOT / m for m in ws]


def name(p: tuple[str, ...]) -> str:
    return "crate" if not p else "::".join(p)


ALLOW = ROOT / "scripts" / "module_cycles.allow"


def allowed() -> set[str]:
    if not ALLOW.exists():
        return set()
    lines = (ln.split("#", 1)[0].strip() for ln in ALLOW.read_text().splitlines())
    return {ln for ln in lines if ln}


def main(argv: list[str]) -> int:
    dirs = [Path(a).resolve() for a in argv] or members()
    known = allowed()
    seen: set[str] = set()
    found = 0
    crates = 0
    for member in dirs:
        for root in crate_roots(member):
            crates += 1
            crate = Crate(root)
            graph = crate.edges()
            for comp in sccs(graph):
                where = root.relative_to(ROOT)
                what = f"{where}: {' <-> '.join(name(m) for m in comp)}"
                if what in known:
                    seen.add(what)
                    print(f"known cycle (scripts/module_cycles.allow) in {what}")
                else:
                    found += 1
                    print(f"cycle in {what}")
                members_set = set(comp)
                for a in comp:
                    for b, (file, line) in sorted(graph[a].items()):
                        if b in members_set:
                            print(f"  {file.relative_to(ROOT)}:{line}: {name(a)} -> {name(b)}")
    stale = sorted(known - seen) if not argv else []
    for what in stale:
        print(f"gone, remove it from scripts/module_cycles.allow: {what}")
    if found or stale:
        print(f"module cycles: {found} new in {crates} crate roots, {len(seen)} known")
        return 1
    print(f"module cycles: none new in {crates} crate roots, {len(seen)} known")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
