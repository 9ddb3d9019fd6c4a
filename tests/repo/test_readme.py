"""README.md: its Python example runs as written."""
import re

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def test_readme_python_example_runs_and_its_shapes_hold():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README lost its Python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    geometry = namespace["geometry"]
    for line in blocks[0].splitlines():
        shape = re.match(r'geometry\["(\w+)"\]\.shape\s+# \[([\d, ]+)\]', line)
        if shape:
            assert list(geometry[shape.group(1)].shape) == [int(n) for n in shape.group(2).split(",")], line


def test_the_architecture_table_names_every_layer_and_only_modules_that_exist():
    section = README.read_text().split("## Architecture", 1)[1].split("\n## ", 1)[0]
    package = REPO_ROOT / "diffsynth" / "fantasy_world"
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    layers = [row[1].strip(" `/") for row in rows]
    assert layers == ["config.py", "geometry", "model", "tiny", "data", "train", "eval", "app"]
    not_modules = {"FantasyWorldConfig", "stage_loss", "bench/"}
    for layer, row in zip(layers[1:], rows[1:]):
        named = set(re.findall(r"`([\w/]+)`", row[2])) - not_modules
        missing = [name for name in named if not (package / layer / f"{name}.py").exists() and not (package / layer / name).is_dir()]
        assert missing == [], (layer, missing)
