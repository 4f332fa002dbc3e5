"""`adapter`: a residual bottleneck (D -> r -> D) in every transformer block, plus the head.

Placement: after the block's feed-forward output projection, before that sub-layer's residual add
(and, in post-norm BERT, its LayerNorm) -- the single-adapter placement of Pfeiffer et al. (2021),
which costs half of Houlsby's two adapters per block for about the same accuracy. The up
projection starts at zero, so the model starts as the pretrained function. peft has no bottleneck
adapter, so this one is ours; it hooks the projection's output and leaves every pretrained module
and parameter name unchanged.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedft.errors import ModelError
from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel

# Where the feed-forward output projection sits inside a block, per model family.
FFN_OUTPUT_PATHS = ("output.dense", "mlp.fc2", "ffn.lin2", "mlp.c_proj", "mlp.down_proj")


class AdapterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1, description="bottleneck width")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, r: int):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = nn.GELU()
        self.up = nn.Linear(r, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden):
        return hidden + self.up(self.act(self.down(hidden)))


def ffn_output(block: nn.Module) -> nn.Module | None:
    for path in FFN_OUTPUT_PATHS:
        module = block
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module) and hasattr(module, "weight"):
            return module
    return None


@register
class BottleneckAdapter(Method):
    name = "adapter"
    summary = "FedPEFT: residual bottleneck adapters (D->r->D) in every block + head"
    options_model = AdapterOptions
    default_lr = 1e-3

    def attach(self, model: TaskModel) -> None:
        dim = model.hidden_size()
        for index, block in enumerate(model.blocks()):
            projection = ffn_output(block)
            if projection is None:
                raise ModelError(
                    f"method 'adapter' cannot place adapters in {model.source}: block {index} has none of "
                    f"{', '.join(FFN_OUTPUT_PATHS)}"
                )
            adapter = Bottleneck(dim, self.options.r)
            block.add_module("adapter", adapter)
            projection.register_forward_hook(lambda _mod, _inp, out, adapter=adapter: adapter(out))

    def select_trainable(self, model: TaskModel) -> list[str]:
        return self.plus_head(model, lambda n: ".adapter." in n)
