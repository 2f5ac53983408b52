"""The README's equation index, the code's tags and the tests stay in sync; so do the decided choices of SPEC.md and
SPEC-baselines.md."""
from __future__ import annotations

import ast
import io
import re
import tokenize

from dataclasses import fields

from conftest import ROOT, assets
from settings import Settings, flag

TAG_NAMES = r"E\d+|Alg\d|L\d|P\d|S\d|K\d|D\d|B\d|F\d"
TAG = re.compile(rf"\[({TAG_NAMES})\]")
SOURCES = sorted(p.name for p in ROOT.glob("*.py"))  # every room of the code; tests/ holds the proofs


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
            "S2", "K1", "K2", "K3", "K4", "D1", "B1", "B2", "F1"} == set(index)


def test_the_index_points_at_functions_that_carry_the_tag():
    for tag, where in readme_index().items():
        refs = re.findall(r"`(\w+\.py):([\w.]+)`", where)
        assert refs, f"{tag}: no file:function in the README"
        for file, func in refs:
            src = (ROOT / file).read_text()
            name = func.split(".")[-1]
            assert re.search(rf"(def|class) {name}\b", src), f"{tag}: {file} has no {func}"
        assert any(f"[{tag}]" in (ROOT / file).read_text() for file, _ in refs), f"{tag}: not tagged in {refs}"


