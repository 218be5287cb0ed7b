"""Planted bugs, one at a time: which of a module's small, plausible mistakes does the suite catch?

    make mutate MODULE=engine/prediction.py [LIMIT=30] [KINDS="operator mistake"]
    python tests/mutate.py engine/prediction.py --limit 30 [--seed 0] [--kinds operator mistake] [--since REV]

Two families of one-spot changes of the module's syntax tree:

- ``operator``: a comparison flipped (< and <=, == and !=, in and not in, is and is not), an
  arithmetic operator swapped (+ and -, * and /), ``and`` and ``or`` swapped, a ``not`` dropped, a
  boolean or small integer constant changed;
- ``mistake``, the mistakes a developer makes: a dropped ``if ...: raise`` (a check forgotten), the
  first two positional arguments of a call swapped, a dropped collective or device move (a
  statement calling barrier / all_reduce / broadcast ..., or ``x.to(device)`` read as ``x``), an
  off-by-one in a slice bound or a ``range`` end, a dictionary key or attribute string replaced by
  another string key of the module.

``--since REV`` draws only from the lines the module added or changed since a git revision (the
newest code: where the last round's tests are thinnest).

Each mutant is written into a scratch copy of the repository. "Caught" means the whole suite fails:
first the tests named for the module (``--tests``; by default tests/test_<module>.py, else the files
that name it), which fail fast; a mutant they miss is run against the rest of the suite before it
counts as a survivor. A mutant whose run hangs past ``--timeout`` counts as caught (multi-process
tests time out), marked so. Survivors are printed with their line, so a test can be written that
they would fail. Not part of CI: a run takes (mutants x test time).
"""
import argparse
import ast
import copy
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div,
         ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
COLLECTIVES = {"barrier", "all_reduce", "all_reduce_sum", "all_reduce_mean", "broadcast", "broadcast_from",
               "all_gather", "gather_interleaved", "ranks_holding", "agree", "stop_unless_main_agrees", "prepare",
               "use_device", "set_device", "on_device"}
DEVICE_MOVES = {"to", "cuda", "cpu", "on_device"}
KINDS = ("operator", "mistake")
SYMMETRIC = {"max", "min", "gcd", "lcm", "hypot", "isclose", "allclose", "equal", "array_equal", "same_file",
             "samefile", "clip"}  # calls whose first two arguments commute: a swap is no mistake
# (numpy's clip(a, lo, hi) is minimum(maximum(a, lo), hi): a and lo commute)


class Site:
    """One spot a mutant can change: ``apply(tree)`` changes the (copied) tree in place."""

    def __init__(self, kind: str, what: str, line: int, path: list, change):
        self.kind, self.what, self.line, self.path, self.change = kind, what, line, path, change


def node_at(tree: ast.AST, path: list):
    node = tree
    for field, index in path:
        node = getattr(node, field) if index is None else getattr(node, field)[index]
    return node


def walk_with_paths(node: ast.AST, path=()):
    yield node, list(path)
    for field, value in ast.iter_fields(node):
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    yield from walk_with_paths(item, (*path, (field, i)))
        elif isinstance(value, ast.AST):
            yield from walk_with_paths(value, (*path, (field, None)))


def call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def string_keys(tree: ast.AST) -> list:
    """The string constants the module uses as subscript keys, in order of first use."""
    keys = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            if node.slice.value not in keys:
                keys.append(node.slice.value)
    return keys


