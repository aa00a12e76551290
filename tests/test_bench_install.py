"""benchmarks.bench_install reads the README's main command as printed and changes only its port."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_install import main_command, with_port

ROOT = Path(__file__).resolve().parents[1]


def test_the_main_command_is_the_readme_line_and_only_its_port_changes():
    command = main_command(ROOT / "README.md")
    assert command.startswith("python -m venv .venv && ") and "python -m engine.serve" in command
    port = command.split("--port ")[1].split()[0]
    assert with_port(command, 12345) == command.replace(f"--port {port}", "--port 12345")
    assert with_port("python -m engine.serve --model tiny", 9) == "python -m engine.serve --model tiny --port 9"


def test_a_readme_without_the_block_is_refused_naming_the_marker(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# nothing here\n")
    with pytest.raises(SystemExit, match="main-command"):
        main_command(readme)
