"""The code's layers: every import points down (or across, within a layer), nothing imports back in a circle, and
no file edits sys.path (the project is installed into its venv instead); each test file imports no other."""
import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT
# From the bottom up; a module may import from its own layer and the layers below.
LAYERS = {"core": 0, "distributed_utils": 0, "models": 1, "data": 2, "engine": 3, "train": 4, "eval": 4, "predict": 4,
          "scripts": 4}


def project_files() -> list[Path]:
    files = [p for top in LAYERS for p in [ROOT / f"{top}.py", *sorted((ROOT / top).rglob("*.py"))] if p.is_file()]
    return [p for p in files if ".venv" not in p.parts]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The project modules `path` imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            name = ".".join(filter(None, [base, node.module or ""]))
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {m for m in found if m.split(".")[0] in LAYERS}


def existing(name: str, modules: set[str]) -> str | None:
    """The longest prefix of a dotted import that is one of the project's modules."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules), None)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in project_files()}
    graph = {}
    for name, path in files.items():
        targets = {existing(m, set(files)) for m in imported_modules(path)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def test_the_scan_sees_the_layers():
    graph = import_graph()
    assert {"core.config", "models.convnext", "data.loaders.samplers", "engine.loop", "train", "eval"} <= set(graph)
    assert "core.errors" in graph["distributed_utils"] and "engine.build" in graph["train"]


def test_imports_point_down():
    wrong = [f"{a} (layer {LAYERS[a.split('.')[0]]}) imports {b} (layer {LAYERS[b.split('.')[0]]})"
             for a, targets in import_graph().items() for b in targets
             if LAYERS[b.split(".")[0]] > LAYERS[a.split(".")[0]]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_config_does_not_import_the_model_code():
    assert not any(m.startswith("models") for m in import_graph()["core.config"])


def test_nothing_edits_sys_path():
    edit = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*\+?=")
    offenders = [str(p.relative_to(ROOT)) for p in [*project_files(), *sorted((ROOT / "tests").glob("*.py"))]
                 if edit.search(p.read_text())]
    assert not offenders, offenders


def test_no_test_file_imports_another():
    """A test file reads on its own: what several share lives in the tests' helper modules (helpers.py,
    simulated_device.py), never in another test_*.py, whose import would also run its module and its fixtures."""
    test_files = sorted((ROOT / "tests").glob("test_*.py"))
    assert len(test_files) > 20
    wrong = [f"{path.name} imports {name}" for path in test_files for name in imported_test_modules(path)]
    assert not wrong, "\n".join(wrong)


def imported_test_modules(path: Path) -> list[str]:
    """The test_* modules that `path` imports: at its top, inside a function, or in a script it runs (a string)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.append(node.module or "")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names += re.findall(r"^\s*(?:from|import)\s+([\w.]+)", node.value, re.MULTILINE)
    return [name for name in names if name.split(".")[0].startswith("test_")]


# The rooms of data/ (its sub-packages), from the bottom up: a data module may import from its own room and the rooms
# below; decoding and augment, both at the bottom, stand alone (neither imports the other).
DATA_ROOMS = {"data.decoding": 0,  # the workers' JPEG decode
              "data.augment": 0,  # the device's batch work
              "data.sources": 1,  # image sources: the interface, one module per storage, the table
              "data.loaders": 2,  # recipes, samplers, collation, DataLoaders
              "data": 3}  # the API train.py and eval.py use


def data_room(module: str) -> str | None:
    """The room (sub-package) a data module is in; None for a module of data/ in no room."""
    parts = module.split(".")
    room = module if module == "data" else ".".join(parts[:2])
    return room if room in DATA_ROOMS and (len(parts) > 2 or module == "data") else None


def test_data_rooms_import_down_and_bottom_rooms_stand_alone():
    graph = {a: {b for b in targets if b.split(".")[0] == "data"} for a, targets in import_graph().items()
             if a.split(".")[0] == "data"}
    unplaced = sorted(m for m in graph if data_room(m) is None and m not in DATA_ROOMS)
    assert not unplaced, f"modules of data/ in no room: {unplaced}"
    room = {m: data_room(m) or m for m in graph}
    wrong = [f"{a} imports {b}" for a, targets in graph.items() for b in targets
             if DATA_ROOMS[room[b]] > DATA_ROOMS[room[a]]
             or (DATA_ROOMS[room[a]] == DATA_ROOMS[room[b]] and room[a] != room[b])]
    assert not wrong, "\n".join(wrong)


def test_data_holds_no_command_line_tools():
    """Tools that write data (shards, test beds, hub prefetch) live in scripts/, not in the library."""
    tools = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "data").rglob("*.py"))
             if "__main__" in p.read_text() or "argparse" in p.read_text()]
    assert not tools, tools
