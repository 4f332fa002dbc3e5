"""`bias`: BitFit (Ben Zaken et al. 2022): every bias term plus the head trains; weights stay frozen."""

from fedft.errors import ModelError
from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel


@register
class BiasOnly(Method):
    name = "bias"
    summary = "FedPEFT: all bias terms + head (BitFit)"
    default_lr = 5e-3

    def select_trainable(self, model: TaskModel) -> list[str]:
        if not any(n.endswith(".bias") for n, _ in model.net.named_parameters()):
            raise ModelError(
                f"method 'bias': {model.source} has no bias terms (Llama-family blocks have "
                "none); use lora, adapter or prompt"
            )
        return self.plus_head(model, lambda n: n.endswith(".bias"))
