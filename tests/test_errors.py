"""The one helper behind every one-line error, and the peak-memory helper of the benchmarks."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from benchmark import peak
from selproj_plugin.errors import one_line


@pytest.mark.parametrize(
    "exc, plain, typed",
    [
        (ValueError("bad table\nTraceback follows"), "bad table", "ValueError: bad table"),
        (KeyError("x"), "'x'", "KeyError: 'x'"),
        (RuntimeError(""), "RuntimeError", "RuntimeError"),
        (OSError("  \n  disk full  \n more"), "disk full", "OSError: disk full"),
    ],
)
def test_one_line(exc, plain, typed):
    assert one_line(exc) == plain
    assert one_line(exc, with_type=True) == typed


def test_every_module_uses_the_one_helper():
    """No module writes its own: the helper is defined once and imported everywhere else."""
    root = Path(__file__).resolve().parents[1]
    defined = [
        str(p.relative_to(root))
        for folder in ("selproj_plugin", "adapters", "benchmark")
        for p in (root / folder).rglob("*.py")
        if "def one_line(" in p.read_text() or "def _one_line(" in p.read_text()
    ]
    assert defined == ["selproj_plugin/errors.py"]


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads Linux's /proc")
def test_peak_rss_is_at_least_what_the_process_holds_and_agrees_with_getrusage(monkeypatch):
    block = bytearray(64 * 2**20)  # touched, so resident
    now = _resident_bytes()
    vmhwm = peak.peak_rss_bytes()
    assert vmhwm >= now
    monkeypatch.setattr(peak, "Path", lambda *_: Path("/nonexistent/status"))  # a system without /proc
    fallback = peak.peak_rss_bytes()
    assert fallback == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert abs(fallback - vmhwm) <= 0.05 * vmhwm
    del block
