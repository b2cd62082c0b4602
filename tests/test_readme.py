"""The README is a front door that tells the truth: its cluster recipe is the commands the
quickstart runs (rendered by megatron_adapt/recipe.py), every tool command in it and in docs/
parses with that tool's own arguments, and its map names files that exist."""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from megatron_adapt import recipe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    """Each shell command of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in _bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def test_readme_is_short():
    assert README.count("\n") <= 300, f"README.md has {README.count(chr(10))} lines; the rest belongs in docs/"


def test_readme_cluster_block_is_the_recipe_module():
    sys.path.insert(0, str(ROOT))
    from tools.recipe import CLUSTER_BASE, CLUSTER_WORK

    block = recipe.render(recipe.recipe_steps(recipe.CLUSTER), CLUSTER_WORK, CLUSTER_BASE)
    assert block + "\n" in _bash_blocks(README), \
        "README's cluster recipe differs from `python tools/recipe.py show`; paste its output into README.md"


def test_quickstart_runs_the_clusters_commands_with_other_values():
    """Same tools and flags in the same order: only values (paths, sizes, configs, launcher) differ."""
    def shape(step: recipe.Step) -> list[str]:
        # --max-docs only shortens the quickstart's evaluation
        words = [w for w in step.argv if (w.startswith("--") and w != "--max-docs") or w.startswith("tools/")]
        return [w for w in words if not w.startswith("--nproc")] if step.trains else words

    cluster, quick = recipe.recipe_steps(recipe.CLUSTER), recipe.recipe_steps(recipe.QUICKSTART)
    assert [s.title for s in cluster] == [s.title for s in quick]
    for a, b in zip(cluster, quick):
        if a.trains:
            assert b.trains and a.output == b.output, f"{a.title}: the runs write to different places"
        else:
            assert shape(a) == shape(b), f"{a.title}: {shape(a)} vs {shape(b)}"
    assert recipe.recipe_steps(recipe.QUICKSTART) == recipe.quickstart_steps()[2:-2], \
        "the quickstart is not the recipe between its stand-ins and its generations"


class _Parsed(Exception):
    pass


def _tool_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in [ROOT / "README.md", *DOCS]:
        for argv in _commands(path.read_text()):
            while argv and "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
                argv = argv[1:]
            if len(argv) >= 2 and argv[0] == "python" and argv[1].startswith("tools/"):
                found.append((f"{path.name}: {shlex.join(argv)}", argv[1:]))
    return found


@pytest.mark.parametrize("where,argv", _tool_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_tool_commands_parse(where, argv, monkeypatch):
    """The tool accepts every flag and choice the documentation gives it (its parser runs, the tool does not)."""
    spec = importlib.util.spec_from_file_location("documented_tool", ROOT / argv[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        module.main(argv[1:])
    except _Parsed:
        return
    except SystemExit as exit_:
        pytest.fail(f"{where}: the tool refused its arguments (exit {exit_.code})")
    pytest.fail(f"{where}: the tool ran without parsing arguments")


def test_map_names_files_that_exist():
    section = README.split("## Where to change what", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`((?:megatron_adapt|tools|launch|configs|csrc|bench|model|data)/[\w./]*|[\w]+\.py)`", section)
    assert named, "the map names no files"
    base = None
    for name in named:
        if name.startswith(("model/", "data/")) and not (ROOT / name).exists():
            name = "megatron_adapt/" + name
        if "/" not in name:  # a file named after its package's path in the same cell
            assert base is not None and (base / name).exists(), f"README map: {name} is not in {base}"
            continue
        path = ROOT / name
        assert path.exists(), f"README map names {name}, which is not in the tree"
        base = path if path.is_dir() else path.parent
