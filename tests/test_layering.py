"""The package's layering (docs/architecture.md): the model is plain PyTorch plus ``parallel/`` and
knows no privacy or app config; the DP step knows no training loop, app config, runtime or DeepSpeed.
Read from the source's import statements, so a new file that breaks a rule fails here."""
import ast

import pytest

from helpers import ROOT

PACKAGE = ROOT / "dpdist"
FORBIDDEN = {
    "model": ("dpdist.config", "dpdist.privacy", "dpdist.train", "dpdist.runtime", "dpdist.data", "deepspeed",
              "transformers", "peft"),
    "privacy": ("dpdist.train", "dpdist.config", "dpdist.runtime", "deepspeed", "transformers", "peft"),
    "parallel": ("dpdist.config", "dpdist.privacy", "dpdist.train", "dpdist.model", "deepspeed"),
}


def imported_modules(path):
    """Absolute names of every module ``path`` imports, at any depth of the file (lazy imports too)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = node.module if node.level == 0 else ".".join(p for p in (base, node.module) if p)
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("layer", FORBIDDEN)
def test_a_layer_imports_nothing_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    broken = [f"{path.relative_to(ROOT)} imports {name}" for path in files for name in imported_modules(path)
              if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[layer])]
    assert not broken, "; ".join(broken)


def test_the_check_sees_relative_imports():
    names = set(imported_modules(PACKAGE / "model" / "hf.py"))
    assert "dpdist.model.config" in names and "dpdist.model.config.ModelConfig" in names
