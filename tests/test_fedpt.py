"""`fedpt`: the proxy-tuning rule, output spaces, distillation, generation with a causal LM pair,
the HTTP logits source, and what a round counts."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedft.errors import ModelError
from fedft.federation.engine import build_task, evaluate_global, run_federation
from fedft.federation.training import evaluate, read_state, write_state
from fedft.methods.fedpt.logits import (
    CountingCache,
    HttpLogitsSource,
    LocalCausalLM,
    LocalModelSource,
    serve_logits,
)
from fedft.methods.fedpt.proxy import (
    ProxyTuned,
    batch_texts,
    proxy_generate,
)
from fedft.metrics import rundir
from fedft.metrics.report import summary_rows
from fedft.models.backbone import minilm_path

from helpers import tiny_config

PAIR = {
    "method.small_layers": 1,
    "method.distill_steps": 0,
    "method.public_rows": 120,
    "method.public_heldout": 40,
}


def pt_server(tmp_path: Path, **sets):
    task = build_task(tiny_config(tmp_path, "fedpt", **{**PAIR, **sets}))
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    return task, server


def tuned(server) -> None:
    """Move the global LoRA and head away from their start, as federated rounds would."""
    generator = torch.Generator().manual_seed(3)
    server.global_state = {
        k: v + 0.3 * torch.randn(v.shape, generator=generator)
        for k, v in server.global_state.items()
    }


def scores(server, task, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch = task.data.test.batch(np.arange(16))
    models = server.evaluation_models(task.model)
    for model in models.values():
        model.eval()
    with torch.no_grad():
        proxy = ProxyTuned(server.large, server.small, server.untuned, alpha)(batch)
        large = models["large_test"](batch)
    return proxy, large


def test_alpha_zero_returns_the_large_models_logits_exactly(tmp_path: Path):
    task, server = pt_server(tmp_path)
    tuned(server)
    proxy, large = scores(server, task, alpha=0.0)
    assert torch.equal(proxy, large)


def test_an_untuned_small_model_leaves_the_large_models_logits_unchanged(tmp_path: Path):
    task, server = pt_server(tmp_path)  # the global state is still the small model's start
    proxy, large = scores(server, task, alpha=1.5)
    assert torch.equal(proxy, large)


def test_the_proxy_distribution_is_the_softmax_of_the_sum(tmp_path: Path):
    task, server = pt_server(tmp_path)
    tuned(server)
    alpha = 0.7
    proxy, _ = scores(server, task, alpha)
    batch = task.data.test.batch(np.arange(16))
    # by hand: each model alone (the large one through its own tokenizer on the decoded texts)
    texts = batch_texts(task.model, batch)
    large = server.large.source.logits(texts)
    with torch.no_grad():
        server.small.eval(), server.untuned.eval()
        small, base = server.small(batch), server.untuned(batch)
    expected = torch.softmax(large + alpha * (small - base), -1)
    torch.testing.assert_close(torch.softmax(proxy, -1), expected, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(small, base)  # the steering is not trivially zero


def test_a_large_model_over_other_labels_is_refused(tmp_path: Path):
    # tiny-bert's own classifier answers over LABEL_0, LABEL_1; the demo task has 8 labels
    with pytest.raises(ModelError, match="answers over 2 labels .* but the small model over 8"):
        pt_server(tmp_path, **{"method.large_head": "own"})


def test_distillation_lowers_the_kl_on_held_out_inputs(tmp_path: Path):
    task, server = pt_server(tmp_path, **{"method.distill_steps": 40, "method.distill_lr": 1e-2})
    tuned(server)
    public = server.public
    assert not set(public.train.tolist()) & set(public.heldout.tolist())
    before_state = dict(server.global_state)
    # the targets are exact, whatever the random state and after scoring has toggled modes
    rows = public.train[:20]
    evaluate_global(task, server)  # loads the global state into the server's small model
    torch.manual_seed(1)
    first = server._teacher(rows)
    evaluate_global(task, server)
    torch.manual_seed(2)
    assert torch.equal(server._teacher(rows), first)
    report = server.distil(round_number=1)
    assert report["distill_kl_after"] < 0.8 * report["distill_kl_before"]
    assert any(not torch.equal(before_state[k], server.global_state[k]) for k in before_state)


def test_a_round_sends_only_the_small_models_lora_and_head(tmp_path: Path):
    cfg = tiny_config(tmp_path, "fedpt", **{**PAIR, "method.distill_steps": 5})
    task = build_task(cfg)
    run_dir = Path(cfg.output_dir) / "run"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    names = task.method.trainable_names
    assert all(".lora_" in n or n.startswith("net.classifier.") for n in names)
    for line in lines:
        assert line["bytes_up"] == line["bytes_down"] == 2 * task.trainable_bytes  # 2 clients
        for key in ("test_accuracy", "small_test_accuracy", "large_test_accuracy"):
            assert line[key] is not None
    texts = set(batch_texts(task.model, task.data.test.batch(np.arange(len(task.data.test)))))
    # the large model is asked once per distinct input: the public rows in round 1, the test
    # texts at the first evaluation; never again
    assert lines[0]["large_queries_eval"] == len(texts)
    assert lines[0]["large_queries_round"] > 0
    assert lines[1]["large_queries_round"] == lines[1]["large_queries_eval"] == 0
    assert summary["fedpt"]["large_queries"] == lines[0]["large_queries_round"] + len(texts)
    assert lines[-1]["large_test_accuracy"] == lines[0]["large_test_accuracy"]  # frozen


def test_the_http_source_answers_what_the_local_model_does(tmp_path: Path):
    task, server = pt_server(tmp_path)
    local = server.large.source
    http = serve_logits(local)
    try:
        url = f"http://127.0.0.1:{http.server_address[1]}"
        remote = HttpLogitsSource(url)
        texts = batch_texts(task.model, task.data.test.batch(np.arange(10)))
        assert remote.space == local.space
        assert torch.equal(remote.logits(texts), local.logits(texts))
        cache = CountingCache(remote)
        cache.logits(texts + texts[:3])
        assert cache.queries == len(set(texts)) and cache.query_bytes == remote.last_bytes > 0
    finally:
        http.shutdown()
    with pytest.raises(ModelError, match="did not answer"):
        HttpLogitsSource(url, timeout=2)


def gpt2(layers: int, seed: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(config).eval()


def test_a_tiny_gpt2_pair_generates_with_proxy_tuned_logits():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # one shared tokenizer
    vocab = len(tokenizer)
    large, base = gpt2(2, 1, vocab), gpt2(1, 2, vocab)
    small = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False),
    ).eval()
    prompt = tokenizer(["the film was"], return_tensors="pt")["input_ids"]
    sources = [LocalCausalLM(m, tokenizer) for m in (large, small, base)]
    alpha = 1.0
    out = proxy_generate(*sources, prompt, max_new_tokens=6, alpha=alpha)
    assert out.shape == (1, prompt.shape[1] + 6) and torch.equal(out[:, : prompt.shape[1]], prompt)
    with torch.no_grad():  # each new token is the argmax of the proxy logits, computed by hand
        for step in range(prompt.shape[1], out.shape[1]):
            ids = out[:, :step]
            by_hand = large(ids).logits[:, -1] + alpha * (
                small(ids).logits[:, -1] - base(ids).logits[:, -1]
            )
            assert int(out[0, step]) == int(by_hand.argmax(-1))
    # α = 0 is the large model's own greedy generation
    alone = proxy_generate(*sources, prompt, max_new_tokens=6, alpha=0.0)
    reference = large.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(alone, reference)
    assert not torch.equal(out, alone)  # the small model's tuning steered it
    # sampling is seeded
    sampled = [
        proxy_generate(
            *sources, prompt, 4, alpha, temperature=1.0, generator=torch.Generator().manual_seed(0)
        )
        for _ in range(2)
    ]
    assert torch.equal(sampled[0], sampled[1])


def test_a_causal_pair_with_different_vocabularies_is_refused():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    large = LocalCausalLM(gpt2(1, 1, len(tokenizer)), tokenizer)
    small = LocalCausalLM(gpt2(1, 2, len(tokenizer) + 5), tokenizer)
    with pytest.raises(ModelError, match="one shared tokenizer"):
        proxy_generate(large, small, small, torch.tensor([[101, 2023]]), 2)


def test_local_source_scores_the_zero_shot_large_model(tmp_path: Path):
    """The zero-shot head: cosine similarity of mean-pooled embeddings to the label names'."""
    task, server = pt_server(tmp_path)
    source: LocalModelSource = server.large.source
    net = source._model.net
    texts = ["a great match", "a sad recipe"]
    enc = source._model.preprocess.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = net.encoder(
            **{k: enc[k] for k in ("input_ids", "attention_mask")}
        ).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        by_hand = 20.0 * F.normalize(pooled, dim=-1) @ F.normalize(net.classifier.weight, dim=-1).T
    torch.testing.assert_close(source.logits(texts), by_hand, rtol=1e-5, atol=1e-5)


