"""``python -m benchmark.trak_gradients``: selected-components gradients vs TRAK's ``grad_wrt``.

Both computers get the same model, the same batch and the same selection, and both use
``vmap(grad(...))`` over the same model output (the response-masked loss).  TRAK's
``FunctionalGradientComputer(grad_wrt=...)`` differentiates every parameter and drops
the rest; :class:`~selproj_plugin.adapters.trak.SelectedGradientComputer` differentiates
only the selected tensors.  Each method runs in its own process, so peak memory is its
own: extra resident memory over the loaded model (CPU, sampled every millisecond) or
``torch.cuda.max_memory_allocated`` over the loaded model (CUDA).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Sequence

import torch

METHODS = ("selected", "grad_wrt")
DEFAULT_SELECTION = "model.layers.1.mlp.down_proj,model.layers.2.self_attn.q_proj"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmark.trak_gradients", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random-init Llama (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default %(default)s)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="samples per batch (default %(default)s)")
    p.add_argument("--length", type=int, default=64, help="tokens per sample, half of them response (default %(default)s)")
    p.add_argument("--selection", default=DEFAULT_SELECTION, help="comma-separated components (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed batches after one warm-up (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.hidden, args.layers, args.vocab, args.batch, args.repeats) < 1 or args.length < 4:
        p.error("sizes must be positive and --length at least 4")
    return args


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], list[str]]:
    """The random-init model, one batch ``(input_ids, attention_mask, labels)`` and the selected tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from selproj_plugin.adapters._common import plan, resolve_reducer

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=max(256, args.length),
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).to(args.device).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=gen)
    labels = ids.clone()
    labels[:, : args.length // 2] = -100  # prompt half masked, as the engine's loss does
    batch = tuple(t.to(args.device) for t in (ids, torch.ones_like(ids), labels))
    names = [n.strip() for n in args.selection.split(",") if n.strip()]
    wrt = list(plan(model, resolve_reducer("greedy", {"selection": names})).param_names)
    return model, batch, wrt


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Highest resident set size seen while active (sampled every millisecond)."""

    def __enter__(self) -> "_PeakRSS":
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_method(method: str, args: argparse.Namespace, out_path: str, queue: Any) -> None:
    """Child process: time and measure one gradient computer; save its gradients for comparison."""
    from trak.gradient_computers import FunctionalGradientComputer

    from selproj_plugin.adapters.trak import CausalLMOutput, SelectedGradientComputer

    torch.set_num_threads(torch.get_num_threads())
    model, batch, wrt = build(args)
    cls = SelectedGradientComputer if method == "selected" else FunctionalGradientComputer
    computer = cls(model, CausalLMOutput(), None, torch.float32, args.device, grad_wrt=wrt)
    cuda = args.device.startswith("cuda")

    def once() -> dict[str, torch.Tensor]:
        grads = computer.compute_per_sample_grad(batch)
        if cuda:
            torch.cuda.synchronize()
        return grads

    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = once()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss()
        with _PeakRSS() as probe:
            grads = once()
        peak = probe.peak - base
    grad_bytes = sum(g.numel() * g.element_size() for g in grads.values())
    torch.save({k: v.detach().cpu() for k, v in grads.items()}, out_path)
    del grads
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    queue.put(
        {
            "method": method,
            "seconds": statistics.median(times),
            "best": min(times),
            "peak_bytes": peak,
            "grad_bytes": grad_bytes,
            "num_params": sum(p.numel() for p in model.parameters()),
            "selected_params": sum(dict(model.named_parameters())[n].numel() for n in wrt),
        }
    )


def measure(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], float]:
    """Run both methods in fresh processes; results by method and the largest gradient difference."""
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_method, args=(method, args, os.path.join(tmp, f"{method}.pt"), queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"benchmark: the {method} run failed (exit code {proc.exitcode})")
            results[method] = queue.get()
        a = torch.load(os.path.join(tmp, "selected.pt"))
        b = torch.load(os.path.join(tmp, "grad_wrt.pt"))
    if sorted(a) != sorted(b):
        raise SystemExit(f"benchmark: the methods returned different tensors: {sorted(a)} vs {sorted(b)}")
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    return results, diff


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results, diff = measure(args)
    sel, ref = results["selected"], results["grad_wrt"]
    mib = 2**20
    print(
        f"model: random-init Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab} "
        f"({sel['num_params'] / 1e6:.2f}M parameters), device {args.device}, {torch.get_num_threads()} threads"
    )
    print(
        f"batch: {args.batch} samples x {args.length} tokens; selection: {args.selection} "
        f"({sel['selected_params']} parameters, {100 * sel['selected_params'] / sel['num_params']:.2f}%)"
    )
    memory = "peak extra GPU memory" if args.device.startswith("cuda") else "peak extra RSS"
    print(f"{'method':<46} {'s/batch median':>15} {'best':>8} {memory + ' (MiB)':>28} {'gradients (MiB)':>16}")
    for label, r in (("SelectedGradientComputer (selected only)", sel), ("FunctionalGradientComputer(grad_wrt=selection)", ref)):
        print(f"{label:<46} {r['seconds']:>15.3f} {r['best']:>8.3f} {r['peak_bytes'] / mib:>28.1f} {r['grad_bytes'] / mib:>16.1f}")
    print(
        f"speed-up {ref['seconds'] / sel['seconds']:.2f}x (median), {ref['best'] / sel['best']:.2f}x (best); peak memory "
        f"{ref['peak_bytes'] / max(sel['peak_bytes'], 1):.2f}x lower; same gradients: max |difference| = {diff:.2e}"
    )
    print(f"timings over {args.repeats} batches after a warm-up; other processes on the machine inflate them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
