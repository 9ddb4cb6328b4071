"""Conformance kit for reducer plugins, in the spirit of scikit-learn's ``check_estimator``.

``check_reducer(MyReducer)`` runs a reducer class through everything a reducer meets: the
plugin registry, the contract's two steps on a real catalogue, table scoring, the engine's
per-sample features, TRAK and Captum, on a tiny random-init Llama built here (offline, a
few seconds).  The TRAK and Captum checks come from the adapters
(``selproj_plugin.adapters.conformance``) through the ``selproj.checks`` entry-point group, so
this module never imports the adapters.  It raises :class:`ReducerCheckError` listing every
violated check by name;
``reducer_checks(MyReducer)`` gives the same checks one by one for ``pytest.mark.parametrize``::

    @pytest.mark.parametrize("check", reducer_checks(MyReducer), ids=str)
    def test_my_reducer(check):
        check()
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from selproj_plugin.components import Component, catalogue
from selproj_plugin.errors import one_line
from selproj_plugin.registry import LEGACY_METHODS, build_registry, own_dataclass
from selproj_plugin.samples import Sample
from selproj_plugin.strategies.base import Reducer, ReducerError, Reduction, reduction
from selproj_plugin.table import ComponentTable
from selproj_plugin.transforms import Transform

__all__ = ["Check", "ReducerCheckError", "check_reducer", "reducer_checks", "tiny_model"]

TOLERANCE = 1e-4  # cosines from different code paths (fp32 gradients) agree to this


class ReducerCheckError(AssertionError):
    """One or more conformance checks failed; the message lists each by name."""


@dataclass(frozen=True)
class Check:
    """One named conformance check, callable (raises ``AssertionError`` on a violation)."""

    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()

    def __str__(self) -> str:
        return self.name


# ---- the tiny world every check runs in ---------------------------------------------
TRAIN = [
    Sample("t0", "What is the capital of France?", "Paris is the capital of France."),
    Sample("t1", "Count to three.", "One, two, three."),
    Sample("t2", "Name a colour of the sea.", "The sea is often blue."),
    Sample("t3", "How many legs does a cat have?", "A cat has four legs."),
]
QUERIES = [
    Sample("q0", "Which city is France's capital?", "The capital of France is Paris."),
    Sample("q1", "Please count up to three.", "One two three."),
    Sample("q2", "What colour is the sea?", "Blue, usually."),
]
CANDIDATES = np.array([[0, 1, 2], [1, 2, 3], [2, 3, 0]])  # each query's original first


@functools.lru_cache(maxsize=1)
def tiny_model() -> tuple[torch.nn.Module, Any]:
    """A 2-layer random-init Llama (tied embedding) and a byte-level tokenizer, both offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab={**vocab, "<eos>": 256}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=257,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            attn_implementation="eager",
        )
    ).eval()
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


@dataclass
class _World:
    """Lazily built shared inputs: the model's catalogue, an engine table, per-sample features."""

    model: torch.nn.Module
    tokenizer: Any
    table: ComponentTable
    catalogue: tuple[Component, ...]


@functools.lru_cache(maxsize=1)
def world() -> _World:
    from selproj_plugin.engine import EngineConfig, build_table

    model, tokenizer = tiny_model()
    table = build_table(
        model, tokenizer, QUERIES, TRAIN, CANDIDATES, np.zeros(len(QUERIES), dtype=int), config=EngineConfig(progress=False)
    )
    return _World(model, tokenizer, table, tuple(catalogue(model)))


def _features(red: Reduction, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """The engine's per-sample gradients of the selection, in selection order."""
    from selproj_plugin.engine import EngineConfig, sample_features

    w = world()
    feats = sample_features(w.model, w.tokenizer, samples, red.names, EngineConfig(progress=False))
    return {n: feats[n] for n in red.names}


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)


def expected_cosines(red: Reduction) -> np.ndarray:
    """[Q, train] cosines of the transform applied to the engine's features: the reference every path must give."""
    q = _unit(red.transform(_features(red, QUERIES)))
    t = _unit(red.transform(_features(red, TRAIN)))
    return (q @ t.T).numpy()


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    worst = float(np.max(np.abs(got - want)))
    assert worst <= TOLERANCE, f"{what} (largest difference {worst:.2e} > {TOLERANCE:.0e})"


# ---- the checks --------------------------------------------------------------------------
def instance(cls: type[Reducer], options: Mapping[str, Any]) -> Reducer:
    reducer = cls(**options)
    if cls.fitted:
        reducer.fit(world().table)
    return reducer


