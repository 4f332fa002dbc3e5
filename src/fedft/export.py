"""What a run leaves for plain Hugging Face code: `fedft export RUN OUT` and `fedft generate RUN
PROMPT`.

A run's checkpoint holds only what it trained (LoRA factors, prompts, biases, ...). Export puts
it in the form the Hugging Face stack loads without fedft:

- **LoRA** (`lora`, `fedpft` plugged into the full model, `zo` on LoRA): a peft adapter folder,
  `PeftModel.from_pretrained(base, OUT)`; a trained classification head rides along as peft's
  `modules_to_save`. `lora` with `aggregation=exact` keeps a dense residual beside each adapted
  weight, which no peft adapter holds: it exports merged (W0 + R + s·B·A in each weight).
- **Soft prompts on a causal LM** (`prompt`, `zo` on prompts, `sfprompt`): a peft prompt-tuning
  adapter (virtual tokens before the input embeddings, as fedft trains them). Where the method
  also trained weights of the model (sfprompt's tail), the base is that merged model, in
  `OUT/base`.
- **Weights of the model itself** (`full`, `head`, `bias`, `zo` on those, `sfprompt` without
  prompts): the merged model and its tokenizer, `AutoModelFor...from_pretrained(OUT)`.
- **Modules no library has** (`adapter`'s bottlenecks; a classifier's prompts after [CLS]): the
  merged model with a small modeling file beside it that adds them,
  `AutoModelFor...from_pretrained(OUT, trust_remote_code=True)`.
- **A zero-shot head** (`zo`'s default start on a text encoder, `model.head=zero_shot`, the
  default under sample-level DP): the merged encoder (LoRA folded in) with a modeling file for
  mean pooling and the cosine head, and for the prompts or adapters the run trained,
  `AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)`.

An adapter's base is the run's model where a name or folder loads it (the converted SmolLM2 in
fedft's cache, MiniLM's folder, a hub name); a tiny random test model, which nothing could
recreate, is written to `OUT/base` (and so is any base with `--with-base`). `OUT/README.md` says
what produced the export. OUT is written to a temporary folder and moved into place: an existing
folder is never written over.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from fedft.errors import FedftError
from fedft.federation.client import CLIENT
from fedft.federation.engine import Task, build_task, make_server
from fedft.federation.server import Server
from fedft.methods.lora.aggregation import RESIDUAL
from fedft.methods.zo.head import LABEL_ROWS
from fedft.metrics import rundir
from fedft.models.backbone import TaskModel
from fedft.models.zero_shot import ZeroShotClassifier

TINY = ("tiny-bert", "tiny-vit", "tiny-llama")


@dataclass
class LoadedRun:
    run_dir: Path
    task: Task
    server: Server
    model: TaskModel  # the deployed model, carrying the run's last global state
    summary: dict[str, Any]


def load_run(run_dir: Path) -> LoadedRun:
    """A finished (or stopped) run's model as its last checkpoint left it."""
    from fedft.config import validate_config

    if not run_dir.is_dir():
        raise FedftError(f"{run_dir} is not a folder; give a run folder, e.g. runs/lora-demo")
    saved = run_dir / rundir.CONFIG
    if not saved.is_file():
        raise FedftError(f"{run_dir} is not a fedft run folder (no {rundir.CONFIG} in it)")
    if not (run_dir / rundir.CHECKPOINT).is_file():
        raise FedftError(f"{run_dir} has no checkpoint: the run never finished a round")
    try:
        tree = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as exc:
        raise FedftError(f"{saved} is not valid YAML: {str(exc).splitlines()[0]}") from None
    cfg = validate_config(tree if isinstance(tree, dict) else {})
    if cfg.method.name == "fedpt":
        raise FedftError(
            "a fedpt run deploys the large model steered by the small one; there is no single "
            "model to export (the small model's LoRA is in the run's checkpoint)"
        )
    tensors, meta = rundir.load_checkpoint(run_dir)
    task = build_task(cfg)
    server = make_server(task)
    server.load_state_dict(
        {k: v for k, v in tensors.items() if not k.startswith(CLIENT)}, meta["server"]
    )
    model = server.evaluation_models(task.model)["test"]
    assert isinstance(model, TaskModel)
    model.eval()
    summary = {}
    if (run_dir / rundir.SUMMARY).is_file():
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    return LoadedRun(run_dir, task, server, model, summary)


