"""No module of ours shadows an importable one.

`python bench/train_step.py` puts `bench/` first on `sys.path`, so a `bench/kernels.py` hid the
installed `kernels` package that transformers imports (issue 18). Every folder whose scripts are
run as `python path/x.py` is checked here, and so are the top-level folders the scripts import as
packages after putting the repository root on `sys.path`.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT



def script_folders(root: Path) -> list[Path]:
    """Folders outside the package and the tests that hold the project's Python files (git's view:
    tracked or not ignored, so the materialised upstream and the caches are not ours to check)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout.split()
    folders = set()
    for name in listed:
        relative = Path(name)
        if relative.parts[0] in {"diffsynth", "tests"} or len(relative.parts) == 1 or not (root / relative).exists():
            continue
        folders.add(root / relative.parent)
    return sorted(folders)


def module_names(folder: Path) -> set[str]:
    """What `import NAME` would find in `folder`: its modules and its sub-packages."""
    names = {path.stem for path in folder.glob("*.py")}
    names |= {path.name for path in folder.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    return names


def importable_names() -> dict[str, str]:
    """Standard-library module names and installed distributions' top-level names -> their owner."""
    owners = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, distributions in importlib.metadata.packages_distributions().items():
        if name != "diffsynth":  # our own installed package
            owners[name] = "installed distribution " + ", ".join(sorted(set(distributions)))
    return owners


def shadowing(root: Path, owners: dict[str, str]) -> list[str]:
    """One line per module of ours whose name is already taken by `owners`."""
    clashes = []
    for folder in script_folders(root):
        for name in sorted(module_names(folder)):
            if name in owners:
                clashes.append(f"{(folder / name).relative_to(root)}: shadows {name!r} of {owners[name]}")
    for folder in sorted({folder.relative_to(root).parts[0] for folder in script_folders(root)}):
        if folder in owners:  # scripts insert the repository root and import `bench.*`, `tools.*`
            clashes.append(f"{folder}/: the package name shadows {folder!r} of {owners[folder]}")
    return clashes


def test_no_script_module_shadows_an_importable_module() -> None:
    assert shadowing(REPO_ROOT, importable_names()) == []


@pytest.mark.parametrize("name", ["json", "kernels"])
def test_a_colliding_module_is_named(tmp_path: Path, name: str) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "train_step.py").write_text("")
    (bench / f"{name}.py").write_text("")
    owners = importable_names()
    assert name in owners, f"{name} should be importable here (kernels comes with transformers)"
    assert shadowing(tmp_path, owners) == [f"bench/{name}: shadows {name!r} of {owners[name]}"]


def test_the_repository_folders_are_checked() -> None:
    folders = {folder.relative_to(REPO_ROOT).as_posix() for folder in script_folders(REPO_ROOT)}
    assert {"bench", "tools", "examples/wanvideo/model_training"} <= folders
