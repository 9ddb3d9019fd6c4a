#!/usr/bin/env python3
"""Manage the patch-style fork of DiffSynth-Studio (stdlib only).

The upstream package is pinned in ``patches/upstream.json`` (name, version, sdist sha256). The
working tree ``diffsynth/`` is never committed: it is pristine upstream plus the patches listed
in ``patches/series`` (GNU quilt layout, ``-p1`` paths ``a/diffsynth/...``).

Verbs:
  fetch     download the pinned sdist into the cache and verify its sha256
  apply     materialise diffsynth/ = pristine upstream + series (idempotent, never loses edits)
  export    regenerate patches/ from the edited diffsynth/ (deterministic; new files included)
  check     diffsynth/ equals pristine + series, and every patch applies with `git apply --check`
  combined  write one unified diff of the whole fork (dist/) for `git apply` on an upstream tree

Environment: DIFFSYNTH_FORK_CACHE overrides the cache folder (default: <repo>/.cache/fork).
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "diffsynth"
IGNORED_NAMES = {"__pycache__", ".pytest_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo", ".egg-info")


class ForkError(Exception):
    """A failure the user can act on; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Layout


class Fork:
    """Paths of one fork checkout: its patches, its materialised tree and its cache."""

    def __init__(self, root: Path = ROOT, cache: Path | None = None):
        self.root = Path(root)
        self.patches = self.root / "patches"
        self.work = self.root / PACKAGE
        env_cache = os.environ.get("DIFFSYNTH_FORK_CACHE")
        self.cache = Path(cache or env_cache or self.root / ".cache" / "fork")
        self.lock = json.loads((self.patches / "upstream.json").read_text())

    @property
    def sdist_name(self) -> str:
        return f"{self.lock['name']}-{self.lock['version']}.tar.gz"

    @property
    def sdist_path(self) -> Path:
        return self.cache / self.sdist_name

    @property
    def pristine(self) -> Path:
        """Folder holding the pristine ``diffsynth/`` tree of the pinned version."""
        return self.cache / f"pristine-{self.lock['version']}-{self.lock['sha256'][:12]}"

    @property
    def manifest_path(self) -> Path:
        return self.cache / "materialised.json"

    def series(self) -> list[str]:
        path = self.patches / "series"
        if not path.exists():
            return []
        names = []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.append(line.split()[0])
        return names


# ---------------------------------------------------------------------------------------------
# Trees


def read_tree(base: Path) -> dict[str, bytes]:
    """All files under ``base/diffsynth`` as {posix path relative to base: bytes}."""
    files = {}
    top = base / PACKAGE
    if not top.is_dir():
        return files
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_NAMES and not d.endswith(IGNORED_SUFFIXES))
        for name in sorted(filenames):
            if name.endswith(IGNORED_SUFFIXES):
                continue
            path = Path(dirpath) / name
            files[path.relative_to(base).as_posix()] = path.read_bytes()
    return files


def tree_digest(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


def write_tree(files: dict[str, bytes], base: Path) -> None:
    for rel, data in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def differing_paths(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))


# ---------------------------------------------------------------------------------------------
# Fetch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sdist(fork: Fork, path: Path, downloaded: bool = False) -> None:
    """Refuse an sdist whose sha256 is not the one pinned in ``patches/upstream.json``.

    A mismatch has two possible causes and the tool cannot tell which, so the message names both
    files and both hashes: the pin may be wrong (then the sdist is fine and must not be deleted),
    or the sdist may be corrupt or another release (``downloaded``: a fresh download, not kept).
    """
    actual = sha256_file(path)
    expected = fork.lock["sha256"]
    if actual != expected:
        spec = f"{fork.lock['name']}=={fork.lock['version']}"
        lock_path = fork.patches / "upstream.json"
        if downloaded:
            file_cause = f"the download of {spec} was corrupted (nothing was kept; run `python tools/fork.py fetch` again)"
        else:
            file_cause = f"{path} is corrupt or not {spec} (then delete it and run `python tools/fork.py fetch` again)"
        raise ForkError(
            f"sha256 mismatch for {path.name}: expected {expected} (pinned in {lock_path}), actual {actual} ({path}). "
            f"Either the pinned sha256 in {lock_path} is wrong (check it against the sdist's sha256 at "
            f"https://pypi.org/project/{fork.lock['name']}/{fork.lock['version']}/#files and fix the pin; keep the file), "
            f"or {file_cause}."
        )