# --- what kind of export ------------------------------------------------------------------------
def export_kind(task: Task) -> str:
    names = task.method.trainable_names
    if isinstance(task.model.net, ZeroShotClassifier):
        return "zero-shot"
    if getattr(task.method.options, "aggregation", "mean") == "exact":
        return "merged"  # a dense residual beside each LoRA weight: no peft adapter holds it
    if LABEL_ROWS in names:
        return "merged"  # zo's label-word rows: an LM head of their own, untied from the input
    lora = any(".lora_" in n for n in names)
    prompt = any(n.startswith("prompt.") for n in names)
    adapter = any(".adapter." in n for n in names)
    if adapter or (prompt and not task.model.generative):
        return "remote-code"
    if lora:
        return "peft-lora"
    if prompt:
        return "peft-prompt"
    return "merged"


def _auto_class(model: TaskModel) -> str:
    if model.generative:
        return "AutoModelForCausalLM"
    if model.kind == "image":
        return "AutoModelForImageClassification"
    return "AutoModelForSequenceClassification"


def base_source(task: Task) -> str | None:
    """A name or folder that loads the run's untuned backbone, or None (a tiny random model)."""
    name = task.cfg.model.name
    if name in TINY:
        return None
    if name == "minilm":
        from fedft.models.backbone import minilm_path

        return minilm_path()
    if name == "smollm2":
        from fedft.models.causal import smollm2_path

        return smollm2_path()
    if name.lower().endswith(".gguf"):
        from fedft.models.causal import convert_gguf

        return str(convert_gguf(Path(name).expanduser()))
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _fresh_backbone(run: LoadedRun) -> TaskModel:
    """The run's backbone as it started (seeded), with nothing attached: the adapter's base."""
    from fedft.models.backbone import load_like

    return load_like(run.task.model, run.task.cfg)


