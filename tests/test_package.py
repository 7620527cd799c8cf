"""The package's shape: every module importable by its dotted name, imports only downward."""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path

import pytest

import pipeline

PACKAGE = Path(pipeline.__file__).parent

# Units of the package (top-level modules and packages; a few submodules of orchestration on
# their own), from the bottom up. A module may import from its own unit and from units of lower
# layers only: science stages never reach into orchestration, and the QC report reads an
# output's records without depending on how runs are scheduled.
LAYERS = (
    {
        "_version",
        "errors",
        "settings",
        "normalize",
        "tiling",
        "windows",
        "qc",
        "qc.metrics",
        "qc.plausibility",
    },
    {"io"},
    {"synthetic"},
    {"convnet"},
    {"segmentation", "measurement", "tracking", "classification"},
    {"config", "qc.evaluate", "orchestration.outcomes", "orchestration.cluster"},
    {"orchestration.records"},
    {"orchestration.plan"},
    {"qc.report"},
    {"orchestration"},
    {"api"},
    {"cli", "__init__"},
    {"__main__"},
)
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def _modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(pipeline.__path__, "pipeline.")
        if info.name != "pipeline.__main__"  # runs the command line
    )


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in LAYER_OF:
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("pipeline")}
        graph[name] = targets
    return graph


@pytest.mark.parametrize("module", _modules())
def test_every_module_is_reachable_by_its_dotted_name(module):
    # `import pipeline.a.b as m` binds getattr(getattr(pipeline, "a"), "b"): a public
    # function named like a submodule would shadow it.
    imported = importlib.import_module(module)
    reached = functools.reduce(getattr, module.split(".")[1:], pipeline)
    assert reached is imported


def test_every_unit_has_a_layer():
    units = {_unit(module) for module in _imports()}
    assert units <= set(LAYER_OF), f"give these a layer: {sorted(units - set(LAYER_OF))}"


def test_imports_point_downward_only():
    upward = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _unit(target) != _unit(module) and LAYER_OF[_unit(target)] >= LAYER_OF[_unit(module)]
    ]
    assert not upward


def test_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                pytest.fail(f"import cycle: {' -> '.join((*path, module, target))}")
            if target in graph and not state.get(target):
                visit(target, (*path, module))
        state[module] = 2

    for module in graph:
        if not state.get(module):
            visit(module, ())


def test_training_imports_no_cluster_or_storage_stack():
    """``import pipeline.convnet.training`` (a GPU node training a model) loads neither the
    cluster (distributed) nor the storage (zarr) stack, and the public API still resolves."""
    import subprocess
    import sys

    code = (
        "import sys, pipeline.convnet.training, pipeline.synthetic\n"
        "assert not {'distributed', 'zarr', 'dask_jobqueue'} & set(sys.modules), sys.modules\n"
        "import pipeline\n"
        "assert pipeline.segment.__module__ == 'pipeline.api'\n"
        "assert pipeline.track.__module__ == 'pipeline.tracking'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'segmnet'"):
        pipeline.segmnet  # noqa: B018