def sites(tree: ast.AST) -> list:
    """Every spot a mutant can change, docstrings and annotations aside."""
    found, keys = [], string_keys(tree)
    for node, path in walk_with_paths(tree):
        line = getattr(node, "lineno", 0)
        # ---- operator changes
        for field in ("op", "ops"):
            value = getattr(node, field, None)
            ops = value if isinstance(value, list) else [value] if value is not None else []
            for i, op in enumerate(ops):
                if type(op) in SWAPS:
                    def change(n, field=field, i=i):
                        ops = getattr(n, field)
                        if isinstance(ops, list):
                            ops[i] = SWAPS[type(ops[i])]()
                        else:
                            setattr(n, field, SWAPS[type(ops)]())
                    found.append(Site("operator", f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", line, path,
                                      change))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append(Site("operator", "drop not", line, path, "unwrap"))
        if isinstance(node, ast.Constant) and type(node.value) in (bool, int):
            if isinstance(node.value, bool):
                found.append(Site("operator", f"{node.value} -> {not node.value}", line, path,
                                  lambda n: setattr(n, "value", not n.value)))
            elif abs(node.value) <= 1000:
                found.append(Site("operator", f"{node.value} -> {node.value + 1}", line, path,
                                  lambda n: setattr(n, "value", n.value + 1)))
        # ---- the mistakes that matter
        if isinstance(node, ast.If) and any(isinstance(s, ast.Raise) for s in node.body) and not node.orelse:
            found.append(Site("mistake", "drop an if ...: raise", line, path, "pass"))
        if isinstance(node, ast.Call):
            positional = [a for a in node.args if not isinstance(a, ast.Starred)]
            if len(positional) >= 2 and len(positional) == len(node.args) and \
                    ast.dump(positional[0]) != ast.dump(positional[1]) and call_name(node) not in SYMMETRIC:
                def swap(n):
                    n.args[0], n.args[1] = n.args[1], n.args[0]
                found.append(Site("mistake", f"swap the first two arguments of {call_name(node) or 'a call'}()",
                                  line, path, swap))
            if call_name(node) in DEVICE_MOVES and isinstance(node.func, ast.Attribute):
                found.append(Site("mistake", f"drop .{call_name(node)}(...)", line, path, "receiver"))
            if call_name(node) == "range" and node.args:
                def longer(n):
                    end = n.args[1] if len(n.args) > 1 else n.args[0]
                    idx = 1 if len(n.args) > 1 else 0
                    n.args[idx] = ast.BinOp(left=end, op=ast.Add(), right=ast.Constant(1))
                found.append(Site("mistake", "range(...) one longer", line, path, longer))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and call_name(node.value) in COLLECTIVES:
            found.append(Site("mistake", f"drop the call {call_name(node.value)}()", line, path, "pass"))
        if isinstance(node, ast.Slice):
            for bound in ("lower", "upper"):
                if getattr(node, bound) is not None:
                    def off(n, bound=bound):
                        setattr(n, bound, ast.BinOp(left=getattr(n, bound), op=ast.Add(), right=ast.Constant(1)))
                    found.append(Site("mistake", f"slice {bound} bound + 1", getattr(node, bound).lineno, path, off))
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and \
                isinstance(node.slice.value, str) and len(keys) > 1:
            other = keys[(keys.index(node.slice.value) + 1) % len(keys)]
            found.append(Site("mistake", f"key {node.slice.value!r} -> {other!r}", line, path,
                              lambda n, other=other: setattr(n.slice, "value", other)))
    return found


def replace_node(tree: ast.AST, path: list, new) -> None:
    parent = node_at(tree, path[:-1])
    field, index = path[-1]
    if index is None:
        setattr(parent, field, new)
    else:
        getattr(parent, field)[index] = new


def mutant(tree: ast.AST, site: Site) -> str:
    """The module's source with ``site`` changed."""
    tree = copy.deepcopy(tree)
    node = node_at(tree, site.path)
    if site.change == "unwrap":
        replace_node(tree, site.path, node.operand)
    elif site.change == "pass":
        replace_node(tree, site.path, ast.Pass())
    elif site.change == "receiver":
        replace_node(tree, site.path, node.func.value)
    else:
        site.change(node)
    return ast.unparse(ast.fix_missing_locations(tree))


def docstring_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def changed_lines(module: str, rev: str) -> set:
    """Line numbers of ``module`` (as it is now) added or changed since ``rev``; all of them for a file
    that was elsewhere or absent then (git follows no renames here: a moved module counts as new)."""
    out = subprocess.run(["git", "diff", "--unified=0", "--no-color", rev, "--", module], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"mutate.py: git diff {rev} failed: {out.stderr.strip()}")
    lines = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", out.stdout, flags=re.M):
        lines.update(range(int(start), int(start) + (1 if count == "" else int(count))))
    return lines


def module_tests(module: str) -> list:
    """The fast first stage: tests/test_<name>.py, else the test files that name the module."""
    name = os.path.splitext(os.path.basename(module))[0]
    own = f"tests/test_{name}.py"
    if os.path.isfile(os.path.join(ROOT, own)):
        return [own]
    dotted = os.path.splitext(module)[0].replace(os.sep, ".").removesuffix(".__init__")
    users = [os.path.relpath(path, ROOT) for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
             if re.search(rf"\b{re.escape(dotted)}\b|\b{re.escape(name)}\b", open(path).read())]
    return users or ["tests"]


