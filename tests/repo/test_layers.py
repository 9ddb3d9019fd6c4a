"""The package's layers, read from the source with ``ast``: no module imports a layer above its own.

``diffsynth/fantasy_world/`` is ordered config < geometry < model < tiny < data < train < eval <
app < the package's top (``__init__``, the command-line modules). ``model/`` is what upstream's DiT
and pipeline import, so beyond the layers below it, it may import upstream's model code
(``diffsynth.models``, ``diffsynth.core``) but not its pipelines or training side
(``diffsynth.diffusion``). Upstream's patched files may import ``model/`` only, and the DiT file only
inside the functions that need it (the deferred hooks: FantasyWorld builds on that file).
"""
import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "diffsynth" / "fantasy_world"
FW = "diffsynth.fantasy_world"
LAYERS = ("config", "geometry", "model", "tiny", "data", "train", "eval", "app")
TOP = len(LAYERS)
# Upstream modules a layer may not import, beyond the layer order.
UPSTREAM_REFUSED = {"geometry": ("diffsynth",), "model": ("diffsynth.pipelines", "diffsynth.diffusion")}
UPSTREAM_HOOK_FILES = ("models/wan_video_dit.py", "pipelines/wan_video.py")


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, whether it is a package's ``__init__``) of a file under ``diffsynth/``."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imported_modules(path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute module, line) of every import in ``path`` (``from x import y`` gives ``x`` and ``x.y``)."""
    name, is_package = module_name(path)
    package = name.split(".") if is_package else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def layer_of(module: str) -> int:
    """Rank of a ``diffsynth.fantasy_world`` module in :data:`LAYERS` (the package's top: above all)."""
    parts = module.split(".")
    return LAYERS.index(parts[2]) if len(parts) > 2 and parts[2] in LAYERS else TOP


def upward_imports(package: Path) -> list[str]:
    """Every import under ``package`` that climbs above the importing module's layer, as text."""
    problems = []
    for path in sorted(package.rglob("*.py")):
        name, _ = module_name(path)
        own = layer_of(name)
        own_name = LAYERS[own] if own < TOP else "top"
        for target, line in imported_modules(path):
            where = f"{path.relative_to(REPO_ROOT)}:{line} ({own_name}) imports {target}"
            if target.startswith(FW + ".") and layer_of(target) > own:
                problems.append(where)
            elif not target.startswith(FW) and target.startswith(UPSTREAM_REFUSED.get(own_name, ("-",))):
                problems.append(where)
    return sorted(set(problems))


def test_every_subpackage_is_a_layer():
    subpackages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert subpackages == set(LAYERS) - {"config"}
    assert (PACKAGE / "config.py").exists()


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(PACKAGE) == []


@pytest.mark.parametrize("layer, line", [
    ("model", "from ..train.losses import geometry_loss"),
    ("model", "from ...diffusion import FlowMatchScheduler"),
    ("model", "from ...pipelines.wan_video import model_fn_wan_video"),
    ("geometry", "from ..model.heads import unfold_latent_frames"),
    ("data", "from ..app.inference import save_inference_outputs"),
])
def test_an_upward_import_is_found(tmp_path, monkeypatch, layer, line):
    # The check reads the files as given: a copy of the package with one upward import added fails it.
    copy = tmp_path / "diffsynth" / "fantasy_world"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    (copy / layer / "added.py").write_text(f"def late():\n    {line}\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    assert [problem for problem in upward_imports(copy) if "added.py" in problem] != []


def test_upstream_reaches_the_package_only_through_the_model_layer():
    for relative in UPSTREAM_HOOK_FILES:
        path = REPO_ROOT / "diffsynth" / relative
        reached = {module for module, _ in imported_modules(path) if module.startswith(FW + ".")}
        assert reached and all(module.startswith(FW + ".model.") for module in reached), (relative, reached)


def test_upstreams_dit_defers_its_hooks_into_the_functions_that_need_them():
    # Module-level, the DiT file would import FantasyWorld while FantasyWorld imports it: a circle.
    path = REPO_ROOT / "diffsynth" / "models" / "wan_video_dit.py"
    assert [module for module, _ in imported_modules(path, top_level_only=True) if module.startswith(FW)] == []
    assert any(module.startswith(FW + ".model.") for module, _ in imported_modules(path))
