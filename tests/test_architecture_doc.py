"""docs/ARCHITECTURE.md names modules and functions a newcomer can find: every module path
it mentions exists, and every `Class.method` it names is defined in the source."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"


def _sources() -> str:
    return "\n".join(p.read_text() for d in ("dorafs", "worker", "registry") for p in (REPO / d).rglob("*.py"))


def test_every_module_path_exists():
    text = DOC.read_text()
    paths = set(re.findall(r"\b((?:[a-z_]+/)+[a-z_]+\.py)\b", text))
    assert len(paths) >= 20
    missing = [p for p in sorted(paths) if not (REPO / p).exists() and not (REPO / "dorafs" / p).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_named_method_is_defined():
    text, source = DOC.read_text(), _sources()
    named = {m for m in re.findall(r"\b([A-Z][A-Za-z0-9]+)\.(_?[a-z][a-z0-9_]*)\b", text) if m[1] != "md"}
    assert len(named) >= 10
    missing = [f"{cls}.{name}" for cls, name in sorted(named)
               if not re.search(rf"^class {cls}\b", source, re.M)
               or not re.search(rf"^\s+(?:async )?def {name}\(", source, re.M)]
    assert not missing, f"docs/ARCHITECTURE.md names functions that are not defined: {missing}"
