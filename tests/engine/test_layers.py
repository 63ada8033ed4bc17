"""The architecture, checked from the source: imports point one way, the loss library stays light, and
`engine/train.py` run as a script cannot shadow another module.

Layers of profuser.engine (a module may import its own unit and units of a lower rank only):
    9  cli.py, api.py              the command line (dispatches to every command, the recipe included);
                                   the Python API (every command as a function)
    8  train.py                    the training recipe
    7  tools/                      demo, plot, synthetic stores
    6  passes/, trainer/           teacher passes; training step, schedule, checkpoints, eval
    5  loader/                     the streaming loader
    4  store/                      the stores on disk
    3  text/                       chat encoding, alignment, known tokenizers
    2  models/, config_cli.py      model / tokenizer / dtype / logit-transform rules; every command's options
    1  commands.py, config.py,     the subcommand table; typed configs and choice lists; ranks and devices;
       dist.py, errors.py, fileio.py  one-line errors; atomic writes, full-disk errors, the one lock
    0  config_tree.py              typed dataclass trees from YAML and key=value overrides
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "engine"
RANK = {"config_tree": 0, "commands": 1, "config": 1, "dist": 1, "errors": 1, "fileio": 1, "config_cli": 2,
        "models": 2, "text": 3, "store": 4, "loader": 5, "passes": 6, "trainer": 6, "tools": 7, "train": 8, "cli": 9,
        "api": 9}


def module_name(path: Path) -> str:
    rel = path.relative_to(ENGINE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["profuser.engine", *parts])


def engine_imports(path: Path) -> set[str]:
    """Every profuser.engine module (or package) `path` imports, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("profuser.engine")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("profuser.engine"):
                continue
            for a in node.names:  # `from . import store` names a module, `from .store import X` a member
                sub = f"{mod}.{a.name}"
                out.add(sub if (ENGINE / Path(*sub.split(".")[2:])).with_suffix(".py").exists()
                        or (ENGINE / Path(*sub.split(".")[2:]) / "__init__.py").exists() else mod)
    return out


def unit(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[2] if len(parts) > 2 else None  # None: the profuser.engine package itself


SOURCES = sorted(ENGINE.rglob("*.py"))


def test_every_engine_module_has_a_layer():
    units = {unit(module_name(p)) for p in SOURCES} - {None}
    assert units == set(RANK), f"new top-level units need a layer: {units ^ set(RANK)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path):
    me = unit(module_name(path))
    for mod in engine_imports(path):
        other = unit(mod)
        if other is None or me is None or other == me:
            continue
        assert RANK[other] < RANK[me], f"{path.relative_to(REPO)} ({me}, rank {RANK[me]}) imports {mod} " \
                                       f"({other}, rank {RANK[other]}): dependencies must point down"


def test_no_import_cycles_between_modules():
    graph = {module_name(p): {m for m in engine_imports(p) if m != module_name(p)} for p in SOURCES}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph.get(m, ()):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n in graph and state.get(n) is None:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if state.get(m) is None:
            visit(m, [m])


def test_loss_library_imports_only_torch_numpy_triton():
    """profuser.kernels is usable alone (pip install profuser): no engine, transformers, datasets, pyarrow."""
    allowed = {"torch", "triton", "numpy", "__future__", "dataclasses", "typing", "math", "os", "contextlib",
               "warnings", "functools"}
    for path in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for n in names:
                assert n.split(".")[0] in allowed, f"{path.relative_to(REPO)} imports {n}"


def test_script_entry_cannot_shadow_other_modules():
    """`deepspeed engine/train.py` puts engine/ first on sys.path: none of its top-level names may be a
    module that Python or an installed package provides (that is why no sys.path edit is needed)."""
    names = {p.stem for p in ENGINE.glob("*.py")} | {p.name for p in ENGINE.iterdir() if (p / "__init__.py").exists()}
    names.discard("__init__")
    for name in sorted(names):
        assert name not in sys.stdlib_module_names, f"engine/{name} shadows the standard library module {name}"
        spec = importlib.util.find_spec(name)
        assert spec is None, f"engine/{name} would shadow the installed module {name} ({spec.origin})"


def test_no_sys_path_edits():
    for top in ("engine", "bench", "kernels"):
        for path in sorted((REPO / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                    pytest.fail(f"{path.relative_to(REPO)}:{node.lineno} uses sys.path")


def test_cli_commands_resolve():
    from profuser.engine import cli

    for name, (module, _) in cli.COMMANDS.items():
        mod = importlib.import_module(f"profuser.engine.{module}")
        assert callable(mod.add_arguments) and callable(mod.run_command), name
