"""`sfprompt`: split federated prompt tuning (after SFPrompt, Cao et al. 2024).

The model is cut in three. The client keeps the head (embeddings, the first `head_blocks` blocks
and the soft prompts) and the tail (the last `tail_blocks` blocks and the classifier); the server
keeps the frozen body and never sees inputs or labels. Each round a client prunes its rows to the
`keep_fraction` with the highest EL2N and, on those rows, trains prompts and tail on a local loss
that skips the body (phase 1), then through the body in split steps, `chunk_batches` batches per
exchange (phase 2); the server averages prompts and tails (phase 3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedft.config import RunConfig
from fedft.federation.aggregation import Tensors
from fedft.federation.client import ClientContext, Handler
from fedft.federation.payload import Payload
from fedft.federation.server import Server
from fedft.federation.training import write_state
from fedft.methods import register
from fedft.methods.base import Method
from fedft.methods.prompt import PromptOptions, PromptTuning
from fedft.methods.sfprompt.client import SplitClient
from fedft.methods.sfprompt.split import Relay, blocks_prefix, check_cut, strip_body
from fedft.models.backbone import TaskModel, load_like, resolve_device


class SfPromptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_tokens: int = Field(
        20, ge=0, description="soft prompt tokens after the embeddings (0: tail only)"
    )
    head_blocks: int = Field(1, ge=0, description="blocks the client runs before the body")
    tail_blocks: int = Field(1, ge=0, description="blocks the client runs after the body")
    keep_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="EL2N pruning: share of rows kept for phase 1 and split training (1: off)",
    )
    prune_per_class: bool = Field(
        False,
        description="EL2N keeps keep_fraction of each label's rows, not of all rows (early on "
        "the hardest rows of a binary task are mostly one class)",
    )
    prune_keep: Literal["hardest", "easiest", "random"] = Field(
        "hardest",
        description="which rows EL2N pruning keeps: the hardest (SFPrompt), the easiest (what "
        "Sorscher et al. 2022 find better when data is scarce), or a seeded random share (the "
        "control)",
    )
    prune_warmup_rounds: int = Field(
        0,
        ge=0,
        description="first rounds that keep every row (an untrained head's EL2N says little)",
    )
    local_epochs: int = Field(
        1, ge=0, description="phase 1: epochs on the local loss that skips the body (0: off)"
    )
    phase1_rows: Literal["kept", "all"] = Field(
        "kept", description="phase 1 trains on the rows pruning kept (as SFPrompt), or on all"
    )
    chunk_batches: int = Field(4, ge=1, description="split-training batches per exchange")
    prompt_lr: float = Field(1e-2, gt=0, description="learning rate of the prompts")

    def tail_lr(self, cfg: RunConfig) -> float:
        return cfg.train.lr if cfg.train.lr is not None else SfPrompt.default_lr


@register
class SfPrompt(Method):
    name = "sfprompt"
    summary = "split + federated: prompts and tail on the client, frozen body on the server"
    options_model = SfPromptOptions
    default_lr = 1e-3
    # No DP: the server receives every example's head activations, which DP-SGD on the
    # parameters would not protect; split learning needs noise on the activations instead.
    privacy_modes = ()
    zero_shot_head_under_dp = False  # a start, or a model, of its own

    def __init__(self, options: BaseModel | None = None):
        super().__init__(options)
        self.relay: Relay | None = None
        self.client_model: TaskModel | None = None  # what the server's full model copies
        self.prompt_names: list[str] = []

    def _attach_prompt(self, model: TaskModel) -> None:
        if self.options.num_tokens > 0:
            PromptTuning(PromptOptions(num_tokens=self.options.num_tokens)).attach(model)

    def attach(self, model: TaskModel) -> None:
        check_cut(model, self.options.head_blocks, self.options.tail_blocks)
        self.client_model = model
        self._attach_prompt(model)
        self.relay = strip_body(model, self.options.head_blocks, self.options.tail_blocks)

    def select_trainable(self, model: TaskModel) -> list[str]:
        """Prompts, the tail's blocks, and everything after the blocks (final norm, head; a
        causal LM's LM head only where it is not tied to the input embeddings)."""
        blocks = blocks_prefix(model)
        # the embedding side: the module holding the input embeddings (BERT's `embeddings`,
        # with its position embeddings and norm), unless that module holds the blocks too (a
        # Llama's `model`): then the input embeddings alone
        word = next(n for n, m in model.named_modules() if m is model.input_embeddings())
        parent = word.rsplit(".", 1)[0] + "."
        embeddings = word + "." if blocks.startswith(parent) else parent
        first_tail = len(model.blocks()) - self.options.tail_blocks

        def in_tail(name: str) -> bool:
            if name.startswith(blocks):
                return int(name[len(blocks) :].split(".", 1)[0]) >= first_tail
            return not name.startswith(embeddings)

        names = [n for n, _ in model.named_parameters() if n.startswith("prompt.") or in_tail(n)]
        self.prompt_names = [n for n in names if n.startswith("prompt.")]
        return names

    # --- client --------------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Handler]:
        return {"sf_start": self.start, "sf_tail": self.tail, "sf_head": self.head}

    def _client(self, ctx: ClientContext) -> SplitClient:
        assert self.relay is not None, "prepare() the model first"
        return SplitClient(ctx, self.relay, self.prompt_names, self.options)

    def start(self, ctx: ClientContext, payload: Payload) -> Payload:
        return self._client(ctx).start(payload)

    def tail(self, ctx: ClientContext, payload: Payload) -> Payload:
        return self._continue(ctx, payload, SplitClient.tail_step)

    def head(self, ctx: ClientContext, payload: Payload) -> Payload:
        return self._continue(ctx, payload, SplitClient.head_step)

    def _continue(
        self, ctx: ClientContext, payload: Payload, step: Callable[[SplitClient, Payload], Payload]
    ) -> Payload:
        """A later request of the round: pick up where the client's last one left off."""
        client = self._client(ctx)
        client.load()
        reply = step(client, payload)
        if reply.scalars.get("done"):  # the round is over and nothing of it carries to the next
            ctx.state.clear()
        else:
            client.save()
        return reply

    # --- server --------------------------------------------------------------------------------
    def make_server(self, cfg: RunConfig, initial: Tensors) -> Server:
        """The server holds the whole model (it is the model owner): the body for split steps,
        and all of it to evaluate the global prompts and tail."""
        from fedft.methods.sfprompt.server import SfPromptServer

        assert self.client_model is not None, "prepare() the model first"
        full = load_like(self.client_model, cfg)
        self._attach_prompt(full)
        for param in full.parameters():
            param.requires_grad_(False)
        full.to(resolve_device(cfg.device))
        write_state(full, initial)
        return SfPromptServer(cfg, initial, full, self.options)
