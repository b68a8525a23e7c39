"""The package's shape, checked from its source (``ast``, every import including those inside functions):

- imports flow one way through the layers documented in README "Layout" (``LAYERS`` below), and no module
  import cycle exists;
- the registry is the only place a stage kind is known: outside ``pipeline/stages/`` no code compares a kind to
  a kind's name, lists kind names, or passes one as ``kind=``; nothing imports a stage module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.config import registry

from conftest import REPO

# Lowest first: a module may import from its own layer or any layer before it, never from a later one.
LAYERS = [
    "util",  # errors, atomic files, wording, console, network probes, signals
    "builtin",  # the tiny model and tasks, replicas and their templates, the built-in checkers
    "config",  # typed recipes, the loader, rounds, the stage-kind registry
    "compat",  # the ledger of workarounds of libraries' internals
    "data",  # data formats, adapters, mixtures, linters (no torch)
    "modeling",  # model and tokenizer loading: the only place peft / bitsandbytes are touched
    "plan",  # the memory planner
    "observe",  # tracking, report, plots
    "train",  # TRL argument mapping, the fit loop, callbacks, batching, checkpoints
    "rollout",  # generation, candidates, scoring, selection
    "run",  # runner, stage context, manifest, lock, preflight, export
    "stages",  # the stage kinds, found through the registry
    "cli",  # the command line (and the package's __init__ / __main__)
]
PACKAGE = "pipeline"


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "cli"
    return parts[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules ``path`` imports (``from pipeline.x import y`` counts as pipeline.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m != name}


def import_graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(path, name, set(found)) for name, path in found.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            here, there = layer_of(module), layer_of(target)
            if here not in rank or there not in rank:
                bad.append(f"{module} -> {target}: layer {here if here not in rank else there!r} is not in LAYERS")
            elif rank[there] > rank[here]:
                bad.append(f"{module} ({here}) imports {target} ({there}), a higher layer")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def kind_name_uses(root: Path, kind_names: set[str]) -> list[str]:
    """Places outside pipeline/stages/ that switch on or list stage kinds by name."""

    def names_in(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and node.value in kind_names:
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [n for elt in node.elts for n in names_in(elt)]
        return []

    bad = []
    for name, path in modules(root).items():
        if layer_of(name) == "stages":
            continue
        where = path.relative_to(root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                text = ast.unparse(node)
                if "kind" in text and any(names_in(side) for side in sides):
                    bad.append(f"{where}:{node.lineno}: {text}")
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and (
                len(set(names_in(node))) >= 2 or (len(node.elts) == 1 and names_in(node))
            ):
                bad.append(f"{where}:{node.lineno}: a list of stage kinds {ast.unparse(node)}")
            elif (
                isinstance(node, ast.Dict)
                and len({k.value for k in node.keys if isinstance(k, ast.Constant)} & kind_names) >= 2
            ):
                bad.append(f"{where}:{node.lineno}: a table keyed by stage kinds")
            elif isinstance(node, ast.keyword) and node.arg == "kind" and names_in(node.value):
                bad.append(f"{where}:{node.lineno}: kind={ast.unparse(node.value)}")
    return bad


def test_imports_follow_the_layers():
    graph = import_graph(REPO)
    assert len(graph) > 50  # the walk found the package
    assert layer_violations(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


def test_no_module_outside_the_stages_imports_a_stage_kind():
    graph = import_graph(REPO)
    importers = sorted(
        f"{m} -> {t}" for m, ts in graph.items() for t in ts if layer_of(t) == "stages" and layer_of(m) != "stages"
    )
    assert importers == []


def test_no_stage_kind_name_outside_pipeline_stages():
    names = set(registry.kinds())
    assert {"sft", "reward", "bon", "dpo", "grpo", "eval"} <= names
    assert kind_name_uses(REPO, names) == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ('if stage.kind == "sft":\n    pass\n', "stage.kind == 'sft'"),
        ('TRAINING = ("sft", "reward", "dpo")\n', "a list of stage kinds"),
        ('ok = entry.get("kind") in ("eval",)\n', "entry.get('kind') in ('eval',)"),
        ('setup = Setup(kind="bon")\n', "kind='bon'"),
        ('PLOTS = {"dpo": 1, "reward": 2}\n', "a table keyed by stage kinds"),
        ('FROM = {"pairs_from": ("bon",)}\n', "a list of stage kinds ('bon',)"),
    ],
)
def test_the_kind_name_check_finds_each_form_of_switch(tmp_path, source, expected):
    (tmp_path / PACKAGE / "plan").mkdir(parents=True)
    (tmp_path / PACKAGE / "plan" / "bad.py").write_text(source)
    (tmp_path / PACKAGE / "data").mkdir()
    (tmp_path / PACKAGE / "data" / "fine.py").write_text('for split in ("train", "eval"):\n    pass\n')
    found = kind_name_uses(tmp_path, {"sft", "reward", "bon", "dpo", "eval"})
    assert found and all("plan/bad.py:1" in f for f in found) and any(expected in f for f in found)


def test_the_layer_and_cycle_checks_find_violations(tmp_path):
    for module, text in {
        "data/a.py": "from pipeline.run import runner\n",  # upward
        "run/runner.py": "def f():\n    from pipeline.run import context\n",
        "run/context.py": "import pipeline.run.runner\n",  # a cycle, one side inside a function
    }.items():
        path = tmp_path / PACKAGE / module
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path)
    assert layer_violations(graph) == ["pipeline.data.a (data) imports pipeline.run.runner (run), a higher layer"]
    assert cycles(graph) == [["pipeline.run.context", "pipeline.run.runner"]]
