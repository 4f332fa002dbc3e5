"""`model.head=zero_shot`: every method on a text encoder can start from the label names instead
of a random classifier. The head starts as the label names' mean-pooled embeddings (so step 0 is
the zero-shot answer), is the one head every party builds (a server's own copy too), trains and
is noised under DP-SGD like any other tensor, and a causal LM is refused with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedft.errors import ModelError
from fedft.federation.engine import build_task, run_federation
from fedft.metrics import rundir
from fedft.models.backbone import load_like
from fedft.models.zero_shot import CosineHead, ZeroShotClassifier, mean_pool

from helpers import tiny_config, tiny_llama_config

ZERO_SHOT = {"model.head": "zero_shot"}


@pytest.mark.parametrize("method", ["lora", "head", "bias", "full", "adapter", "prompt"])
def test_every_method_starts_from_the_label_names(tmp_path: Path, method: str):
    task = build_task(tiny_config(tmp_path, method, **ZERO_SHOT))
    net = task.model.net
    assert isinstance(net, ZeroShotClassifier) and isinstance(net.classifier, CosineHead)
    assert "net.classifier.weight" in task.method.trainable_names
    assert not any("pooler" in n for n in task.method.trainable_names)  # mean pooling replaces it
    # row k is label k's name embedded by the untuned encoder, as the run starts
    fresh = load_like(task.model, task.cfg)
    assert isinstance(fresh.net, ZeroShotClassifier)
    torch.testing.assert_close(fresh.net.classifier.weight, net.classifier.weight)
    tokenizer = task.model.preprocess.tokenizer
    enc = tokenizer([task.model.label_names[1]], return_tensors="pt")
    net.eval()
    with torch.no_grad():
        hidden = net.encoder(**enc).last_hidden_state
    torch.testing.assert_close(
        net.classifier.weight[1], mean_pool(hidden, enc["attention_mask"])[0], rtol=1e-4, atol=1e-5
    )


def test_prompt_tokens_are_pooled_with_the_text_by_the_zero_shot_head(tmp_path: Path):
    task = build_task(tiny_config(tmp_path, "prompt", **ZERO_SHOT))
    model, net = task.model, task.model.net
    enc = model.preprocess.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    model.eval()
    with torch.no_grad():
        logits = model(batch)
        # by hand: the prompt tokens after [CLS], then mean pooling over text and prompt alike
        n = model.prompt[0].tokens.shape[0]
        text = net.get_input_embeddings()(enc["input_ids"])
        tokens = model.prompt[0].tokens.expand(2, -1, -1)
        embeds = torch.cat([text[:, :1], tokens, text[:, 1:]], dim=1)
        mask = torch.cat(
            [
                enc["attention_mask"][:, :1],
                torch.ones(2, n, dtype=torch.long),
                enc["attention_mask"][:, 1:],
            ],
            dim=1,
        )
        hidden = net.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        expected = net.classifier(mean_pool(hidden, mask))
    torch.testing.assert_close(logits, expected)
    start = model.prompt[0].tokens.detach().clone()
    run_dir, lock = rundir.new_run_dir(task.cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)  # trains and evaluates through the same path
    finally:
        lock.release()
    tensors, _ = rundir.load_checkpoint(run_dir)
    tokens = next(v for k, v in tensors.items() if k.endswith("prompt.0.tokens"))
    assert not torch.allclose(tokens, start) and np.isfinite(summary["final_loss"])


def test_a_private_run_trains_the_zero_shot_head(tmp_path: Path):
    cfg = tiny_config(
        tmp_path,
        "lora",
        **ZERO_SHOT,
        **{"privacy.mode": "sample", "privacy.epsilon": 8.0, "federation.rounds": 1},
    )
    task = build_task(cfg)
    start = task.model.net.classifier.weight.detach().clone()
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    tensors, _ = rundir.load_checkpoint(run_dir)
    head = next(v for k, v in tensors.items() if k.endswith("net.classifier.weight"))
    assert not torch.allclose(head, start)  # it moved: trained and noised
    assert summary["privacy"]["epsilon_max"] <= 8.0 + 1e-6
    assert np.isfinite(summary["final_loss"])


def test_a_causal_lm_is_refused_with_the_reason(tmp_path: Path):
    with pytest.raises(ModelError, match="scores its label words already"):
        build_task(tiny_llama_config(tmp_path, "lora", **ZERO_SHOT))


SAMPLE_DP = {"privacy.mode": "sample", "privacy.noise_multiplier": 1.0}


@pytest.mark.parametrize(
    ("method", "sets", "head"),
    [
        ("lora", SAMPLE_DP, "zero_shot"),  # the DP recipe
        ("bias", SAMPLE_DP, "zero_shot"),
        ("lora", {}, "task"),  # no DP: the model's own head
        ("lora", {"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, "task"),
        ("lora", {**SAMPLE_DP, "model.head": "task"}, "task"),  # asked for
        ("zo", SAMPLE_DP, "task"),  # zo has a start of its own (`method.start`)
    ],
)
def test_auto_head_is_zero_shot_under_sample_level_dp_and_recorded(tmp_path, method, sets, head):
    task = build_task(tiny_config(tmp_path, method, **sets))
    assert task.cfg.model.head == head  # config.yaml keeps what ran
    zero_shot = isinstance(task.model.net, ZeroShotClassifier)
    assert zero_shot == (head == "zero_shot" or method == "zo")


def test_auto_head_leaves_a_causal_lm_its_label_words(tmp_path: Path):
    task = build_task(tiny_llama_config(tmp_path, "lora", **SAMPLE_DP))
    assert task.cfg.model.head == "task" and not isinstance(task.model.net, ZeroShotClassifier)


@pytest.mark.parametrize(
    ("method", "sets", "factor"),
    [
        ("lora", SAMPLE_DP, 5.0),  # AdamW under DP-SGD: the recipe's larger step
        ("prompt", SAMPLE_DP, 5.0),
        ("lora", {**SAMPLE_DP, "train.optimizer": "sgd"}, 1.0),
        ("lora", {}, 1.0),
        ("lora", {"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, 1.0),
    ],
)
def test_the_default_lr_under_dp_sgd_is_the_recipes(tmp_path: Path, method, sets, factor):
    task = build_task(tiny_config(tmp_path, method, **sets))
    assert task.method.lr(task.cfg) == pytest.approx(task.method.default_lr * factor)
    given = build_task(tiny_config(tmp_path, method, **{**sets, "train.lr": 0.02}))
    assert given.method.lr(given.cfg) == 0.02  # a given lr is used as given


@pytest.mark.parametrize(
    ("sets", "lr"),
    [
        ({}, 5e-3),  # a random head to learn: bias's own default
        (ZERO_SHOT, 1e-3),  # a cosine head from the label names: the smaller step
        (SAMPLE_DP, 5 * 1e-3),  # auto head under DP-SGD is zero-shot, times the recipe's 5
        ({**SAMPLE_DP, "model.head": "task"}, 5 * 5e-3),
    ],
)
def test_bias_takes_its_zero_shot_lr_where_the_head_starts_from_the_label_names(
    tmp_path: Path, sets, lr
):
    task = build_task(tiny_config(tmp_path, "bias", **sets))
    assert task.method.lr(task.cfg) == pytest.approx(lr)


@pytest.mark.parametrize(("method", "lr"), [("full", 5e-5), ("lora", 5 * 1e-3)])
def test_under_dp_sgd_full_keeps_its_lr_where_peft_steps_five_times_larger(
    tmp_path: Path, method: str, lr: float
):
    task = build_task(tiny_config(tmp_path, method, **SAMPLE_DP))
    assert task.method.lr(task.cfg) == pytest.approx(lr)
