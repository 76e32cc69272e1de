"""The package's structure: the data package imports nothing above it, and train.py never asks which mode its data
is in (docs/layout.md)."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "accel_gpt"
# The trainer, the run plan and every command: what the data package sits below. (`accel_gpt.cli`, the helper that
# gives commands their one-line errors, is below it: the config's parser uses it.)
ABOVE_DATA = {"train", "plan", "sample", "evaluate", "export", "harness", "cache", "batches", "generate", "analysis"}


def runtime_imports(path) -> set[str]:
    """The accel_gpt modules a file imports when it runs (not those under `if TYPE_CHECKING:`)."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name.startswith("accel_gpt")}


def module_file(name: str):
    path = REPO / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_the_data_package_imports_nothing_above_it():
    """Neither directly nor through the modules it imports (followed as Python would load them)."""
    above = {f"accel_gpt.{name}" for name in ABOVE_DATA}
    seen, todo = set(), [f"accel_gpt.data.{path.stem}" for path in (PACKAGE / "data").glob("*.py")]
    while todo:
        name = todo.pop()
        if name in seen or not module_file(name).is_file():
            continue  # a name imported from a module, not a module
        seen.add(name)
        assert name not in above, f"the data package reaches {name}"
        todo += runtime_imports(module_file(name))


def test_every_subpackage_is_installed():
    """pyproject's package list names every package folder: an install without one fails at import."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


def test_train_asks_nothing_of_the_data_mode():
    """Both modes give train.py one interface (`RunData`): no streaming flag, batch class or mode test there."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"streaming", "StreamBatches", "EpochBatches", "StreamData", "CachedData", "stream_source"}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    probes = [ast.unparse(call) for call in calls if call.func.id in ("getattr", "hasattr", "isinstance")]
    assert not [probe for probe in probes if "data" in probe]  # no getattr(run.data, ...) asking for a mode
