"""`head`: only the task head (classifier, and the pooler that feeds it) trains: linear probing.
On a causal LM, its LM head, where that is not tied to the input embeddings (refused where it is,
as in SmolLM2 and most small Llama-family models)."""

from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel


@register
class HeadOnly(Method):
    name = "head"
    summary = "baseline: only the classifier head trains and is sent"
    default_lr = 5e-3

    def select_trainable(self, model: TaskModel) -> list[str]:
        return model.output_head_names()
