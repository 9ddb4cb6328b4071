"""Command-line options come from the settings dataclasses: a CLI left alone runs with the dataclass's defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from benchmark import retrieval, settings_cli, speed
from benchmark.finetune import FinetuneSettings
from benchmark.pipeline import PipelineOptions
from selproj_plugin.engine_config import EngineConfig


def test_retrieval_defaults_are_the_engine_configs():
    args = retrieval.parse_args([])
    assert retrieval.engine_settings(args) == EngineConfig()
    for name in retrieval.ENGINE_OPTIONS:
        assert getattr(args, name) == getattr(EngineConfig(), name), name


def test_retrieval_pipeline_defaults_are_the_dataclasses():
    args = retrieval.parse_args([])
    for name in ("max_samples", "candidates", "max_new_tokens", "dtype"):
        assert getattr(args, name) == getattr(PipelineOptions(), name), name


def test_retrieval_engine_options_reach_the_engine_config():
    args = retrieval.parse_args(
        [
            "--batch-size",
            "3",
            "--max-length",
            "64",
            "--memory-limit-gb",
            "2.5",
            "--max-spill-gb",
            "0",
            "--dot-order",
            "gram",
            "--device",
            "cuda:1",
            "--no-progress",
        ]
    )
    assert retrieval.engine_settings(args) == EngineConfig(
        batch_size=3, max_length=64, memory_limit_gb=2.5, max_spill_gb=0.0, dot_order="gram", device="cuda:1", progress=False
    )


def test_retrieval_finetune_defaults_are_the_dataclasses():
    assert retrieval.finetune_settings(retrieval.parse_args([])) == FinetuneSettings()
    # a model given with --model is measured as given unless a fine-tune is asked for
    assert retrieval.finetune_settings(retrieval.parse_args(["--model", "m"])).epochs == 0
    args = retrieval.parse_args(["--checkpoints", "3", "--finetune-lr", "0.01"])
    assert retrieval.finetune_settings(args) == FinetuneSettings(checkpoints=3, lr=0.01)


def test_speed_defaults_are_the_engine_configs():
    args = speed.build_parser().parse_args([])
    assert speed.engine_config(args) == EngineConfig()
    for name in speed.ENGINE_OPTIONS:
        assert getattr(args, name) == getattr(EngineConfig(), name), name
    # one limit for every worker, the projection worker's (on the CPU) included
    args = speed.build_parser().parse_args(["--memory-limit-gb", "2", "--device", "cuda"])
    assert speed.engine_config(args, device="cpu") == EngineConfig(memory_limit_gb=2.0)


def test_a_bad_choice_is_refused(capsys):
    with pytest.raises(SystemExit):
        retrieval.parse_args(["--dot-order", "sideways"])
    assert "sideways" in capsys.readouterr().err


@dataclass
class _Knobs:
    count: int | None = field(default=None, metadata={"help": "how many"})
    rate: float = field(default=0.5, metadata={"help": "how fast, in %", "flag": "--speed"})


def test_flags_types_and_help_come_from_the_fields():
    p = argparse.ArgumentParser()
    settings_cli.add_arguments(p, _Knobs, prefix="k_")
    assert p.parse_args([]) == argparse.Namespace(k_count=None, k_rate=0.5)
    args = p.parse_args(["--k-count", "4", "--speed", "2"])
    assert settings_cli.from_args(args, _Knobs, prefix="k_") == _Knobs(count=4, rate=2.0)
    text = p.format_help()
    assert "how many" in text and "how fast, in % (default 0.5)" in text
    with pytest.raises(ValueError, match="no field nope"):
        settings_cli.add_arguments(argparse.ArgumentParser(), _Knobs, ["nope"])
