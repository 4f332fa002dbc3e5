"""Building the sub-model: fewer feed-forward neurons in most blocks, or (the emulator baseline)
fewer blocks.

A feed-forward network is input projection(s) -> activation -> output projection; neuron j is row
j of each input projection (and its bias) and column j of the output projection. Keeping a subset
of neurons is exact slicing of those three tensors, so attention is untouched and LoRA on
attention has the same shapes in the sub-model and the full model: what clients learn on the
sub-model plugs straight back into the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedft.errors import ModelError
from fedft.models.backbone import Skip, TaskModel

# (input projections, output projection), relative to a block, per model family.
FFN_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("intermediate.dense",), "output.dense"),  # BERT, RoBERTa, MiniLM, ...
    (("mlp.fc1",), "mlp.fc2"),  # ViT (transformers 5), CLIP, Phi
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama, Qwen, Mistral
    (("ffn.lin1",), "ffn.lin2"),  # DistilBERT
    (("fc1",), "fc2"),  # OPT
)


@dataclass(frozen=True)
class Ffn:
    """Where one block's feed-forward projections live (module paths from the model's root)."""

    layer: int
    inputs: tuple[str, ...]
    output: str


def resolve_layers(spec: list[int], count: int, what: str) -> list[int]:
    """Layer indices with negatives counted from the end, checked against the model's depth."""
    out = []
    for index in spec:
        if not -count <= index < count:
            raise ModelError(
                f"method 'fedpft': {what} names layer {index}, but the model has {count} blocks"
            )
        out.append(index % count)
    return sorted(set(out))


def block_path(model: TaskModel, layer: int) -> str:
    blocks = model.blocks()
    for name, module in model.named_modules():
        if module is blocks:
            return f"{name}.{layer}"
    raise ModelError(f"model {model.source}: cannot name its transformer blocks")


def find_ffns(model: TaskModel, layers: list[int]) -> list[Ffn]:
    """The feed-forward projections of `layers`; refuses a family whose layout is unknown or whose
    projections are not plain linear layers (LoRA on them would not survive compression)."""
    out = []
    for layer in layers:
        block = model.blocks()[layer]
        names = dict(block.named_modules())
        layout = next(
            (lay for lay in FFN_LAYOUTS if all(p in names for p in (*lay[0], lay[1]))), None
        )
        if layout is None:
            raise ModelError(
                f"method 'fedpft': block {layer} of {model.source} has no feed-forward layout it "
                f"knows ({', '.join(lay[1] for lay in FFN_LAYOUTS)}); use method.compression=layer_drop"
            )
        for path in (*layout[0], layout[1]):
            if type(names[path]) is not nn.Linear:
                raise ModelError(
                    f"method 'fedpft': {path} in block {layer} is a {type(names[path]).__name__}, "
                    "not a plain linear layer; leave the feed-forward projections out of "
                    "method.target_modules (fedpft compresses them)"
                )
        prefix = block_path(model, layer)
        out.append(Ffn(layer, tuple(f"{prefix}.{p}" for p in layout[0]), f"{prefix}.{layout[1]}"))
    return out


def saliency(model: nn.Module, ffn: Ffn) -> torch.Tensor:
    """Per neuron: the L2 norm of its input row(s) and output column taken together."""
    squares = model.get_submodule(ffn.output).weight.detach().pow(2).sum(0)
    for path in ffn.inputs:
        squares = squares + model.get_submodule(path).weight.detach().pow(2).sum(1)
    return squares.sqrt()


def top_neurons(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in ascending index order (so keeping them all keeps
    the original order; ties go to the lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values


def width_of(model: nn.Module, ffn: Ffn) -> int:
    return int(model.get_submodule(ffn.output).weight.shape[1])


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@torch.no_grad()
def keep_neurons(model: nn.Module, ffn: Ffn, index: torch.Tensor) -> None:
    """Shrink one feed-forward network to the neurons in `index`, copying their weights."""
    for path in ffn.inputs:
        old = model.get_submodule(path)
        new = nn.Linear(old.in_features, len(index), bias=old.bias is not None)
        new.weight.copy_(old.weight[index])
        if old.bias is not None:
            new.bias.copy_(old.bias[index])
        _replace(model, path, new.to(old.weight.device, old.weight.dtype))
    old = model.get_submodule(ffn.output)
    new = nn.Linear(len(index), old.out_features, bias=old.bias is not None)
    new.weight.copy_(old.weight[:, index])
    if old.bias is not None:
        new.bias.copy_(old.bias)
    _replace(model, ffn.output, new.to(old.weight.device, old.weight.dtype))


def compress_ffns(model: TaskModel, ffns: list[Ffn], keep: float) -> dict[int, torch.Tensor]:
    """Keep the top ⌈keep·width⌉ neurons by saliency in each of `ffns`; returns the kept indices
    (into the full model's neurons) per layer."""
    kept = {}
    for ffn in ffns:
        width = width_of(model, ffn)
        index = top_neurons(saliency(model, ffn), max(1, round(keep * width)))
        keep_neurons(model, ffn, index)
        kept[ffn.layer] = index
    return kept


def layers_to_drop(middle: list[int], keep: float) -> list[int]:
    """The emulator's dropped layers: of the `middle` layers, keep round(keep·n) spread evenly."""
    count = round(keep * len(middle))
    if count == 0:
        return list(middle)
    step = len(middle) / count
    kept = {middle[int(i * step)] for i in range(count)}
    return [layer for layer in middle if layer not in kept]


def drop_layers(model: TaskModel, layers: list[int]) -> None:
    """Replace whole blocks by pass-throughs (Offsite-Tuning's layer-drop emulator, no
    distillation). Their positions stay, so the kept blocks keep their parameter names."""
    blocks = model.blocks()
    for layer in layers:
        blocks[layer] = Skip()


# --- neuron slices: what re-alignment changes and sends ----------------------------------------
def slice_tensors(model: nn.Module, ffn: Ffn, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights of neurons `index` (positions in the sub-model's layer), keyed by projection."""
    out = {}
    for i, path in enumerate(ffn.inputs):
        module = model.get_submodule(path)
        out[f"in{i}.weight"] = module.weight.detach()[index].clone()
        if module.bias is not None:
            out[f"in{i}.bias"] = module.bias.detach()[index].clone()
    out["out.weight"] = model.get_submodule(ffn.output).weight.detach()[:, index].clone()
    return out


@torch.no_grad()
def write_slices(
    model: nn.Module, ffn: Ffn, index: torch.Tensor, tensors: dict[str, torch.Tensor]
) -> None:
    for i, path in enumerate(ffn.inputs):
        module = model.get_submodule(path)
        module.weight[index] = tensors[f"in{i}.weight"].to(module.weight)
        if module.bias is not None:
            module.bias[index] = tensors[f"in{i}.bias"].to(module.bias)
    output = model.get_submodule(ffn.output).weight
    output[:, index] = tensors["out.weight"].to(output)


def ffn_parameters(model: nn.Module, ffns: list[Ffn]) -> dict[str, nn.Parameter]:
    """Every parameter of the compressed feed-forward networks, by name."""
    out = {}
    for ffn in ffns:
        for path in (*ffn.inputs, ffn.output):
            for pname, param in model.get_submodule(path).named_parameters():
                out[f"{path}.{pname}"] = param
    return out
