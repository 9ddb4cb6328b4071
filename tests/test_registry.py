"""The plugin system: a third-party reducer through a real entry point, broken plugins, disabling."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selproj_plugin import registry as registry_module
from selproj_plugin.registry import StrategyError, get_strategy, list_strategies, plugin_errors
from tests.helpers import contributing_python_blocks, install_plugin, synthetic_path

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = contributing_python_blocks()[0]  # the complete plugin shown in CONTRIBUTING.md, so it stays true


def test_the_documented_plugin_is_short():
    assert len(PLUGIN.splitlines()) < 30


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    registry_module.registry(reload=True)


def test_entry_point_plugin_is_a_strategy(site, synthetic_paraphrased):
    paraphrased = synthetic_paraphrased
    install_plugin(site, "selproj-attn", "attn", "selproj_attn_plugin", PLUGIN)
    registry_module.registry(reload=True)
    assert list_strategies()["attention_only"] == "every attention projection (q, k, v, o)"
    assert registry_module.registry().owners["attention_only"] == "attn"
    result = get_strategy("attention_only").evaluate(paraphrased)
    assert len(result.components) == 16 * 4
    assert all("self_attn" in n for n in result.components)
    first4 = get_strategy("attention_only", layers=4).evaluate(paraphrased)
    assert len(first4.components) == 4 * 4 and first4.param_fraction < result.param_fraction


def test_broken_plugins_are_reported_and_others_keep_working(site):
    install_plugin(site, "selproj-broken-import", "broken_import", "selproj_broken_a", "import does_not_exist_xyz\n")
    install_plugin(
        site,
        "selproj-broken-hook",
        "broken_hook",
        "selproj_broken_b",
        """
        from selproj_plugin import hookimpl
        @hookimpl
        def selproj_strategies():
            raise RuntimeError("boom")
    """,
    )
    registry_module.registry(reload=True)
    errors = plugin_errors()
    assert len(errors["broken_import"]) == 1 and "ModuleNotFoundError" in errors["broken_import"][0]
    assert errors["broken_hook"] == ["selproj_strategies raised RuntimeError: boom"]
    assert {"full", "greedy", "random_projection"} <= set(list_strategies())
    with pytest.raises(StrategyError, match=r"unknown strategy 'nope'; registered: full, greedy.*plugins that failed: broken"):
        get_strategy("nope")


def test_disable_by_name(site, monkeypatch):
    install_plugin(site, "selproj-attn", "attn", "selproj_attn_plugin2", PLUGIN)
    monkeypatch.setenv("SELPROJ_DISABLE_PLUGINS", "attn")
    registry_module.registry(reload=True)
    assert "attention_only" not in list_strategies()
    with pytest.raises(StrategyError, match=r"unknown strategy 'attention_only'.*SELPROJ_DISABLE_PLUGINS blocks plugin\(s\) attn$"):
        get_strategy("attention_only")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"patience": "3"}, "option greedy.patience expects int, got '3'"),
        ({"patience": True}, "option greedy.patience expects int, got True"),
        ({"budget": "0.01"}, "option greedy.budget expects float or none, got '0.01'"),
        ({"selection": 3}, "option greedy.selection expects str or a comma-separated list of str or none, got 3"),
        ({"selection": ["L3 down", 4]}, "expects str or a comma-separated list of str or none, got ['L3 down', 4]"),
    ],
)
def test_python_api_refuses_option_values_of_the_wrong_type(options, message):
    with pytest.raises(StrategyError) as err:
        get_strategy("greedy", **options)
    assert str(err.value).endswith(message) and "\n" not in str(err.value)


def test_python_api_accepts_values_of_the_declared_types():
    import numpy as np

    assert get_strategy("greedy", patience=np.int64(2), budget=1, selection=["L3 down"]).patience == 2
    assert get_strategy("random_projection", dim="1%").dim == "1%"


def test_duplicate_strategy_name_is_refused(site):
    install_plugin(
        site,
        "selproj-dupe",
        "dupe",
        "selproj_dupe",
        """
        from dataclasses import dataclass
        from selproj_plugin import Reducer, hookimpl
        @dataclass
        class Again(Reducer):
            name = "greedy"
        @hookimpl
        def selproj_strategies():
            return [Again]
    """,
    )
    registry_module.registry(reload=True)
    assert plugin_errors()["dupe"] == ["strategy name 'greedy' is already registered by builtin"]
    assert get_strategy("greedy").__class__.__module__ == "selproj_plugin.strategies.greedy"


@pytest.mark.slow
def test_cli_runs_a_plugin_strategy(tmp_path):
    install_plugin(tmp_path, "selproj-attn", "attn", "selproj_attn_cli", PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run(
        [sys.executable, "-m", "benchmark.retrieval", "--table", str(synthetic_path("paraphrased")), "--strategy", "attention_only,full"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "attention_only" in out.stdout


def test_python_api_warns_about_broken_plugins_and_unknown_disabled_names(site, monkeypatch):
    install_plugin(site, "selproj-broken-warn", "broken_warn", "selproj_broken_w", "import does_not_exist_xyz\n")
    monkeypatch.setenv("SELPROJ_DISABLE_PLUGINS", "biultin")
    with pytest.warns(registry_module.PluginWarning) as caught:
        registry_module.registry(reload=True)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("selproj plugin broken_warn disabled: failed to load: ModuleNotFoundError") for m in messages)
    assert any(
        m.startswith("SELPROJ_DISABLE_PLUGINS names 'biultin', which is no selproj plugin; plugins: ")
        and "broken_warn" in m
        and "builtin" in m
        for m in messages
    )


def test_legacy_reduce_is_refused_at_registration(site):
    install_plugin(
        site,
        "selproj-old",
        "old",
        "selproj_old",
        """
        from dataclasses import dataclass
        from selproj_plugin import Reducer, hookimpl
        @dataclass
        class Old(Reducer):
            name = "old_weighted"
            summary = "0.1-style reducer"
            def reduce(self, features):
                return features
        @hookimpl
        def selproj_strategies():
            return [Old]
    """,
    )
    registry_module.registry(reload=True)
    assert "old_weighted" not in list_strategies()
    [error] = plugin_errors()["old"]
    assert error.startswith("reducer Old defines reduce(), which selproj no longer calls")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"patience": "3", "budget": "0.25"}, {"patience": 3, "budget": 0.25}),
        ({"budget": "none", "selection": "a,b"}, {"budget": None, "selection": "a,b"}),
    ],
)
def test_option_text_is_converted_to_the_field_type(raw, expected):
    assert registry_module.convert_options("greedy", raw) == expected
    assert registry_module.convert_options("random_projection", {"dim": "4096"}) == {"dim": 4096}
    assert registry_module.convert_options("random_projection", {"dim": "1%"}) == {"dim": "1%"}


def test_option_text_that_fits_no_type_is_one_line():
    with pytest.raises(StrategyError, match=r"^option greedy.patience expects int, got 'three'$"):
        registry_module.convert_options("greedy", {"patience": "three"})
    with pytest.raises(StrategyError, match="strategy 'greedy' has no option patients; options: budget, patience, selection"):
        registry_module.convert_options("greedy", {"patients": "3"})


def reducer_plugin(body: str, provided: str) -> str:
    """A plugin module's source: the imports, ``body`` (classes, extra hooks) and the hook returning ``provided``."""
    return (
        "from dataclasses import dataclass\nfrom selproj_plugin import Reducer, hookimpl\n"
        f"{textwrap.dedent(body)}\n@hookimpl\ndef selproj_strategies():\n    return [{provided}]\n"
    )


