"""The large model as a black box: text in, logits over a declared output space out.

Nothing in `fedpt` reads the large model's weights or gradients; it only calls a `LogitsSource`.
Two kinds of large model: a classifier (texts in, logits over labels out: `LogitsSource`) and a
causal LM (token ids in, next-token logits over its vocabulary out: `SequenceLogitsSource`). Each
comes as a local transformers model (the default) or an HTTP endpoint (`serve_logits` puts any
source behind one). `CountingCache` sits in front of a classifier: it is frozen, so an input is
asked once; `QueryCounter` in front of a causal LM. Every query that goes out is counted with its
bytes.
"""

from __future__ import annotations

import inspect
import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import torch
from torch import nn

from fedft.errors import ModelError
from fedft.models.backbone import TaskModel


@dataclass(frozen=True)
class OutputSpace:
    """What the logits range over: class labels (classification) or a tokenizer's vocabulary."""

    kind: str  # "labels" | "tokens"
    names: tuple[str, ...]

    def describe(self) -> str:
        shown = ", ".join(self.names[:6]) + (", ..." if len(self.names) > 6 else "")
        return f"{len(self.names)} {self.kind} ({shown})"


def check_same_space(large: OutputSpace, small: OutputSpace) -> None:
    if large != small:
        raise ModelError(
            f"method 'fedpt': the large model answers over {large.describe()} but the small model "
            f"over {small.describe()}; proxy-tuning adds their logits, so both need one output "
            "space (the same labels in the same order, or one shared tokenizer)"
        )


class LogitsSource(Protocol):
    """A classifier: texts in, logits over labels out."""

    space: OutputSpace

    def logits(self, texts: list[str]) -> torch.Tensor: ...


class SequenceLogitsSource(Protocol):
    """A causal LM: token ids in (its tokenizer's, right- or left-padded), next-token logits over
    its vocabulary at the last `keep` positions out, [B, keep, V] float32."""

    space: OutputSpace

    def sequence_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
    ) -> torch.Tensor: ...


def vocabulary_space(tokenizer: Any, vocab_size: int) -> OutputSpace:
    """A causal LM's output space: its tokens, in id order (padded rows of the embedding matrix
    beyond the tokenizer get placeholder names, so two models agree only if both agree)."""
    known = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    extra = [f"<unused {i}>" for i in range(len(known), vocab_size)]
    return OutputSpace("tokens", tuple(known) + tuple(extra))


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: left padding (generation) gets the same
    positions as the unpadded row, right padding those the model would give it anyway."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class LocalCausalLM:
    """A causal LM in this process (any transformers `*ForCausalLM`, LoRA injected or not), used
    only through its logits.

    Decoding asks for the next token of sequences that grow by one token a step. Between
    `begin_decoding()` and `end_decoding()` the source keeps its key/value cache and runs only the
    new tokens when a call extends the previous call's ids; outside a decoding session every call
    runs the whole sequence (the weights may have changed in between)."""

    def __init__(self, net: nn.Module, tokenizer: Any):
        self.net = net
        self.space = vocabulary_space(tokenizer, int(net.config.vocab_size))
        self._decoding = False
        self._ids: torch.Tensor | None = None
        self._past: Any = None

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def sequence_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
    ) -> torch.Tensor:
        was = self.net.training
        self.net.eval()
        try:
            device = self._device()
            mask = attention_mask.to(device)
            out = self.net(
                input_ids=input_ids.to(device),
                attention_mask=mask,
                position_ids=positions(mask),
                logits_to_keep=keep,
                use_cache=False,
            )
        finally:
            self.net.train(was)
        return out.logits[:, -keep:].float()

    def _cache_argument(self) -> str:
        return (
            "cache"
            if "cache" in inspect.signature(self.net.forward).parameters
            else "past_key_values"
        )

    def begin_decoding(self) -> None:
        self._decoding, self._ids, self._past = True, None, None

    def end_decoding(self) -> None:
        self._decoding, self._ids, self._past = False, None, None

    @torch.inference_mode()
    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, V]: the logits of the token after `input_ids`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not self._decoding:
            return self.sequence_logits(input_ids, attention_mask, 1)[:, -1]
        device = self._device()
        ids, mask = input_ids.to(device), attention_mask.to(device)
        seen = 0 if self._ids is None else self._ids.shape[1]
        extends = (
            self._ids is not None
            and ids.shape[0] == self._ids.shape[0]
            and ids.shape[1] > seen
            and torch.equal(ids[:, :seen], self._ids)
        )
        if not extends:
            seen, self._past = 0, None
        was = self.net.training
        self.net.eval()
        try:
            out = self.net(
                input_ids=ids[:, seen:],
                attention_mask=mask,
                position_ids=positions(mask)[:, seen:],
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_argument(): self._past},
            )
        finally:
            self.net.train(was)
        # transformers 5 names the cache `cache`; earlier releases `past_key_values`
        self._ids = ids
        self._past = out.get("cache", None) or out.get("past_key_values", None)
        return out.logits[:, -1].float()


