"""tools/fork.py: pinned upstream + patches/ materialisation, export, check and combined patch."""
import hashlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("fork", REPO_ROOT / "tools" / "fork.py")
fork_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fork_tool)

UPSTREAM = {
    "diffsynth/__init__.py": "from .core import *\n",
    "diffsynth/core/__init__.py": "".join(f"line_{i} = {i}\n" for i in range(40)),
    "diffsynth/models/dit.py": "def rope():\n    return 1\n",
    "diffsynth/version.py": "__version__ = '9.9.9'",  # no trailing newline, like upstream's file
}


def make_sdist(path: Path, files: dict) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"diffsynth-9.9.9/{rel}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fork(tmp_path):
    """A fork checkout of a tiny fake upstream whose sdist already sits in the cache."""
    root, cache = tmp_path / "repo", tmp_path / "cache"
    (root / "patches").mkdir(parents=True)
    cache.mkdir()
    sha = make_sdist(cache / "diffsynth-9.9.9.tar.gz", UPSTREAM)
    (root / "patches" / "upstream.json").write_text(json.dumps({"name": "diffsynth", "version": "9.9.9", "sha256": sha}))
    (root / "patches" / "series").write_text("")
    return fork_tool.Fork(root=root, cache=cache)


def edit(fork, rel, text):
    path = fork.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def patch_bytes(fork):
    return {p.name: p.read_bytes() for p in sorted(fork.patches.iterdir()) if p.name != "upstream.json"}


def test_apply_export_round_trip_is_byte_identical(fork):
    fork_tool.apply(fork)
    edit(fork, "diffsynth/models/dit.py", "def rope():\n    return 2\n")
    edit(fork, "diffsynth/version.py", "__version__ = '9.9.9+fork'")
    edit(fork, "diffsynth/extra/new.py", "NEW = True\n")
    fork_tool.export(fork)
    first = patch_bytes(fork)
    assert set(first) == {"series", "diffsynth-extra.patch", "diffsynth-models-dit.patch", "diffsynth-version.patch"}
    assert "new file mode 100644" in first["diffsynth-extra.patch"].decode()
    assert "\\ No newline at end of file" in first["diffsynth-version.patch"].decode()

    # Rebuild from scratch: the patches reproduce the edited tree, and exporting again changes no byte.
    shutil.rmtree(fork.root / "diffsynth")
    fork_tool.apply(fork)
    assert (fork.root / "diffsynth/extra/new.py").read_text() == "NEW = True\n"
    fork_tool.check(fork)
    fork_tool.export(fork)
    assert patch_bytes(fork) == first


def test_export_keeps_files_in_the_patch_that_carries_them(fork):
    fork_tool.apply(fork)
    edit(fork, "diffsynth/models/dit.py", "def rope():\n    return 2\n")
    edit(fork, "diffsynth/__init__.py", "X = 1\nfrom .core import *\n")
    fork_tool.export(fork)
    both = (fork.patches / "diffsynth-models-dit.patch").read_text() + (fork.patches / "diffsynth-__init__.patch").read_text()
    (fork.patches / "mine.patch").write_text(both)
    (fork.patches / "diffsynth-models-dit.patch").unlink()
    (fork.patches / "diffsynth-__init__.patch").unlink()
    (fork.patches / "series").write_text("mine.patch\n")
    fork_tool.export(fork)
    assert fork.series() == ["mine.patch"]
    assert fork_tool.patch_files((fork.patches / "mine.patch").read_text()) == ["diffsynth/__init__.py", "diffsynth/models/dit.py"]


def test_check_catches_an_edit_that_was_not_exported(fork):
    fork_tool.apply(fork)
    fork_tool.check(fork)
    edit(fork, "diffsynth/models/dit.py", "def rope():\n    return 3\n")
    with pytest.raises(fork_tool.ForkError, match="diffsynth/models/dit.py"):
        fork_tool.check(fork)


def test_apply_refuses_to_overwrite_unexported_edits(fork):
    fork_tool.apply(fork)
    edit(fork, "diffsynth/models/dit.py", "def rope():\n    return 3\n")
    with pytest.raises(fork_tool.ForkError, match="diffsynth/models/dit.py"):
        fork_tool.apply(fork)
    # Also when the patches changed since the last apply (e.g. after a pull).
    (fork.patches / "p.patch").write_text(fork_tool.file_diff("diffsynth/__init__.py", b"from .core import *\n", b"A = 1\nfrom .core import *\n"))
    (fork.patches / "series").write_text("p.patch\n")
    with pytest.raises(fork_tool.ForkError, match="make patches"):
        fork_tool.apply(fork)
    assert (fork.root / "diffsynth/models/dit.py").read_text().endswith("return 3\n")
    fork_tool.apply(fork, force=True)
    assert (fork.root / "diffsynth/models/dit.py").read_text().endswith("return 1\n")
    assert (fork.root / "diffsynth/__init__.py").read_text().startswith("A = 1\n")


def test_apply_rebuilds_a_clean_tree_when_patches_change(fork):
    fork_tool.apply(fork)
    (fork.patches / "p.patch").write_text(fork_tool.file_diff("diffsynth/__init__.py", b"from .core import *\n", b"B = 2\nfrom .core import *\n"))
    (fork.patches / "series").write_text("p.patch\n")
    assert fork_tool.apply(fork) is True
    assert fork_tool.apply(fork) is False  # idempotent
    fork_tool.check(fork)


