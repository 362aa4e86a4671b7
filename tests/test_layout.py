"""The package layout: imports flow one way (app -> plugin -> method), with no import circle.

The graph is read from the source with ``ast``, so function-level imports count too: a late import cannot hide a
circle.
"""

import ast
import os
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parent.parent / "hf_lwf"
# The plugin's wiring: what the method must never import.
WIRING = {"hf_lwf.callback", "hf_lwf.trainer", "hf_lwf.modelcard", "hf_lwf.run", "hf_lwf.resume", "hf_lwf.checks",
          "hf_lwf.backends", "hf_lwf.backends.base", "hf_lwf.backends.local", "hf_lwf.backends.fsdp2",
          "hf_lwf.backends.zero"}
# Only the run layer (and the trainer, which wires an engine's step hook) may import the backends.
BACKEND_USERS = {"hf_lwf.run", "hf_lwf.callback", "hf_lwf.trainer"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names of the modules an ``from ... import ...`` statement loads (submodules included)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                targets = resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]], ignore: set[str]) -> list[str] | None:
    """A circle among the modules outside ``ignore``, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node] - ignore):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(set(graph) - ignore):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_the_modules():
    graph = import_graph()
    assert {"hf_lwf.callback", "hf_lwf.method.fisher", "hf_lwf.app.cli", "hf_lwf.baselines.l2sp"} <= set(graph)
    assert "hf_lwf.method.fisher" in graph["hf_lwf.run"] and "hf_lwf.run" in graph["hf_lwf.callback"]
    assert "hf_lwf.method.common" in graph["hf_lwf.method.persample.rules.linear"]
    assert {"hf_lwf.method.persample.engine", "hf_lwf.method.persample.rules.base"} <= set(graph)


def test_no_import_circle():
    # A package's ``__init__`` re-exports its submodules, so "parent imports child" edges are left out of the
    # circle check (a child reaching its parent's __init__ is how ``from .. import x`` works).
    graph = import_graph()
    acyclic = {m: {t for t in e if not t.startswith(m + ".")} for m, e in graph.items()}
    assert find_cycle(acyclic, ignore={"hf_lwf"}) is None


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if m.startswith("hf_lwf.method")))
def test_method_imports_neither_wiring_nor_app(module):
    bad = {t for t in import_graph()[module] if t in WIRING or t == "hf_lwf" or t.startswith("hf_lwf.app")}
    assert not bad, f"{module} imports {sorted(bad)}"


# What the method may import from the rest of the package: the collectives, which know nothing of the plugin.
BELOW_METHOD = {"hf_lwf.distributed"}


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if m.startswith("hf_lwf.method")))
def test_method_imports_nothing_above_it(module):
    bad = {t for t in import_graph()[module] if not t.startswith("hf_lwf.method") and t not in BELOW_METHOD}
    assert not bad, f"{module} imports {sorted(bad)}"


# The per-sample engine's layers, lowest first: a module imports only from the layers before its own (its own
# layer too inside the rules, whose families share the registry and helpers).
PERSAMPLE = "hf_lwf.method.persample"
PERSAMPLE_LAYERS = ["rules", "record", "fused", "consumers", "exact", "plan", "capture", "engine"]


def persample_layer(module: str) -> int:
    return PERSAMPLE_LAYERS.index(module[len(PERSAMPLE) + 1 :].split(".")[0])


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if m.startswith(PERSAMPLE + ".")))
def test_per_sample_imports_flow_one_way(module):
    inside = {t for t in import_graph()[module] if t.startswith(PERSAMPLE + ".")}
    bad = {t for t in inside if persample_layer(t) > persample_layer(module)
           or (persample_layer(t) == persample_layer(module) and not module.startswith(PERSAMPLE + ".rules"))}
    assert not bad, f"{module} imports {sorted(bad)}"
    assert PERSAMPLE not in import_graph()[module], f"{module} imports the package's __init__"


def test_every_per_sample_module_has_a_layer():
    modules = {m for m in import_graph() if m.startswith(PERSAMPLE + ".")}
    assert {m[len(PERSAMPLE) + 1 :].split(".")[0] for m in modules} == set(PERSAMPLE_LAYERS)


@pytest.mark.parametrize(
    "module", sorted(m for m in import_graph() if not m.startswith(("hf_lwf.app", "hf_lwf.method")) and m != "hf_lwf.__main__")
)
def test_plugin_does_not_import_app(module):
    bad = {t for t in import_graph()[module] if t.startswith("hf_lwf.app")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", sorted(m for m in import_graph() if not m.startswith("hf_lwf.backends")))
def test_only_the_run_layer_imports_the_backends(module):
    backends = {t for t in import_graph()[module] if t.startswith("hf_lwf.backends")}
    assert not backends or module in BACKEND_USERS, f"{module} imports {sorted(backends)}"


@pytest.mark.parametrize("module", ["hf_lwf.callback", "hf_lwf.trainer", "hf_lwf.run"])
def test_no_engine_branch_above_the_backends(module):
    source = (PACKAGE / (module.split(".")[-1] + ".py")).read_text()
    for word in ("deepspeed", "zero3", "ds_id", "fully_shard", "is_deepspeed_enabled", "FSDP"):
        assert word not in source, f"{module} mentions {word!r}: engine specifics belong in hf_lwf/backends"


def test_checker_finds_a_circle_and_an_upward_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph, ignore=set()) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}, ignore=set()) is None
    node = ast.parse("from ..callback import LWFCallback").body[0]
    assert "hf_lwf.callback" in resolve("hf_lwf.method.fisher", False, node)


def test_public_entry_points_unchanged():
    import hf_lwf

    for name in ("LWFCallback", "LWFConfig", "LWFRun", "LWFState", "LWFTrainer", "LWFTrainerMixin",
                 "LWFTrainingArguments", "LWFUnlearningError", "__version__"):
        assert hasattr(hf_lwf, name)
    setup = (PACKAGE.parent / "setup.cfg").read_text()
    assert "hf-lwf = hf_lwf.app.cli:main" in setup
    assert os.path.exists(PACKAGE / "__main__.py")
