"""The Python example of the README ('Use Keel from Python/JavaScript') runs as written."""

import os
import re
import subprocess
import sys

from conftest import REPO


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use Keel from Python/JavaScript", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(keel, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    done = subprocess.run([sys.executable, str(script)], env={**os.environ, "KEEL_GRPC": keel.address},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith('COMPLETED ["Hello Tokyo!", "Hello Lima!"]'), done.stdout
