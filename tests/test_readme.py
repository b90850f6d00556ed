"""The README's commands are what a newcomer runs first; CI must run the same test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.split("\n", 1)[1].strip() for b in text.split("```")[1::2] if b.startswith("sh\n")]


def test_ci_runs_exactly_the_readme_test_command():
    first, second = _blocks()[:2]
    assert first.endswith("flasher demo")
    assert "ruff check" in second and "mypy" in second and "python -m pytest -q" in second
    assert second in (ROOT / ".ci" / "run").read_text().splitlines()
