"""The README's layout names every module of the package, so a newcomer finds each one from the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ")]
    package = ROOT / "diffusers_klvae"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if not re.search(rf"(?<![\w/.]){re.escape(m)}\b", layout)]
    assert not missing, f"README.md's Layout does not name {missing}"