def fetch(fork: Fork) -> Path:
    """Download (once) and verify the pinned sdist; extract the pristine tree. Returns its folder."""
    fork.cache.mkdir(parents=True, exist_ok=True)
    if not fork.sdist_path.exists():
        spec = f"{fork.lock['name']}=={fork.lock['version']}"
        print(f"fork: downloading {spec} (sdist) into {fork.cache}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=fork.cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, spec]
            result = subprocess.run(cmd, capture_output=True, text=True)
            got = Path(tmp) / fork.sdist_name
            if result.returncode != 0 or not got.exists():
                raise ForkError(f"could not download {spec}: {result.stderr.strip() or result.stdout.strip()}")
            verify_sdist(fork, got, downloaded=True)
            os.replace(got, fork.sdist_path)
    verify_sdist(fork, fork.sdist_path)
    if not (fork.pristine / PACKAGE).is_dir():
        extract_pristine(fork)
    return fork.pristine


def extract_pristine(fork: Fork) -> None:
    prefix = f"{fork.lock['name']}-{fork.lock['version']}/{PACKAGE}/"
    staging = Path(tempfile.mkdtemp(dir=fork.cache))
    with tarfile.open(fork.sdist_path) as archive:
        for member in archive.getmembers():
            if not member.isfile() or not member.name.startswith(prefix):
                continue
            rel = PACKAGE + "/" + member.name[len(prefix):]
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    if fork.pristine.exists():
        shutil.rmtree(fork.pristine)
    os.replace(staging, fork.pristine)


# ---------------------------------------------------------------------------------------------
# Patches: write


def split_lines(data: bytes, path: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ForkError(f"{path} is not UTF-8 text; the fork carries text files only") from error
    return text.splitlines(keepends=True)


def file_diff(path: str, old: bytes | None, new: bytes | None) -> str:
    """One file's git-style unified diff (3 lines of context, no timestamps)."""
    old_lines = split_lines(old, path) if old is not None else []
    new_lines = split_lines(new, path) if new is not None else []
    header = [f"diff --git a/{path} b/{path}\n"]
    if old is None:
        header.append("new file mode 100644\n")
    elif new is None:
        header.append("deleted file mode 100644\n")
    from_name = f"a/{path}" if old is not None else "/dev/null"
    to_name = f"b/{path}" if new is not None else "/dev/null"
    body = []
    for line in difflib.unified_diff(old_lines, new_lines, from_name, to_name, n=3):
        if line.startswith(("---", "+++")):
            line = line.rstrip() + "\n"  # difflib appends a blank date field
        body.append(line)
        if not line.endswith("\n"):
            body.append("\n\\ No newline at end of file\n")
    return "".join(header + body)


def patch_files(text: str) -> list[str]:
    return re.findall(r"^diff --git a/(\S+) b/\S+$", text, flags=re.M)


def default_patch_name(path: str, pristine: dict[str, bytes]) -> str:
    """Patch for a file no patch carries yet: a new folder's files share one, else one per file."""
    parts = path.split("/")
    for depth in range(2, len(parts)):
        folder = "/".join(parts[:depth]) + "/"
        if not any(p.startswith(folder) for p in pristine):
            return "-".join(parts[:depth]) + ".patch"
    return "-".join(parts).replace(".py", "") + ".patch"


def export(fork: Fork) -> list[str]:
    """Regenerate patches/ from diffsynth/; returns the new series."""
    pristine = read_tree(fetch(fork))
    work = read_tree(fork.root)
    if not work:
        raise ForkError(f"{fork.work} does not exist; nothing to export (run `make setup`)")
    owner = {}
    for name in fork.series():
        for path in patch_files((fork.patches / name).read_text()):
            owner.setdefault(path, name)
    groups: dict[str, list[str]] = {}
    for path in differing_paths(pristine, work):
        name = owner.get(path) or default_patch_name(path, pristine)
        groups.setdefault(name, []).append(path)
    series = [n for n in fork.series() if n in groups]
    series += sorted(n for n in groups if n not in series)
    for name in fork.series():
        if name not in groups:
            (fork.patches / name).unlink(missing_ok=True)
    for name in series:
        text = "".join(file_diff(p, pristine.get(p), work.get(p)) for p in sorted(groups[name]))
        write_if_changed(fork.patches / name, text)
    write_if_changed(fork.patches / "series", "".join(f"{n}\n" for n in series))
    save_manifest(fork, work)
    return series


def write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Patches: apply


def hunk_headers(patch_text: str, path: str) -> list[tuple[int, str]]:
    """(old start line, header) of each hunk of ``path`` in a patch."""
    hunks, current = [], None
    for line in patch_text.splitlines():
        match = re.match(r"^diff --git a/(\S+) b/", line)
        if match:
            current = match.group(1)
        elif current == path and line.startswith("@@"):
            start = re.match(r"^@@ -(\d+)", line)
            hunks.append((int(start.group(1)), line))
    return hunks


def describe_conflict(name: str, patch_text: str, git_stderr: str) -> str:
    match = re.search(r"patch failed: (\S+):(\d+)", git_stderr)
    if match:
        path, line = match.group(1), int(match.group(2))
        hunks = hunk_headers(patch_text, path)
        index = next((i for i, (start, _) in enumerate(hunks) if start == line), None)
        if index is None:  # git reports the line it last tried; name the nearest hunk
            index = min(range(len(hunks)), key=lambda i: abs(hunks[i][0] - line)) if hunks else 0
        header = hunks[index][1] if hunks else "?"
        return (f"patch {name} does not apply: file {path}, hunk #{index + 1} of {len(hunks)} "
                f"({header}). Fix the patch or rebase it onto the pinned upstream.")
    missing = re.search(r"error: (\S+): (No such file or directory|does not exist in index|already exists)", git_stderr)
    if missing:
        return f"patch {name} does not apply: file {missing.group(1)}: {missing.group(2)}"
    return f"patch {name} does not apply: {git_stderr.strip()}"


def git_apply(tree: Path, patch: Path, check_only: bool = False) -> subprocess.CompletedProcess:
    cmd = ["git", "apply", "-p1", "--whitespace=nowarn"] + (["--check"] if check_only else []) + [str(patch)]
    # Stop git from treating an enclosing repository as the target of the patch.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    return subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)


def build_expected(fork: Fork) -> dict[str, bytes]:
    """Pristine upstream with the whole series applied, as a file map."""
    pristine_dir = fetch(fork)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        shutil.copytree(pristine_dir, tree)
        for name in fork.series():
            patch = fork.patches / name
            if not patch.exists():
                raise ForkError(f"patches/series names {name}, but patches/{name} does not exist")
            for check_only in (True, False):
                result = git_apply(tree, patch, check_only)
                if result.returncode != 0:
                    raise ForkError(describe_conflict(name, patch.read_text(), result.stderr))
        return read_tree(tree)


def save_manifest(fork: Fork, files: dict[str, bytes]) -> None:
    fork.cache.mkdir(parents=True, exist_ok=True)
    fork.manifest_path.write_text(json.dumps(tree_digest(files), indent=0, sort_keys=True))


def apply(fork: Fork, force: bool = False) -> bool:
    """Materialise diffsynth/. Returns True when files were written."""
    expected = build_expected(fork)
    work = read_tree(fork.root)
    if work == expected:
        save_manifest(fork, work)
        return False
    if work and not force:
        last = json.loads(fork.manifest_path.read_text()) if fork.manifest_path.exists() else None
        if last != tree_digest(work):
            edited = differing_paths(work, expected)
            shown = "\n  ".join(edited[:20]) + ("\n  ..." if len(edited) > 20 else "")
            raise ForkError(
                f"{fork.work} has edits that are not in patches/ (or was not made by this tool):\n  {shown}\n"
                "Export them first with `make patches` (python tools/fork.py export), "
                "or discard them with `python tools/fork.py apply --force`."
            )
    if fork.work.exists():
        shutil.rmtree(fork.work)
    write_tree(expected, fork.root)
    save_manifest(fork, expected)
    return True


# ---------------------------------------------------------------------------------------------
# Check and combined patch


def check(fork: Fork) -> None:
    expected = build_expected(fork)
    work = read_tree(fork.root)
    if not work:
        raise ForkError(f"{fork.work} does not exist; run `make setup`")
    differing = differing_paths(work, expected)
    if differing:
        raise ForkError(
            "diffsynth/ differs from pristine upstream + patches/series in:\n  " + "\n  ".join(differing)
            + "\nRun `make patches` to export the edits (then commit patches/)."
        )


def combined(fork: Fork, out: Path | None = None) -> Path:
    pristine = read_tree(fetch(fork))
    expected = build_expected(fork)
    out = out or fork.root / "dist" / f"diffsynth-{fork.lock['version']}-fantasyworld.patch"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(file_diff(p, pristine.get(p), expected.get(p)) for p in differing_paths(pristine, expected))
    out.write_text(text)
    return out


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fork.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    sub.add_parser("fetch", help="download and verify the pinned upstream sdist")
    apply_parser = sub.add_parser("apply", help="materialise diffsynth/ from upstream + patches")
    apply_parser.add_argument("--force", action="store_true", help="discard edits that are not exported")
    sub.add_parser("export", help="regenerate patches/ from diffsynth/")
    sub.add_parser("check", help="verify diffsynth/ == upstream + patches")
    combined_parser = sub.add_parser("combined", help="write the whole fork as one patch")
    combined_parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    fork = Fork()
    try:
        if args.verb == "fetch":
            fetch(fork)
            print(f"fork: {fork.sdist_path} verified (sha256 {fork.lock['sha256']})")
        elif args.verb == "apply":
            changed = apply(fork, force=args.force)
            print(f"fork: diffsynth/ {'materialised' if changed else 'already up to date'} "
                  f"({len(fork.series())} patches)")
        elif args.verb == "export":
            series = export(fork)
            print(f"fork: exported {len(series)} patches: {', '.join(series) or '(none)'}")
        elif args.verb == "check":
            check(fork)
            print(f"fork: diffsynth/ == upstream {fork.lock['version']} + {len(fork.series())} patches; all apply cleanly")
        elif args.verb == "combined":
            print(f"fork: wrote {combined(fork, args.out)}")
    except ForkError as error:
        print(f"fork: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
