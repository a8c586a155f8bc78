#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a cycle.

    scripts/modcycles.py [WORKSPACE_DIR]     (default: this repository)

For each crate under crates/ (each root: src/lib.rs, src/main.rs, src/bin/*.rs), the module tree
is found by following `mod` declarations (with `#[path]`, `mod.rs` and inline `mod x { }`). The
graph has one node per top-level module (`daemon`, `nbd_server`, `commands`, ...: the children of
the root, each with every file below it) and an edge A -> B for every path written in A's files
that resolves into B: `crate::B...`, `$crate::B`, `super::...` or `self::...` chains that climb to
the root, and the members of `crate::{B, C::d}` groups. Comments and string literals are skipped;
tests and `#[cfg(test)]` modules are not (a test that needs a cycle is a cycle).

A cycle is a strongly connected component of two or more modules. Each is printed with its edges
and, for each edge, the first place that makes it; then the count. Exit status 1 on any cycle,
so that a cycle, once removed, cannot come back unnoticed. Standard library only.
"""

import os
import re
import sys
from collections import namedtuple

Token = namedtuple("Token", "kind text line")  # kind: ident, punct, str

_IDENT = re.compile(r"r#[A-Za-z_][A-Za-z0-9_]*|[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][A-Za-z0-9_]*")
_RAW_STR = re.compile(r'b?r(#*)"')


def tokenize(text):
    """Rust source as identifiers, punctuation (`::` as one token) and string literals; comments
    dropped. Enough of the lexer to tell `crate::x` in code from the same text in a comment, a
    string or a char literal."""
    tokens, i, line, n = [], 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += text[i] == "\n"
                    i += 1
        elif _RAW_STR.match(text, i):
            m = _RAW_STR.match(text, i)
            close = '"' + m.group(1)
            end = text.find(close, m.end())
            end = n if end < 0 else end
            value = text[m.end():end]
            tokens.append(Token("str", value, line))
            line += value.count("\n")
            i = end + len(close)
        elif c == '"' or text.startswith('b"', i):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            value = text[i + (2 if c == "b" else 1):j]
            tokens.append(Token("str", value, line))
            line += value.count("\n")
            i = j + 1
        elif c == "'" or text.startswith("b'", i):
            j = i + (2 if c == "b" else 1)
            if j < n and text[j] == "\\":  # an escaped char literal: '\n', '\'', '\u{..}'
                j += 2
                while j < n and text[j] != "'":
                    j += 1
                i = j + 1
            elif j + 1 < n and text[j + 1] == "'":  # 'x'
                i = j + 2
            else:  # a lifetime or label: 'a
                m = _IDENT.match(text, j)
                i = m.end() if m else j
        elif _IDENT.match(text, i):
            m = _IDENT.match(text, i)
            tokens.append(Token("ident", m.group().removeprefix("r#"), line))
            i = m.end()
        elif _NUMBER.match(text, i):
            i = _NUMBER.match(text, i).end()
        elif text.startswith("::", i):
            tokens.append(Token("punct", "::", line))
            i += 2
        else:
            tokens.append(Token("punct", c, line))
            i += 1
    return tokens


def _path_at(tokens, i):
    """The path starting at tokens[i] (`crate`, `super` or `self`): its segments, the group that
    ends it (a list of item paths, possibly nested groups), and the index after it."""
    segs = [tokens[i].text]
    i += 1
    while i + 1 < len(tokens) and tokens[i].text == "::":
        nxt = tokens[i + 1]
        if nxt.kind == "ident":
            segs.append(nxt.text)
            i += 2
        elif nxt.text == "{":
            group, i = _group_at(tokens, i + 2)
            return segs, group, i
        else:  # `::*` or `::<`
            break
    return segs, None, i


def _group_at(tokens, i):
    """The items of a `{a, b::c, d::{e}}` group whose `{` is just before tokens[i]: each item is
    (segments, nested group or None)."""
    items = []
    segs = []
    while i < len(tokens):
        t = tokens[i]
        if t.text == "}":
            if segs:
                items.append((segs, None))
            return items, i + 1
        if t.text == ",":
            if segs:
                items.append((segs, None))
            segs = []
            i += 1
        elif t.text == "{":
            nested, i = _group_at(tokens, i + 1)
            items.append((segs, nested))
            segs = []
        elif t.kind == "ident" and (not segs or tokens[i - 1].text == "::"):
            segs.append(t.text)
            i += 1
        else:  # `::`, `*`, `as x`
            if t.text == "as":
                i += 2  # skip the alias: it names nothing in the tree
                continue
            i += 1
    return items, i


def _resolve(segs, here):
    """An absolute module path (list of names, [] for the crate root) for the leading
    `crate`/`super`/`self` segments of `segs` written in module `here`, and the rest;
    None when the path climbs above the root (not Rust)."""
    if segs[0] == "crate":
        return [], segs[1:]
    base, k = list(here), 0
    while k < len(segs) and segs[k] in ("super", "self"):
        if segs[k] == "super":
            if not base:
                return None
            base.pop()
        k += 1
    return base, segs[k:]


def _targets(base, rest, group):
    """The top-level modules an absolute path (base + rest, then maybe a group) names."""
    full = base + rest
    if full:
        return [full[0]]
    out = []
    for segs, nested in group or []:
        if segs and segs[0] not in ("self", "super", "crate"):
            out.append(segs[0])
        elif not segs and nested:  # `crate::{{a, b}}`: legal, odd
            out.extend(_targets([], [], nested))
    return out


def scan_file(path, module, on_path, on_mod):
    """Reads one file of module `module` (a list of names). Calls on_path(abs_top, line) for each
    top-level module a path names, and on_mod(name, path_attr, inline_parents) for each
    `mod name;` declaration (inline_parents: the inline modules it sits in)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        tokens = tokenize(f.read())
    inline = []  # (name, brace depth at which its block closes)
    depth, pending_path, i = 0, None, 0
    while i < len(tokens):
        t = tokens[i]
        here = module + [name for name, _ in inline]
        if t.text == "{":
            depth += 1
        elif t.text == "}":
            depth -= 1
            if inline and inline[-1][1] == depth:
                inline.pop()
        elif (t.text == "#" and i + 5 < len(tokens) and tokens[i + 1].text == "["
              and tokens[i + 2].text == "path" and tokens[i + 3].text == "="
              and tokens[i + 4].kind == "str"):
            pending_path = tokens[i + 4].text
            i += 5
            continue
        elif (t.text == "mod" and t.kind == "ident" and i + 2 < len(tokens)
              and tokens[i + 1].kind == "ident"):
            name, after = tokens[i + 1].text, tokens[i + 2].text
            if after == ";":
                on_mod(name, pending_path, [n for n, _ in inline])
            elif after == "{":
                inline.append((name, depth))
                depth += 1
                i += 3
                pending_path = None
                continue
            pending_path = None
        elif t.kind == "ident" and t.text in ("crate", "super", "self") and (
                i == 0 or tokens[i - 1].text != "::"):
            segs, group, end = _path_at(tokens, i)
            if len(segs) > 1 or group is not None:
                resolved = _resolve(segs, here)
                if resolved is not None:
                    for top in _targets(resolved[0], resolved[1], group):
                        on_path(top, t.line)
            i = end
            continue
        elif t.text == ";":
            pending_path = None
        i += 1


def _child_file(parent_file, parent_is_mod_rs, inline_parents, name, path_attr):
    """Where `mod name;` declared in parent_file (inside inline modules inline_parents) lives."""
    here = os.path.dirname(parent_file)
    if path_attr is not None:
        if inline_parents:
            here = os.path.join(here, *inline_parents)
        return os.path.normpath(os.path.join(here, path_attr))
    if not parent_is_mod_rs:
        here = os.path.join(here, os.path.splitext(os.path.basename(parent_file))[0])
    here = os.path.join(here, *inline_parents)
    flat = os.path.join(here, name + ".rs")
    return flat if os.path.exists(flat) else os.path.join(here, name, "mod.rs")


def crate_graph(root_file):
    """(modules, edges) for the crate rooted at root_file: modules, the top-level module names;
    edges, {(a, b): (file, line)} with the first place each edge is made."""
    modules, edges, seen = [], {}, set()
    # (file, module path, is it a mod-rs file: lib.rs, main.rs, mod.rs or a #[path] file)
    work = [(root_file, [], True)]
    while work:
        path, module, mod_rs = work.pop()
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)

        def on_mod(name, path_attr, inline_parents, path=path, module=module, mod_rs=mod_rs):
            child = _child_file(path, mod_rs, inline_parents, name, path_attr)
            child_module = module + inline_parents + [name]
            if len(child_module) == 1:
                modules.append(name)
            child_mod_rs = path_attr is not None or os.path.basename(child) == "mod.rs"
            work.append((child, child_module, child_mod_rs))

        def on_path(top, line, path=path, module=module):
            if module and top != module[0]:
                edges.setdefault((module[0], top), (path, line))

        scan_file(path, module, on_path, on_mod)
    edges = {e: where for e, where in edges.items() if e[1] in modules}
    return sorted(modules), edges


def cycles(modules, edges):
    """The strongly connected components of two or more modules (Tarjan), each sorted."""
    succ = {m: sorted(b for a, b in edges if a == m) for m in modules}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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

    sys.setrecursionlimit(max(1000, 4 * len(modules) + 100))
    for v in modules:
        if v not in index:
            visit(v)
    return sorted(out)


def crate_roots(workspace):
    """(label, root file) for every crate root under workspace/crates/*/src."""
    roots = []
    crates = os.path.join(workspace, "crates")
    for crate in sorted(os.listdir(crates)):
        src = os.path.join(crates, crate, "src")
        for name, label in (("lib.rs", crate), ("main.rs", f"{crate} (bin)")):
            if os.path.exists(os.path.join(src, name)):
                roots.append((label, os.path.join(src, name)))
        bins = os.path.join(src, "bin")
        if os.path.isdir(bins):
            for f in sorted(os.listdir(bins)):
                if f.endswith(".rs"):
                    roots.append((f"{crate} (bin {f[:-3]})", os.path.join(bins, f)))
    return roots


def main(argv):
    workspace = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    workspace = os.path.abspath(workspace)
    total = 0
    for label, root in crate_roots(workspace):
        modules, edges = crate_graph(root)
        for comp in cycles(modules, edges):
            total += 1
            print(f"{label}: cycle of {len(comp)} modules: {', '.join(comp)}")
            for (a, b), (path, line) in sorted(edges.items()):
                if a in comp and b in comp:
                    print(f"  {a} -> {b}  ({os.path.relpath(path, workspace)}:{line})")
    print(f"{total} module cycles")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
