"""The large model as a black box: text in, logits over a declared output space out.

Nothing in `fedpt` reads the large model's weights or gradients; it only calls a `LogitsSource`.
Two sources: a local transformers model (the default), and an HTTP endpoint (`serve_logits` puts
any source behind one). `CountingCache` sits in front of either: the large model is frozen, so an
input is asked once, and every query that does go out is counted with its bytes.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import torch

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
    space: OutputSpace

    def logits(self, texts: list[str]) -> torch.Tensor: ...


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
            self._send({"logits": source.logits(list(body["texts"])).tolist()})

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
