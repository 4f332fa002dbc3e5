"""Every method on a tiny BERT and a tiny ViT: it trains (loss falls on a fixed batch), its frozen
parameters stay bit-identical, and it trains what it says it trains."""

import pytest
import torch
import torch.nn.functional as F

from fedft.methods import available_methods, get_method
from fedft.models.backbone import load_task_model

METHODS = ["full", "head", "bias", "adapter", "prompt", "lora"]


def fixed_batch(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if kind == "tiny-bert":
        ids = torch.randint(1000, 2000, (8, 12), generator=g)
        ids[:, 0] = 101
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.arange(8) % 3,
        }
    return {"pixel_values": torch.randn(8, 1, 8, 8, generator=g), "labels": torch.arange(8) % 3}


def build(method: str, model_name: str, **options):
    model = load_task_model(model_name, 3, 12, seed=0)
    plugin = get_method(method)(get_method(method).options_model(**options))
    names = plugin.prepare(model)
    return model, names


def test_registry_has_the_fedpeft_methods():
    assert set(METHODS) <= set(available_methods())


CASES = [(m, model, {}) for model in ("tiny-bert", "tiny-vit") for m in METHODS] + [
    ("prompt", "tiny-vit", {"deep": True})
]


@pytest.mark.parametrize(
    ("method", "model_name", "options"),
    CASES,
    ids=lambda c: c if isinstance(c, str) else "deep" if c else "",
)
def test_method_trains_and_leaves_frozen_weights_alone(method: str, model_name: str, options: dict):
    model, names = build(method, model_name, **options)
    trainable = set(names)
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable
    }
    batch = fixed_batch(model_name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()  # no dropout: the fixed batch gives a clean loss curve; gradients flow the same
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    for n, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[n], before), n


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
def test_what_each_method_trains(model_name: str):
    model, full = build("full", model_name)
    head = set(build("head", model_name)[1])
    assert head and all("classifier" in n or "pooler" in n for n in head)
    assert set(full) == {n for n, _ in model.named_parameters()}
    bias = set(build("bias", model_name)[1])
    assert bias - head and all(n.endswith(".bias") for n in bias - head)
    for method, marker in (("adapter", ".adapter."), ("lora", ".lora_"), ("prompt", "prompt.")):
        names = set(build(method, model_name)[1])
        assert head <= names
        extra = names - head
        assert extra and all(marker in n or n.startswith(marker) for n in extra), method


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-vit"])
def test_adapter_starts_as_the_pretrained_function(model_name: str):
    plain = load_task_model(model_name, 3, 12, seed=0).eval()
    adapted, _ = build("adapter", model_name)
    adapted.eval()
    batch = fixed_batch(model_name)
    with torch.no_grad():
        torch.testing.assert_close(adapted(batch), plain(batch), rtol=0, atol=1e-6)


def test_text_prompts_extend_the_sequence_after_cls():
    model, _ = build("prompt", "tiny-bert", num_tokens=5)
    seen = {}
    model.net.bert.encoder.register_forward_pre_hook(
        lambda m, a, k: seen.update(shape=(a[0] if a else k["hidden_states"]).shape),
        with_kwargs=True,
    )
    model(fixed_batch("tiny-bert"))
    assert seen["shape"][1] == 12 + 5


def test_deep_visual_prompts_have_one_set_per_block():
    model, names = build("prompt", "tiny-vit", num_tokens=3, deep=True)
    params = dict(model.named_parameters())
    assert [params[f"prompt.{i}.tokens"].shape for i in range(2)] == [(3, 32), (3, 32)]
