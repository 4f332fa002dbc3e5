"""`full`: every weight trains and crosses the network both ways. The baseline all others beat on bytes."""

from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel


@register
class FullFineTuning(Method):
    name = "full"
    summary = "baseline: every weight trains; every weight is sent both ways"
    default_lr = 5e-5

    def select_trainable(self, model: TaskModel) -> list[str]:
        return [name for name, _ in model.named_parameters()]
