"""`fedft export` round trips: the exported folder, loaded by transformers and peft alone, scores
the run's final test loss (and accuracy) to within 1e-4; `fedft generate` answers as the run's
model does; an existing folder is never written over."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedft.cli import main
from fedft.federation.engine import build_task, run_federation
from fedft.metrics import rundir
from fedft.tasks.prompts import IGNORE

from helpers import LABEL_WORDS, tiny_config, tiny_llama_config


def finished_run(cfg) -> tuple[Path, dict, object]:
    task = build_task(cfg)
    run_dir, lock = rundir.new_run_dir(cfg, overwrite=False)
    try:
        summary = run_federation(task, run_dir)
    finally:
        lock.release()
    return run_dir, summary, task


def hf_response_loss(model, data, virtual_tokens: int = 0) -> float:
    """Mean loss per response token, from a plain Hugging Face model's logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), 8):
            b = data.batch(np.arange(start, min(start + 8, len(data))))
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            logits = logits[:, virtual_tokens:-1]
            targets = b["target_ids"][:, 1:]
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            count += int((targets != IGNORE).sum())
    return total / count


def hf_class_scores(model, data) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a plain classifier."""
    with torch.no_grad():
        b = data.batch(np.arange(len(data)))
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss = float(F.cross_entropy(logits, b["labels"]))
    return loss, float((logits.argmax(-1) == b["labels"]).float().mean())


def export(run_dir: Path, out: Path) -> str:
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "exported by fedft" in (out / "README.md").read_text()
    return out


GENERATIVE = {
    "lora": ("peft-lora", {}),
    "prompt": ("peft-prompt", {"method.num_tokens": 4}),
    "full": ("merged", {}),
    "adapter": ("remote-code", {"method.r": 4}),
    # the LoRA learnt on the sub-model, plugged into the full model
    "fedpft": (
        "peft-lora",
        {"method.keep_layers": [0], "method.distill_steps": 3, "method.realign_every": 0},
    ),
    # prompts as a peft adapter on a base that carries the tuned tail
    "sfprompt": (
        "peft-prompt",
        {"method.num_tokens": 4, "method.head_blocks": 0, "method.tail_blocks": 1},
    ),
}


@pytest.mark.parametrize("method", list(GENERATIVE))
def test_generative_exports_score_the_runs_final_loss(tmp_path: Path, method: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kind, options = GENERATIVE[method]
    run_dir, summary, task = finished_run(
        tiny_llama_config(tmp_path, method, **{"task.eval_generations": 0, **options})
    )
    out = export(run_dir, tmp_path / "out")
    if kind.startswith("peft"):
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "base"  # a tiny model: its base is written
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        model = PeftModel.from_pretrained(base, out).eval()
        virtual = options.get("method.num_tokens", 0)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=kind == "remote-code"
        ).eval()
        virtual = 0
    loss = hf_response_loss(model, task.data.test, virtual)
    assert loss == pytest.approx(summary["final_loss"], abs=1e-4)


@pytest.mark.parametrize(
    ("method", "kind", "options"),
    [
        ("lora", "peft-lora", {}),
        ("prompt", "remote-code", {"method.num_tokens": 4}),
        ("lora", "merged", {"method.aggregation": "exact", "method.client_ranks": [2, 8]}),
        ("zo", "zero-shot", {}),  # zo's default start on an encoder: the zero-shot head
        ("zo", "zero-shot", {"method.params": "lora"}),
        ("lora", "zero-shot", {"model.head": "zero_shot"}),
        # the DP default head (model.head=auto under privacy.mode=sample) with modules no
        # library has: the modeling file adds them under the cosine head
        ("prompt", "zero-shot", {"model.head": "zero_shot", "method.num_tokens": 4}),
        ("adapter", "zero-shot", {"model.head": "zero_shot", "method.r": 4}),
        ("adapter", "remote-code", {"method.r": 4}),
    ],
    ids=[
        "lora",
        "prompt",
        "lora-exact",
        "zo-zero-shot",
        "zo-lora-zero-shot",
        "lora-zero-shot",
        "prompt-zero-shot",
        "adapter-zero-shot",
        "adapter",
    ],
)
def test_classifier_exports_score_the_runs_final_loss_and_accuracy(
    tmp_path: Path, method: str, kind: str, options: dict
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, summary, task = finished_run(tiny_config(tmp_path, method, **options))
    out = export(run_dir, tmp_path / "out")
    assert f"form: {kind}" in (out / "README.md").read_text()
    if kind == "merged":  # the residual and the factors are in the weights themselves
        model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    elif kind == "peft-lora":
        base = AutoModelForSequenceClassification.from_pretrained(out / "base")
        model = PeftModel.from_pretrained(base, out).eval()  # the trained head rides along
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            out, trust_remote_code=True
        ).eval()
    if method == "zo":
        assert summary["method_choices"]["start"] == "zero_shot"
    loss, accuracy = hf_class_scores(model, task.data.test)
    assert loss == pytest.approx(summary["final_loss"], abs=1e-4)
    assert accuracy == pytest.approx(summary["final_accuracy"], abs=1e-6)


def test_generate_answers_like_the_runs_model_and_export_never_overwrites(tmp_path: Path, capsys):
    run_dir, _, task = finished_run(tiny_llama_config(tmp_path, "lora"))
    capsys.readouterr()
    assert main(["generate", str(run_dir), "Write a headline.", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    from fedft.export import load_run

    run = load_run(run_dir)
    objective = run.model.task
    objective.options = objective.options.model_copy(update={"max_new_tokens": 4})
    expected = objective.generate(
        run.model, [objective.frame("Write a headline.")], run.task.device
    )
    assert printed == expected
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    assert main(["export", str(run_dir), str(taken)]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
    assert (taken / "mine.txt").read_text() == "keep me"
    classify_dir, _, _ = finished_run(tiny_config(tmp_path / "c", "bias"))
    assert main(["generate", str(classify_dir), "hello"]) == 2
    assert "answers with a causal LM run" in capsys.readouterr().err


def test_zo_label_word_rows_export_as_an_untied_lm_head(tmp_path: Path):
    """zo's default on a causal LM's label words trains the LM head's rows of those words apart
    from the (tied) input embeddings: the export gives the model a head of its own, and its
    logits are the run's deployed model's."""
    from transformers import AutoModelForCausalLM

    from fedft.export import load_run

    sets = {**LABEL_WORDS, "method.params": "lora"}
    run_dir, summary, task = finished_run(tiny_llama_config(tmp_path, "zo", **sets))
    assert summary["method_choices"]["head"] == "exact"
    out = export(run_dir, tmp_path / "out")
    assert "form: merged" in (out / "README.md").read_text()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    run = load_run(run_dir)
    rows = run.model.get_submodule("label_head")
    start = task.model.net.get_output_embeddings().weight[rows.ids]
    assert not torch.allclose(rows.rows, start)  # the rows trained away from the start
    b = task.data.test.batch(np.arange(4))
    with torch.no_grad():
        ours = run.model.net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        theirs = exported(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert torch.allclose(theirs, ours, atol=1e-4)
    embeddings = exported.get_input_embeddings().weight
    assert torch.equal(embeddings, run.model.net.get_input_embeddings().weight)
