"""Sample-level DP-SGD on a client (Abadi et al. 2016), through Opacus.

Opacus's `GradSampleModule` computes each example's gradient of the trainable tensors with hooks,
and its `DPOptimizer` clips every example's gradient (jointly over all trainable tensors) to L2
norm C, sums, adds N(0, (sigma C)^2) and divides by the expected batch size. Batches are Poisson
samples at the accountant's rate, so a step may draw no example; it still adds noise, because it
is a step the accountant counts. `train.max_grad_norm` does not apply: clipping is per example.

The local engine shares one model among all its clients, so the hooks live for one client's round
only: added when it starts, removed (with Opacus's attributes on the parameters) when it ends.

The noise and the Poisson masks come from `privacy.noise` (the OS's CSPRNG unless the run asks for
reproducible, not-private noise); the masks never leave the client. What leaves the client
under DP is the noised model and its row count (public under sample-level DP, as the accountant's
expected batch q * rows assumes), not its training loss: the loss is a statistic of the private
data that no accountant counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import (
    GradSampleModuleFastGradientClipping,
    register_grad_sampler,
    register_norm_sampler,
)
from opacus.grad_sample.embedding import (
    compute_embedding_grad_sample,
    compute_embedding_norm_sample,
)
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from fedft.config import RunConfig
from fedft.data.encode import TensorData
from fedft.federation.training import TrainStats, make_optimizer, parameters_by_name, task_of
from fedft.models.zero_shot import CosineHead
from fedft.privacy.accounting import MechanismPlan, plan_client
from fedft.privacy.noise import RandomSource, dp_random, poisson_batches

NOISE_TAG, SAMPLING_TAG = 0xD9, 0x5A


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus's per-example embedding gradients, with the `padding_idx` row left at zero as
    PyTorch's own backward leaves it. Hugging Face models set `padding_idx` to the pad token,
    which in many causal LMs is the end-of-turn token itself (SmolLM2's `<|im_end|>`): Opacus
    would give that row gradient a plain backward never gives it."""
    out = compute_embedding_grad_sample(layer, activations, backprops)
    if layer.padding_idx is not None and layer.weight in out:
        out[layer.weight][:, layer.padding_idx] = 0
    return out


