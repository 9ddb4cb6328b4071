"""selproj-plugin: select or project LLM gradients for training-data attribution.

Public API: ``list_strategies``, ``get_strategy`` (reducers by name, plugins included),
``Reducer``, ``Transform``/``Concatenate`` and ``hookimpl`` (to write a plugin),
``reduction`` (a reducer's two steps on one catalogue), ``ComponentTable`` (the data they score).
"""

from selproj_plugin.hookspecs import hookimpl
from selproj_plugin.registry import StrategyError, get_strategy, list_strategies, plugin_errors
from selproj_plugin.strategies.base import Reducer, ReducerError, Reduction, StrategyResult, reduction
from selproj_plugin.transforms import Concatenate, Transform, TransformError
from selproj_plugin.table import ComponentTable, TableError

__version__ = "0.1.0"
__all__ = [
    "ComponentTable",
    "Concatenate",
    "Reducer",
    "ReducerError",
    "Reduction",
    "StrategyError",
    "StrategyResult",
    "TableError",
    "Transform",
    "TransformError",
    "get_strategy",
    "hookimpl",
    "list_strategies",
    "plugin_errors",
    "reduction",
    "__version__",
]
