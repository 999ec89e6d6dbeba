"""seekforge's layering: lower layers never import higher ones, and no two parts import each other.

Every `import` and `from ... import` in seekforge's sources counts, those inside functions included (a lazy
import is still a dependency; it only hides the cycle until run time). A part is a subpackage
(seekforge/model/, seekforge/engine/, ...) or a top-level module (seekforge/tokenizer.py, ...); imports
inside one part are free.
"""

from __future__ import annotations

import ast
from pathlib import Path

import seekforge

ROOT = Path(seekforge.__file__).parent

# Each part, with the parts below it that it may import (each package's __init__ docstring says the same).
# The order is the layering, lowest first: ops -> nothing of seekforge but the config and error helpers;
# model -> ops; engine -> ops, model; parallel -> model; train -> model, data and parallel, never the engine;
# rl -> train (its loop) and engine (rollouts); server -> engine; commands -> everything.
BASE = {"errors", "configio"}
ALLOWED = {
    "errors": set(),
    "configio": {"errors"},
    "ops": BASE,
    "model": BASE | {"ops"},
    "fp8": BASE | {"model", "ops"},  # FP8 training applied to the model from outside; its quantisation is an op
    "parallel": BASE | {"model"},  # distributed training applied to the model from outside
    "chat_template": BASE,
    "reasoning": BASE,
    "documents": BASE,
    "tasks": BASE | {"documents"},  # a task's corpus form may be a Prompted document
    "rewards": BASE | {"tasks"},
    "dual_chain": BASE | {"tasks", "rewards"},  # the engine and server take a DualChain; they import none of it
    "tokenizer": BASE | {"chat_template", "documents"},
    "data": BASE | {"tasks", "tokenizer", "documents"},
    "engine": BASE | {"ops", "model", "tokenizer"},
    "train": BASE | {"model", "tokenizer", "data", "documents", "fp8", "parallel", "tasks"},  # tasks: long_eval's passkey probe
    "rl": BASE | {"model", "engine", "tokenizer", "data", "tasks", "rewards", "train", "parallel"},
    "server": BASE | {"engine", "model", "tokenizer", "reasoning", "chat_template"},
    "commands": {"*"},
    "cli": BASE | {"commands"},
    "__main__": {"cli"},
    "__init__": BASE | {"model", "engine"},  # the package's front door: seekforge.LLM, seekforge.from_pretrained
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[tuple[str, str], list[str]]:
    """{(importer part, imported part): ["seekforge.a.b imports seekforge.c.d", ...]} across parts."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if rel.name == "__init__" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from seekforge import engine` imports the part seekforge.engine
                targets = [f"{base}.{alias.name}" if base == "seekforge" else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("seekforge.") and _part(target) != _part(module):
                    if _root_name(target):
                        continue
                    edges.setdefault((_part(module), _part(target)), []).append(f"{module} imports {target}")
    return edges


def _root_name(target: str) -> bool:
    """`from seekforge import ConfigError`: a name of the package root, not a part."""
    name = target.split(".")[1]
    return not ((ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file())


def test_every_part_has_a_place_in_the_layering():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    assert parts == set(ALLOWED), "add the new part to ALLOWED, with the parts it may import"


def test_no_part_imports_a_higher_one():
    bad = [f"{a} -> {b}: {where[0]}" for (a, b), where in sorted(_imports().items())
           if "*" not in ALLOWED[a] and b not in ALLOWED[a]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for a, b in _imports():
        graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:  # depth first; "open" nodes are those on `path`
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt != node else node)
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles between parts:\n" + "\n".join(cycles)


def test_the_walk_sees_imports_inside_functions():
    """A lazy import still counts: LLM.__init__ imports the checkpoint loader inside the function."""
    assert "seekforge.engine.llm imports seekforge.model.hf" in _imports()[("engine", "model")]
