#!/usr/bin/env python3
"""Fails when a part of the daemon imports a part it must never import.

    scripts/layers.py [WORKSPACE_DIR]     (default: this repository)

No cycle (scripts/modcycles.py) is not enough: a protocol server that imports the daemon can be
acyclic today and still be the knot of tomorrow. These are the arrows that must never exist
between top-level modules of crates/bexd (docs/architecture.md, "Module graph", says why), read
with modcycles.py's own module graph. Each violation is printed with the first line making it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modcycles  # noqa: E402

# module -> (the modules it may import, or None for any) and the modules it must never import.
RULES = {
    # Plain data: nothing of the crate.
    "config": (set(), set()),
    # Readers produce plain data.
    "qapi": ({"config", "util"}, set()),
    # The node table takes config and never parses; it knows no exports or servers.
    "nodes": ({"config", "error", "util"}, set()),
    # The export table holds node holds; its guards hold the table, never the daemon.
    "exports": ({"config", "error", "events", "nodes"}, set()),
    # Objects know no nodes.
    "objects": ({"config", "error", "tls", "util"}, set()),
    # The NBD server sees a ServerContext: never the daemon, a command or a monitor.
    "nbd_server": (None, {"daemon", "commands", "monitor", "startup", "serve", "program", "qapi"}),
    # A monitor runs commands through commands::Executor and borrows nothing of the NBD server.
    "monitor": (None, {"daemon", "nbd_server", "nodes", "exports", "objects"}),
    # The daemon wires the parts; it never calls up into commands or monitors.
    "daemon": (None, {"commands", "monitor", "startup", "serve", "program", "qapi"}),
}


def violations(workspace):
    """[(from, to, file, line)] for every forbidden import in crates/bexd."""
    root = os.path.join(workspace, "crates", "bexd", "src", "lib.rs")
    _, edges = modcycles.crate_graph(root)
    found = []
    for (a, b), (path, line) in sorted(edges.items()):
        if a not in RULES:
            continue
        allowed, never = RULES[a]
        if b in never or (allowed is not None and b not in allowed):
            found.append((a, b, os.path.relpath(path, workspace), line))
    return found


def main(argv):
    workspace = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "..")
    workspace = os.path.abspath(workspace)
    found = violations(workspace)
    for a, b, path, line in found:
        print(f"bexd: {a} must not import {b}  ({path}:{line})")
    print(f"{len(found)} forbidden imports")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
