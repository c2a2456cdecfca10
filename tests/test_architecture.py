"""The stage map of docs/architecture.md holds: every package under ``src/morphnet/`` is in its
table, and imports only from its own stage or the stages before it; no module imports itself back
through others (no import cycle, function-level imports included)."""

import ast
import re
from pathlib import Path

import morphnet

ROOT = Path(morphnet.__file__).resolve().parent  # the package as imported (installed or src/)
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def stage_of_packages() -> dict[str, int]:
    """Package name -> stage number, read from the table at the top of docs/architecture.md."""
    stages = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s[^|]*\|([^|]*)\|", line)
        if row:
            for package in re.findall(r"`(\w+)/`", row.group(2)):
                stages[package] = int(row.group(1))
    return stages


def morphnet_imports(path: Path) -> set[str]:
    """First component under ``morphnet`` of every import in ``path`` ('' for the package itself)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "morphnet":
                found.add(parts[1] if len(parts) > 1 else "")
    return found


def test_every_package_is_in_the_stage_table():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    stages = stage_of_packages()
    assert packages == set(stages), f"add to (or remove from) the table in {DOC.name}: {packages ^ set(stages)}"
    assert sorted(set(stages.values())) == list(range(1, 8))


def test_stages_import_only_downward():
    stages = stage_of_packages()
    top = max(stages.values())
    wrong = []
    for package, stage in stages.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in morphnet_imports(path) - {"errors"}:
                # the package itself (its public API) stands for every stage: only the tools may use it
                level = top if imported == "" else stages.get(imported)
                if level is None or level > stage:
                    wrong.append(f"{path.relative_to(ROOT)} (stage {stage}) imports morphnet.{imported}")
    assert not wrong, "imports that reach up the pipeline:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The scanner finds the shapes of import used in the code base (so the test above can fail)."""
    source = tmp_path / "m.py"
    source.write_text("import morphnet\nfrom morphnet.evaluation import CostEvaluator\n"
                      "import morphnet.surgery.rebuild\nfrom morphnet import apply_structure\nfrom . import sibling\n")
    assert morphnet_imports(source) == {"", "evaluation", "surgery"}


def module_imports(root: Path, package: str = "morphnet") -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports, from the AST of every file under ``root`` (imports
    inside functions too). ``from a.b import c`` reaches the module ``a.b.c`` when it is one, else ``a.b``
    (its ``__init__``); the parent packages Python initializes on the way are not counted."""
    files = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                found |= {known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in files else known(base)
                          for alias in node.names}
        graph[module] = found - {None, module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the import graph (``[a, b, ..., a]``), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = 2
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_module_imports_itself_back():
    """No import cycle anywhere in the package (``channels/analysis.py``, ``coverage.py`` and the handlers
    formed one of 13 files: the walker's types now live in ``channels/walker.py``, which all of them
    import). Imports of the facade ``morphnet`` itself are left out: tools on top of the public API
    import it by design (``import morphnet``, attributes read when called) while it re-exports some of
    them, and the stage check above keeps every lower stage from importing it."""
    graph = {module: imported - {"morphnet"} for module, imported in module_imports(ROOT).items()}
    cycle = import_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub" / "__init__.py").write_text("from morphnet.sub import b  # noqa\n")
    (tmp_path / "sub" / "a.py").write_text("from morphnet.sub.b import thing\n")
    (tmp_path / "sub" / "b.py").write_text("def thing():\n    from .a import other\n")
    graph = module_imports(tmp_path)
    assert graph["morphnet.sub.b"] == {"morphnet.sub.a"} and graph["morphnet.sub"] == {"morphnet.sub.b"}
    assert import_cycle(graph) == ["morphnet.sub.b", "morphnet.sub.a", "morphnet.sub.b"]
    assert import_cycle({"x": {"y"}, "y": set()}) == []
