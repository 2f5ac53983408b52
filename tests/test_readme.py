"""The README's equation index, the code's tags and the tests stay in sync; so do the decided choices of SPEC.md and
SPEC-baselines.md."""
from __future__ import annotations

import ast
import re

from conftest import ROOT, assets

TAG_NAMES = r"E\d+|Alg\d|L\d|P\d|S\d|K\d|D\d"
TAG = re.compile(rf"\[({TAG_NAMES})\]")
SOURCES = ["model.py", "lora.py", "reward.py", "trie.py", "tokrl.py", "train.py", "settings.py", "tasks.py",
           "checkpoints.py", "baselines.py", "replay.py"]


def readme_index() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Equation index", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(rf"\| ({TAG_NAMES}) \|", line)]
    return {r[1].strip(): r[-2] for r in rows}


def code_tags() -> dict[str, set[str]]:
    tags: dict[str, set[str]] = {}
    for f in SOURCES:
        for t in TAG.findall((ROOT / f).read_text()):
            tags.setdefault(t, set()).add(f)
    return tags


def test_every_readme_tag_is_in_the_code_and_back():
    index, code = readme_index(), code_tags()
    assert set(index) == set(code), f"README only: {set(index) - set(code)}; code only: {set(code) - set(index)}"
    assert {"E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8", "E9", "E10", "Alg1", "Alg2", "L1", "P1", "S1",
            "S2", "K1", "K2", "K3", "K4", "D1"} == set(index)


def test_the_index_points_at_functions_that_carry_the_tag():
    for tag, where in readme_index().items():
        refs = re.findall(r"`(\w+\.py):([\w.]+)`", where)
        assert refs, f"{tag}: no file:function in the README"
        for file, func in refs:
            src = (ROOT / file).read_text()
            name = func.split(".")[-1]
            assert re.search(rf"(def|class) {name}\b", src), f"{tag}: {file} has no {func}"
        assert any(f"[{tag}]" in (ROOT / file).read_text() for file, _ in refs), f"{tag}: not tagged in {refs}"


def all_test_functions() -> list[tuple[str, str, set[str]]]:
    """Every top-level test function of tests/test_*.py (but this file): (name, its text with the section heading
    it sits under, the names it calls: f(...) and obj.f(...), read from the syntax tree, not from the text)."""
    out = []
    for p in sorted((ROOT / "tests").glob("test_*.py")):
        if p.name == "test_readme.py":
            continue
        src = p.read_text()
        lines = src.splitlines()
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                calls = {c.func.attr if isinstance(c.func, ast.Attribute) else getattr(c.func, "id", "")
                         for c in ast.walk(node) if isinstance(c, ast.Call)}
                heading = next((ln for ln in reversed(lines[: node.lineno - 1]) if re.match(r"# -+ ", ln)), "")
                out.append((f"{p.name}::{node.name}", heading + "\n" + ast.get_source_segment(src, node), calls))
    return out


def test_every_tag_has_a_test():
    """A tag is proven by a test function that names it (in its name, body or section heading) AND calls a function
    the README index names for it: a docstring or comment that mentions a tag, alone, does not count."""
    tests, missing = all_test_functions(), []
    for tag, where in readme_index().items():
        funcs = {f.split(".")[-1] for _, f in re.findall(r"`(\w+\.py):([\w.]+)`", where)}
        names_tag = re.compile(rf"(?<![A-Za-z0-9]){tag}(?![0-9])")
        provers = [name for name, text, calls in tests if names_tag.search(text) and funcs & calls]
        if not provers:
            missing.append(f"{tag} (calling one of {sorted(funcs)})")
    assert not missing, f"no test both names and calls the README index's functions for: {', '.join(missing)}"


def test_readme_lists_every_decided_choice_of_the_spec():
    spec = (ROOT / "docs" / "SPEC.md").read_text().split("## Notation", 1)[1]  # the intro explains the marker
    baselines = (ROOT / "docs" / "SPEC-baselines.md").read_text().split("## PPO with a critic", 1)[1]  # likewise
    n_spec = len(re.findall(r"\*\*\[decided", spec)) + len(re.findall(r"\*\*\[decided", baselines))
    readme = (ROOT / "README.md").read_text().split("## Choices the paper leaves open", 1)[1].split("\n## ")[0]
    n_readme = len(re.findall(r"^\d+\. \*\*\[decided\]\*\*", readme, flags=re.M))
    assert n_spec == n_readme == 14 + 6


def test_every_decided_choice_is_commented_in_the_code():
    lines = "".join((ROOT / f).read_text() for f in SOURCES).splitlines()
    decided = "\n".join(" ".join(lines[i: i + 2]) for i, line in enumerate(lines) if "[decided]" in line)
    for needle in ["round(fraction·L)", "α = r", "leading minus sign", "partial products", "+ 1e-4", "0-based",
                   "does not give P", "replay pool", "r = 1.0", "weight decay", "no λ term in the loss", "ChatML",
                   "first newline",
                   "Evaluation: greedy",
                   # SPEC-baselines.md
                   "shares the policy", "last token", "not a reward penalty", "λ_GAE = 0.95",
                   "over all completion tokens", "μ = 4", "w3 = 0.5", "same sampling budget", "β_D = 0.1",
                   "no pair"]:
        assert needle in decided, f"no [decided] comment (on its line or the next) says {needle!r}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    cmd = re.search(r"^(python3 -m pytest[^\n]*)$", ci, flags=re.M).group(1)
    assert f"\n{cmd}\n" in readme


def test_the_shipped_specifications_are_the_shared_ones():
    """docs/ ships the specification so that the README stands alone; it must not drift from the project's own."""
    for name in ("SPEC.md", "SPEC-baselines.md"):
        assert (ROOT / "docs" / name).read_text() == (assets() / name).read_text(), f"docs/{name} differs"
