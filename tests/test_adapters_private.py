"""TRAK's and Captum's private symbols: all there, each reached only through ``adapters/_private.py``."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

pytest.importorskip("trak")
pytest.importorskip("captum")
from selproj_plugin.adapters._private import PRIVATE, Private, resolve  # noqa: E402

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def test_every_private_symbol_the_adapters_use_is_there():
    for symbol in PRIVATE:
        resolve(symbol)  # raises ImportError naming the symbol and the version


@pytest.mark.parametrize(
    "symbol",
    [
        Private("captum", "captum.influence", "TracInCP._gone"),
        Private("traker", "trak.traker", "TRAKer._gone", instance=True),
        Private("captum", "captum._no_such_module", "_f"),
    ],
)
def test_a_missing_symbol_is_one_line_naming_it_and_the_version(symbol):
    version = importlib.metadata.version(symbol.package)
    with pytest.raises(ImportError) as err:
        resolve(symbol)
    message = str(err.value)
    assert message.startswith(f"{symbol.package} {version} has no {symbol.module}.{symbol.name}, which ")
    assert "\n" not in message


def test_no_other_adapter_module_touches_a_private_trak_or_captum_symbol():
    leaves = {symbol.name.rpartition(".")[2]: symbol for symbol in PRIVATE}
    names = {leaf for leaf, symbol in leaves.items() if leaf.startswith("_") or symbol.instance}
    for path in sorted(ADAPTERS.glob("*.py")):
        if path.name == "_private.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("trak", "captum"):
                assert "._" not in node.module and not any(a.name.startswith("_") for a in node.names), (
                    f"{path.name}:{node.lineno} imports a private name from {node.module}"
                )
            used = (
                node.attr
                if isinstance(node, ast.Attribute)
                else node.name
                if isinstance(node, ast.FunctionDef)
                else node.id
                if isinstance(node, ast.Name)
                else None
            )
            assert used not in names, f"{path.name}:{node.lineno} reaches {used} outside _private.py"
