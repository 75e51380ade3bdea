"""The generic types check with mypy --strict: ``Message[Order].value`` is an
``Order``, a handler must yield results, a decoder must give what the handler
takes (the files in tests/typing/)."""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api as mypy_api

HERE = Path(__file__).parent / "typing"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<text>.*)$")


def _mypy(tmp_path: Path, *files: Path) -> list[tuple[str, int, str]]:
    out, err, _ = mypy_api.run(
        [
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            *map(str, files),
        ]
    )
    assert not err, err
    found = []
    for line in out.splitlines():
        match = ERROR.match(line)
        if match:
            name = Path(match["path"]).name
            found.append((name, int(match["line"]), match["text"]))
    return found


def _marked(path: Path) -> list[int]:
    lines = path.read_text().splitlines()
    return [number for number, text in enumerate(lines, 1) if "# error:" in text]


def test_typed_handlers_check_and_wrong_ones_fail(tmp_path: Path) -> None:
    ok, wrong = HERE / "handlers_ok.py", HERE / "handlers_wrong.py"
    errors = _mypy(tmp_path, ok, wrong)
    assert [e for e in errors if e[0] == ok.name] == []
    wrong_lines = sorted(line for name, line, _ in errors if name == wrong.name)
    assert wrong_lines == _marked(wrong), errors
