"""The package's structure: the data package imports nothing above it, and train.py never asks which mode its data
is in (docs/layout.md)."""

import ast

from conftest import REPO, run_python

PACKAGE = REPO / "accel_gpt"
# The trainer, the run plan and every command: what the data package sits below.
ABOVE_DATA = {"train", "plan", "cli", "sample", "evaluate", "export", "harness", "cache", "generate", "analysis"}


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


def test_the_data_package_imports_nothing_above_it():
    above = {f"accel_gpt.{name}" for name in ABOVE_DATA}
    for path in sorted((PACKAGE / "data").glob("*.py")):
        assert not runtime_imports(path) & above, path.name
    loaded = run_python(
        "import sys\nimport accel_gpt.data.run_data\n"
        "print(sorted(m for m in sys.modules if m in ('accel_gpt.train', 'accel_gpt.plan')))"
    )
    assert loaded.stdout.strip() == "[]"


def test_train_asks_nothing_of_the_data_mode():
    """Both modes give train.py one interface (`RunData`): no streaming flag, batch class or mode test there."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"streaming", "StreamBatches", "EpochBatches", "StreamData", "CachedData", "stream_source"}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    probes = [ast.unparse(call) for call in calls if call.func.id in ("getattr", "hasattr", "isinstance")]
    assert not [probe for probe in probes if "data" in probe]  # no getattr(run.data, ...) asking for a mode
