#!/usr/bin/env python3
"""Tests of scripts/modcycles.py on small synthetic workspaces: a cycle is found (through each
kind of path it reads), an acyclic tree passes, and what is not code is not read as code.

    python3 scripts/test_modcycles.py
"""

import contextlib
import io
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import modcycles  # noqa: E402


class Workspace:
    """A workspace of crates written from {crate: {path under src: text}}."""

    def __init__(self, crates):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        for crate, files in crates.items():
            for rel, text in files.items():
                path = os.path.join(self.dir, "crates", crate, "src", rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)

    def run(self):
        """(exit status, printed text) of modcycles.py over this workspace."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = modcycles.main(["modcycles.py", self.dir])
        return status, out.getvalue()

    def graph(self, crate="c", root="lib.rs"):
        modules, edges = modcycles.crate_graph(os.path.join(self.dir, "crates", crate, "src", root))
        return modules, set(edges)

    def close(self):
        self.tmp.cleanup()


def graph_of(files, crate="c"):
    ws = Workspace({crate: files})
    try:
        return ws.graph(crate)
    finally:
        ws.close()


class CycleFound(unittest.TestCase):
    def test_two_modules_importing_each_other_fail_and_are_printed(self):
        ws = Workspace({"c": {
            "lib.rs": "pub mod a;\npub mod b;\npub mod leaf;\n",
            "a.rs": "use crate::b::B;\npub struct A;\n",
            "b.rs": "pub struct B;\nfn f() { let _ = crate::a::A; }\n",
            "leaf.rs": "use crate::a::A;\n",
        }})
        try:
            status, out = ws.run()
        finally:
            ws.close()
        self.assertEqual(status, 1)
        self.assertIn("c: cycle of 2 modules: a, b\n", out)
        self.assertIn("  a -> b  (crates/c/src/a.rs:1)\n", out)
        self.assertIn("  b -> a  (crates/c/src/b.rs:2)\n", out)
        self.assertNotIn("leaf ->", out, "an edge out of the cycle is not part of it")
        self.assertTrue(out.endswith("1 module cycles\n"))

    def test_a_three_module_ring_is_one_cycle(self):
        modules, edges = graph_of({
            "lib.rs": "mod a; mod b; mod c;",
            "a.rs": "use crate::b;", "b.rs": "use crate::c;", "c.rs": "use crate::a;",
        })
        self.assertEqual(modcycles.cycles(modules, edges), [["a", "b", "c"]])

    def test_super_from_a_top_level_file_reaches_its_siblings(self):
        modules, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a.rs": "use super::b::B;",
            "b/mod.rs": "mod inner;",
            "b/inner.rs": "use super::super::a;",
        })
        self.assertEqual(edges, {("a", "b"), ("b", "a")})
        self.assertEqual(modcycles.cycles(modules, edges), [["a", "b"]])

    def test_group_members_nested_or_not_are_edges(self):
        _, edges = graph_of({
            "lib.rs": "mod a; mod b; mod c; mod d;",
            "a.rs": "use crate::{b::{X, Y as Z}, c, self as root, d::*};",
            "b.rs": "", "c.rs": "", "d.rs": "",
        })
        self.assertEqual(edges, {("a", "b"), ("a", "c"), ("a", "d")})

    def test_super_in_an_inline_test_module_counts_from_that_module(self):
        _, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a.rs": "fn f() {}\n#[cfg(test)]\nmod tests {\n    use super::f;\n    use super::super::b;\n}\n",
            "b.rs": "",
        })
        self.assertEqual(edges, {("a", "b")})

    def test_a_path_attribute_file_sits_where_it_is_declared(self):
        # a/x.rs declares tests at a/x_tests.rs: module a::x::tests, three levels down.
        _, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a/mod.rs": "mod x; mod y;",
            "a/x.rs": '#[cfg(test)]\n#[path = "x_tests.rs"]\nmod tests;\n',
            "a/x_tests.rs": "use super::super::y;\nuse super::super::super::b;\n",
            "a/y.rs": "",
            "b.rs": "",
        })
        self.assertEqual(edges, {("a", "b")})

    def test_after_an_inline_module_closes_paths_count_from_the_file_again(self):
        _, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a.rs": "mod tests {\n    fn f() { if true { } }\n}\nuse super::b;\n",
            "b.rs": "",
        })
        self.assertEqual(edges, {("a", "b")})

    def test_a_path_above_the_root_is_ignored(self):
        _, edges = graph_of({"lib.rs": "mod a; mod b;", "a.rs": "use super::super::b;", "b.rs": ""})
        self.assertEqual(edges, set())

    def test_dollar_crate_in_a_macro_is_an_edge(self):
        _, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a.rs": "macro_rules! m { () => { $crate::b::f() } }",
            "b.rs": "",
        })
        self.assertEqual(edges, {("a", "b")})

    def test_each_root_is_its_own_crate(self):
        ws = Workspace({"c": {
            "lib.rs": "mod a;", "a.rs": "",
            "main.rs": "mod x; mod y;", "x.rs": "use crate::y;", "y.rs": "use crate::x;",
        }})
        try:
            status, out = ws.run()
        finally:
            ws.close()
        self.assertEqual(status, 1)
        self.assertIn("c (bin): cycle of 2 modules: x, y", out)
        self.assertNotIn("c: cycle", out)


class NoCycle(unittest.TestCase):
    def test_a_layered_crate_passes(self):
        ws = Workspace({
            "c": {
                "lib.rs": "pub mod config;\npub mod table;\npub mod server;\n",
                "config.rs": "pub struct Config;\n",
                "table.rs": "use crate::config::Config;\n",
                "server/mod.rs": "mod conn;\nuse crate::{config::Config, table};\n",
                "server/conn.rs": "use super::super::table;\nuse super::Helper;\n",
            },
            "other": {"lib.rs": "mod a;", "a.rs": "use crate::a::x;"},
        })
        try:
            status, out = ws.run()
        finally:
            ws.close()
        self.assertEqual((status, out), (0, "0 module cycles\n"))

    def test_self_and_child_paths_are_not_edges(self):
        modules, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a/mod.rs": "mod x;\nuse self::x::X;\nuse crate::a::x::Y;\n",
            "a/x.rs": "use super::Z;\nuse crate::a::W;\n",
            "b.rs": "use crate::a;",
        })
        self.assertEqual(edges, {("b", "a")})
        self.assertEqual(modcycles.cycles(modules, edges), [])

    def test_comments_strings_and_chars_are_not_code(self):
        _, edges = graph_of({
            "lib.rs": "mod a; mod b;",
            "a.rs": (
                "// use crate::b;\n"
                "/* crate::b /* nested */ crate::b */\n"
                "/// [`crate::b::B`]\n"
                "const S: &str = \"crate::b::B \\\" crate::b\";\n"
                "const R: &str = r#\"crate::b \"quoted\" \"#;\n"
                "const Q: char = '\"';\n"
                "fn f<'a>(x: &'a str) -> &'a str { x }\n"
                "const T: &str = \"after the char: crate::b\";\n"
            ),
            "b.rs": "use crate::a;",
        })
        self.assertEqual(edges, {("b", "a")})

    def test_an_undeclared_file_is_not_a_module(self):
        modules, edges = graph_of({
            "lib.rs": "mod a;",
            "a.rs": "",
            "stray.rs": "use crate::a;",
        })
        self.assertEqual((modules, edges), (["a"], set()))


class LayersTest(unittest.TestCase):
    """scripts/layers.py: the never-arrows between the daemon's parts."""

    def violations(self, files):
        import layers

        ws = Workspace({"bexd": files})
        try:
            return [(a, b) for a, b, _, _ in layers.violations(ws.dir)]
        finally:
            ws.close()

    def test_server_importing_the_daemon_is_refused(self):
        files = {
            "lib.rs": "pub mod daemon;\npub mod nbd_server;\n",
            "daemon.rs": "pub struct Daemon;\n",
            "nbd_server/mod.rs": "use crate::daemon::Daemon;\n",
        }
        self.assertEqual(self.violations(files), [("nbd_server", "daemon")])

    def test_config_importing_anything_is_refused(self):
        files = {
            "lib.rs": "pub mod config;\npub mod util;\n",
            "config.rs": "use super::util::strerror;\n",
            "util.rs": "pub fn strerror() {}\n",
        }
        self.assertEqual(self.violations(files), [("config", "util")])

    def test_allowed_arrows_pass(self):
        files = {
            "lib.rs": "pub mod config;\npub mod exports;\npub mod nbd_server;\npub mod nodes;\n",
            "config.rs": "pub struct C;\n",
            "nodes.rs": "use crate::config::C;\n",
            "exports.rs": "use crate::{config::C, nodes};\n",
            "nbd_server.rs": "use crate::exports;\n",
        }
        self.assertEqual(self.violations(files), [])


if __name__ == "__main__":
    unittest.main(verbosity=1)
