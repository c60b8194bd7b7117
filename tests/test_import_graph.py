"""The package's layering: every import under src/normkit points down (or sideways), never up.

Layers, bottom to top::

    stats / backend / registry  →  kernels  →  functional  →  nn  →  models / adapt / continual
        →  convert / integrations  →  bench / cli / normkit

A module may import its own layer and the ones below it. Imports inside functions count too (a
lazy import in the CLI or the bench is fine because it points down). :mod:`normkit.data` depends
on nothing above the bottom layer and only the code that trains on it (adapt, continual, bench)
may import it, so the layers themselves never pull in scikit-learn or the bench.

The graph is read from the source with :mod:`ast` (nothing is imported), so the test also sees
imports on branches that do not run here. A new top-level module or subpackage must be given a
layer in ``LAYERS`` before the test passes, which is the point: its place is a decision.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "normkit"

#: first component under ``normkit`` → layer (higher = further from the engine)
LAYERS: dict[str, int] = {
    "stats": 0,
    "backend": 0,
    "registry": 0,
    "_compat": 0,  # deprecation shims for renamed arguments, usable from any layer
    "data": 0,  # depends on nothing in normkit; who may import it is restricted below
    "sync": 0,  # cross-process moment sums (torch.distributed), used by the statistics engine
    "kernels": 1,
    "functional": 2,
    "nn": 3,
    "layers": 3,  # a re-export of normkit.nn kept for old imports
    "models": 4,
    "adapt": 4,
    "continual": 4,
    "optim": 4,  # optimizers and diagnostics for scale-invariant weights
    "distributed": 4,  # convert_sync_norms and buffer averaging over a process group
    "convert": 5,  # tools that put normkit into existing models (torch's and transformers')
    "integrations": 5,  # third-party integrations (transformers), optional dependencies only
    "bench": 6,
    "cli": 6,
    "": 6,  # the package root: eager imports of the lower layers, lazy access to the rest
}
LAYER_NAMES = {
    0: "stats/sync/backend/registry/_compat/data",
    1: "kernels",
    2: "functional",
    3: "nn",
    4: "models/adapt/continual/optim/distributed",
    5: "convert/integrations",
    6: "bench/cli",
}

#: who may import normkit.data: the code that trains or evaluates on it
DATA_USERS = {"data", "adapt", "continual", "bench"}

#: Known violations, each with the work that removes it; an entry that no longer violates fails
#: the test, so the list cannot go stale. The last one, kernels/benchmark.py reading the registry,
#: was moved in issue 11 work (now normkit.bench.kernels).
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute module name of a ``from X import ...`` (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _exists(module: str) -> bool:
    rel = Path(*module.split("."))
    return (SRC / rel).is_dir() or (SRC / rel).with_suffix(".py").is_file()


def normkit_imports(path: Path, importer: str | None = None) -> list[tuple[str, int]]:
    """``(imported normkit module, line)`` for every import in the file, at any depth.

    ``importer`` is the file's module name (derived from its place under src/ by default).
    """
    importer = importer if importer is not None else _module_name(path)
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "normkit"]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, is_package, node)
            if module.split(".")[0] != "normkit":
                continue
            for alias in node.names:  # `from normkit import functional` imports the submodule
                sub = f"{module}.{alias.name}"
                found.append((sub if alias.name != "*" and _exists(sub) else module, node.lineno))
    return found


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    comp = _component(module)
    if comp not in LAYERS:
        raise AssertionError(f"{module} has no layer: add {comp!r} to LAYERS in tests/test_import_graph.py")
    return LAYERS[comp]


def _all_edges() -> list[tuple[str, str, str]]:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 50, f"expected the whole package under {PKG}, found {len(files)} files"
    edges = []
    for path in files:
        importer = _module_name(path)
        for imported, line in normkit_imports(path):
            edges.append((importer, imported, f"{path.relative_to(SRC.parent)}:{line}"))
    return edges


def test_the_parser_sees_relative_nested_and_package_imports(tmp_path):
    """The checker itself: if it missed an import kind, the layering test would pass vacuously."""
    f = tmp_path / "m.py"
    f.write_text(
        "from normkit import functional as F\n"
        "def g():\n"
        "    import normkit.bench.runner\n"
        "    from normkit.registry import norm_info\n"
        "from normkit import __version__\n"
    )
    fake = PKG / "nn" / "m.py"  # only its name is used for relative imports
    got = {m for m, _ in normkit_imports(f, "normkit.nn.m")}
    assert got == {"normkit.functional", "normkit.bench.runner", "normkit.registry", "normkit"}
    rel = ast.parse("from ..stats import moments\nfrom . import papers\n").body
    assert _resolve(_module_name(fake), False, rel[0]) == "normkit.stats"
    assert _resolve(_module_name(fake), False, rel[1]) == "normkit.nn"
    assert _layer("normkit.bench.suites") > _layer("normkit.nn.layer_norm") > _layer("normkit.kernels.cpu")


def test_no_module_imports_a_layer_above_it():
    violations, used_exceptions = [], set()
    for importer, imported, where in _all_edges():
        src, dst = _layer(importer), _layer(imported)
        kernels_reads_registry = _component(importer) == "kernels" and _component(imported) == "registry"
        if dst <= src and not kernels_reads_registry:
            continue
        if (importer, imported) in KNOWN_EXCEPTIONS:
            used_exceptions.add((importer, imported))
            continue
        why = "the registry is filled by nn" if kernels_reads_registry else f"{LAYER_NAMES[src]} → {LAYER_NAMES[dst]}"
        violations.append(f"{where}: {importer} imports {imported} ({why})")
    assert not violations, "imports that point up:\n" + "\n".join(violations)
    stale = set(KNOWN_EXCEPTIONS) - used_exceptions
    assert not stale, f"KNOWN_EXCEPTIONS no longer needed, remove them: {sorted(stale)}"


def test_only_the_data_users_import_normkit_data():
    bad = [
        f"{where}: {importer} imports {imported}"
        for importer, imported, where in _all_edges()
        if _component(imported) == "data" and _component(importer) not in DATA_USERS
    ]
    assert not bad, f"normkit.data may be imported by {sorted(DATA_USERS - {'data'})} only:\n" + "\n".join(bad)


def test_data_depends_on_nothing_above_the_bottom_layer():
    deps = {imported for importer, imported, _ in _all_edges() if _component(importer) == "data"}
    assert {_component(d) for d in deps} <= {"data", "stats", "backend", "registry"}, deps


def test_import_normkit_is_light_and_registers_every_method():
    """``import normkit`` loads the engine and the layers only, yet every method is registered.

    Run in a fresh interpreter: the test session has long imported everything.
    """
    code = (
        "import sys, normkit\n"
        "loaded = sorted({m.split('.')[1] for m in sys.modules if m.startswith('normkit.')})\n"
        "print(','.join(loaded))\n"
        "print('adab2n' in normkit.list_norms(), 'sklearn' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    loaded = set(out[0].split(","))
    heavy = {"adapt", "bench", "continual", "data", "layers", "models"}
    assert loaded.isdisjoint(heavy), f"import normkit loaded {sorted(loaded & heavy)}"
    assert {"nn", "functional"} <= loaded
    assert out[1:] == ["True", "False"], "AdaB2N must be registered and scikit-learn not imported by `import normkit`"


def test_lazy_subpackages_and_old_paths_still_work():
    import normkit
    import normkit.bench.data as old_data
    import normkit.continual as continual
    import normkit.data as data
    import normkit.layers as layers
    import normkit.nn as nn

    for name in ("adapt", "bench", "continual", "layers", "models"):
        assert getattr(normkit, name).__name__ == f"normkit.{name}"
        assert name in dir(normkit)
    assert normkit.self_normalizing_mlp is normkit.models.self_normalizing_mlp
    with pytest.raises(AttributeError, match="has no attribute 'not_a_module'"):
        normkit.not_a_module  # noqa: B018
    # re-exports are the same objects, not copies
    assert old_data.load_digits is data.load_digits and old_data.DataSplit is data.DataSplit
    assert continual.AdaB2N is nn.AdaB2N is normkit.AdaB2N
    from normkit.continual.adab2n import convert_adab2n

    assert convert_adab2n is nn.adab2n.convert_adab2n
    homes = (nn.init, nn.normalizer_free, nn.weight_standardization)
    for name in layers.__all__:
        assert any(getattr(home, name, None) is getattr(layers, name) for home in homes), name
    from normkit.layers.init import lecun_normal_
    from normkit.layers.normalizer_free import ScaledStdConv2d
    from normkit.layers.weight_standardization import WSConv2d

    assert (lecun_normal_, ScaledStdConv2d, WSConv2d) == (nn.init.lecun_normal_, nn.ScaledStdConv2d, nn.WSConv2d)