def functions_by_line(tree: ast.Module) -> dict[int, str]:
    """Line number -> the qualified name (Class.method) of the innermost function holding it."""
    where: dict[int, str] = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    where.update({n: name for n in range(child.lineno, child.end_lineno + 1)})
                visit(child, name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return where


def computed_on(tree: ast.Module, line: int) -> list[ast.AST]:
    """The expressions a line computes: the innermost statement starting on it (of a compound statement, the header:
    an if's test, a for's target and iterable)."""
    starts = [n for n in ast.walk(tree) if isinstance(n, ast.stmt) and n.lineno == line]
    if not starts:
        return []
    stmt = min(starts, key=lambda n: n.end_lineno - n.lineno)
    header = {ast.If: ("test",), ast.While: ("test",), ast.For: ("target", "iter"), ast.With: ("items",)}
    if type(stmt) in header:
        return [getattr(stmt, f) for f in header[type(stmt)] if not isinstance(getattr(stmt, f), list)] + \
            [i.context_expr for i in getattr(stmt, "items", [])]
    return [stmt]


def tag_sites() -> list[tuple[str, str, int, str, bool]]:
    """Every bracketed tag written in the code: (tag, file, line, the holding function, in a comment after code)."""
    sites = []
    for f in SOURCES:
        src = (ROOT / f).read_text()
        comments = {t.start: t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                    if t.type == tokenize.COMMENT}
        holder, lines = functions_by_line(ast.parse(src)), src.splitlines()
        for n, line in enumerate(lines, 1):
            for m in TAG.finditer(line):
                after_code = any(row == n and col <= m.start() and col > 0 and line[:col].strip()
                                 for (row, col) in comments)
                sites.append((m.group(1), f, n, holder.get(n, ""), after_code))
    return sites


def test_each_tag_is_on_one_computing_line_and_the_index_names_its_function_first():
    """A tag in brackets is written once in the whole code: in the comment of the line that computes its equation
    (not a docstring, not a comment line of its own, not a call of another tagged function: a call site names the
    equation in words). The README index's first file.py:function for that tag is the function holding that line."""
    sites, index = tag_sites(), readme_index()
    by_tag: dict[str, list] = {}
    for site in sites:
        by_tag.setdefault(site[0], []).append(site)
    holders = {holder.split(".")[-1] for _, _, _, holder, _ in sites}  # the functions that compute a tag
    problems = [f"[{t}] written {len(s)} times: " + ", ".join(f"{f}:{n}" for _, f, n, _, _ in s)
                for t, s in sorted(by_tag.items()) if len(s) != 1]
    for tag, f, n, holder, after_code in (s[0] for s in by_tag.values() if len(s) == 1):
        tree = ast.parse((ROOT / f).read_text())
        exprs = computed_on(tree, n)
        nodes = [x for e in exprs for x in ast.walk(e)]
        computes = any(isinstance(x, (ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Call,
                                         ast.Subscript))
                       for x in nodes)
        top = exprs[0].value if exprs and isinstance(exprs[0], (ast.Assign, ast.Expr, ast.Return)) else None
        called = top.func.attr if isinstance(top, ast.Call) and isinstance(top.func, ast.Attribute) else \
            getattr(getattr(top, "func", None), "id", None)
        if not after_code or not computes:
            problems.append(f"[{tag}] {f}:{n}: not in the comment of a line that computes")
        elif called in holders - {holder.split(".")[-1]}:
            problems.append(f"[{tag}] {f}:{n}: a call of {called}, which computes a tagged equation itself")
        first = re.findall(r"`(\w+\.py:[\w.]+)`", index.get(tag, ""))[:1]
        if first != [f"{f}:{holder}"]:
            problems.append(f"[{tag}] {f}:{n} is in {f}:{holder}; the README index names {first} first")
    assert not problems, "\n".join(problems)


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


def beyond_the_paper_options(beyond: str) -> dict[str, tuple[str, int]]:
    """SPEC.md's "Beyond the paper" bullets: tag -> (the option's flag, the number of [decided] choices it makes)."""
    bullets = re.findall(r"^- ((\w+),.*?)(?=^- |\Z)", beyond, flags=re.M | re.S)
    return {tag: (re.search(r"`(--[a-z-]+)", text).group(1), len(re.findall(r"\*\*\[decided", text)))
            for text, tag in bullets}


def test_readme_lists_every_decided_choice_of_the_spec():
    """The README lists the paper's 14 and the baselines' 6 decided choices, and one entry for each decided choice of
    an option beyond the paper once that option exists (its flag is a setting), each entry naming the option's flag."""
    spec = (ROOT / "docs" / "SPEC.md").read_text().split("## Notation", 1)[1]  # the intro explains the marker
    # "Beyond the paper" decides the options F1, B1, B2; its own first sentence explains the marker too.
    before, beyond = spec.split("## Beyond the paper", 1)
    beyond, after = beyond.split("\n## ", 1)
    spec, beyond = before + after, beyond.split("\n", 2)[2]  # after its heading and its explaining sentence's start
    baselines = (ROOT / "docs" / "SPEC-baselines.md").read_text().split("## PPO with a critic", 1)[1]  # likewise
    n_spec = len(re.findall(r"\*\*\[decided", spec)) + len(re.findall(r"\*\*\[decided", baselines))
    readme = (ROOT / "README.md").read_text().split("## Choices the paper leaves open", 1)[1].split("\n## ")[0]
    entries = re.findall(r"^\d+\. \*\*\[decided\]\*\*.*$", readme, flags=re.M)
    options = beyond_the_paper_options(beyond)
    assert sorted(options) == ["B1", "B2", "F1"] and sum(n for _, n in options.values()) == 5
    flags = {flag(f.name) for f in fields(Settings)}
    built = {tag: n for tag, (option, n) in options.items() if option in flags}
    assert {"B1", "B2", "F1"} <= set(built)
    assert n_spec == 14 + 6 and len(entries) == n_spec + sum(built.values())
    for tag, (option, n) in options.items():  # an option's entries name its flag; none before the option exists
        naming = [e for e in entries if re.search(rf"{re.escape(option)}(?![\w-])", e)]
        assert len(naming) == built.get(tag, 0), f"{tag} ({option}): {len(naming)} README entries name it"


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
                   "no pair",
                   # SPEC.md, beyond the paper
                   "TreeRL's process reward", "∝ H_j of y[j]",
                   "frozen copy of the starting weights", "AdamW's weight decay over every parameter",
                   "TRL's GRPO default for full fine-tuning"]:
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


# --- the README and docs/: a first read, and links that lead somewhere ------------------------------------------------

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path) -> set[str]:
    text, fence, found = path.read_text(), False, set()
    for line in text.splitlines():
        fence ^= line.startswith("```")
        if not fence and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(m.group(1)))
    return found


def test_slug_is_github_s_on_the_headings_we_link():
    assert slug("E10's λ: two readings, and the default of the paper's command") == \
        "e10s-λ-two-readings-and-the-default-of-the-papers-command"
    assert slug("Design notes and the smaller choices") == "design-notes-and-the-smaller-choices"
    assert slug("T-SPMO: what moves the adapter") == "t-spmo-what-moves-the-adapter"


def test_every_relative_link_of_the_readme_and_docs_leads_to_a_file_and_heading():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_first_read():
    """At most 300 lines: what tokrl is, the set-up, the main command and its cost, the miniature, the tests, the
    paper's commands, the index, the choices and the links; what is measured or long lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, len(lines)
    first = "\n".join(lines[:60])
    assert "pip install" in first and "python train.py --algo tspmo --task mult" in first
