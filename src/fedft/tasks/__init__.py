"""Tasks: what a batch means and how a model is scored. `classify` (a classification head: logits
over labels, accuracy) and `generate` (a causal LM: loss on the response, perplexity, Rouge-L,
label-word accuracy). Methods act on parameters and a loss and never branch on the task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedft.errors import ConfigError
from fedft.tasks.base import Task
from fedft.tasks.classify import Classify
from fedft.tasks.generate import Generate

if TYPE_CHECKING:
    from fedft.config import RunConfig
    from fedft.data.sources import RawData


def make_generate(cfg: RunConfig, raw: RawData, tokenizer: Any) -> Generate:
    """The generation task for the run's data (its rows say which kind: `raw.generation`)."""
    words = cfg.task.label_words
    if raw.generation == "labels":
        if words is None:
            words = list(raw.label_names)
        elif len(words) != raw.num_labels:
            raise ConfigError(
                f"task.label_words gives {len(words)} words but the data has {raw.num_labels} "
                f"classes ({', '.join(raw.label_names[:6])}); give one word per class, in order"
            )
    assert raw.generation is not None
    return Generate(
        tokenizer, cfg.model.max_length, cfg.task, raw.generation, list(words or []), cfg.seed
    )


__all__ = ["Classify", "Generate", "Task", "make_generate"]
