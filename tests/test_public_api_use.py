"""vitrail uses other libraries through their public names only: nothing in src/ imports or reads a name that starts
with "_" from another package, so that a release that renames its internals breaks nothing here."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitrail"
OWN = "vitrail"
# Class attributes transformers documents for model classes to declare (and reads itself): conventions of the
# public API, not private names.
DOCUMENTED = {
    "_auto_class",
    "_can_compile_fullgraph",
    "_can_record_outputs",
    "_checkpoint_conversion_mapping",
    "_keep_in_fp32_modules",
    "_keys_to_ignore_on_load_missing",
    "_keys_to_ignore_on_load_unexpected",
    "_no_split_modules",
    "_supports_attention_backend",
    "_supports_flash_attn",
    "_supports_flex_attn",
    "_supports_sdpa",
    "_tied_weights_keys",
}


def is_private(name: str) -> bool:
    return (
        name.startswith("_")
        and not (name.startswith("__") and name.endswith("__"))
        and name not in DOCUMENTED
    )


def is_foreign(module: str | None, level: int) -> bool:
    return level == 0 and module is not None and module.split(".")[0] != OWN


def private_uses(source: str) -> list[str]:
    """Each place where `source` imports a private name of another package, or reads one from a name it imported
    from another package (`module._name`, `Class._name`), as "line: what"."""
    tree = ast.parse(source)
    found, foreign = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_foreign(alias.name, 0):
                    if any(is_private(part) for part in alias.name.split(".")):
                        found.append(f"{node.lineno}: import {alias.name}")
                    foreign.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and is_foreign(node.module, node.level):
            for part in node.module.split("."):
                if is_private(part):
                    found.append(f"{node.lineno}: from {node.module} import ...")
                    break
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                foreign.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in foreign:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_scan_finds_private_uses():
    source = (
        "import torch\n"
        "import numpy as np\n"
        "import huggingface_hub.utils._http\n"
        "from huggingface_hub.utils import _http\n"
        "from huggingface_hub.utils._http import get_session\n"
        "from transformers import PreTrainedModel\n"
        "from .plots import _save\n"
        "from vitrail.plots import _new_figure\n"
        "x = torch._C\n"
        "y = np.linalg._umath_linalg\n"
        "z = PreTrainedModel._from_config\n"
        "ok = (torch.__version__, PreTrainedModel._supports_sdpa, self._private, _save)\n"
    )
    assert private_uses(source) == [
        "3: import huggingface_hub.utils._http",
        "4: from huggingface_hub.utils import _http",
        "5: from huggingface_hub.utils._http import ...",
        "9: torch._C",
        "10: np.linalg._umath_linalg",
        "11: PreTrainedModel._from_config",
    ]


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda path: str(path.relative_to(SRC)))
def test_no_private_names_of_other_packages(path):
    assert private_uses(path.read_text()) == []