def check_class(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """A Reducer dataclass with a name and a one-line summary, no method of the old interface."""
    assert isinstance(cls, type) and issubclass(cls, Reducer), f"{cls!r} is not a Reducer subclass"
    assert own_dataclass(cls), f"{cls.__name__} is not itself a dataclass (options are its fields): add @dataclass"
    assert isinstance(cls.name, str) and cls.name, f"{cls.__name__}.name must be a non-empty string"
    assert isinstance(cls.summary, str) and cls.summary and "\n" not in cls.summary, f"{cls.__name__}.summary must be one non-empty line"
    legacy = [m for m in LEGACY_METHODS if any(m in vars(k) for k in cls.__mro__)]
    assert not legacy, f"{cls.__name__} defines {legacy[0]}(), which selproj never calls: use transform()"


def check_registers(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """Registered through the ``selproj_strategies`` hook, it is listed under its name with no error."""
    from selproj_plugin.hookspecs import hookimpl

    plugin = types.ModuleType("selproj_check")  # a module, as an entry point gives (pluggy hashes plugins)
    plugin.selproj_strategies = hookimpl(lambda: [cls])
    reg = build_registry(plugins=[("selproj-check", plugin)])
    installed = reg.strategies.get(cls.name) is cls  # a built-in, or already installed by its own entry point
    assert installed or "selproj-check" not in reg.errors, f"registry refused {cls.__name__}: {'; '.join(reg.errors['selproj-check'])}"
    assert installed, f"registry refused {cls.__name__}: name {cls.name!r} is taken by plugin {reg.owners.get(cls.name)}"
    fields = [f for f in dataclasses.fields(cls) if f.init]
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    assert not missing, f"options without a default cannot be left out on the CLI: {', '.join(missing)}"


def check_select(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """``select`` returns catalogue names, at least one, no repeats, the same each time, catalogue untouched."""
    w = world()
    reducer = instance(cls, options)
    before = tuple(w.catalogue)
    first = reducer.select(w.catalogue)
    assert isinstance(first, (list, tuple)) and all(isinstance(n, str) for n in first), (
        f"select must return a list of names, got {type(first).__name__}"
    )
    assert tuple(w.catalogue) == before, "select changed the catalogue it was given"
    red = reduction(reducer, w.catalogue)  # raises ReducerError naming an unknown, repeated or empty selection
    assert list(reducer.select(w.catalogue)) == list(first), "select gives different names on a second call"
    assert red.selected, "select kept nothing"


def check_transform(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """``transform`` maps [N, d_c] features to finite [N, dim], per sample, the same when built again."""
    w = world()
    red = reduction(instance(cls, options), w.catalogue)
    t = red.transform
    assert isinstance(t, Transform), f"transform returned {type(t).__name__}, not a Transform"
    feats = _features(red, TRAIN)
    out = t(feats)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (len(TRAIN), t.dim), (
        f"transform gave shape {tuple(getattr(out, 'shape', ()))} for {len(TRAIN)} samples; declared dim {t.dim}"
    )
    assert torch.isfinite(out).all(), "transform output holds NaN or inf"
    single = torch.cat([t({n: v[i : i + 1] for n, v in feats.items()}) for i in range(len(TRAIN))])
    assert torch.allclose(single.double(), out.double(), rtol=1e-5, atol=1e-7 * float(out.abs().max())), (
        "transform mixes samples: a sample's output depends on the rest of its batch"
    )
    again = reduction(instance(cls, options), w.catalogue).transform(feats)
    assert torch.equal(again, out), "a transform built again for the same model gives other outputs (seed it)"
    assert isinstance(t.key, str) and t.key, "transform.key must name the map (tables store similarities under it)"


def check_table(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """Table scoring gives what the transform gives on gradients, or refuses in one line."""
    w = world()
    reducer = instance(cls, options)
    red = reduction(reducer, w.table.component_list)
    try:
        result = cls(**options).evaluate(w.table, folds=3)
    except ReducerError as exc:
        assert red.transform.on_table(w.table) is None, f"evaluate refused a table its transform can score: {exc}"
        assert "\n" not in str(exc), "the refusal is not one line"
        return
    assert 0 <= result.accuracy <= 1 and result.dim == red.transform.dim
    on_gradients = expected_cosines(reduction(reducer, w.catalogue))
    rows = np.arange(len(QUERIES))[:, None]
    want = on_gradients[rows, CANDIDATES]
    assert_close(result.similarity, want, "table scoring and the transform on per-sample gradients disagree")


CheckFunction = Callable[[type[Reducer], Mapping[str, Any]], None]
CHECKS: tuple[CheckFunction, ...] = (check_class, check_registers, check_select, check_transform, check_table)
# Packages add checks here: an entry point naming a tuple of check functions (the adapters add TRAK and Captum).
CHECKS_ENTRY_POINT_GROUP = "selproj.checks"


def extra_checks() -> list[CheckFunction]:
    """The checks of every ``selproj.checks`` entry point, by entry-point name; one that fails to load
    becomes a check that fails with its error, so a broken package is reported, never skipped."""
    found: dict[str, Any] = {}
    for ep in importlib.metadata.entry_points(group=CHECKS_ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)  # an editable install may list its metadata twice
    checks: list[CheckFunction] = []
    for name in sorted(found):
        try:
            checks.extend(found[name].load())
        except Exception as exc:
            error = one_line(exc, with_type=True)

            def unloadable(cls, options, name=name, error=error):
                raise AssertionError(f"the {CHECKS_ENTRY_POINT_GROUP} entry point {name!r} does not load: {error}")

            unloadable.__name__ = f"check_{name}_loads"
            checks.append(unloadable)
    return checks


def reducer_checks(cls: type[Reducer], options: Mapping[str, Any] | None = None) -> list[Check]:
    """Every conformance check of ``cls`` (built with ``options``), each a callable named for what it checks."""
    opts = dict(options or {})
    return [Check(f"{cls.__name__}:{fn.__name__}", functools.partial(fn, cls, opts)) for fn in (*CHECKS, *extra_checks())]


def check_reducer(cls: type[Reducer], options: Mapping[str, Any] | None = None) -> None:
    """Run every check; raise :class:`ReducerCheckError` listing each violation by check name."""
    failures = []
    for check in reducer_checks(cls, options):
        try:
            check()
        except Exception as exc:  # every failure is reported, not only the first
            text = str(exc).strip().splitlines()
            failures.append(f"{check.name.split(':', 1)[1]}: {text[0] if text else type(exc).__name__}")
    if failures:
        raise ReducerCheckError(f"{cls.__name__} violates {len(failures)} check(s): " + "; ".join(failures))
