"""Typed run configuration: YAML file + dotted `--set` overrides, validated before anything runs.

Every field has a default and one line of help (`fedft config` prints them). A method's own
options live under `method:` next to its name and are validated by the method's plug-in, so a new
method adds its options without touching this file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedft.errors import ConfigError


class Section(BaseModel):
    # infinities and NaN are never a meaningful setting: refuse them with the field's name
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field(
        "minilm",
        description=(
            "'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled SmolLM2-135M-Instruct), "
            "'tiny-bert', 'tiny-vit', 'tiny-llama' (tests), a local folder, a .gguf file, or a hub "
            "name"
        ),
    )
    max_length: int = Field(
        48,
        ge=4,
        le=4096,
        description="tokens per row (classification: the text; generation: prompt + response)",
    )
    head: Literal["auto", "task", "zero_shot"] = Field(
        "auto",
        description="a text encoder's classifier: 'task' (its own, or a fresh one) or "
        "'zero_shot' (the mean-pooled sentence embedding's cosine to each label name's, one "
        "trainable vector per label: a meaningful start, and far fewer values to train, send "
        "and noise under DP); 'auto': zero_shot under privacy.mode=sample, else task",
    )


class DataConfig(Section):
    source: str = Field(
        "demo",
        description="'demo' (built-in), a local csv/jsonl/parquet file or folder, or a hub dataset name",
    )
    text_column: str = Field("text", description="column holding the text")
    label_column: str = Field(
        "label",
        description="column holding the class label (generation: optional, a class to partition by)",
    )
    test_file: str | None = Field(
        None,
        description="test split file; default: test.*/validation.* in the folder, else held out",
    )
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="fraction held out as the global test set when there is no test file",
    )
    max_train_samples: int | None = Field(
        None, ge=1, description="seeded subset of the training data (None: all)"
    )
    max_test_samples: int | None = Field(
        None, ge=1, description="seeded subset of the global test set (None: all)"
    )
    partition: Literal[
        "auto",
        "iid",
        "dirichlet",
        "pathological",
        "shard",
        "column",
        "linear",
        "square",
        "exponential",
    ] = Field(
        "auto",
        description="how training data is split across clients (auto: dirichlet where the data "
        "has classes, else iid; shard: rows sorted by label cut into shards, "
        "data.shards_per_client each (McMahan et al. 2017); column: one client per value of "
        "data.partition_column; linear / square / exponential: IID rows, client i's share of "
        "them growing as i+1, (i+1)^2 or e^i)",
    )
    partition_column: str | None = Field(
        None,
        description="partition=column: the column whose values are the clients (an author, a "
        "topic, a site); one client a value unless federation.clients is set, and then more "
        "values than clients are grouped, largest first, onto the client with the fewest rows",
    )
    alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration (smaller: more skewed label mix)"
    )
    classes_per_client: int = Field(
        2, ge=1, description="classes each client holds with 'pathological'"
    )
    shards_per_client: int = Field(
        2, ge=1, description="label-sorted shards each client holds with 'shard'"
    )
    min_partition_size: int = Field(
        10, ge=1, description="smallest client partition 'dirichlet' accepts"
    )
    local_test_fraction: float = Field(
        0.1, ge=0, lt=1, description="fraction of each client's data kept for its local test"
    )
    server_rows: int | None = Field(
        None,
        ge=0,
        description="training rows the server keeps as its validation split, held by no client "
        "and never the test split (fedpt chooses alpha on them); None: what the method needs",
    )

    @model_validator(mode="after")
    def _column_named(self) -> DataConfig:
        if self.partition == "column" and not self.partition_column:
            raise ValueError(
                "data.partition=column needs data.partition_column (the column whose values are "
                "the clients, e.g. topic)"
            )
        return self


class TaskConfig(Section):
    kind: Literal["auto", "classify", "generate"] = Field(
        "auto",
        description=(
            "'classify' (a classification head), 'generate' (a causal LM: supervised fine-tuning), "
            "'auto': generate for a causal LM, else classify"
        ),
    )
    prompt_column: str | None = Field(
        None,
        description="generation: the prompt column (None: 'instruction' plus input_column, else 'prompt')",
    )
    input_column: str = Field(
        "input", description="generation: appended to the instruction when the row has it"
    )
    response_column: str | None = Field(
        None,
        description="generation: the response column (None: the first of output, response, "
        "completion, answer)",
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="generation: the prompt frame; auto: the model's chat template where it has one",
    )
    system_prompt: str | None = Field(
        None,
        description="generation: the chat template's system turn (None: the template's default, "
        "which may add one; '': an empty one, shorter prompts)",
    )
    label_prompt: str = Field(
        "Classify the text as one of: {labels}.\n\nText: {text}",
        description="classification data run as generation: the prompt ({text}, {labels})",
    )
    label_words: list[str] | None = Field(
        None, description="the word answered for each class, in class order (None: class names)"
    )
    max_new_tokens: int = Field(32, ge=1, description="generation: tokens generated per answer")
    eval_generations: int = Field(
        64, ge=0, description="generation: test rows (fixed, seeded) answered for Rouge-L"
    )
    client_eval_generations: int = Field(
        8, ge=0, description="generation: each client's local test rows answered for Rouge-L"
    )

    @field_validator("label_prompt")
    @classmethod
    def _has_text(cls, value: str) -> str:
        if "{text}" not in value:
            raise ValueError("must contain {text}, where the row's text goes")
        try:
            value.format(text="", labels="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"only {{text}} and {{labels}} may be filled in ({exc})") from None
        return value


class FederationConfig(Section):
    engine: Literal["local"] = Field(
        "local",
        description="'local': every client in this process (Flower runs start with `flwr run`)",
    )
    clients: int = Field(10, ge=1, description="number of clients")
    rounds: int = Field(8, ge=1, description="federated rounds")
    sample_fraction: float = Field(
        0.5, gt=0, le=1, description="fraction of clients sampled each round"
    )
    sample_count: int | None = Field(
        None, ge=1, description="clients sampled each round (overrides sample_fraction)"
    )
    min_replies: int = Field(
        1, ge=1, description="a round with fewer successful replies stops the run"
    )
    reply_timeout: float = Field(
        600.0,
        gt=0,
        description="Flower: seconds a round waits for replies; missing ones count as failed",
    )
    node_wait: float = Field(
        120.0,
        gt=0,
        description="Flower: seconds the server waits for `clients` SuperNodes to connect",
    )
    eval_every: int = Field(
        1, ge=1, description="evaluate the global model every k rounds (and at the end)"
    )
    eval_initial: bool | None = Field(
        None,
        description="score the untuned model before round 1 (None: for generation only)",
    )
    eval_clients: int | None = Field(
        100,
        ge=1,
        description="clients that score the final model on their local test rows, drawn once "
        "with the run seed (None: every client)",
    )
    batch_clients: int = Field(
        1,
        ge=1,
        description="local engine: train this many of a round's clients in one forward pass a "
        "step, each example through its own client's tensors (methods that train Linear "
        "tensors by local backprop without DP: lora, head); 1: one after another",
    )
    count_flops: bool = Field(
        False,
        description="count each client's floating-point operations (torch's FlopCounterMode: "
        "matmuls, convolutions, attention; not elementwise ops) into the metrics",
    )
    secure_aggregation: bool = Field(
        False,
        description="Flower: the server learns only the weighted sum of the clients' updates, "
        "never one client's (Flower's SecAgg+ workflow and client mod, with its quantization); "
        "for methods whose server needs only that sum (full, head, bias, adapter, prompt, lora "
        "with one rank and aggregation=mean); the local engine refuses it (no separate parties)",
    )
    secagg_clip_range: float = Field(
        1.0,
        gt=0,
        description="SecAgg+: every value of a client's update (trained minus sent) must lie "
        "within this range either side of zero; quantization steps are 2 x range / 2^22",
    )
    secagg_max_weight: float = Field(
        1000.0,
        gt=0,
        description="SecAgg+: the largest training-row count a client weighs with (Flower's "
        "max_weight); an update is scaled by rows / max_weight before quantization",
    )
    server_optimizer: Literal["fedavg", "fedavgm", "fedadam"] = Field(
        "fedavg", description="how the server applies the mean update"
    )
    server_lr: float = Field(
        1.0, gt=0, description="server learning rate (1.0 with fedavg: plain weighted mean)"
    )
    server_momentum: float = Field(
        0.9, ge=0, lt=1, description="momentum for fedavgm; beta1 for fedadam"
    )
    server_beta2: float = Field(0.99, gt=0, lt=1, description="beta2 for fedadam")
    server_eps: float = Field(1e-3, gt=0, description="epsilon (tau) for fedadam")


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="local epochs per round")
    max_steps: int | None = Field(
        None, ge=1, description="local steps per round (overrides epochs)"
    )
    batch_size: int = Field(16, ge=1, description="local batch size")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="client optimizer")
    lr: float | None = Field(
        None, gt=0, description="client learning rate (None: the method's default)"
    )
    weight_decay: float = Field(0.0, ge=0, description="client weight decay")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the local gradient norm (None: off)"
    )
    group_by_length: bool = Field(
        True,
        description="generation: batches of rows of similar length (less padding); no effect on "
        "classification or on DP's Poisson batches",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the backward pass (Hugging Face "
        "models): activation memory of one block, about one more forward of time; local "
        "backprop steps (not DP-SGD's)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: autocast the training forward and loss to bfloat16 where the device "
        "supports it (weights, gradients and optimizer stay fp32); local backprop steps",
    )


class PrivacyConfig(Section):
    mode: Literal["none", "sample", "client"] = Field(
        "none",
        description=(
            "'none'; 'sample': example-level DP-SGD on each client (Opacus; for zo: noise on the "
            "clipped per-example scalar); 'client': client-level DP-FedAvg (clipped updates, "
            "server noise)"
        ),
    )
    epsilon: float | None = Field(
        None,
        gt=0,
        description="target epsilon per client over the whole run (calibrates the noise)",
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="target delta")
    noise_multiplier: float | None = Field(
        None, gt=0, description="explicit noise multiplier (None: calibrated from epsilon)"
    )
    clip: float = Field(
        1.0,
        gt=0,
        description=(
            "L2 clipping bound: per example gradient ('sample'; zo: its projected-gradient "
            "scalars), per client update ('client')"
        ),
    )
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant")
    clipping: Literal["auto", "per_example", "ghost"] = Field(
        "auto",
        description=(
            "'sample' DP-SGD: 'per_example' materializes each example's gradient (Opacus "
            "GradSampleModule); 'ghost' computes only their norms and backpropagates twice "
            "(Opacus ghost clipping: memory of a plain step, about twice its time); auto: ghost "
            "where the per-example gradients would pass 1 GB"
        ),
    )
    reproducible_noise_not_private: bool = Field(
        False,
        description=(
            "tests only: draw DP noise and sampling from the run seed, so a run replays; anyone "
            "who knows the seed can remove the noise, so the run is marked NOT PRIVATE and its "
            "epsilon is no guarantee (default: secret randomness from the OS)"
        ),
    )

    @model_validator(mode="after")
    def _target_or_noise(self) -> PrivacyConfig:
        if self.mode != "none" and self.epsilon is None and self.noise_multiplier is None:
            raise ValueError(
                f"privacy.mode={self.mode} needs privacy.epsilon (a target) or privacy.noise_multiplier"
            )
        return self


class MethodConfig(BaseModel):
    """`name` plus the method's own options, validated by the method plug-in."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("lora", description="method plug-in (see `fedft methods`)")

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(Section):
    name: str | None = Field(
        None,
        description="run folder name under output_dir (None: <method>-<data>, numbered if taken)",
    )
    output_dir: str = Field("runs", description="where run folders go")
    seed: int = Field(0, description="one seed gives one result on the local engine")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when present"
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        """A run's name is one folder inside output_dir: nothing fedft writes or deletes may lie
        outside it."""
        if name is None:
            return None
        if name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{name!r} is not a folder name: give one path component (no '/', not '.' or "
                "'..', not empty), e.g. --name my-run"
            )
        return name

    @model_validator(mode="after")
    def _caps_that_would_be_silent(self) -> RunConfig:
        f = self.federation
        if f.sample_count is not None and f.sample_count > f.clients:
            raise ValueError(
                f"federation.sample_count={f.sample_count} is more than federation.clients="
                f"{f.clients}; sample at most every client"
            )
        per_round = f.sample_count or math.ceil(f.sample_fraction * f.clients)
        if self.privacy.mode != "client" and f.min_replies > per_round:
            raise ValueError(
                f"federation.min_replies={f.min_replies} is more than the {per_round} clients "
                "sampled per round, so every round would stop the run; lower it or sample more"
            )
        return self

    @model_validator(mode="after")
    def _check_method(self) -> RunConfig:
        from fedft.methods import get_method

        plugin = get_method(self.method.name)
        validated = plugin.validate_options(self.method.options())
        for key, value in validated.items():
            setattr(self.method, key, value)
        return self

    def method_options(self) -> Any:
        """The method's typed options object."""
        from fedft.methods import get_method

        return get_method(self.method.name).options_model(**self.method.options())


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "config"
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown field; see `fedft config` for the fields there are")
        elif not item["loc"]:  # a check across fields: its message names them
            lines.append(message)
        else:
            lines.append(f"{where}: {message} (got {item.get('input')!r})")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(
            f"--set {text!r}: write it as dotted.key=value, e.g. --set method.name=bias"
        )
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"--set {text!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def build_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """YAML file (if any), then `base` entries, then overrides in order; validated once at the end."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {path} is not valid YAML: {exc}".splitlines()[0]
            ) from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = loaded
    for dotted, value in (base or {}).items():
        apply_override(tree, dotted.split("."), value)
    for text in overrides or []:
        path_parts, value = parse_override(text)
        apply_override(tree, path_parts, value)
    return validate_config(tree)


def validate_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _yaml_value(value: Any) -> str:
    """A default as one line of YAML (a text with newlines stays one double-quoted line)."""
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_fields() -> str:
    """Defaults as YAML with each field's help as a comment (`fedft config`)."""
    from fedft.methods import available_methods, get_method

    out: list[str] = []

    def walk(model: type[BaseModel], indent: int) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            pad = "  " * indent
            if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not MethodConfig:
                out.append(f"{pad}{name}:")
                walk(ann, indent + 1)
                continue
            default = field.get_default(call_default_factory=True)
            if ann is MethodConfig:
                out.append(f"{pad}{name}:")
                out.append(
                    f"  {pad}name: {default.name}  # {MethodConfig.model_fields['name'].description}"
                )
                for mname in available_methods():
                    opts = get_method(mname).options_model
                    for oname, ofield in opts.model_fields.items():
                        val = _yaml_value(ofield.get_default(call_default_factory=True))
                        out.append(f"  {pad}# {oname}: {val}  # [{mname}] {ofield.description}")
                continue
            out.append(f"{pad}{name}: {_yaml_value(default)}  # {field.description}")

    walk(RunConfig, 0)
    return "\n".join(out)
