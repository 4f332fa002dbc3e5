"""The generation task on tiny-llama: which rows are which, prompts in the chat template, loss on
response tokens only, truncation that says what it cut, label-word accuracy, greedy generation
with soft prompts, length-grouped batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedft.config import TaskConfig, build_config
from fedft.data import load_raw
from fedft.data.encode import TensorData
from fedft.errors import DataError
from fedft.federation.engine import build_task
from fedft.federation.training import batches
from fedft.methods import get_method
from fedft.models.backbone import load_task_model
from fedft.tasks import Generate
from fedft.tasks.prompts import IGNORE, encode_pairs, prompt_format, prompt_lengths

from helpers import tiny_llama_config, write_generation_data


@pytest.fixture(scope="module")
def sft_task(tmp_path_factory):
    return build_task(tiny_llama_config(tmp_path_factory.mktemp("sft")))


def full_logits_loss(net, batch) -> torch.Tensor:
    """Each example's mean loss over its response tokens, from all positions' logits (the
    textbook computation, without fedft's shortcuts)."""
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["target_ids"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view(targets.shape)
    mask = targets != IGNORE
    return (nll * mask).sum(1) / mask.sum(1)


def test_alpaca_rows_need_no_flags(sft_task):
    model, data = sft_task.model, sft_task.data
    assert model.generative and model.task.mode == "sft" and model.task.headline == "rouge_l"
    assert data.label_names == ["markets", "sports", "weather"]  # data.label_column=topic
    assert data.partition == "dirichlet"
    tokenizer = model.preprocess.tokenizer
    batch = data.train.batch(np.arange(2))
    first = int(prompt_lengths(batch["target_ids"])[0])
    prompt = tokenizer.decode(batch["input_ids"][0, :first])
    row = json.loads((Path(sft_task.cfg.data.source) / "train.jsonl").read_text().splitlines()[0])
    content = f"{row['instruction']}\n\n{row['input']}"
    framed = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == framed
    answer = batch["target_ids"][0][batch["target_ids"][0] != IGNORE]
    assert tokenizer.decode(answer) == row["output"] + "<|im_end|>"  # the turn's end is learnt


def test_loss_is_on_response_tokens_only(sft_task):
    model = sft_task.model
    batch = sft_task.data.train.batch(np.arange(6))
    first = prompt_lengths(batch["target_ids"])
    for i, f in enumerate(first.tolist()):  # no prompt token is a target
        assert (batch["target_ids"][i, :f] == IGNORE).all()
    model.eval()
    with torch.no_grad():
        ours = model.task.example_losses(model(batch), batch)
        textbook = full_logits_loss(model.net, batch)
        torch.testing.assert_close(ours, textbook, rtol=1e-5, atol=1e-5)
        # a different prompt token moves the loss only through the response's context; a target
        # moved into the prompt would change it by the prompt token's own log-likelihood
        changed = {k: v.clone() for k, v in batch.items()}
        changed["target_ids"][:, 1] = changed["input_ids"][:, 1]
        assert not torch.allclose(model.task.example_losses(model(changed), changed), ours)


def test_trimmed_batches_score_as_padded_ones(sft_task):
    model, data = sft_task.model, sft_task.data.train
    rows = np.arange(5)
    padded = TensorData(data.features, data.labels, data.lengths, trim=False).batch(rows)
    trimmed = data.batch(rows)
    assert trimmed["input_ids"].shape[1] == int(data.lengths[rows].max())
    assert padded["input_ids"].shape[1] == sft_task.cfg.model.max_length
    model.eval()
    with torch.no_grad():
        a = model.task.example_losses(model(padded), padded)
        b = model.task.example_losses(model(trimmed), trimmed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_plain_template_and_truncation_say_what_they_cut():
    tokenizer = load_task_model("tiny-llama", 0, 32, 0, causal=True).preprocess.tokenizer
    fmt = prompt_format(tokenizer, "plain", None)
    assert tokenizer.decode(fmt.prefix + fmt.suffix) == "### Instruction:\n\n\n### Response:\n"
    assert fmt.end == [tokenizer.eos_token_id]
    long_prompt = " ".join(["word"] * 80)
    enc = encode_pairs(tokenizer, fmt, [long_prompt, "short"], ["Answer here", "ok"], 32)
    assert (enc.prompts_cut, enc.responses_cut) == (1, 0)
    answer = enc.target_ids[0][enc.target_ids[0] != IGNORE]
    assert tokenizer.decode(answer) == "Answer here" + tokenizer.eos_token  # kept whole
    assert int(enc.lengths[0]) == 32
    enc = encode_pairs(tokenizer, fmt, ["short"], [" ".join(["long"] * 60)], 32)
    assert (enc.prompts_cut, enc.responses_cut) == (0, 1)
    assert (enc.target_ids[0] != IGNORE).sum() > 0


def test_label_words_accuracy_matches_a_hand_computation(tmp_path: Path):
    """Classification rows run as generation: each label word's summed log-probability, computed
    here one candidate at a time from full logits, picks the answer."""
    folder = tmp_path / "topics"
    folder.mkdir()
    names = ["World", "Sports", "Sci/Tech"]  # Sci/Tech is 3 tokens
    (folder / "labels.txt").write_text("\n".join(names) + "\n")
    rows = [("stocks fell today", 0), ("the team won", 1), ("a new chip", 2), ("rain", 0)] * 3
    (folder / "train.csv").write_text(
        "text,label\n" + "\n".join(f"{t},{y}" for t, y in rows) + "\n"
    )
    (folder / "test.csv").write_text(
        "text,label\n" + "\n".join(f"{t},{y}" for t, y in rows[:4]) + "\n"
    )
    cfg = tiny_llama_config(
        tmp_path,
        **{"data.source": str(folder), "data.label_column": "label", "data.partition": "iid"},
    )
    task = build_task(cfg)
    model, test = task.model, task.data.test
    assert model.task.mode == "labels" and model.task.headline == "accuracy"
    tokenizer = model.preprocess.tokenizer
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in names]
    assert len(words[2]) > 1
    model.eval()
    hand = torch.zeros(len(test), len(names))
    with torch.no_grad():
        for i in range(len(test)):
            row = test.batch(np.array([i]))
            first = int(prompt_lengths(row["target_ids"])[0])
            prompt = row["input_ids"][0, :first].tolist()
            for k, word in enumerate(words):
                ids = torch.tensor([prompt + word])
                logp = model.net(input_ids=ids).logits.log_softmax(-1)[0]
                hand[i, k] = sum(float(logp[first - 1 + j, t]) for j, t in enumerate(word))
        ours = model.task.label_scores(model, test.batch(np.arange(len(test))), task.device)
    torch.testing.assert_close(ours, hand, rtol=1e-4, atol=1e-4)
    expected = float((hand.argmax(1) == test.labels).float().mean())
    metrics = model.task.evaluate(model, test, None, 8, task.device)
    assert metrics["accuracy"] == expected


def test_greedy_generation_with_soft_prompts_matches_a_step_by_step_decode(sft_task):
    """Batched, left-padded, cached generation through the prompt method's input hook gives the
    tokens a decode without cache, one prompt at a time, gives: positions and masks agree."""
    model = load_task_model("tiny-llama", 0, 64, 0, causal=True, task=sft_task.model.task)
    prompt = get_method("prompt")(get_method("prompt").options_model(num_tokens=3))
    prompt.prepare(model)
    model.eval()
    data = sft_task.data.test
    rows = data.batch(np.arange(2))
    firsts = prompt_lengths(rows["target_ids"])
    prompts = [rows["input_ids"][i, : int(f)].tolist() for i, f in enumerate(firsts)]
    prompts[1] = prompts[1][:-3] if len(prompts[1]) == len(prompts[0]) else prompts[1]
    pad = model.preprocess.tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), pad)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    steps = 5
    cached = model.generate(ids, mask, steps, stop_ids=[-1], pad_id=pad)
    for i, p in enumerate(prompts):
        seq = list(p)
        with torch.no_grad():
            for _ in range(steps):
                t = torch.tensor([seq])
                seq.append(
                    int(
                        model({"input_ids": t, "attention_mask": torch.ones_like(t)})[
                            0, -1
                        ].argmax()
                    )
                )
        assert cached[i].tolist() == seq[len(p) :]


