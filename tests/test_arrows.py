"""The rooms' imports point down: parsing flags does not load the decoder, no two rooms import each other, and the
README's map of the rooms is the code's."""
import ast
import re
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


def test_the_evaluation_and_the_stop_lie_below_the_loop_and_the_checks():
    """evaluation.py sizes its own batch: it imports neither the loop (training.py) nor the input checks (checks.py),
    which read CPU_EVAL_BATCH from it; stopping.py (the signals) imports no room but distributed.py. The loop and the
    command line import both."""
    rooms = {p.stem for p in ROOT.glob("*.py")}
    arrows = {r: top_level_imports(ROOT / f"{r}.py", rooms) for r in ("evaluation", "stopping", "training", "train",
                                                                       "checks")}
    assert not {"training", "checks", "train"} & arrows["evaluation"], arrows["evaluation"]
    assert arrows["stopping"] <= {"distributed"}, arrows["stopping"]
    assert {"evaluation", "stopping"} <= arrows["training"] and "stopping" in arrows["train"]
    assert "evaluation" in arrows["checks"]


def readme_map() -> list[tuple[set[str], set[str]]]:
    """The README's map of the code, top row first: each row's rooms and the imports it names."""
    section = (ROOT / "README.md").read_text().split("## The code\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| `"):
            rooms, _, imports = (cell.strip() for cell in line.strip().strip("|").split("|"))
            rows.append((set(re.findall(r"`(\w+)\.py`", rooms)),
                         set() if imports == "—" else {name.strip() for name in imports.split(",")}))
    return rows


def test_the_readme_s_map_names_every_room_once_with_its_imports_each_pointing_down():
    rooms = {p.stem for p in ROOT.glob("*.py")}
    rows = readme_map()
    listed = [room for row, _ in rows for room in row]
    odd = sorted(r for r in listed if listed.count(r) > 1 or r not in rooms)
    assert sorted(listed) == sorted(rooms), f"not in the map: {sorted(rooms - set(listed))}; twice or no room: {odd}"
    for i, (row, named) in enumerate(rows):
        code = set().union(*(top_level_imports(ROOT / f"{r}.py", rooms) for r in row)) - row
        assert named == code, f"{sorted(row)}: the map names {sorted(named - code)} more, {sorted(code - named)} less"
        below = {room for later, _ in rows[i + 1:] for room in later}
        assert named <= below, f"{sorted(row)} imports {sorted(named - below)}, not below it in the README's map"


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
