"""README.md: its Python example runs as written."""
import re
from pathlib import Path

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
