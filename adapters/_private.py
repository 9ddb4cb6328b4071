"""Every private TRAK and Captum symbol the adapters rely on, reached only through this module.

:data:`PRIVATE` names each one.  They are resolved when this module is imported, so an
upgrade that renames or drops one fails there with one line naming the symbol and the
installed version, instead of somewhere deep inside a run.  The adapters subclass the
bases here (:class:`SaverBase`, :class:`TRAKerBase`, :class:`TracInCPBase`), which give
the private hooks public names, and call the private functions by the names bound below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from typing import Any

from captum.influence import TracInCP
from trak.savers import MmapSaver
from trak.traker import TRAKer

SUPPORTED = {"traker": "traker>=0.3,<0.4", "captum": "captum>=0.7,<0.10"}  # as pyproject.toml pins them


@dataclass(frozen=True)
class Private:
    """One private symbol: ``module`` then ``name`` (dotted through classes); ``instance``: an attribute
    the class's own code sets on ``self``, so it exists on instances only."""

    package: str  # the distribution, for its version
    module: str
    name: str
    instance: bool = False

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


PRIVATE = (
    Private("traker", "trak.savers", "MmapSaver._load"),
    Private("traker", "trak.traker", "TRAKer._last_ind", instance=True),
    Private("traker", "trak.traker", "TRAKer._last_ind_target", instance=True),
    Private("traker", "trak.traker", "TRAKer.ckpt_loaded", instance=True),
    Private("captum", "captum.influence", "TracInCP._basic_computation_tracincp"),
    Private("captum", "captum.influence", "TracInCP._influence"),
    Private("captum", "captum.influence", "TracInCP._get_k_most_influential"),
    Private("captum", "captum._utils.gradient", "_compute_jacobian_wrt_params_with_sample_wise_trick"),
    Private("captum", "captum._utils.gradient", "_extract_parameters_from_layers"),
    Private("captum", "captum.influence._utils.common", "_format_inputs_dataset"),
    Private("captum", "captum.influence._utils.common", "_load_flexible_state_dict"),
    Private("captum", "captum.influence._utils.common", "KMostInfluentialResults"),
)


def resolve(symbol: Private) -> Any:
    """The symbol's object (an instance attribute: its class); ImportError naming it and the version if absent."""
    try:
        attr = symbol.name.rpartition(".")[2]
        obj = importlib.import_module(symbol.module)
        for part in symbol.name.split(".")[:-1] if symbol.instance else symbol.name.split("."):
            obj = getattr(obj, part)
        if symbol.instance and f"self.{attr} =" not in inspect.getsource(obj):
            raise AttributeError(attr)
        return obj
    except (ImportError, AttributeError, OSError, TypeError):
        try:
            version = importlib.metadata.version(symbol.package)
        except importlib.metadata.PackageNotFoundError:
            version = "(not installed)"
        raise ImportError(
            f"{symbol.package} {version} has no {symbol}, which selproj_plugin.adapters uses; install {SUPPORTED[symbol.package]}"
        ) from None


_found = {symbol.name: resolve(symbol) for symbol in PRIVATE}
compute_jacobian_sample_wise = _found["_compute_jacobian_wrt_params_with_sample_wise_trick"]
extract_parameters_from_layers = _found["_extract_parameters_from_layers"]
format_inputs_dataset = _found["_format_inputs_dataset"]
load_flexible_state_dict = _found["_load_flexible_state_dict"]
KMostInfluentialResults = _found["KMostInfluentialResults"]


class SaverBase(MmapSaver):
    """``MmapSaver`` whose private array loader is :meth:`load_store`."""

    def _load(self, fname, shape, mode, dtype=None):
        return self.load_store(fname, shape, mode, dtype)

    def load_store(self, fname, shape, mode, dtype=None):
        """TRAK's own: a memory-mapped store (None if a store to read is missing)."""
        return MmapSaver._load(self, fname, shape, mode, dtype)


class TRAKerBase(TRAKer):
    """``TRAKer`` with its private bookkeeping under public names."""

    @property
    def loaded_model_id(self) -> Any:
        """The model ID of the last ``load_checkpoint`` (a placeholder string before any)."""
        return self.ckpt_loaded

    def next_index(self, target: bool) -> int:
        """Index ``featurize`` (``score`` if ``target``) gives the next sample passed with ``num_samples``."""
        return self._last_ind_target if target else self._last_ind

    def set_next_index(self, target: bool, value: int) -> None:
        if target:
            self._last_ind_target = value
        else:
            self._last_ind = value


class TracInCPBase(TracInCP):
    """``TracInCP`` whose private per-batch gradients, influence matrix and top-k are public methods."""

    def _basic_computation_tracincp(self, inputs, targets=None, loss_fn=None, reduction_type=None):
        return self.batch_gradients(inputs, targets, loss_fn, reduction_type)

    def _influence(self, inputs, show_progress=False, aggregate=False):
        return self.influence_matrix(inputs, show_progress, aggregate)

    def _get_k_most_influential(self, inputs, k=5, proponents=True, show_progress=False, aggregate=False):
        return self.most_influential(inputs, k, proponents, show_progress, aggregate)

    def batch_gradients(self, inputs, targets=None, loss_fn=None, reduction_type=None):
        """Captum's own: the batch's per-sample gradients (a tuple, one per layer)."""
        return TracInCP._basic_computation_tracincp(self, inputs, targets, loss_fn, reduction_type)

    def influence_matrix(self, inputs, show_progress=False, aggregate=False):
        """Captum's own ``[tests, train]`` influence (``aggregate``: summed over tests)."""
        return TracInCP._influence(self, inputs, show_progress, aggregate)

    def most_influential(self, inputs, k=5, proponents=True, show_progress=False, aggregate=False):
        """Captum's own top-``k`` training samples per test."""
        return TracInCP._get_k_most_influential(self, inputs, k, proponents, show_progress, aggregate)
