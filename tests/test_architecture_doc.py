"""docs/ARCHITECTURE.md names modules and functions a newcomer can find: every module path
it mentions exists, every `Class.method` it names is defined in that class, and every
module of the client core (dorafs/client/) has its place in it."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"


def _methods() -> dict[str, set[str]]:
    """Class name -> the functions defined in its body, over dorafs/, worker/, registry/."""
    found: dict[str, set[str]] = {}
    for d in ("dorafs", "worker", "registry"):
        for path in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    found.setdefault(node.name, set()).update(
                        item.name for item in node.body if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return found


def test_every_module_path_exists():
    text = DOC.read_text()
    paths = set(re.findall(r"\b((?:[a-z_]+/)+[a-z_]+\.py)\b", text))
    assert len(paths) >= 20
    missing = [p for p in sorted(paths) if not (REPO / p).exists() and not (REPO / "dorafs" / p).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_named_method_is_defined_in_its_class():
    text, methods = DOC.read_text(), _methods()
    named = {m for m in re.findall(r"\b([A-Z][A-Za-z0-9]+)\.(_?[a-z][a-z0-9_]*)\b", text) if m[1] != "md"}
    assert len(named) >= 20
    missing = [f"{cls}.{name}" for cls, name in sorted(named) if name not in methods.get(cls, ())]
    assert not missing, f"docs/ARCHITECTURE.md names functions that are not defined in their class: {missing}"


def test_every_module_of_the_client_core_is_named():
    """A newcomer following a read finds each of the client's concerns on the page."""
    text = DOC.read_text()
    modules = sorted(p.name for p in (REPO / "dorafs" / "client").glob("*.py") if not p.name.startswith("_"))
    assert {"router.py", "metadata.py", "reading.py", "prefetch.py"} <= set(modules)
    unnamed = [m for m in modules if f"client/{m}" not in text]
    assert not unnamed, f"docs/ARCHITECTURE.md does not name these modules of dorafs/client/: {unnamed}"
