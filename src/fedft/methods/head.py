"""`head`: only the task head (classifier, and the pooler that feeds it) trains: linear probing."""

from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel


@register
class HeadOnly(Method):
    name = "head"
    summary = "baseline: only the classifier head trains and is sent"
    default_lr = 5e-3

    def select_trainable(self, model: TaskModel) -> list[str]:
        return model.head_parameter_names()
