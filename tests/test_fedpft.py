"""`fedpft`: the sub-model (exact when nothing is cut, top-m neurons by saliency), distillation,
neuron activity, re-alignment slices, the LoRA plug-in into the full model, and resume."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedft.errors import ConfigError, ModelError
from fedft.federation.client import ClientContext
from fedft.federation.engine import build_task, run_federation
from fedft.federation.payload import ClientCost, Payload, Reply
from fedft.federation.training import read_state, write_state
from fedft.methods.fedpft.activity import neuron_activity
from fedft.methods.fedpft.distill import weight_product_loss
from fedft.methods.fedpft.server import ACTIVITY, REALIGN, SUBMODEL
from fedft.methods.fedpft.submodel import ffn_parameters
from fedft.metrics import rundir
from fedft.models.backbone import Skip, load_task_model

from helpers import assert_same_global_state, shared_dataset, tiny_config

# tiny-bert has 2 blocks: keeping only block 0 whole compresses block 1
SMALL = {
    "method.keep_layers": [0],
    "method.distill_steps": 30,
    "method.realign_steps": 10,
    "method.public_rows": 120,
    "method.public_heldout": 40,
}


def fp_task(tmp_path: Path, model: str = "tiny-bert", **sets):
    if model == "tiny-vit":  # distil on digits no client holds (other writers' test images)
        data = shared_dataset("optdigits")
        sets = {"data.source": str(data), "method.public_data": str(data / "test.csv"), **sets}
    return build_task(tiny_config(tmp_path, "fedpft", model=model, **{**SMALL, **sets}))


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-vit"])
@pytest.mark.parametrize(
    "sets",
    [{"method.keep": 1.0}, {"method.keep": 0.25, "method.keep_layers": [0, 1]}],
    ids=["full-width", "no-layer-compressed"],
)
def test_a_submodel_that_cuts_nothing_equals_the_full_model(tmp_path: Path, model, sets):
    task = fp_task(tmp_path, model, **sets)
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    batch = task.data.train.batch(np.arange(8))
    assert torch.equal(logits_of(task.model, batch), logits_of(server.full, batch))
    assert torch.equal(logits_of(server.sub, batch), logits_of(server.full, batch))


def test_selection_keeps_the_top_m_neurons_by_saliency(tmp_path: Path):
    task = fp_task(tmp_path, **{"method.keep": 0.25})
    full = load_task_model("tiny-bert", task.model.num_labels, 16, task.cfg.seed)
    block = full.blocks()[1]
    w_in, b_in = block.intermediate.dense.weight, block.intermediate.dense.bias
    w_out = block.output.dense.weight
    saliency = (w_in.pow(2).sum(1) + w_out.pow(2).sum(0)).sqrt()  # by hand, per neuron
    m = round(0.25 * w_in.shape[0])
    kept = sorted(saliency.argsort(descending=True)[:m].tolist())
    assert min(saliency[kept]) > max(saliency[[j for j in range(len(saliency)) if j not in kept]])
    sub_block = task.model.blocks()[1]
    assert sub_block.intermediate.dense.weight.shape == (m, w_in.shape[1])
    assert torch.equal(sub_block.intermediate.dense.weight, w_in[kept])
    assert torch.equal(sub_block.intermediate.dense.bias, b_in[kept])
    assert torch.equal(sub_block.output.dense.weight, w_out[:, kept])
    # the block kept whole and attention everywhere are untouched
    assert task.model.blocks()[0].intermediate.dense.weight.shape == w_in.shape
    assert sub_block.attention.self.query.base_layer.weight.shape == (32, 32)


def test_the_lora_state_loads_into_the_full_model_with_no_missing_or_unexpected_key(
    tmp_path: Path,
):
    task = fp_task(tmp_path)
    initial = read_state(task.model, task.method.trainable_names)
    server = task.method.make_server(task.cfg, initial)
    full = server.full
    own = set(task.method.select_trainable(full))  # the full model's own LoRA + head
    assert set(server.global_state) == own
    state = {**full.state_dict(), **server.global_state}
    result = full.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # plugging in moves the full model: its LoRA B matrices now hold the global values
    changed = {k: v + 0.5 for k, v in server.global_state.items()}
    write_state(full, changed)
    assert all(torch.equal(dict(full.named_parameters())[k], v) for k, v in changed.items())


def test_with_full_width_the_plugged_in_full_model_scores_what_the_sub_model_does(
    tmp_path: Path,
):
    cfg = tiny_config(tmp_path, "fedpft", **{**SMALL, "method.keep": 1.0})
    run_dir = Path(cfg.output_dir) / "run"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    run_federation(build_task(cfg), run_dir)
    line = rundir.read_metrics(run_dir)[-1]
    assert line["test_accuracy"] == line["submodel_test_accuracy"]
    assert line["test_loss"] == pytest.approx(line["submodel_test_loss"], rel=1e-6)


def test_distillation_lowers_the_hidden_state_loss_on_held_out_text(tmp_path: Path):
    task = fp_task(
        tmp_path,
        **{"method.distill_steps": 60, "method.distill_lr": 3e-3, "method.weight_product": 0.1},
    )
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    public = server.public
    assert not set(public.train.tolist()) & set(public.heldout.tolist())
    before_weights = {k: v.clone() for k, v in ffn_parameters(server.sub, server.ffns).items()}
    metrics = server.distil()
    assert metrics["distill_loss_after"] < 0.9 * metrics["distill_loss_before"]
    # only the compressed feed-forward weights were trained
    after = ffn_parameters(server.sub, server.ffns)
    assert all(not torch.equal(before_weights[k], after[k]) for k in after)
    assert server.summary()["fedpft"]["distill"]["heldout_after"] == metrics["distill_loss_after"]


def test_the_weight_product_term_is_zero_when_equal_and_carries_gradient(tmp_path: Path):
    task = fp_task(tmp_path, **{"method.keep": 1.0})
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    assert float(weight_product_loss(server.sub, server.full, server.ffns)) == 0.0
    sub = copy.deepcopy(server.sub)
    params = ffn_parameters(sub, server.ffns)
    with torch.no_grad():
        for p in params.values():
            p.mul_(0.9)
            p.requires_grad_(True)
    loss = weight_product_loss(sub, server.full, server.ffns)
    loss.backward()
    ffn = server.ffns[0]
    assert loss.item() > 0 and params[f"{ffn.output}.weight"].grad.abs().sum() > 0
    assert params[f"{ffn.inputs[0]}.weight"].grad.abs().sum() > 0


@pytest.mark.parametrize("measure", ["mean_abs", "nonpositive"])
def test_neuron_activity_is_measured_on_real_tokens(tmp_path: Path, measure: str):
    task = fp_task(tmp_path)
    ffn = task.method.ffns[0]
    rows = np.arange(20)
    activity, tokens = neuron_activity(
        task.model, task.method.ffns, task.data.train, rows, 8, measure, task.device
    )
    batch = task.data.train.batch(rows)
    seen = {}
    module = task.model.get_submodule(ffn.inputs[0])
    handle = module.register_forward_hook(lambda _m, _a, out: seen.update(pre=out))
    logits_of(task.model, batch)
    handle.remove()
    real = seen["pre"][batch["attention_mask"].bool()]  # [tokens, m]
    by_hand = (
        nn.functional.gelu(real).abs().mean(0)
        if measure == "mean_abs"
        else (real > 0).float().mean(0)
    )
    assert tokens == int(batch["attention_mask"].sum())
    torch.testing.assert_close(activity[ffn.layer], by_hand, rtol=1e-5, atol=1e-6)


def test_realignment_keeps_the_most_used_neurons_and_ships_only_the_others(tmp_path: Path):
    task = fp_task(tmp_path, **{"method.realign_keep": 0.75})
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    server.distil()
    ffn = server.ffns[0]
    ctx = ClientContext(
        0, 1, task.model, task.data, task.data.clients[0], task.cfg, task.device,
        task.method.trainable_names,
    )  # fmt: skip
    # the first contact carries the whole sub-model; the client's model then equals the server's
    first = server.payload_for(0, collect_activity=False)
    assert any(k.startswith(SUBMODEL) for k in first.tensors)
    task.method.receive_submodel(ctx, first)
    server.client_versions[0] = ctx.state["submodel_version"]
    for name, param in ffn_parameters(task.model, server.ffns).items():
        assert torch.equal(param, ffn_parameters(server.sub, server.ffns)[name]), name
    m = task.model.get_submodule(ffn.output).weight.shape[1]
    use = torch.arange(m, dtype=torch.float32)  # neuron j used j units: the top 3/4 stay
    reply = Reply(
        0, "train", Payload({f"{ACTIVITY}{ffn.layer}": use}, {"activity_tokens": 10}), None,
        ClientCost(),
    )  # fmt: skip
    before = {k: v.clone() for k, v in ffn_parameters(server.sub, server.ffns).items()}
    metrics = server.realign([reply])
    fixed = torch.arange(m // 4, m)
    free = torch.arange(0, m // 4)
    after = ffn_parameters(server.sub, server.ffns)
    assert metrics["realigned_neurons"] == len(free) and server.version == 2
    assert torch.equal(
        after[f"{ffn.inputs[0]}.weight"][fixed], before[f"{ffn.inputs[0]}.weight"][fixed]
    )
    assert torch.equal(
        after[f"{ffn.output}.weight"][:, fixed], before[f"{ffn.output}.weight"][:, fixed]
    )
    assert torch.equal(after[f"{ffn.output}.bias"], before[f"{ffn.output}.bias"])
    assert not torch.equal(
        after[f"{ffn.inputs[0]}.weight"][free], before[f"{ffn.inputs[0]}.weight"][free]
    )
    # the next message carries exactly the re-distilled slices, and the client ends up equal again
    second = server.payload_for(0, collect_activity=False)
    shipped = {k: v for k, v in second.tensors.items() if k.startswith(REALIGN)}
    assert torch.equal(shipped[f"{REALIGN}{ffn.layer}.index"].long(), free)
    hidden = task.model.hidden_size()
    assert sum(t.numel() for t in shipped.values()) == len(free) * (1 + 2 * hidden + 1)
    assert not any(k.startswith(SUBMODEL) for k in second.tensors)
    task.method.receive_submodel(ctx, second)
    for name, param in ffn_parameters(task.model, server.ffns).items():
        assert torch.equal(param, after[name]), name


def test_a_round_reports_one_time_realignment_and_lora_bytes_apart(tmp_path: Path):
    sets = {**SMALL, "federation.rounds": 3, "method.realign_every": 1}
    cfg = tiny_config(tmp_path, "fedpft", **sets)
    task = build_task(cfg)
    run_dir = Path(cfg.output_dir) / "run"
    rundir.start_run_dir(run_dir, "{}", overwrite=False)
    summary = run_federation(task, run_dir)
    lines = rundir.read_metrics(run_dir)
    download = summary["fedpft"]["submodel_download_bytes"]
    first_contacts = set()
    for line in lines:
        new = [c for c in line["clients"] if c not in first_contacts]
        first_contacts.update(line["clients"])
        assert line["submodel_bytes"] == len(new) * download
        assert line["parameter_bytes"] == 2 * len(line["clients"]) * task.trainable_bytes
        assert (
            line["submodel_bytes"] + line["realign_bytes"] + line["parameter_bytes"]
            == line["bytes_up"] + line["bytes_down"]
        )
        assert line["realign_bytes"] > 0 and line["realign_loss_after"] is not None
    assert summary["fedpft"]["submodel_bytes"] < summary["fedpft"]["full_model_bytes"]
    assert summary["submodel_final_accuracy"] == lines[-1]["submodel_test_accuracy"] is not None


def test_a_resumed_fedpft_run_equals_an_unbroken_one(tmp_path: Path):
    sets = {**SMALL, "federation.rounds": 3, "method.realign_every": 2}
    a = Path(tmp_path / "runs" / "a")
    rundir.start_run_dir(a, "{}", overwrite=False)
    full = run_federation(build_task(tiny_config(tmp_path, "fedpft", **sets)), a)
    b = Path(tmp_path / "runs" / "b")
    rundir.start_run_dir(b, "{}", overwrite=False)
    short = {**sets, "federation.rounds": 2}
    run_federation(build_task(tiny_config(tmp_path, "fedpft", **short)), b)
    resumed = run_federation(build_task(tiny_config(tmp_path, "fedpft", **sets)), b, resume=True)
    assert resumed["final_loss"] == full["final_loss"]
    assert_same_global_state(a, b)
    ta, _ = rundir.load_checkpoint(a)
    tb, _ = rundir.load_checkpoint(b)
    for name in [n for n in ta if n.startswith("sub.")]:
        assert torch.equal(ta[name], tb[name]), name


def test_the_layer_drop_emulator_drops_middle_blocks_and_its_lora_plugs_in(tmp_path: Path):
    sets = {
        "method.compression": "layer_drop",
        "method.keep": 0.4,
        "method.distill_steps": 0,
        "method.realign_every": 0,
    }
    task = fp_task(tmp_path, **sets)
    assert isinstance(task.model.blocks()[1], Skip) and not isinstance(task.model.blocks()[0], Skip)
    server = task.method.make_server(task.cfg, read_state(task.model, task.method.trainable_names))
    full_names = set(dict(server.full.named_parameters()))
    assert set(server.global_state) <= full_names  # no unexpected key
    assert not any("layer.1." in n for n in server.global_state)  # the dropped block has no LoRA
    assert any("layer.1." in n and "lora_B" in n for n in full_names)  # the full model's stays 0


@pytest.mark.parametrize(
    ("sets", "error", "message"),
    [
        (
            {"method.compression": "layer_drop"},
            ConfigError,
            "compression=layer_drop is the plain emulator",
        ),
        ({"method.keep_layers": [5]}, ModelError, "names layer 5, but the model has 2 blocks"),
        (
            {"method.target_modules": ["query", "dense"]},
            ModelError,
            "leave the feed-forward projections out of method.target_modules",
        ),
        (
            {"privacy.mode": "sample", "privacy.epsilon": 8},
            ConfigError,
            "set method.realign_every=0 to train under DP",
        ),
    ],
    ids=["layer-drop-with-distillation", "keep-layer-out-of-range", "lora-on-ffn", "dp-realign"],
)
def test_settings_fedpft_cannot_serve_are_refused(tmp_path: Path, sets, error, message):
    with pytest.raises(error, match=message):
        fp_task(tmp_path, **sets)
