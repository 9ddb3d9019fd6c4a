"""tools/pins.py: the lock is read strictly and every difference from it is named."""
from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

import pytest

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("pins", REPO_ROOT / "tools" / "pins.py")
pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pins)


def test_differences_name_each_package_and_both_versions() -> None:
    locked = {"numpy": "2.4.6", "torch": "2.14.1", "kernels": "0.19.1"}
    found = {"numpy": "2.4.6", "torch": "2.13.0", "extra-package": "1.0"}
    assert pins.differences(locked, found) == [
        "extra-package: installed 1.0, not in the lock",
        "kernels: locked 0.19.1, not installed",
        "torch: locked 2.14.1, installed 2.13.0",
    ]
    assert pins.differences(locked, dict(locked)) == []


def test_names_are_compared_by_their_normal_form(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("# header\nTyping_Extensions==4.16.0\nhuggingface.hub==2.4.0  # comment\n\n")
    assert pins.read_lock(lock) == {"typing-extensions": "4.16.0", "huggingface-hub": "2.4.0"}


@pytest.mark.parametrize("line", ["numpy>=2", "numpy", "torch @ file:///wheel.whl"])
def test_a_line_that_is_not_an_exact_pin_is_refused_with_its_line_number(tmp_path: Path, line: str) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text("einops==0.8.2\n" + line + "\n")
    with pytest.raises(ValueError, match=r"lock.txt:2: expected `name==version`"):
        pins.read_lock(lock)


def test_freeze_then_check_round_trips_the_running_environment(tmp_path: Path, capsys) -> None:
    lock = tmp_path / "lock.txt"
    count = pins.freeze(lock)
    assert count == len(pins.read_lock(lock)) > 10
    assert "diffsynth" not in pins.read_lock(lock)  # our own editable install is the repository
    assert pins.main(["check", str(lock)]) == 0
    lock.write_text(lock.read_text().replace(f"torch=={pins.installed()['torch']}", "torch==0.0.1"))
    assert pins.main(["check", str(lock)]) == 1
    assert "torch: locked 0.0.1, installed" in capsys.readouterr().err


def test_the_committed_lock_pins_what_the_suite_imports() -> None:
    lock = REPO_ROOT / "requirements" / f"lock-{platform.machine()}.txt"
    if not lock.exists():
        pytest.fail(f"{lock.relative_to(REPO_ROOT)} is missing: `make lock` writes it")
    pinned = pins.read_lock(lock)
    for name in ("torch", "transformers", "accelerate", "numpy", "safetensors", "pytest", "kernels"):
        assert name in pinned, f"{name} is not pinned in {lock.name}"
