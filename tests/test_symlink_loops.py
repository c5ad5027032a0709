"""A symbolic link loop where a job writes (its output, its errors file) is one line and exit 2 before
any work, and no file changes."""

from __future__ import annotations

import pytest

from cli_run import assert_one_line_error, run_cli


@pytest.mark.parametrize("command", [
    ["translate", "{input}", "-o", "{loop}", "--to", "ja"],
    ["translate", "{input}", "-o", "{output}", "--errors", "{loop}", "--to", "ja"],
    ["ask", "--batch", "{input}", "-o", "{loop}"],
    ["ask", "--batch", "{input}", "-o", "{output}", "--errors", "{loop}"],
])
def test_a_symlink_loop_as_a_jobs_file_is_one_line_and_exit_2(tmp_path, command):
    (tmp_path / "in.txt").write_text("Hello world.\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    before = sorted((path.name, path.lstat().st_mtime_ns) for path in tmp_path.iterdir())
    names = {"input": tmp_path / "in.txt", "loop": tmp_path / "loop", "output": tmp_path / "out.jsonl"}
    proc = run_cli(*(part.format(**names) for part in command))
    assert_one_line_error(proc, "symbolic link loop")
    assert sorted((path.name, path.lstat().st_mtime_ns) for path in tmp_path.iterdir()) == before
