"""tests/mutate.py (``make mutate``): the planted bugs it draws are the kinds docs/USAGE.md names, each
written as the one-spot change it says, and none that cannot be a bug (a docstring, commuting arguments)."""
import ast

from tests.mutate import docstring_lines, mutant, sites

SOURCE = '''"""A module's docstring: 1 < 2 is no site."""
import numpy as np


def f(x, d, ctx):
    """A function's docstring: x.to(device) is no site."""
    if x is None:
        raise ValueError("no x")
    y = np.clip(x, 0, 255)
    z = max(x, 3)
    w = divmod(x, d)
    broadcast(w, ctx)
    v = w.to(ctx.device)
    for i in range(4):
        v = v[1:i]
    return d["a"] + d["b"] and not y
'''


def drawn(kind=None):
    tree = ast.parse(SOURCE)
    skip = docstring_lines(tree)
    return {(s.what, s.line): mutant(tree, s) for s in sites(tree) if s.line not in skip and (kind is None or s.kind == kind)}


def test_the_mistakes_that_matter_are_drawn_as_one_spot_changes():
    got = drawn("mistake")
    assert set(got) == {("drop an if ...: raise", 7), ("swap the first two arguments of divmod()", 11),
                        ("drop the call broadcast()", 12), ("swap the first two arguments of broadcast()", 12),
                        ("drop .to(...)", 13), ("range(...) one longer", 14), ("slice lower bound + 1", 15),
                        ("slice upper bound + 1", 15), ("key 'a' -> 'b'", 16), ("key 'b' -> 'a'", 16)}
    # clip(a, lo, hi) and max(a, b): their first two arguments commute, so a swap is no bug
    assert "if x is None" not in got[("drop an if ...: raise", 7)]
    assert "w = divmod(d, x)" in got[("swap the first two arguments of divmod()", 11)]
    assert "broadcast(w, ctx)" not in got[("drop the call broadcast()", 12)]
    assert "v = w\n" in got[("drop .to(...)", 13)]
    assert "range(4 + 1)" in got[("range(...) one longer", 14)]
    assert "v[1 + 1:i]" in got[("slice lower bound + 1", 15)] and "v[1:i + 1]" in got[("slice upper bound + 1", 15)]
    assert "d['b'] + d['b']" in got[("key 'a' -> 'b'", 16)]


def test_operator_changes_skip_docstrings_and_change_one_spot():
    got = drawn("operator")
    assert ("Lt -> LtE", 1) not in got and all(line > 6 for _, line in got)  # docstrings aside
    assert "if x is not None" in got[("Is -> IsNot", 7)]
    assert "return d['a'] - d['b'] and (not y)" in got[("Add -> Sub", 16)]
    assert "return d['a'] + d['b'] or not y" in got[("And -> Or", 16)]
    assert "return d['a'] + d['b'] and y" in got[("drop not", 16)]
    assert "range(5)" in got[("4 -> 5", 14)]
    for source in got.values():  # each mutant is one change of the module: it still parses, and differs once
        changed = [a for a, b in zip(ast.unparse(ast.parse(SOURCE)).splitlines(), source.splitlines()) if a != b]
        assert len(changed) == 1
