"""selproj-plugin: select or project LLM gradients for training-data attribution.

Public API: ``list_strategies``, ``get_strategy`` (reducers by name, plugins included),
``Reducer`` and ``hookimpl`` (to write a plugin), ``ComponentTable`` (the data they score).
"""

from selproj_plugin.hookspecs import hookimpl
from selproj_plugin.registry import StrategyError, get_strategy, list_strategies, plugin_errors
from selproj_plugin.strategies.base import Reducer, StrategyResult
from selproj_plugin.table import ComponentTable, TableError

__version__ = "0.1.0"
__all__ = [
    "ComponentTable", "Reducer", "StrategyError", "StrategyResult", "TableError",
    "get_strategy", "hookimpl", "list_strategies", "plugin_errors", "__version__",
]
