"""Component catalogue: which model component each trainable parameter belongs to.

A *component* is the unit that gradient selection picks from: one module's own
trainable tensors (a q/k/v/o projection, an MLP gate/up/down matrix, the
embedding, a norm).  Kinds and layer indices are derived from Hugging Face
parameter names, so the same catalogue serves Llama/SmolLM2, OLMo/OLMo2, Qwen2,
Mistral, GPT-NeoX and GPT-2 checkpoints and the paper's reference tables.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

KINDS: tuple[str, ...] = (
    "embed",
    "q",
    "k",
    "v",
    "o",
    "gate",
    "up",
    "down",
    "norm",
    "lm_head",
    "qkv",
    "mlp_in",
    "mlp_out",
    "other",
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")

# (regex over the module path, kind); first match wins, so specific before general.
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind)
    for pattern, kind in (
        (r"(?:^|\.)(?:embed_tokens|wte|wpe|embed_in|word_embeddings|embed_positions)$", "embed"),
        (r"(?:^|\.)(?:lm_head|embed_out)$", "lm_head"),
        (r"(?:^|\.)(?:q_norm|k_norm)$", "norm"),
        (r"(?:norm|ln_f|ln_1|ln_2|layernorm|layer_norm)[^.]*$", "norm"),
        (r"(?:^|\.)(?:q_proj|query)$", "q"),
        (r"(?:^|\.)(?:k_proj|key)$", "k"),
        (r"(?:^|\.)(?:v_proj|value)$", "v"),
        (r"(?:^|\.)(?:c_attn|query_key_value|qkv_proj|Wqkv)$", "qkv"),
        (r"(?:^|\.)(?:o_proj|out_proj)$", "o"),
        (r"(?:attn|attention)\.(?:c_proj|dense)$", "o"),
        (r"(?:^|\.)gate_proj$", "gate"),
        (r"(?:^|\.)up_proj$", "up"),
        (r"(?:^|\.)down_proj$", "down"),
        (r"(?:^|\.)gate_up_proj$", "mlp_in"),
        (r"mlp\.(?:c_fc|dense_h_to_4h|fc_in|fc1)$", "mlp_in"),
        (r"mlp\.(?:c_proj|dense_4h_to_h|fc_out|fc2)$", "mlp_out"),
    )
)


def kind_and_layer(name: str) -> tuple[str, int | None]:
    """Kind and layer index of a module or parameter name (``.weight``/``.bias`` ignored)."""
    module = re.sub(r"\.(?:weight|bias)$", "", name)
    layer_match = _LAYER.search(module)
    layer = int(layer_match.group(1)) if layer_match else None
    for pattern, kind in _RULES:
        if pattern.search(module):
            return kind, layer
    return "other", layer


@dataclass(frozen=True)
class Component:
    """One selectable unit: a name, its kind and layer, the parameter tensors it owns."""

    name: str
    kind: str
    layer: int | None
    param_names: tuple[str, ...]
    num_params: int

    @property
    def label(self) -> str:
        """Short human label, e.g. ``L9 down`` or ``embed``."""
        return self.kind if self.layer is None else f"L{self.layer} {self.kind}"


# The paper's gradient: the embedding (or the tied embedding / LM head) and the weight
# matrices of attention and MLP. Norms, biases and modules of unknown kind are opt-in ("all").
PAPER_KINDS = frozenset({"embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down", "qkv", "mlp_in", "mlp_out"})
COMPONENT_SETS = ("paper", "all")


def check_scope(scope: str) -> str:
    """A component set name, or a one-line ``ValueError`` listing the valid ones."""
    if scope not in COMPONENT_SETS:
        raise ValueError(f"unknown component set {scope!r}; choose from {', '.join(COMPONENT_SETS)}")
    return scope


def catalogue(model: torch.nn.Module, scope: str = "paper") -> list[Component]:
    """The model's components in model order: ``scope="paper"`` (default) or ``"all"`` trainable tensors.

    Components are modules with their own trainable tensors, named by module path;
    a tensor shared by two modules (a tied embedding / LM head) counts once, with the
    module that owns it first.  Under ``"all"`` every trainable tensor is in exactly one
    component, and modules of unknown kind give one component per tensor; ``"paper"``
    keeps the weight matrices of :data:`PAPER_KINDS` only (the paper's full gradient).
    """
    paper = check_scope(scope) == "paper"
    seen: set[int] = set()
    out: list[Component] = []
    for module_name, module in model.named_modules():
        own = [
            (f"{module_name}.{p_name}" if module_name else p_name, p)
            for p_name, p in module.named_parameters(recurse=False)
            if p.requires_grad and id(p) not in seen
        ]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        kind, layer = kind_and_layer(module_name)
        if paper:
            own = [(n, p) for n, p in own if n.endswith("weight")]
            if kind not in PAPER_KINDS or not own:
                continue
        if kind == "other":
            out.extend(Component(n, "other", layer, (n,), p.numel()) for n, p in own)
        else:
            out.append(Component(module_name, kind, layer, tuple(n for n, _ in own), sum(p.numel() for _, p in own)))
    if not out:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters"
            + (" in the paper's component set (try scope 'all')" if paper else "")
        )
    return out


def resolve(components: Sequence[Component], names: Iterable[str]) -> list[Component]:
    """The component each name means, in the order given: a component name, one of its
    parameter names, or its report label (``L3 down``, ``embed``) where that label is unique.

    Raises ``ValueError`` naming every name that matches no component.
    """
    wanted = list(names)
    by_name = {c.name: c for c in components}
    by_param = {p: c for c in components for p in c.param_names}
    labels: dict[str, list[Component]] = {}
    for c in components:
        labels.setdefault(c.label, []).append(c)
    by_label = {label: cs[0] for label, cs in labels.items() if len(cs) == 1}
    missing = [n for n in wanted if n not in by_name and n not in by_param and n not in by_label]
    if missing:
        raise ValueError(f"selection names no existing component: {', '.join(missing)}")
    return [by_name.get(n) or by_param.get(n) or by_label[n] for n in wanted]


def select(components: Sequence[Component], names: Iterable[str]) -> list[Component]:
    """The components named by ``names`` (see :func:`resolve`), in model order."""
    chosen = {id(c) for c in resolve(components, names)}
    return [c for c in components if id(c) in chosen]
