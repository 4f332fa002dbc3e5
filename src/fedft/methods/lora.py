"""`lora`: low-rank adapters on the attention projections (through peft), plus the head."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedft.errors import ModelError
from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import HEAD_MODULE_NAMES, TaskModel

# Query/value projection names per model family, tried in order when target_modules is not given.
DEFAULT_TARGETS = (("query", "value"), ("q_proj", "v_proj"), ("q_lin", "v_lin"), ("c_attn",))


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="module names to adapt (None: the model's query/value projections; "
        "'all-linear': every linear layer but the output head)",
    )

    @classmethod
    def part_of(cls, options: BaseModel) -> LoraOptions:
        """The LoRA options inside a method's larger options (methods that reuse `lora`)."""
        return cls(**{k: getattr(options, k) for k in cls.model_fields})


def _leaf_names(net: nn.Module) -> set[str]:
    return {
        name.split(".")[-1]
        for name, module in net.named_modules()
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    }


def _module_names(net: nn.Module) -> set[str]:
    return {name.split(".")[-1] for name, _ in net.named_modules()}


@register
class Lora(Method):
    name = "lora"
    summary = "PEFT: LoRA on attention (peft) + head"
    options_model = LoraOptions
    default_lr = 1e-3

    def attach(self, model: TaskModel) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        leaves = _leaf_names(model.net)
        targets = self.options.target_modules
        if targets == "all-linear":
            pass  # peft finds them (and leaves the output layer alone)
        elif targets is None:
            targets = next((list(t) for t in DEFAULT_TARGETS if set(t) <= leaves), None)
            if targets is None:
                raise ModelError(
                    f"method 'lora': no query/value projections found in {model.source}; set method.target_modules"
                )
        missing = [t for t in targets if t not in leaves] if targets != "all-linear" else []
        if missing:
            raise ModelError(
                f"method 'lora': {model.source} has no linear modules named {missing}; its linear layers are {sorted(leaves)[:12]}"
            )
        config = LoraConfig(
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=targets,
            # the task head trains whole; a causal LM has none (peft keeps its LM head out)
            exclude_modules=[n for n in HEAD_MODULE_NAMES if n in _module_names(model.net)] or None,
        )
        inject_adapter_in_model(config, model.net)

    def select_trainable(self, model: TaskModel) -> list[str]:
        return self.plus_head(model, lambda n: ".lora_" in n)