def _save_base(net: torch.nn.Module, model: TaskModel, folder: Path) -> None:
    net.save_pretrained(folder)
    tokenizer = model.preprocess.tokenizer
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _trained(model: TaskModel, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def _load_into(target: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors by name into `target`; every one must land."""
    params = dict(target.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(f"export: no parameter named {missing[:3]} in the exported model")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


# --- the four forms -----------------------------------------------------------------------------
def _peft_lora(run: LoadedRun, folder: Path, with_base: bool) -> str:
    from peft import LoraConfig, get_peft_model

    method = run.task.method
    options = getattr(method, "inner", method).options  # zo keeps lora's options inside
    model = run.model
    names = method.trainable_names
    # the head modules by path (peft matches modules_to_save by the end of a module's name)
    heads = sorted(
        {n.removeprefix("net.").rpartition(".")[0] for n in model.head_parameter_names()}
    )
    fresh = _fresh_backbone(run)
    base = base_source(run.task)
    if base is None or with_base:
        _save_base(fresh.net, model, folder / "base")
        base = "base"
    lora_names = [n for n in names if ".lora_" in n]
    targets = sorted({n.split(".lora_")[0].split(".")[-1] for n in lora_names})
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
        base_model_name_or_path=base,
    )
    peft_model = get_peft_model(fresh.net, config)
    tensors = {}
    for name, value in _trained(model, names).items():
        inner = name.removeprefix("net.")
        if ".lora_" in name:
            tensors[f"base_model.model.{inner}"] = value
        else:  # a head module, which peft keeps a trainable copy of
            module, _, leaf = inner.rpartition(".")
            tensors[f"base_model.model.{module}.modules_to_save.default.{leaf}"] = value
    _load_into(peft_model, tensors)
    peft_model.save_pretrained(folder)
    _fix_base_path(folder, base)
    if model.preprocess.tokenizer is not None:
        model.preprocess.tokenizer.save_pretrained(folder)
    return base


def _fix_base_path(folder: Path, base: str) -> None:
    """peft writes the base's path as it was given; keep `base` relative to OUT only in words."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    path.write_text(json.dumps(config, indent=2) + "\n")


def _peft_prompt(run: LoadedRun, folder: Path, with_base: bool) -> str:
    from peft import PromptTuningConfig, get_peft_model

    model = run.model
    names = run.task.method.trainable_names
    prompt_names = [n for n in names if n.startswith("prompt.")]
    rest = [n for n in names if n not in prompt_names]
    tokens = _trained(model, prompt_names)[prompt_names[0]]
    fresh = _fresh_backbone(run)
    base = base_source(run.task)
    if rest:  # weights of the model trained too (sfprompt's tail): the base is that model
        _load_into(fresh, _trained(model, rest))
    if base is None or with_base or rest:
        _save_base(fresh.net, model, folder / "base")
        base = "base"
    config = fresh.net.config
    peft_config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=int(tokens.shape[0]),
        token_dim=int(tokens.shape[1]),
        num_transformer_submodules=1,
        num_attention_heads=int(config.num_attention_heads),
        num_layers=int(config.num_hidden_layers),
        base_model_name_or_path=base,
    )
    peft_model = get_peft_model(fresh.net, peft_config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(tokens)
    peft_model.save_pretrained(folder)
    _fix_base_path(folder, base)
    model.preprocess.tokenizer.save_pretrained(folder)
    return base


def _merged(run: LoadedRun, folder: Path) -> None:
    fresh = _fresh_backbone(run)
    names = run.task.method.trainable_names
    lora = [n for n in names if ".lora_" in n]
    plain = [n for n in names if n not in lora and n != LABEL_ROWS]
    _load_into(fresh, {**_trained(run.model, plain), **_merged_lora_weights(run.model)})
    if LABEL_ROWS in names:
        _untie_label_rows(fresh, run.model)
    _save_base(fresh.net, run.model, folder)


@torch.no_grad()
def _untie_label_rows(fresh: TaskModel, model: TaskModel) -> None:
    """zo's label-word rows into an LM head of the exported model's own: its rows for those
    tokens replaced, the input embeddings (which a small Llama ties to the head) left as they
    were, as the run left them."""
    rows = model.get_submodule("label_head")
    head = fresh.net.get_output_embeddings()
    weight = head.weight.detach().clone()
    weight[rows.ids] = rows.rows.detach().to(weight.dtype)
    head.weight = torch.nn.Parameter(weight)
    fresh.net.config.tie_word_embeddings = False


@torch.no_grad()
def _merged_lora_weights(model: TaskModel) -> dict[str, torch.Tensor]:
    """Each LoRA module's whole weight, W0 + s·B·A (peft's delta, in the base layer's layout)
    plus the dense residual `lora`'s exact aggregation keeps beside it (out x in), by the plain
    module's parameter name."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not lora_a:
            continue
        weight = module.base_layer.weight.detach().clone()
        for adapter in lora_a:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
        residual = getattr(module, RESIDUAL, None)
        if residual is not None:
            weight += residual.T if getattr(module, "fan_in_fan_out", False) else residual
        out[f"{name}.weight"] = weight.cpu()
    return out


MODULES_CODE = '''"""Written by `fedft export`: {base_class} with {what}. Load with
{auto}.from_pretrained(folder, trust_remote_code=True)."""

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class Bottleneck(nn.Module):
    def __init__(self, dim, r):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = nn.GELU()
        self.up = nn.Linear(r, dim)

    def forward(self, hidden):
        return hidden + self.up(self.act(self.down(hidden)))


def add_fedft_modules(model, spec):
    """Bottleneck adapters after each block's feed-forward output; soft prompt tokens."""
    model.fedft_after = spec.get("prompt_after", 1)
    model.fedft_prompt = None
    if spec.get("prompt_tokens"):
        model.fedft_prompt = nn.Parameter(torch.zeros(spec["prompt_tokens"], spec["dim"]))
    if spec.get("adapter_r"):
        for block in model.get_submodule(spec["blocks"]):
            adapter = Bottleneck(spec["dim"], spec["adapter_r"])
            block.add_module("adapter", adapter)
            block.get_submodule(spec["projection"]).register_forward_hook(
                lambda _m, _i, out, adapter=adapter: adapter(out)
            )


def with_prompt(model, input_ids, attention_mask, inputs_embeds):
    """The prompt tokens after the first `fedft_after` positions; the mask grows to match."""
    if model.fedft_prompt is None or (input_ids is None and inputs_embeds is None):
        return input_ids, attention_mask, inputs_embeds
    embeds = inputs_embeds if inputs_embeds is not None else model.get_input_embeddings()(input_ids)
    a, n = model.fedft_after, model.fedft_prompt.shape[0]
    prompt = model.fedft_prompt.unsqueeze(0).expand(embeds.shape[0], -1, -1).to(embeds.dtype)
    inputs_embeds = torch.cat([embeds[:, :a], prompt, embeds[:, a:]], dim=1)
    if attention_mask is not None:
        ones = attention_mask.new_ones(attention_mask.shape[0], n)
        attention_mask = torch.cat([attention_mask[:, :a], ones, attention_mask[:, a:]], 1)
    return None, attention_mask, inputs_embeds
'''

MODEL_CODE = """

class FedftModel(transformers.{base_class}):
    def __init__(self, config):
        super().__init__(config)
        add_fedft_modules(self, config.fedft)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        input_ids, attention_mask, inputs_embeds = with_prompt(
            self, input_ids, attention_mask, inputs_embeds
        )
        return super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
"""

ZERO_SHOT_CODE = """

class FedftZeroShot(transformers.{base_class}):
    def __init__(self, config):
        super().__init__(config)
        if getattr(self, "pooler", None) is not None:
            self.pooler = None  # mean pooling replaces it
        add_fedft_modules(self, config.fedft)
        self.fedft_scale = config.fedft["zero_shot_scale"]
        self.fedft_classifier = nn.Parameter(torch.zeros(config.num_labels, config.hidden_size))

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, **kwargs):
        if attention_mask is None:
            given = input_ids if input_ids is not None else inputs_embeds
            attention_mask = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        input_ids, attention_mask, inputs_embeds = with_prompt(
            self, input_ids, attention_mask, inputs_embeds
        )
        hidden = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.fedft_scale * F.normalize(pooled, dim=-1) @ F.normalize(
            self.fedft_classifier, dim=-1
        ).T
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
"""


def _load_modeling_file(folder: Path) -> Any:
    """The modeling file just written to `folder`, imported as transformers will import it."""
    import importlib.util
    import sys

    loader = importlib.util.spec_from_file_location("fedft_modeling", folder / "fedft_modeling.py")
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    sys.modules.pop("fedft_modeling", None)
    loader.loader.exec_module(module)
    return module


def _modules_spec(model: TaskModel, root: torch.nn.Module, trained: dict) -> dict[str, Any]:
    """What the modeling file adds to the exported model (`root`: the module it subclasses)."""
    from fedft.methods.adapter import ffn_output

    spec: dict[str, Any] = {"dim": model.hidden_size()}
    adapters = [n for n in trained if ".adapter." in n]
    if adapters:
        blocks = model.blocks()
        projection = ffn_output(blocks[0])
        spec.update(
            blocks=next(n for n, m in root.named_modules() if m is blocks),
            projection=next(n for n, m in blocks[0].named_modules() if m is projection),
            adapter_r=int(trained[next(n for n in adapters if n.endswith("down.weight"))].shape[0]),
        )
    prompts = [n for n in trained if n.startswith("prompt.")]
    if prompts:
        spec["prompt_tokens"] = int(trained[prompts[0]].shape[0])
        spec["prompt_after"] = 0 if model.generative else 1
    return spec


def _write_modeling(
    folder: Path, code: str, config: Any, spec: dict, auto: str, class_name: str, **words: str
) -> Any:
    """Write the modeling file and return a fresh instance of its class for `config`."""
    text = MODULES_CODE.format(auto=auto, **words) + code.format(**words)
    (folder / "fedft_modeling.py").write_text(text)
    config.fedft = spec
    config.auto_map = {auto: f"fedft_modeling.{class_name}"}
    return getattr(_load_modeling_file(folder), class_name)(config)


def _save_modeling(exported: torch.nn.Module, model: TaskModel, folder: Path) -> None:
    exported.save_pretrained(folder)
    del exported.config.fedft  # the run's model shares this config
    del exported.config.auto_map
    if model.preprocess.tokenizer is not None:
        model.preprocess.tokenizer.save_pretrained(folder)


def _renamed(name: str, prefix: str) -> str:
    return "fedft_prompt" if name.startswith("prompt.") else name.removeprefix(prefix)


def _remote_code(run: LoadedRun, folder: Path) -> None:
    model = run.model
    trained = _trained(model, run.task.method.trainable_names)
    exported = _write_modeling(
        folder, MODEL_CODE, model.net.config, _modules_spec(model, model.net, trained),
        _auto_class(model), "FedftModel", base_class=type(model.net).__name__,
        what="the modules fedft trained that no library has (bottleneck adapters after each "
        "block's feed-forward output; soft prompt tokens)",
    )  # fmt: skip
    exported.load_state_dict(_fresh_backbone(run).net.state_dict(), strict=False)
    _load_into(exported, {_renamed(n, "net."): v for n, v in trained.items()})
    _save_modeling(exported, model, folder)


def _zero_shot(run: LoadedRun, folder: Path) -> None:
    """The run's encoder (its trained weights, LoRA merged; its prompts and adapters) under the
    modeling file's mean pooling and cosine head."""
    model = run.model
    net = model.net
    assert isinstance(net, ZeroShotClassifier)
    names = run.task.method.trainable_names
    lora = [n for n in names if ".lora_" in n]
    trained = _trained(model, [n for n in names if n not in lora])
    renamed = {
        "fedft_classifier" if n == "net.classifier.weight" else _renamed(n, "net.encoder."): v
        for n, v in {**trained, **_merged_lora_weights(model)}.items()
    }
    fresh = _fresh_backbone(run).net  # the untuned encoder
    encoder = fresh.encoder if isinstance(fresh, ZeroShotClassifier) else fresh.base_model
    spec = _modules_spec(model, net.encoder, trained)
    extra = "prompt_tokens" in spec or "adapter_r" in spec
    spec["zero_shot_scale"] = float(net.classifier.scale)
    config = encoder.config
    config.num_labels = int(net.classifier.weight.shape[0])
    exported = _write_modeling(
        folder, ZERO_SHOT_CODE, config, spec, "AutoModelForSequenceClassification",
        "FedftZeroShot", base_class=type(encoder).__name__,
        what="the zero-shot head fedft tuned (the mean-pooled sentence embedding scored by "
        "cosine similarity against one vector per label, times a scale)"
        + (" and the prompt tokens or adapters it trained" if extra else ""),
    )  # fmt: skip
    exported.load_state_dict(encoder.state_dict(), strict=False)
    _load_into(exported, renamed)
    _save_modeling(exported, model, folder)


# --- the command ---------------------------------------------------------------------------------
def _readme(run: LoadedRun, kind: str, base: str | None) -> str:
    cfg, s = run.task.cfg, run.summary
    privacy = (s.get("privacy") or {}) if s else {}
    eps = (
        f"epsilon {privacy['epsilon_max']:.3g} (delta {privacy['delta']:g}, {privacy['mode']}-level"
        + ("" if privacy.get("private", True) else ", NOT PRIVATE: reproducible noise")
        + ")"
        if privacy
        else "none (no differential privacy)"
    )
    auto = _auto_class(run.model)
    where = "OUT + '/base'" if base == "base" else repr(base)
    load = {
        "peft-lora": f"base = {auto}.from_pretrained({where})\nmodel = PeftModel.from_pretrained(base, OUT)",
        "peft-prompt": f"base = {auto}.from_pretrained({where})\nmodel = PeftModel.from_pretrained(base, OUT)",
        "merged": f"model = {auto}.from_pretrained(OUT)",
        "remote-code": f"model = {auto}.from_pretrained(OUT, trust_remote_code=True)",
        "zero-shot": f"model = {auto}.from_pretrained(OUT, trust_remote_code=True)",
    }[kind]
    headline = s.get("headline", "accuracy")
    lines = [
        f"# {run.run_dir.name}: exported by fedft",
        "",
        f"- base model: {cfg.model.name}" + (f" (`{base}`)" if base else ""),
        f"- method: {cfg.method.name}; task: {run.model.task.describe()}",
        f"- data: {cfg.data.source}; {cfg.federation.clients} clients",
        f"- rounds completed: {s.get('rounds_completed', '?')}",
        f"- final {headline}: {s.get(f'final_{headline}')}; final test loss: {s.get('final_loss')}",
        f"- privacy: {eps}",
        f"- form: {kind}",
        "",
        "Load it:",
        "",
        "```python",
        "from transformers import "
        + auto
        + ("\nfrom peft import PeftModel" if kind.startswith("peft") else ""),
        "OUT = 'path/to/this/folder'",
        load,
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(run_dir: Path, out: Path, with_base: bool = False) -> str:
    """Write the run's tuned model to `out` (a new folder); returns the form written."""
    if out.exists():
        raise FedftError(f"{out} exists; give a new folder to export into (nothing was written)")
    run = load_run(run_dir)
    kind = export_kind(run.task)
    out.parent.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")  # set after saving
    warnings.filterwarnings("ignore", category=FutureWarning)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        base = None
        if kind == "peft-lora":
            base = _peft_lora(run, tmp, with_base)
        elif kind == "peft-prompt":
            base = _peft_prompt(run, tmp, with_base)
        elif kind == "merged":
            _merged(run, tmp)
        elif kind == "zero-shot":
            _zero_shot(run, tmp)
        else:
            _remote_code(run, tmp)
        (tmp / "README.md").write_text(_readme(run, kind, base))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return kind


def generate_answers(run_dir: Path, prompts: list[str], max_new_tokens: int | None) -> list[str]:
    """The tuned model's greedy answers to prompts, framed as the run framed its training rows."""
    run = load_run(run_dir)
    task = run.model.task
    if not run.model.generative:
        raise FedftError(
            f"{run_dir} tuned a classifier ({task.describe()}); `fedft generate` answers with a "
            "causal LM run (task.kind=generate)"
        )
    if max_new_tokens is not None:
        task.options = task.options.model_copy(update={"max_new_tokens": max_new_tokens})
    return task.generate(run.model, [task.frame(p) for p in prompts], run.task.device)