def test_misspelled_hook_is_that_plugins_one_line_error(site):
    install_plugin(
        site,
        "selproj-typo",
        "typo",
        "selproj_typo",
        reducer_plugin(
            """
        @dataclass
        class Kept(Reducer):
            name = "typo_kept"
            summary = "registered by the correctly spelled hook"
        @hookimpl
        def selproj_strategie():
            return [Kept]
    """,
            "Kept",
        ),
    )
    with pytest.warns(registry_module.PluginWarning, match="selproj plugin typo disabled"):
        registry_module.registry(reload=True)
    assert plugin_errors()["typo"] == ["unknown hook 'selproj_strategie'; selproj's hooks are: selproj_strategies"]
    assert "typo_kept" not in list_strategies()  # the plugin is refused, not half-registered
    assert not registry_module.registry().manager.has_plugin("typo")
    assert {"full", "greedy"} <= set(list_strategies())


def test_a_plugin_with_one_broken_class_is_refused_whole_with_every_error(site):
    install_plugin(
        site,
        "selproj-mixed",
        "mixed",
        "selproj_mixed",
        reducer_plugin(
            """
        @dataclass
        class Good(Reducer):
            name = "mixed_good"
            summary = "fine on its own"
        @dataclass
        class Nameless(Reducer):
            summary = "forgot its name"
        @dataclass
        class Old(Reducer):
            name = "mixed_old"
            summary = "0.1-style reducer"
            def similarity(self, a, b):
                return a @ b.T
    """,
            "Good, Nameless, Old",
        ),
    )
    with pytest.warns(
        registry_module.PluginWarning, match="selproj plugin mixed disabled: reducer Nameless has no name; reducer Old defines similarity"
    ):
        registry_module.registry(reload=True)
    assert plugin_errors()["mixed"] == [
        "reducer Nameless has no name",
        "reducer Old defines similarity(), which selproj no longer calls: put per-sample work in transform() (see CONTRIBUTING.md)",
    ]
    assert not {"mixed_good", "mixed_old"} & set(list_strategies())
    assert not registry_module.registry().manager.has_plugin("mixed")
    with pytest.raises(StrategyError, match=r"plugins that failed: mixed \(reducer Nameless has no name; reducer Old"):
        get_strategy("mixed_good")


def test_a_reducer_subclass_without_its_own_dataclass_decorator_is_refused(site):
    install_plugin(
        site,
        "selproj-undecorated",
        "undecorated",
        "selproj_undecorated",
        reducer_plugin(
            """
        from selproj_plugin.strategies.greedy import Greedy
        class Bare(Reducer):  # Reducer is a dataclass, so is_dataclass(Bare) is true by inheritance
            name = "bare_layers"
            summary = "an option that is no dataclass field"
            layers: int = 2
        class GreedierBare(Greedy):
            name = "greedier_bare"
            summary = "a built-in's subclass, undecorated"
    """,
            "Bare, GreedierBare",
        ),
    )
    with pytest.warns(registry_module.PluginWarning, match="selproj plugin undecorated disabled"):
        registry_module.registry(reload=True)
    assert plugin_errors()["undecorated"] == [
        f"reducer {name} is not itself a dataclass, so its options are not fields: add @dataclass above class {name}"
        for name in ("Bare", "GreedierBare")
    ]
    assert not {"bare_layers", "greedier_bare"} & set(list_strategies())
