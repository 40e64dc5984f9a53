"""ruff over the whole repository: line length 120 and the rules chosen in pyproject.toml."""
import subprocess

from conftest import BIN, ROOT


def test_the_code_passes_ruff():
    p = subprocess.run([str(BIN / "ruff"), "check", "--output-format", "concise", str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
