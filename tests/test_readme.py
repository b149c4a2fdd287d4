"""The README's promises that are cheap to check: CI runs its test command verbatim; its commands exist."""
import re

from conftest import REPO


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(pip install .*?)\n```", text)


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()
    assert "deepspeed --num_gpus 2 brivl_ds/train.py --preset tiny" in main_job
    assert tests.endswith("python -m pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_hostfile_describes_the_papers_cluster():
    lines = [l.split() for l in (REPO / "hostfiles" / "a100").read_text().splitlines() if l.strip()]
    assert len(lines) == 16 and all(slots == "slots=8" for _, slots in lines)
    assert len({host for host, _ in lines}) == 16
