"""The command lines the README and the scripts name keep working after the package moved into layers."""
import re
import runpy

import pytest

from conftest import REPO_ROOT

SCRIPTS = ("README.md", "bench/learn.sh", "examples/wanvideo/model_training/full/test_fantasy_world_training.sh")


def named_commands() -> list[str]:
    """Every ``python -m diffsynth.fantasy_world.<command>`` in the README and the scripts."""
    text = "\n".join((REPO_ROOT / path).read_text() for path in SCRIPTS)
    return sorted(set(re.findall(r"-m (diffsynth\.fantasy_world\.[\w.]+)", text)))


def test_the_documented_commands_are_the_packages_command_modules():
    assert named_commands() == [f"diffsynth.fantasy_world.{name}" for name in ("annotate", "evaluate", "export", "synthetic", "synthetic_ood")]


@pytest.mark.parametrize("module", named_commands())
def test_each_documented_command_runs_as_a_script(module, monkeypatch, capsys):
    # As `python -m <module> --help` does, in this process (no second interpreter start per command).
    monkeypatch.setattr("sys.argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_code:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_code.value.code == 0
    assert "usage:" in capsys.readouterr().out
