"""The README's promises: its first two commands, and CI running exactly the second."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_starts_with_install_and_main_job_then_tests():
    install_and_run, run_tests = readme_commands()
    assert "pip install torch==2.13.0" in install_and_run and "cpmkit release demo" in install_and_run
    assert run_tests.endswith("python -m pytest -q")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == readme_commands()[1]
