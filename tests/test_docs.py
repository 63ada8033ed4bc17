"""Docs that stay true: every path, module, Makefile target, `profuser` subcommand and flag that README.md and
docs/*.md name exists, the README's layout table lists every engine module, and every Makefile target has
its `make help` line.

What counts as a name (in `backticks` or code blocks):
    paths      tokens with a slash or a known suffix (.py .md .yaml .json .cpp .h .sh .jsonl .toml), resolved
               against the repository root, engine/, kernels/, tests/ and bench/; placeholders (<...>, *, {})
               and run outputs (runs/, output folders) are not paths of the repository
    modules    profuser.engine.* / profuser.kernels.* dotted names: a module, or an attribute of one
    targets    `make X`
    commands   `profuser X [... --flag ...]`: X a subcommand, each --flag an option of X's parser
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUFFIXES = (".py", ".md", ".yaml", ".json", ".cpp", ".h", ".sh", ".jsonl", ".toml", ".txt")
ROOTS = ("", "engine", "kernels", "tests", "bench", "csrc", "docs", "configs", "data", "engine/trainer",
         "engine/passes", "engine/text", "engine/loader", "engine/store", "engine/tools", "engine/models",
         "bench/results")
# the user's own files in examples (`profuser prepare --input a.jsonl`), not claims about the tree
EXAMPLES = {"a.jsonl", "b.jsonl", "hf_folder/", "my_data.jsonl", "data.jsonl", "heldout.jsonl", "prompts.jsonl",
            "fuse.yaml", "test.jsonl"}
# written by runs, not part of the repository: a name under these is an output, not a claim about the tree
OUTPUTS = ("runs/", "demo_out/", "final/", "report/", "checkpoints/", "teachers/", "prepared/", "scores/",
           "step", "tmp-", "~/", "/tmp/", "$", ".cache", "out/", "table/", "seed", "tensorboard", "models/<")
OUTPUT_FILES = {"metrics.jsonl", "config.yaml", "manifest.json", "votes.parquet", "votes.json", "report.json",
                "report.md", "profuser_checkpoint.json", "summary.json", "study.md", "study.json", "items.jsonl",
                "heldout.jsonl", "chat_template.jinja", "config.json", "tokenizer.json", "latest", "study_wall.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "train.lock",
                "prepare.lock", "faults.json", "model.safetensors", "tokenizer.model", "selected.json",
                "validation.json", "val.jsonl", "test_pool.jsonl", "train.jsonl", "infer.jsonl",
                "profuser_export.json", "trackers.json"}


def text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def code_spans(doc: str) -> list[str]:
    """Inline `code` and every line of fenced code blocks."""
    out = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", doc, flags=re.S))
    for block in re.findall(r"```[a-z]*\n(.*?)```", doc, flags=re.S):
        out += block.splitlines()
    return out


def path_like(token: str) -> bool:
    if any(c in token for c in "<>*{}=() ") or token.startswith(("-", "http", ".")) or "://" in token:
        return False
    if any(o in token for o in OUTPUTS) or Path(token).name in OUTPUT_FILES or token in EXAMPLES:
        return False
    return token.endswith(SUFFIXES) or (token.endswith("/") and token.count("/") == 1 and len(token) > 2)


def exists(token: str) -> bool:
    t = token.rstrip("/").removeprefix("./")
    return any((REPO / root / t).exists() for root in ROOTS)


def doc_tokens():
    for doc in DOCS:
        for span in code_spans(text(doc)):
            for token in re.split(r"[\s,;:()\[\]]+", span):
                yield doc.relative_to(REPO), token.strip("'\"").rstrip(".")


@pytest.mark.parametrize("doc", [d.relative_to(REPO) for d in DOCS], ids=str)
def test_every_path_named_in_the_docs_exists(doc):
    missing = sorted({t for d, t in doc_tokens() if d == doc and path_like(t) and not exists(t)})
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 1, -1):
        mod = ".".join(parts[:i])
        try:
            if importlib.util.find_spec(mod) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(mod)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_module_named_in_the_docs_resolves():
    names = {m for d, t in doc_tokens() for m in re.findall(r"profuser\.(?:engine|kernels)(?:\.\w+)*", t)}
    assert names
    assert not sorted(n for n in names if not resolves(n)), "modules named in the docs that do not exist"


def makefile_targets() -> dict[str, str]:
    """{target: its line}."""
    out = {}
    for line in text(REPO / "Makefile").splitlines():
        m = re.match(r"^([a-zA-Z][\w-]*):(?!=)", line)
        if m:
            out[m.group(1)] = line
    return out


def test_every_make_target_named_in_the_docs_exists_and_every_target_has_help():
    targets = makefile_targets()
    named = {m for doc in DOCS for span in code_spans(text(doc)) for m in re.findall(r"\bmake ([a-z][\w-]*)", span)}
    unknown = sorted(named - set(targets))
    assert named and not unknown, f"unknown make targets in the docs: {unknown}"
    assert not [t for t, line in targets.items() if "## " not in line], "targets without a `## ` help line"


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    from profuser.engine import cli

    p = argparse.ArgumentParser(prog=f"profuser {name}")
    importlib.import_module(f"profuser.engine.{cli.COMMANDS[name][0]}").add_arguments(p)
    return p


def test_every_profuser_command_and_flag_named_in_the_docs_exists():
    from profuser.engine import cli

    bad = []
    for doc in DOCS:
        for span in code_spans(text(doc)):
            for m in re.finditer(r"(?:^|\s|`)profuser ([a-z][\w-]*)((?:\s+[^|`#]*)?)", span):
                name, rest = m.group(1), m.group(2) or ""
                if name not in cli.COMMANDS:
                    bad.append(f"{doc.name}: profuser {name}")
                    continue
                opts = {s for a in subcommand_parser(name)._actions for s in a.option_strings}
                bad += [f"{doc.name}: profuser {name} {f}" for f in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest)
                        if f not in opts and f not in ("--debug", "--help", "--version")]
    assert not bad, f"subcommands / flags named in the docs that do not exist: {sorted(set(bad))}"


def test_the_readme_layout_table_lists_every_engine_module():
    readme = text(REPO / "README.md")
    table = readme[readme.index("## Repository layout"):]
    table = table[:table.index("\n## ", 5)]
    modules = sorted(p.relative_to(REPO / "engine") for p in (REPO / "engine").rglob("*.py")
                     if p.name != "__init__.py")
    missing = [str(m) for m in modules if f"`{m.name}`" not in table and f"`engine/{m}`" not in table]
    assert not missing, f"engine modules the README layout table does not list: {missing}"
