"""`prompt`: learned prompt tokens plus the head; the backbone stays frozen.

Text (prompt tuning, Lester et al. 2021): n soft tokens go in right after the first token
([CLS]), so the classifier still reads [CLS]; the attention mask grows to match. A causal LM
gets them before the input embeddings instead (as Lester et al. and peft's prompt tuning do), so
every token, the prompt's and the response's, can attend to them. They start as embeddings of
randomly drawn vocabulary tokens.
ViT (visual prompt tuning, Jia et al. 2022): n tokens after [CLS] at the embedding output
(shallow), or fresh tokens at the input of every block (deep).

peft's prompt tuning wraps the model in a PeftModel that copies the classifier and covers text
only; one small module serves both kinds here and keeps parameter names stable.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedft.errors import ModelError
from fedft.federation.batched import Route
from fedft.methods import register
from fedft.methods.base import Method
from fedft.models.backbone import TaskModel


class PromptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_tokens: int = Field(20, ge=1, description="prompt tokens")
    deep: bool = Field(False, description="ViT only: fresh prompt tokens at every block (VPT-deep)")


class PromptTokens(nn.Module):
    """n learned tokens put right after a sequence's first token (`after` = 1), before it (0), or,
    with `replace`, in place of the n tokens that follow the first (VPT-deep's fresh prompts at a
    later block)."""

    def __init__(self, num_tokens: int, dim: int, replace: bool = False, after: int = 1):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim))
        self.replace = replace
        self.after = after
        nn.init.normal_(self.tokens, std=0.02)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens.unsqueeze(0).expand(sequence.shape[0], -1, -1)
        return insert_tokens(sequence, tokens, self.after, self.replace)

    def routed(self, stacked: dict[str, torch.Tensor], route: Route) -> RoutedPrompt:
        """k clients' tokens at once (`federation.batch_clients`)."""
        return RoutedPrompt(stacked["tokens"], self.after, self.replace, route)


def insert_tokens(
    sequence: torch.Tensor, tokens: torch.Tensor, after: int, replace: bool
) -> torch.Tensor:
    """`tokens` (one row of them per sequence) after the first `after` positions, or in place of
    the ones that follow them."""
    n = tokens.shape[1]
    rest = sequence[:, after + n :] if replace else sequence[:, after:]
    return torch.cat([sequence[:, :after], tokens.to(sequence.dtype), rest], dim=1)


class RoutedPrompt(nn.Module):
    """k clients' prompt tokens stacked (k x n x d); each row gets its own client's."""

    def __init__(self, tokens: torch.Tensor, after: int, replace: bool, route: Route):
        super().__init__()
        self.tokens = nn.Parameter(tokens)
        self.after, self.replace, self.route = after, replace, route

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        rows = self.tokens[self.route.client_of_row()]
        return insert_tokens(sequence, rows, self.after, self.replace)


@register_grad_sampler(PromptTokens)
def prompt_grad_sample(
    layer: PromptTokens, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients for Opacus (DP-SGD): the tokens are the same in every example, so an
    example's gradient is the gradient that reached its copy of them."""
    n, a = layer.tokens.shape[0], layer.after
    return {layer.tokens: backprops[:, a : a + n].to(layer.tokens.dtype)}


@register
class PromptTuning(Method):
    name = "prompt"
    summary = "FedPEFT: soft prompt tokens (text) or visual prompts (ViT, shallow/deep) + head"
    options_model = PromptOptions
    default_lr = 1e-2

    def attach(self, model: TaskModel) -> None:
        n = self.options.num_tokens
        if model.kind == "text":
            self._attach_text(model, n)
        else:
            self._attach_image(model, n)

    def _attach_text(self, model: TaskModel, n: int) -> None:
        if self.options.deep:
            raise ModelError(
                "method 'prompt': deep prompts are for ViT; set method.deep=false for text models"
            )
        limit = getattr(model.net.config, "max_position_embeddings", None)
        if limit is not None and model.preprocess.max_length + n > limit:
            raise ModelError(
                f"method 'prompt': {n} prompt tokens + model.max_length={model.preprocess.max_length} exceed "
                f"the {limit} positions of {model.source}; lower one of them"
            )
        embeddings = model.input_embeddings()
        after = 0 if model.generative else 1  # a causal LM: before every token
        prompt = PromptTokens(n, model.hidden_size(), after=after)
        with torch.no_grad():
            picks = torch.randint(1000, embeddings.weight.shape[0], (n,))
            prompt.tokens.copy_(embeddings.weight[picks])
        model.add_module("prompt", nn.ModuleList([prompt]))
        prompts = model.prompt  # looked up at each call: batched clients swap in their own

        def add_prompt(inputs: dict[str, Any]) -> dict[str, Any]:
            ids = inputs.pop("input_ids")
            mask = inputs["attention_mask"]
            inputs["inputs_embeds"] = prompts[0](embeddings(ids))
            ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
            inputs["attention_mask"] = torch.cat([mask[:, :after], ones, mask[:, after:]], dim=1)
            return inputs

        model.input_hooks.append(add_prompt)

    def _attach_image(self, model: TaskModel, n: int) -> None:
        base = model.net.base_model
        embeddings = getattr(base, "embeddings", None)
        if embeddings is None:
            raise ModelError(f"method 'prompt': cannot find the patch embeddings of {model.source}")
        blocks = model.blocks()
        depth = len(blocks) if self.options.deep else 1
        dim = model.hidden_size()
        prompts = nn.ModuleList([PromptTokens(n, dim, replace=i > 0) for i in range(depth)])
        model.add_module("prompt", prompts)
        embeddings.register_forward_hook(lambda _m, _i, out: prompts[0](out))
        for index in range(1, depth):

            def replace(_module, args, kwargs, index=index):
                hidden = prompts[index](args[0] if args else kwargs["hidden_states"])
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            blocks[index].register_forward_pre_hook(replace, with_kwargs=True)

    def select_trainable(self, model: TaskModel) -> list[str]:
        return self.plus_head(model, lambda n: n.startswith("prompt."))