def test_test_accuracy_scores_the_proxy_of_the_clients_aggregate_not_the_distilled_model(
    tmp_path: Path,
):
    """One round with and without distillation: the clients train from the same start, so their
    aggregate is the same, and `test_*` scores its proxy in both runs; `distilled_*` scores the
    small model distillation made (the next round's start) and its proxy."""

    def one_round(name: str, steps: int):
        # a fixed alpha: alpha=auto may choose 0, where the proxy is the large model whatever
        # the small one learned, and the distilled proxy could not differ
        sets = {**PAIR, "federation.rounds": 1, "method.distill_steps": steps, "method.alpha": 1.0}
        cfg = tiny_config(tmp_path, "fedpt", **{**sets, "method.distill_lr": 1e-2})
        task = build_task(cfg)
        server = task.method.make_server(cfg, read_state(task.model, task.method.trainable_names))
        run_dir = Path(cfg.output_dir) / name
        rundir.start_run_dir(run_dir, "{}", overwrite=False)
        summary = run_federation(task, run_dir, server=server)
        return task, server, run_dir, rundir.read_metrics(run_dir)[-1], summary

    _, _, _, plain, _ = one_round("plain", 0)
    task, server, run_dir, line, summary = one_round("distilled", 30)
    for key in ("test_accuracy", "small_test_accuracy", "large_test_accuracy"):
        assert line[key] == plain[key], key
    assert line["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-6)
    assert "distilled_test_accuracy" not in plain
    assert line["distilled_test_loss"] != pytest.approx(line["test_loss"], rel=1e-3)
    assert line["distilled_small_test_loss"] != pytest.approx(line["small_test_loss"], rel=1e-3)
    assert summary["final_accuracy"] == line["test_accuracy"]
    assert summary["distilled_final_accuracy"] == line["distilled_test_accuracy"]
    table = dict(summary_rows(summary))
    assert table["after distillation: proxy"] == f"{100 * line['distilled_test_accuracy']:.2f}%"

    # by hand: the proxy with the aggregate, and with the distilled (global) state
    assert server.model_state() is server.clients_aggregate
    assert any(
        not torch.equal(server.clients_aggregate[k], v) for k, v in server.global_state.items()
    )
    small = copy.deepcopy(server.small)
    for state, prefix in (
        (server.clients_aggregate, "test"),
        (server.global_state, "distilled_test"),
    ):
        write_state(small, state)
        proxy = ProxyTuned(server.large, small, server.untuned, server.alpha).eval()
        stats = evaluate(proxy, task.data.test, None, 64, task.device)
        assert stats.accuracy == line[f"{prefix}_accuracy"]
        assert stats.loss == pytest.approx(line[f"{prefix}_loss"], rel=1e-6)

    # the checkpoint keeps the aggregate, so a resumed run scores the same deployed model
    tensors, meta = rundir.load_checkpoint(run_dir)
    _, fresh = pt_server(tmp_path / "fresh", **{"method.distill_steps": 30})
    fresh.load_state_dict(tensors, meta["server"])
    assert all(
        torch.equal(fresh.clients_aggregate[k], v) for k, v in server.clients_aggregate.items()
    )