def next_token_logits(
    source: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The next-token logits of any sequence source (a local one may reuse its cache)."""
    if hasattr(source, "next_token_logits"):
        return source.next_token_logits(input_ids, attention_mask)
    return source.sequence_logits(input_ids, attention_mask, 1)[:, -1]


class LocalModelSource:
    """A classifier held in this process, used only through its outputs."""

    def __init__(self, model: TaskModel, device: torch.device, batch_size: int = 64):
        self._model = model.eval()
        self._device = device
        self._batch_size = batch_size
        self.space = OutputSpace("labels", tuple(model.label_names))

    @torch.inference_mode()
    def logits(self, texts: list[str]) -> torch.Tensor:
        pre = self._model.preprocess
        out = []
        for start in range(0, len(texts), self._batch_size):
            enc = pre.tokenizer(
                texts[start : start + self._batch_size],
                padding=True,
                truncation=True,
                max_length=pre.max_length,
                return_tensors="pt",
            )
            batch = {
                k: v.to(self._device)
                for k, v in enc.items()
                if k in ("input_ids", "attention_mask")
            }
            out.append(self._model(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.space.names))


class HttpLogitsSource:
    """A served model: GET {url}/info gives its output space, POST {url}/logits answers
    {"texts": [...]} with {"logits": [[...], ...]}."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.last_bytes = 0
        info = self._call("/info", None)
        space = info.get("output_space", {})
        self.space = OutputSpace(str(space.get("kind", "labels")), tuple(space.get("names", ())))

    def _call(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ModelError(f"method.large_url: {self.url}{path} did not answer ({exc})") from exc
        self.last_bytes = len(raw) + (len(data) if data else 0)
        return json.loads(raw)

    def logits(self, texts: list[str]) -> torch.Tensor:
        answer = self._call("/logits", {"texts": texts})
        return torch.tensor(answer["logits"], dtype=torch.float32).reshape(len(texts), -1)

    def sequence_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
    ) -> torch.Tensor:
        """POST {url}/sequence_logits with the ids, mask and k as JSON; the answer is raw
        little-endian float32 [B, k, V] (a vocabulary of 49k floats a position is too much JSON)."""
        body = {
            "input_ids": input_ids.tolist(),
            "attention_mask": attention_mask.tolist(),
            "keep": int(keep),
        }
        raw = self._post_binary("/sequence_logits", body)
        shape = (input_ids.shape[0], keep, len(self.space.names))
        if len(raw) != 4 * shape[0] * shape[1] * shape[2]:
            raise ModelError(
                f"method.large_url: {self.url} answered {len(raw)} bytes for logits of shape "
                f"{shape} (float32)"
            )
        return torch.frombuffer(bytearray(raw), dtype=torch.float32).view(shape).clone()

    def _post_binary(self, path: str, body: dict) -> bytes:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise ModelError(f"method.large_url: {self.url}{path} did not answer ({exc})") from exc
        self.last_bytes = len(raw) + len(data)
        return raw


class CountingCache:
    """Asks the source only for inputs it has not answered before; counts queries and bytes.

    Bytes: what an HTTP source actually moved, else the UTF-8 texts sent plus float32 logits."""

    def __init__(self, source: LogitsSource):
        self.source = source
        self.space = source.space
        self.cache: dict[str, torch.Tensor] = {}
        self.queries = 0
        self.query_bytes = 0

    def logits(self, texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if missing:
            answer = self.source.logits(missing)
            if answer.shape != (len(missing), len(self.space.names)):
                raise ModelError(
                    f"method 'fedpt': the large model answered shape {tuple(answer.shape)} for "
                    f"{len(missing)} inputs over {self.space.describe()}"
                )
            self.cache.update(zip(missing, answer, strict=True))
            self.queries += len(missing)
            sent = getattr(self.source, "last_bytes", 0)
            self.query_bytes += sent or (sum(len(t.encode()) for t in missing) + answer.numel() * 4)
        return torch.stack([self.cache[t] for t in texts])

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The answers and the counters, for a checkpoint: a resumed run must not ask the large
        model again what it already answered (a served model costs per query), and its counts
        go on from where they were. The texts travel as a UTF-8 JSON tensor, so the checkpoint's
        checksum covers them with the logits they key."""
        texts = list(self.cache)
        encoded = torch.frombuffer(bytearray(json.dumps(texts).encode()), dtype=torch.uint8)
        logits = (
            torch.stack([self.cache[t] for t in texts])
            if texts
            else torch.zeros(0, len(self.space.names))
        )
        counts = {"queries": self.queries, "query_bytes": self.query_bytes}
        return {"texts": encoded, "logits": logits}, counts

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> None:
        texts = json.loads(tensors["texts"].numpy().tobytes().decode())
        self.cache = dict(zip(texts, tensors["logits"], strict=True))
        self.queries = int(meta["queries"])
        self.query_bytes = int(meta["query_bytes"])


class QueryCounter:
    """Counts what a causal LM is asked: each sequence of a call is a query (decoding asks once
    a token), with its bytes (what an HTTP source moved, else int32 ids sent plus float32 logits
    returned). Nothing is kept: logits over a vocabulary are too big to cache, and decoding
    rarely asks the same sequence twice."""

    def __init__(self, source: SequenceLogitsSource):
        self.source = source
        self.space = source.space
        self.queries = 0
        self.query_bytes = 0

    def _count(self, ids: torch.Tensor, answer: torch.Tensor) -> None:
        self.queries += int(ids.shape[0])
        sent = getattr(self.source, "last_bytes", 0)
        self.query_bytes += sent or (ids.numel() * 4 + answer.numel() * 4)

    def sequence_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
    ) -> torch.Tensor:
        answer = self.source.sequence_logits(input_ids, attention_mask, keep)
        self._count(input_ids, answer)
        return answer

    def next_token_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        answer = next_token_logits(self.source, input_ids, attention_mask)
        self._count(input_ids, answer)
        return answer

    def begin_decoding(self) -> None:
        getattr(self.source, "begin_decoding", lambda: None)()

    def end_decoding(self) -> None:
        getattr(self.source, "end_decoding", lambda: None)()

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return {}, {"queries": self.queries, "query_bytes": self.query_bytes}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> None:
        self.queries = int(meta["queries"])
        self.query_bytes = int(meta["query_bytes"])


# --- serving a source over HTTP ------------------------------------------------------------------
def serve_logits(
    source: LogitsSource, host: str = "127.0.0.1", port: int = 0
) -> ThreadingHTTPServer:
    """Serve `source` on host:port (0: any free port) in a daemon thread; `.shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            space = source.space
            self._send({"output_space": {"kind": space.kind, "names": list(space.names)}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.rstrip("/").endswith("/sequence_logits"):
                answer = source.sequence_logits(
                    torch.tensor(body["input_ids"], dtype=torch.long),
                    torch.tensor(body["attention_mask"], dtype=torch.long),
                    int(body["keep"]),
                )
                raw = answer.float().cpu().contiguous().numpy().astype("<f4").tobytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)
                return
            self._send({"logits": source.logits(list(body["texts"])).tolist()})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