@register_grad_sampler(CosineHead)
def cosine_head_grad_sample(
    layer: CosineHead, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of the zero-shot head's label vectors (`model.head=zero_shot`).
    logits = s · n(x) · n(W)ᵀ with n(v) = v / |v|: an example's gradient on row k of n(W) is
    s · g_k · n(x) (g: the gradient reaching the logits), and through the normalization of row k,
    (I − u_k u_kᵀ) / |w_k| times that. Ghost clipping takes their norms from these."""
    pooled = F.normalize(activations[0].to(layer.weight.dtype), dim=-1)  # B x D
    norms = layer.weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # K x 1
    units = layer.weight / norms  # K x D
    on_units = layer.scale * backprops.to(pooled.dtype)[:, :, None] * pooled[:, None, :]
    radial = (on_units * units).sum(-1, keepdim=True) * units
    return {layer.weight: (on_units - radial) / norms}


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(
    layer: nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Ghost clipping's per-example embedding gradient norms, without the `padding_idx` row
    (which the backward pass leaves at zero, as above): the positions that look it up contribute
    nothing, so their backprops are zeroed first. Counting that row would clip harder than the
    gradient applied, which is safe but not the mechanism the accountant describes."""
    ids = activations[0].contiguous()  # Opacus views them flat; HF expands token type ids
    if layer.padding_idx is not None:
        keep = (ids != layer.padding_idx).unsqueeze(-1).to(backprops.dtype)
        backprops = backprops * keep
    return compute_embedding_norm_sample(layer, [ids, *activations[1:]], backprops)


def dp_scalars(plan: MechanismPlan, steps: int) -> dict[str, float | int]:
    """What the server's ledger counts for this client's round."""
    return {
        "dp_noise_multiplier": plan.noise_multiplier,
        "dp_sample_rate": plan.sample_rate,
        "dp_steps": steps,
    }


class ExpandSharedIndices:
    """Give trainable embeddings one row of indices per example.

    Text models look up position embeddings with one row of ids shared by the whole batch
    ([1, T], broadcast later), so the embedding sees a batch of one and Opacus cannot split its
    gradient by example. Expanding the ids to [B, T] before the lookup gives the same output and
    per-example gradients. Removed with `close`."""

    def __init__(self, model: nn.Module):
        self.batch_size = 1
        self.handles = [
            module.register_forward_pre_hook(self._expand)
            for module in model.modules()
            if isinstance(module, nn.Embedding) and module.weight.requires_grad
        ]

    def _expand(self, _module: nn.Module, args: tuple) -> tuple | None:
        ids = args[0]
        if ids.dim() >= 1 and ids.shape[0] == 1 and self.batch_size > 1:
            return (ids.expand(self.batch_size, *ids.shape[1:]), *args[1:])
        return None

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class SourcedNoise:
    """An Opacus optimizer's Gaussian noise drawn from a `RandomSource` (secret by default)
    instead of a torch generator; clipping, summing and scaling stay Opacus's."""

    source: RandomSource
    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            summed = p.summed_grad
            noise = self.source.normal(summed.shape, std, summed.dtype, summed.device)
            p.grad = (summed + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class SourcedDPOptimizer(SourcedNoise, DPOptimizer):
    def __init__(self, *args, source: RandomSource, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


class SourcedGhostOptimizer(SourcedNoise, DPOptimizerFastGradientClipping):
    """The optimizer of ghost clipping: the gradient it receives is already the sum of the
    clipped per-example gradients (the second backward pass)."""

    def __init__(self, *args, source: RandomSource, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source


GHOST_ABOVE_BYTES = 1e9  # clipping=auto: per-example gradients past this take ghost clipping


def uses_ghost_clipping(cfg: RunConfig, params: list[nn.Parameter], expected_batch: float) -> bool:
    """Whether a round clips by ghost norms: asked for, or (auto) where one float32 gradient per
    expected example of the trainable tensors would pass `GHOST_ABOVE_BYTES`."""
    if cfg.privacy.clipping != "auto":
        return cfg.privacy.clipping == "ghost"
    per_example = 4 * sum(p.numel() for p in params)
    return per_example * max(expected_batch, 1.0) > GHOST_ABOVE_BYTES


class PrivateSteps:
    """DP-SGD steps on the named parameters of a model, as a context: Opacus's hooks (and the
    index expansion) exist inside the `with` block only."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        cfg: RunConfig,
        lr: float,
        plan: MechanismPlan,
        seed: int,
    ):
        self.model = model
        self.params = list(parameters_by_name(model, names).values())
        self.cfg, self.lr, self.plan, self.seed = cfg, lr, plan, seed

    def __enter__(self) -> PrivateSteps:
        self.shared = ExpandSharedIndices(self.model)
        self.ghost = uses_ghost_clipping(self.cfg, self.params, self.plan.expected_batch)
        options = {
            "noise_multiplier": self.plan.noise_multiplier,
            "max_grad_norm": self.cfg.privacy.clip,
            "expected_batch_size": self.plan.expected_batch,
            "source": dp_random(self.cfg.privacy, self.seed, NOISE_TAG),
        }
        inner = make_optimizer(self.params, self.cfg.train, self.lr)
        if self.ghost:
            self.wrapped = GradSampleModuleFastGradientClipping(
                self.model,
                batch_first=True,
                loss_reduction="mean",
                max_grad_norm=self.cfg.privacy.clip,
                use_ghost_clipping=True,
            )
            self.optimizer = SourcedGhostOptimizer(inner, **options)
        else:
            self.wrapped = GradSampleModule(
                self.model, batch_first=True, loss_reduction="mean", strict=True
            )
            self.optimizer = SourcedDPOptimizer(inner, **options)
        return self

    def step(self, batch: dict[str, torch.Tensor] | None) -> float:
        """One step on a Poisson batch (None: an empty draw, the step is noise alone); returns
        the batch's summed loss."""
        loss_sum = 0.0
        if batch is None:
            for p in self.params:
                if self.ghost:  # the optimizer sums p.grad: nothing to sum
                    p.grad = torch.zeros_like(p)
                else:
                    p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            self.shared.batch_size = len(batch["labels"])
            losses = task_of(self.model).example_losses(self.wrapped(batch), batch)
            with warnings.catch_warnings():  # Opacus's hooks on a frozen-input module: expected
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                if self.ghost:  # norms, then the backward of the clipped losses' sum
                    DPTensorFastGradientClipping(
                        self.wrapped, self.optimizer, losses, "mean"
                    ).backward()
                else:
                    losses.mean().backward()
            loss_sum = float(losses.detach().sum())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    def __exit__(self, *exc: object) -> None:
        self.wrapped.to_standard_module()  # hooks off, per-example tensors gone
        self.shared.close()
        for p in self.params:
            p.grad = None
            for attr in ("summed_grad", "_norm_sample", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)


def train_privately(
    model: nn.Module,
    names: list[str],
    data: TensorData,
    rows: np.ndarray,
    cfg: RunConfig,
    lr: float,
    seed: int,
    device: torch.device,
) -> tuple[TrainStats, MechanismPlan]:
    """One client's round of DP-SGD on `names`: the plan's steps, each on a Poisson batch."""
    if len(rows) == 0:
        raise ValueError("client has no training rows")
    plan = plan_client(cfg, len(rows))
    sampling = dp_random(cfg.privacy, seed, SAMPLING_TAG)
    torch.manual_seed(seed)  # dropout: not a DP draw (it only changes which function is fit)
    model.train()
    steps, loss_sum, seen = 0, 0.0, 0
    with PrivateSteps(model, names, cfg, lr, plan, seed) as private:
        for index in poisson_batches(rows, plan.sample_rate, plan.steps_per_round, sampling):
            batch = {k: v.to(device) for k, v in data.batch(index).items()} if len(index) else None
            loss_sum += private.step(batch)
            seen += len(index)
            steps += 1
    mean_loss = loss_sum / seen if seen else float("nan")
    return TrainStats(len(rows), steps, mean_loss), plan
