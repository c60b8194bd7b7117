"""The README's "Optimizers for normalized weights" snippet runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_optimizers_snippet_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("### Optimizers for normalized weights", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md (optimizers)", "exec"), namespace)
    assert namespace["groups"][0]["projection"] == "channel"
