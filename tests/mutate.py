"""Planted bugs, one at a time: which of a module's small, plausible mistakes does the suite catch?

    make mutate MODULE=engine/prediction.py [TESTS="tests/test_predict.py tests/test_guards.py"] [LIMIT=30]
    python tests/mutate.py engine/prediction.py --tests tests/test_predict.py --limit 30 [--seed 0]

Each mutant changes one spot of the module's syntax tree: a comparison flipped (< and <=, == and
!=, in and not in), an arithmetic operator swapped (+ and -, * and /), ``and`` and ``or`` swapped,
a ``not`` dropped, a boolean or small integer constant changed, a default argument changed. The
mutated module is written into a scratch copy of the repository and the given tests run there
(-x, quiet); a mutant that passes them all survived, and is printed with its line, so that a test
can be written that it would fail. Not part of CI: a run takes (mutants x test time).
"""
import argparse
import ast
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div,
         ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And, ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def sites(tree: ast.AST) -> list:
    """(node path, description) of every spot a mutant can change; docstrings and annotations are skipped."""
    found = []
    for node in ast.walk(tree):
        for field in ("op", "ops"):
            value = getattr(node, field, None)
            ops = value if isinstance(value, list) else [value] if value is not None else []
            for i, op in enumerate(ops):
                if type(op) in SWAPS:
                    found.append((node, field, i, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}"))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            found.append((node, "not", 0, "drop not"))
        if isinstance(node, ast.Constant) and type(node.value) in (bool, int) and not isinstance(node.value, str):
            if isinstance(node.value, bool):
                found.append((node, "const", 0, f"{node.value} -> {not node.value}"))
            elif abs(node.value) <= 1000:
                found.append((node, "const", 0, f"{node.value} -> {node.value + 1}"))
    return found


def mutant(tree: ast.AST, site_index: int) -> str:
    """The module's source with site ``site_index`` changed."""
    tree = copy.deepcopy(tree)
    node, field, i, _ = sites(tree)[site_index]
    if field in ("op", "ops"):
        ops = getattr(node, field)
        if isinstance(ops, list):
            ops[i] = SWAPS[type(ops[i])]()
        else:
            setattr(node, field, SWAPS[type(ops)]())
    elif field == "not":
        replacement = node.operand
        for parent in ast.walk(tree):
            for name, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, name, replacement)
                elif isinstance(value, list):
                    for j, item in enumerate(value):
                        if item is node:
                            value[j] = replacement
    else:
        node.value = (not node.value) if isinstance(node.value, bool) else node.value + 1
    return ast.unparse(tree)


def docstring_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description="Plant one bug at a time in MODULE and run TESTS against each.")
    p.add_argument("module", help="e.g. engine/prediction.py")
    p.add_argument("--tests", nargs="+", default=["tests"], help="test files or folders (default: the whole suite)")
    p.add_argument("--limit", type=int, default=30, help="mutants to try, drawn at random (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=int, default=0, help="skip the first SKIP mutants drawn (to continue a run)")
    p.add_argument("--timeout", type=int, default=0,
                   help="seconds a mutant's run may take; past it the mutant counts as caught (a hang fails the "
                        "suite too: its multi-process tests time out), marked so (default: no limit)")
    args = p.parse_args()
    source = open(os.path.join(ROOT, args.module)).read()
    tree = ast.parse(source)
    skip = docstring_lines(tree)
    candidates = [i for i, (node, *_) in enumerate(sites(tree)) if getattr(node, "lineno", 0) not in skip]
    random.Random(args.seed).shuffle(candidates)
    chosen = sorted(candidates[:args.limit])[args.skip:]
    print(f"{args.module}: {len(candidates)} mutation sites, trying {len(chosen)} against {' '.join(args.tests)}")
    survived, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutate-") as scratch:
        work = os.path.join(scratch, "repo")
        shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*_output",
                                                                  "data", "checkpoint"))
        os.makedirs(os.path.join(work, "checkpoint"), exist_ok=True)
        target = os.path.join(work, args.module)
        for n, index in enumerate(chosen, 1):
            node, _, _, what = sites(tree)[index]
            with open(target, "w") as f:
                f.write(mutant(tree, index))
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args.tests],
                                    cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                caught, how = proc.wait(timeout=args.timeout or None) != 0, ""
            except subprocess.TimeoutExpired:
                caught, how = True, " (timed out)"
                os.killpg(proc.pid, signal.SIGKILL)  # pytest and the processes its tests started
                proc.wait()
            line = source.splitlines()[node.lineno - 1].strip()
            print(f"[{n}/{len(chosen)}] line {node.lineno}: {what}: {'caught' + how if caught else 'SURVIVED'}  | "
                  f"{line[:90]}", flush=True)
            if not caught:
                survived.append((node.lineno, what, line))
        with open(target, "w") as f:
            f.write(source)
    caught = len(chosen) - len(survived)
    print(f"\n{caught} of {len(chosen)} caught ({100 * caught / max(len(chosen), 1):.0f}%) in "
          f"{time.perf_counter() - start:.0f} s")
    for lineno, what, line in survived:
        print(f"  survived: line {lineno}: {what} | {line}")


if __name__ == "__main__":
    main()
