"""Prints the package's requirements from pyproject.toml, one per line, for `pip install -r`.

    python3 scripts/requirements.py            # the runtime dependencies
    python3 scripts/requirements.py dev gpu    # plus those extras

The Makefile's GPU environment installs these next to the system's CuPy and torch without
building the package itself (GPU machines may have no package index, only wheels in .whl/).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
extras = project.get("optional-dependencies", {})
unknown = [name for name in sys.argv[1:] if name not in extras]
if unknown:
    sys.exit(f"unknown extra(s) {unknown}: pyproject.toml has {sorted(extras)}")
for line in project["dependencies"] + [req for name in sys.argv[1:] for req in extras[name]]:
    print(line)
