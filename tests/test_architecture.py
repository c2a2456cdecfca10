"""The stage map of docs/architecture.md holds: every package under ``src/morphnet/`` is in its
table, and imports only from its own stage or the stages before it."""

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