def test_wrong_hash_is_refused_naming_expected_and_actual(fork):
    lock = json.loads((fork.patches / "upstream.json").read_text())
    lock["sha256"] = "0" * 64
    (fork.patches / "upstream.json").write_text(json.dumps(lock))
    fork = fork_tool.Fork(root=fork.root, cache=fork.cache)
    actual = hashlib.sha256((fork.cache / "diffsynth-9.9.9.tar.gz").read_bytes()).hexdigest()
    sdist = fork.cache / "diffsynth-9.9.9.tar.gz"
    with pytest.raises(fork_tool.ForkError) as error:
        fork_tool.fetch(fork)
    message = str(error.value)
    assert f"expected {'0' * 64}" in message and f"actual {actual}" in message
    # The pin may be the wrong one: the message names both files and does not just say "delete the sdist".
    lock_path = fork.patches / "upstream.json"
    assert f"(pinned in {lock_path})" in message and f"the pinned sha256 in {lock_path} is wrong" in message
    assert "keep the file" in message and f"or {sdist} is corrupt" in message
    assert sdist.exists() and hashlib.sha256(sdist.read_bytes()).hexdigest() == actual  # nothing deleted


def test_wrong_hash_of_a_fresh_download_blames_pin_or_download_and_keeps_nothing(fork, monkeypatch):
    sdist = fork.cache / "diffsynth-9.9.9.tar.gz"
    data = sdist.read_bytes()
    sdist.unlink()
    lock = json.loads((fork.patches / "upstream.json").read_text())
    lock["sha256"] = "1" * 64
    (fork.patches / "upstream.json").write_text(json.dumps(lock))
    fork = fork_tool.Fork(root=fork.root, cache=fork.cache)

    def fake_pip_download(cmd, **kwargs):  # `pip download ... -d <folder> diffsynth==9.9.9`
        (Path(cmd[cmd.index("-d") + 1]) / "diffsynth-9.9.9.tar.gz").write_bytes(data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fork_tool.subprocess, "run", fake_pip_download)
    with pytest.raises(fork_tool.ForkError) as error:
        fork_tool.fetch(fork)
    message = str(error.value)
    assert f"expected {'1' * 64}" in message and f"actual {hashlib.sha256(data).hexdigest()}" in message
    assert f"the pinned sha256 in {fork.patches / 'upstream.json'} is wrong" in message
    assert "the download of diffsynth==9.9.9 was corrupted (nothing was kept" in message
    assert not sdist.exists() and json.loads((fork.patches / "upstream.json").read_text())["sha256"] == "1" * 64


def test_conflicting_patch_names_patch_file_and_hunk(fork):
    old = UPSTREAM["diffsynth/core/__init__.py"].encode()
    new = old.replace(b"line_5 = 5", b"line_5 = 50").replace(b"line_30 = 30", b"line_30 = 300")
    (fork.patches / "two-hunks.patch").write_text(fork_tool.file_diff("diffsynth/core/__init__.py", old, new))
    (fork.patches / "series").write_text("two-hunks.patch\n")
    fork_tool.apply(fork)
    # Upstream moves on: the second hunk's context no longer matches.
    text = (fork.patches / "two-hunks.patch").read_text().replace(" line_29 = 29", " line_29 = 2900")
    (fork.patches / "two-hunks.patch").write_text(text)
    with pytest.raises(fork_tool.ForkError) as error:
        fork_tool.check(fork)
    message = str(error.value)
    assert "two-hunks.patch" in message and "diffsynth/core/__init__.py" in message and "hunk #2 of 2" in message


def test_combined_patch_applies_onto_a_pristine_git_tree(fork, tmp_path):
    fork_tool.apply(fork)
    edit(fork, "diffsynth/models/dit.py", "def rope():\n    return 2\n")
    edit(fork, "diffsynth/extra/new.py", "NEW = True\n")
    fork_tool.export(fork)
    out = fork_tool.combined(fork, tmp_path / "fork.patch")
    upstream = tmp_path / "upstream"
    shutil.copytree(fork.pristine, upstream)
    subprocess.run(["git", "init", "-q"], cwd=upstream, check=True)
    subprocess.run(["git", "apply", "--check", str(out)], cwd=upstream, check=True)


def test_real_fork_combined_patch_applies_onto_pinned_upstream(tmp_path):
    real = fork_tool.Fork()
    out = fork_tool.combined(real, tmp_path / "fork.patch")
    upstream = tmp_path / "upstream"
    shutil.copytree(real.pristine, upstream)
    subprocess.run(["git", "init", "-q"], cwd=upstream, check=True)
    result = subprocess.run(["git", "apply", "--check", str(out)], cwd=upstream, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_patch_touches_version_py():
    """The suffix lives in setup.py: upstream's git main says 2.0.0 there, so a patched version.py
    would make the combined patch fail on it."""
    real = fork_tool.Fork()
    touching = [n for n in real.series() if "diffsynth/version.py" in fork_tool.patch_files((real.patches / n).read_text())]
    assert touching == []


def test_setup_py_and_installed_metadata_give_upstream_version_plus_suffix():
    import importlib.metadata

    from diffsynth.version import __version__ as upstream

    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == upstream + "+fantasyworld"
    assert importlib.metadata.version("diffsynth") == upstream + "+fantasyworld"
