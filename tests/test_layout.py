"""The codebase's shape: imports point one way (no cycles, nothing importing upward), no folder holds
more than 35 % of the library in its own files, no test hooks in the library, tests filed by module."""
import ast
import glob
import os
from collections import Counter

from tests.helpers import ROOT, library_files

# Lower layers never import higher ones; a layer may import its own (docs/EXTENDING.md, "Layout").
LAYERS = [
    {"errors"},
    {"utils"},
    {"models", "datasets", "scoring"},
    {"store"},
    {"experiment"},
    {"engine"},
    {"dlsr", "cli"},
    {"main", "test_mse_mfsim", "test_LR", "predict", "submitit_train", "tools"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
OLD_ADDRESS = "utils/detector.py"  # the API's old import path, kept working: the one import that points up


def top_package(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    return rel.split(os.sep)[0].removesuffix(".py")


def imported_packages(path: str) -> set:
    tree = ast.parse(open(path).read())
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and n.level == 0]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return {name.split(".")[0] for name in names if name.split(".")[0] in LEVEL}


def test_imports_point_down_the_layers():
    upward = []
    for path in library_files():
        own = top_package(path)
        if os.path.relpath(path, ROOT) == OLD_ADDRESS:
            continue
        for pkg in imported_packages(path):
            if LEVEL[pkg] > LEVEL[own]:
                upward.append(f"{os.path.relpath(path, ROOT)} imports {pkg}")
    assert not upward, upward


def test_no_import_cycles_between_modules():
    modules = {os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__"): p for p in library_files()}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(open(path).read())
        deps = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                submodules = {m for m in (f"{n.module}.{a.name}" for a in n.names) if m in modules}
                deps |= submodules
                if len(submodules) < len(n.names):  # names of the package itself, not only its submodules
                    deps |= {n.module} & set(modules)
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names} & set(modules)
        graph[name] = deps - {name}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in graph.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, dep])}")
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = "done"
    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_folder_holds_more_than_35_percent_of_the_library():
    lines = Counter()
    for path in library_files():
        with open(path) as f:
            lines[os.path.dirname(os.path.relpath(path, ROOT)) or "."] += sum(1 for _ in f)
    total = sum(lines.values())
    biggest, n = lines.most_common(1)[0]
    assert n / total <= 0.35, f"{biggest}/ holds {100 * n / total:.0f}% of {total} lines"
    assert lines["utils"] / total < 0.15  # utils/ keeps small leaves only


def test_the_library_reads_no_test_hooks():
    for path in library_files():
        text = open(path).read()
        assert "RECORD_COLLECTIVES" not in text and "COLLECTIVE_LOG" not in text and "PYTEST" not in text, path


def test_tests_are_filed_by_module_not_by_campaign():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    assert not [n for n in names if n.startswith(("test_guards", "test_hostile", "test_honoured", "test_reliability"))]
    from tests.conftest import SLOWEST_FIRST
    assert set(SLOWEST_FIRST) <= names  # the order the workers take the slow files in names files that exist


def test_models_and_datasets_import_only_leaves():
    for package in ("models", "datasets", "scoring"):
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            assert imported_packages(path) <= {"errors", "utils", "models", "datasets", "scoring"}, path