def test_length_grouped_batches_cover_every_row_once():
    rows = np.arange(10, 230)
    lengths = np.random.default_rng(0).integers(5, 60, size=300)
    got = list(batches(rows, 8, torch.Generator().manual_seed(0), lengths=lengths))
    flat = np.concatenate(got)
    assert sorted(flat.tolist()) == rows.tolist()
    spread = np.mean([np.ptp(lengths[b]) for b in got])
    shuffled = np.mean(
        [np.ptp(lengths[b]) for b in batches(rows, 8, torch.Generator().manual_seed(0))]
    )
    assert spread < 0.5 * shuffled  # far less padding than random batches


def test_plain_text_is_language_modelling(tmp_path: Path):
    (tmp_path / "lm").mkdir()
    texts = [f"the quick brown fox number {i} jumps" for i in range(30)]
    (tmp_path / "lm" / "train.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cfg = build_config(base={"data.source": str(tmp_path / "lm")})
    raw = load_raw(cfg.data, 0, TaskConfig())
    assert raw.generation == "lm" and raw.num_labels == 0
    task = build_task(tiny_llama_config(tmp_path, **{"data.source": str(tmp_path / "lm")}))
    assert task.model.task.headline == "perplexity" and task.data.partition == "iid"
    batch = task.data.train.batch(np.arange(2))
    n = int(batch["attention_mask"][0].sum())
    assert (batch["target_ids"][0, 1:n] == batch["input_ids"][0, 1:n]).all()  # every token
    assert batch["target_ids"][0, 0] == IGNORE


def test_generation_rows_are_checked(tmp_path: Path):
    folder = write_generation_data(tmp_path / "bad", train=8, test=2)
    lines = (folder / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["output"] = "  "
    lines[3] = json.dumps(row)
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = build_config(base={"data.source": str(folder)})
    with pytest.raises(DataError, match=r"train.jsonl line 4 has no response"):
        load_raw(cfg.data, 0, TaskConfig())
    no_class = build_config(
        base={
            "data.source": str(write_generation_data(tmp_path / "ok")),
            "data.partition": "dirichlet",
        }
    )
    raw = load_raw(no_class.data, 0, TaskConfig())
    assert raw.num_labels == 0  # no 'label' column: no classes
    with pytest.raises(DataError, match="has no class column 'label'"):
        from fedft.data import build_federated_data

        build_federated_data(no_class, raw, lambda r: (None, None))


def test_generate_task_needs_a_causal_lm(tmp_path: Path):
    from fedft.errors import ModelError

    cfg = build_config(base={"model.name": "tiny-bert", "task.kind": "generate"})
    with pytest.raises(ModelError, match="task.kind=generate needs a causal language model"):
        build_task(cfg)


def test_generate_metrics_are_fixed_subsets(sft_task):
    task: Generate = sft_task.model.task
    rows = np.arange(12)
    assert task.generation_rows(rows, 4).tolist() == task.generation_rows(rows, 4).tolist()
    metrics = task.evaluate(sft_task.model, sft_task.data.test, None, 8, sft_task.device, 3)
    assert metrics["generated"] == 3 and 0 <= metrics["rouge_l"] <= 1
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["loss"]))
