"""The Python in README.md and docs/ is code that runs: it parses, every ferrum_gen name it imports
exists, and (GPU) the README quick start and docs/engine-integration.md run top to bottom."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return FENCE.findall(page.read_text())


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ferrum_gen"):
            out += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names if alias.name.startswith("ferrum_gen")]
    return out


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_examples_parse_and_import_real_names(page: Path) -> None:
    for block in python_blocks(page):
        tree = ast.parse(block, filename=str(page))
        for module, name in _imports(tree):
            if module == "ferrum_gen.torch" and importlib.util.find_spec("torch") is None:
                continue  # needs torch; the GPU test below runs it
            mod = importlib.import_module(module)
            if name is not None:
                assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), \
                    f"{page.name}: {module} has no {name}"


def test_the_engine_pages_have_examples() -> None:
    for name in ("getting-started.md", "engine-integration.md"):
        assert python_blocks(ROOT / "docs" / name), f"docs/{name} has no python example"


def _gpu_ready() -> str:
    for module in ("torch", "cupy"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    import torch

    return "" if torch.cuda.is_available() else "no CUDA GPU visible to torch"


@pytest.mark.gpu
@pytest.mark.skipif(bool(_gpu_ready()), reason=f"docs examples need a GPU: {_gpu_ready()}")
@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "engine-integration.md"],
                         ids=["README", "engine-integration"])
def test_examples_run_top_to_bottom(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # they write small.gguf into the working directory
    namespace: dict = {}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - the docs' own examples
    import torch

    torch.cuda.synchronize()