def run_tests(work: str, tests: list, timeout: int, workers: int = 0) -> str:
    """"caught", "caught (timed out)" or "survived" for one pytest run of ``tests`` (stops at the first failure)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    if workers:
        cmd += ["-n", str(workers), "--dist", "loadfile"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return "caught" if proc.wait(timeout=timeout or None) != 0 else "survived"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest and the processes its tests started
        proc.wait()
        return "caught (timed out)"


def main() -> None:
    p = argparse.ArgumentParser(description="Plant one bug at a time in MODULE; the whole suite must catch each.")
    p.add_argument("module", help="e.g. engine/prediction.py")
    p.add_argument("--tests", nargs="+", help="the first stage's test files (default: the module's own and its users)")
    p.add_argument("--first_only", action="store_true", help="count a mutant the first stage misses as a survivor "
                   "(the old, subset-only measure)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--limit", type=int, default=30, help="mutants to try, drawn at random (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--since", metavar="REV", help="only lines added or changed since this git revision")
    p.add_argument("--skip", type=int, default=0, help="skip the first SKIP mutants drawn (to continue a run)")
    p.add_argument("--timeout", type=int, default=900, help="seconds one pytest run may take (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="pytest-xdist workers of the whole-suite stage")
    args = p.parse_args()
    source = open(os.path.join(ROOT, args.module)).read()
    tree = ast.parse(source)
    skip = docstring_lines(tree)
    all_sites = [s for s in sites(tree) if s.line not in skip and s.kind in args.kinds]
    if args.since:
        newer = changed_lines(args.module, args.since)
        all_sites = [s for s in all_sites if s.line in newer]
    order = list(range(len(all_sites)))
    random.Random(args.seed).shuffle(order)
    chosen = sorted(order[:args.limit])[args.skip:]
    first = args.tests or module_tests(args.module)
    by_kind = Counter(s.kind for s in all_sites)
    print(f"{args.module}: {len(all_sites)} sites{f' on lines changed since {args.since}' if args.since else ''} ({', '.join(f'{k} {n}' for k, n in by_kind.items())}), trying "
          f"{len(chosen)}; first stage: {' '.join(first)}; then {'nothing' if args.first_only else 'the whole suite'}")
    outcomes, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        work = os.path.join(scratch, "repo")
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*_output",
                                                                  "data", "checkpoint", "gpu_bundle", "jobs"))
        os.makedirs(os.path.join(work, "checkpoint"), exist_ok=True)
        target = os.path.join(work, args.module)
        for n, index in enumerate(chosen, 1):
            site = all_sites[index]
            try:
                text = mutant(tree, site)
            except Exception as e:  # a change the tree cannot take: not a mutant
                print(f"[{n}/{len(chosen)}] line {site.line}: {site.what}: skipped ({e})")
                continue
            with open(target, "w") as f:
                f.write(text)
            how = run_tests(work, first, args.timeout)
            if how == "survived" and not args.first_only:
                how = run_tests(work, ["tests"], args.timeout, args.workers)
                how = how if how == "survived" else f"{how} by the rest of the suite"
            outcomes.append((site, how))
            line = source.splitlines()[site.line - 1].strip() if site.line else ""
            print(f"[{n}/{len(chosen)}] line {site.line}: {site.kind}: {site.what}: "
                  f"{'SURVIVED' if how == 'survived' else how}  | {line[:90]}", flush=True)
        with open(target, "w") as f:
            f.write(source)
    total = len(outcomes)
    caught = sum(how != "survived" for _, how in outcomes)
    print(f"\n{caught} of {total} caught ({100 * caught / max(total, 1):.0f}%) in {time.perf_counter() - start:.0f} s")
    for kind in KINDS:
        mine = [how for site, how in outcomes if site.kind == kind]
        if mine:
            k = sum(how != "survived" for how in mine)
            print(f"  {kind}: {k} of {len(mine)} caught ({100 * k / len(mine):.0f}%)")
    for site, how in outcomes:
        if how == "survived":
            print(f"  survived: line {site.line}: {site.kind}: {site.what} | {source.splitlines()[site.line - 1].strip()}")


if __name__ == "__main__":
    main()
