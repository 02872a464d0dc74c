"""The training layer's place in the import picture (DESIGN §3), read off the source with ``ast``.

``leapkernels`` <- core (``flow``, ``adapters``, ``objectives``, ``rewards``, ``prompts``,
``sampling``, ``dtypes``...) <- ``leapalign.training`` <- ``leapalign.cli`` <- ``shapes``/``benchmarks``.
Every import counts, function-level ones too: a lazy import that points the wrong way is still a
dependency. The training package and the command line have no import circles.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every ``leapalign``/``leapkernels``/``benchmarks`` module ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in ("leapalign", "leapkernels", "benchmarks")}


def _layer(module: str) -> int:
    if module.startswith("leapkernels"):
        return 0
    if module.startswith(("benchmarks", "leapalign.shapes")):
        return 4
    if module in ("leapalign.cli", "leapalign.__main__"):
        return 3
    if module.startswith("leapalign.training"):
        return 2
    return 1


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / "leapalign").rglob("*.py"))}


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in _modules().items():
        if name == "leapalign":  # the package's lazy re-exports name their modules as strings
            continue
        for target in _imports(path):
            if _layer(target) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circles_in_training_and_the_command_line():
    modules = _modules()
    ours = {n for n in modules if n.startswith("leapalign.training") or n in ("leapalign.cli", "leapalign.sampling", "leapalign.prompts")}
    graph = {n: {t for t in _imports(modules[n]) if t in ours and t != n} for n in ours}
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node])
        done.add(node)

    for node in sorted(ours):
        visit(node, [])


def test_public_api_is_re_exported():
    import leapalign
    from leapalign.training.config import LeapAlignConfig
    from leapalign.training.trainer import LeapAlignTrainer

    assert leapalign.LeapAlignConfig is LeapAlignConfig and leapalign.LeapAlignTrainer is LeapAlignTrainer
    from leapalign.sampling import image_grid, save_image_grid  # noqa: F401  (leapalign.shapes uses them)
    for old in ("config", "trainer", "checkpoint", "ema"):  # moved into leapalign.training, no aliases left
        assert not (ROOT / "leapalign" / f"{old}.py").exists(), old
