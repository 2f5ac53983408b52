"""The rooms' imports point down: parsing flags does not load the decoder, and no two rooms import each other."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_parsing_flags_does_not_import_the_decoder():
    out = subprocess.run([sys.executable, "-c", "import settings, sys; print(sorted({'model', 'sampling', "
                          "'pretrained'} & set(sys.modules)))"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def top_level_imports(path: Path, rooms: set[str]) -> set[str]:
    """The project's modules that `path` imports at its top level (function-level imports run only when called)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & rooms


def test_no_import_cycle_among_the_rooms():
    rooms = {p.stem for p in ROOT.glob("*.py")}
    arrows = {r: top_level_imports(ROOT / f"{r}.py", rooms) - {r} for r in rooms}
    state: dict[str, str] = {}

    def visit(room: str, path: list[str]) -> None:
        state[room] = "open"
        for to in sorted(arrows[room]):
            assert state.get(to) != "open", f"import cycle: {' -> '.join(path + [room, to])}"
            if to not in state:
                visit(to, path + [room])
        state[room] = "done"

    for room in sorted(rooms):
        if room not in state:
            visit(room, [])
    assert arrows["model"] == {"values"} and "model" in arrows["sampling"] and "model" in arrows["pretrained"]


def test_no_script_shadows_a_room_it_imports():
    """A top-level function, class or assignment named as a module the file imports at its top level replaces that
    module for every function of the file (a section function named `sampling` in bench/benchmark.py makes each
    `sampling.sample` there an AttributeError). Checked over the rooms and the bench/ scripts."""
    clashes = []
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        imported, defined = set(), set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        clashes += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(imported & defined)]
    assert clashes == []
