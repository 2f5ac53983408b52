"""bench/mutate.py, the mutation campaign: every mutant's text is found exactly once in the project's code (so that the
campaign's one command plants all of them, and a mutant follows its code when the code moves), each plants a change,
and each planted file still compiles (a mutant that cannot be imported would be a kill that proves nothing)."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import mutate  # noqa: E402


def test_the_mutants_have_distinct_names():
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("m", mutate.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_is_found_once_and_plants_a_bug_that_compiles(m):
    where, why = mutate.locate(m, ROOT)
    assert where is not None, f"{m.name}: {why}"
    assert m.replacement != m.original
    text = where.read_text()
    mutated = text.replace(m.original, m.replacement)
    assert mutated != text
    compile(mutated, str(where), "exec")  # raises SyntaxError for a mutant that breaks the file
    for hint in m.hints:
        assert (ROOT / hint).is_file(), f"{m.name}: hint {hint} is not a file"
