"""The layout README's "Architecture" section draws, checked on the source itself.

Every import statement in ``leapkernels/``, ``leapalign/`` and ``benchmarks/`` is read with ``ast``
(those inside functions too: a lazy import is still an arrow), resolved to the project module it
names, and checked against the layers below. A test here fails when an arrow points up a layer,
when two modules import each other through any path, or when a file or function outgrows the
limits the project keeps.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("leapkernels", "leapalign", "benchmarks")

#: Layers, lowest first. A module may import its own layer and the ones before it, never later ones.
#: The first matching prefix decides (so ``leapalign.training`` is matched before ``leapalign``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("kernels", ("leapkernels",)),
    ("training", ("leapalign.training",)),
    ("cli", ("leapalign.cli", "leapalign.__main__")),
    ("experiments", ("leapalign.shapes",)),
    ("benchmarks", ("benchmarks",)),
    ("core", ("leapalign",)),
]
ORDER = ["kernels", "core", "training", "cli", "experiments", "benchmarks"]

#: The package ``__init__`` re-exports lazily through strings; it is the public face, not a layer.
FACADES = {"leapalign"}

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60


def _module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            elif package == "benchmarks" and parts[-1].startswith(("test_", "conftest")):
                continue  # pytest-benchmark files: run by pytest, imported by no module
            found[".".join(parts)] = path
    return found


MODULES = _module_files()


def layer_of(module: str) -> str:
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {Path(__file__).name}")


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name refers to (its longest known prefix), if any."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> set[str]:
    """Project modules ``module`` imports, with ``from pkg import sub`` resolved to ``pkg.sub``."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names] or [prefix]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_the_layers() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        if module in FACADES:
            continue
        mine = ORDER.index(layer_of(module))
        for target in sorted(targets):
            if target not in FACADES and ORDER.index(layer_of(target)) > mine:
                wrong.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_only_the_upper_layers_use_the_facade() -> None:
    """``leapalign``'s lazy facade re-exports training-layer names, so only training and above use it."""
    low = sorted(m for m, targets in GRAPH.items()
                 if "leapalign" in targets and m not in FACADES and ORDER.index(layer_of(m)) < ORDER.index("training"))
    assert not low, f"modules below the training layer import the 'leapalign' facade: {low}"


def test_public_api_is_re_exported() -> None:
    """What README shows keeps working where the modules moved."""
    import leapalign
    from leapalign.sampling import image_grid, save_image_grid  # noqa: F401  (leapalign.shapes uses them)
    from leapalign.training.config import LeapAlignConfig
    from leapalign.training.plan import plan
    from leapalign.training.trainer import LeapAlignTrainer

    assert leapalign.LeapAlignConfig is LeapAlignConfig and leapalign.LeapAlignTrainer is LeapAlignTrainer
    assert leapalign.plan is plan
    for name in leapalign.__all__:
        assert getattr(leapalign, name) is not None, name


def _find_cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_circles() -> None:
    cycle = _find_cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_checker_sees_a_planted_circle_and_an_upward_arrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two checks above are not vacuous: they catch what they are written for."""
    core, kernels = "leapalign.flow", "leapkernels.backend"
    assert layer_of(core) == "core" and layer_of(kernels) == "kernels"
    monkeypatch.setitem(GRAPH, kernels, GRAPH[kernels] | {core})
    monkeypatch.setitem(GRAPH, core, GRAPH[core] | {kernels})
    assert _find_cycle() is not None
    with pytest.raises(AssertionError, match="leapkernels.backend \\(kernels\\) imports leapalign.flow"):
        test_imports_point_down_the_layers()


def test_relative_and_from_imports_resolve() -> None:
    assert _resolve("leapalign.flow.per_sample") == "leapalign.flow"
    assert _resolve("torch.nn") is None
    assert "leapalign.flow" in GRAPH["leapalign.objectives.leap_ops"]


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_source_files_and_functions_stay_small() -> None:
    too_long = [
        f"{path.relative_to(ROOT)} ({n} lines)"
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    ]
    long_functions = [entry for path in MODULES.values() for entry in _long_functions(path)]
    assert not too_long, f"source files over {MAX_FILE_LINES} lines: {too_long}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
