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


def runtime_imports(path: Path, rooms: set[str]) -> set[str]:
    """The project's modules that `path` imports anywhere, in functions too, but not under `if TYPE_CHECKING:`
    (annotations only: those never run)."""
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo += node.orelse
            continue
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
        todo += ast.iter_child_nodes(node)
    return found & rooms


def test_logging_does_not_import_the_objectives_or_the_adapter():
    rooms = {p.stem for p in ROOT.glob("*.py")}
    assert runtime_imports(ROOT / "lora.py", rooms) >= {"pretrained", "values"}  # the reader sees function imports
    assert "model" not in runtime_imports(ROOT / "lora.py", rooms)  # and skips lora's annotations-only import
    assert runtime_imports(ROOT / "runlog.py", rooms) & {"tokrl", "lora", "baselines"} == set()
