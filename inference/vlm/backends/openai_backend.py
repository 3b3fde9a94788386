"""`openai`: the comparison sent to a model server's OpenAI-compatible /v1/chat/completions.

The serving engine (TensorRT-LLM / NIM, vLLM, SGLang, `transformers serve`) does the batching,
the KV cache and the GPU; this process only builds the messages, keeps up to
`max_concurrency` requests in flight so the engine can batch them, and maps the server's
errors onto the pipeline's classes: a server that is down, busy or slow is
ModelServerUnavailable (retried by time), a request it refuses is ModelServerRejected
(permanent, with the server's own message). Imports neither torch nor transformers.
"""

from __future__ import annotations

import base64
import copy
import io
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..errors import BackendUnavailableError, ModelServerRejected, ModelServerUnavailable
from ..prompting import ImageSlot, Prompt
from ..schema import OUTPUT_SCHEMA
from ..spec import ModelSpec
from .options import BackendOptions, ServerOptions, Timings

log = logging.getLogger(__name__)
# Statuses worth another try later: the server is overloaded, restarting or behind a proxy that is.
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
SCHEMA_NAME = "comparison_findings"


def response_format() -> dict[str, Any]:
    """`json_schema` structured output from schema.OUTPUT_SCHEMA (vLLM, SGLang, TensorRT-LLM honour it;
    a server that ignores it still goes through parsing's validation, repair and fallback)."""
    schema = copy.deepcopy(OUTPUT_SCHEMA)

    def closed(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                node.setdefault("additionalProperties", False)
            for value in node.values():
                closed(value)
        elif isinstance(node, list):
            for value in node:
                closed(value)

    closed(schema)
    return {"type": "json_schema", "json_schema": {"name": SCHEMA_NAME, "schema": schema, "strict": True}}


def png_data_url(pixels: np.ndarray, side: int | None = None, zoom: bool = False) -> str:
    """uint8 (rows, cols) as a PNG data URL; zoom: scaled up to side x side (a crop should fill the
    encoder's input), else scaled down so the longer side is at most `side` (smaller requests)."""
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L")
    if side:
        if zoom:
            img = img.resize((side, side), Image.BICUBIC)
        elif max(img.size) > side:
            scale = side / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Completion:
    """One answer from the server, with what the SR and the job record about who wrote it."""

    text: str
    served_model: str  # the name the server says answered (response `model`)
    server_version: str  # system_fingerprint, the server's /version, or its Server header
    latency_s: float
    ttft_s: float | None = None  # streaming only: time to the first content token
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value
            if value:
                return str(value)
    return str(getattr(exc, "message", "") or exc)


class OpenAIBackend:
    name = "openai"

    def __init__(self, spec: ModelSpec, options: BackendOptions | None = None):
        self.spec = spec
        self.options = options or BackendOptions()
        server = self.options.server
        if server is None or not server.base_url:
            raise BackendUnavailableError("backend 'openai' needs the model server's address: set vlm_base_url "
                                          "(e.g. http://model-server:8000/v1)")
        if server.max_concurrency < 1:
            raise BackendUnavailableError(f"vlm_max_concurrency must be >= 1, got {server.max_concurrency}")
        self.server: ServerOptions = server
        self.served_model = server.served_model or spec.name
        self.server_version = ""
        self._version_asked = False
        self.last = Timings()
        self._client: Any = None
        self._slots = threading.BoundedSemaphore(server.max_concurrency)

    # --- lifecycle ---------------------------------------------------------------------
    def load(self) -> "OpenAIBackend":
        if self._client is None:
            import openai

            # No client-side retries: the pipeline retries by time (retry.py), the CLI reports at once.
            self._client = openai.OpenAI(base_url=self.server.base_url.rstrip("/"), api_key=self.server.api_key or "EMPTY",
                                         timeout=self.server.timeout_s, max_retries=0)
        return self

    def language_model_compiler(self) -> str:
        return f"model server at {self.server.base_url}"

    def warm_up(self, prompt: Prompt | None = None) -> None:
        self.probe()

    def probe(self) -> list[str]:
        """Readiness: the server answers /v1/models and serves our model. Returns the served names."""
        self.load()
        try:
            models = [m.id for m in self._client.models.list()]
        except Exception as exc:  # noqa: BLE001 - mapped onto our classes
            raise self._map(exc) from None
        if models and self.served_model not in models:
            raise ModelServerRejected(f"model server at {self.server.base_url} serves {models}, not {self.served_model!r}; "
                                      "set vlm_served_model to one of them")
        self._learn_version()
        return models

    def _learn_version(self) -> None:
        if not self._version_asked:
            self._version_asked = True  # once per process: it is the same server
            self.server_version = self._version()

    def _version(self) -> str:
        """The server's /version (vLLM, SGLang, trtllm-serve), when it has one."""
        root = self.server.base_url.rstrip("/").removesuffix("/v1")
        try:
            got = self._client.get(f"{root}/version", cast_to=object)
        except Exception:  # noqa: BLE001 - optional endpoint
            return ""
        if isinstance(got, dict) and got.get("version"):
            return str(got["version"])
        return ""

    # --- the request --------------------------------------------------------------------
    def messages(self, prompt: Prompt) -> list[dict[str, Any]]:
        """System text, then the user turn: the prompt's text parts and its images (PNG data URLs) in order."""
        parts = list(prompt.parts)
        system = parts.pop(0) if parts and isinstance(parts[0], str) else ""
        content: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, ImageSlot):
                crop = part.role.endswith("_crop")
                url = png_data_url(part.pixels, self.spec.crop_size if crop else self.spec.image_size, zoom=crop)
                content.append({"type": "image_url", "image_url": {"url": url}})
            elif content and content[-1]["type"] == "text":
                content[-1]["text"] += "\n" + part
            else:
                content.append({"type": "text", "text": part})
        out: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        return out + [{"role": "user", "content": content}]

    def request(self, prompt: Prompt, max_new_tokens: int | None = None) -> dict[str, Any]:
        return {
            "model": self.served_model,
            "messages": self.messages(prompt),
            "max_tokens": max_new_tokens or self.spec.max_new_tokens,
            "temperature": 0.0,
            "response_format": response_format(),
        }

    def complete(self, prompt: Prompt, max_new_tokens: int | None = None, stream: bool = False,
                 extra_body: dict[str, Any] | None = None) -> Completion:
        """One comparison, one request; at most max_concurrency of these run at once in this process.
        extra_body: engine-specific fields (e.g. vLLM's ignore_eos for the benchmark)."""
        self.load()
        body = self.request(prompt, max_new_tokens)
        if extra_body:
            body["extra_body"] = extra_body
        with self._slots:
            t0 = time.perf_counter()
            try:
                if stream:
                    return self._stream(body, t0)
                raw = self._client.chat.completions.with_raw_response.create(**body)
                resp = raw.parse()
            except (ModelServerUnavailable, ModelServerRejected):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped onto our classes
                raise self._map(exc) from None
            latency = time.perf_counter() - t0
        self._learn_version()
        if not resp.choices:
            raise ValueError(f"model server at {self.server.base_url} answered with no choices")
        usage = resp.usage
        version = resp.system_fingerprint or self.server_version or self._header_version(raw.headers)
        return Completion(resp.choices[0].message.content or "", resp.model or self.served_model, version, latency,
                          None, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    def _stream(self, body: dict[str, Any], t0: float) -> Completion:
        raw = self._client.chat.completions.with_raw_response.create(
            **body, stream=True, stream_options={"include_usage": True})
        text, ttft, model, fingerprint, usage, chunks = [], None, "", "", None, 0
        for chunk in raw.parse():
            model = chunk.model or model
            fingerprint = chunk.system_fingerprint or fingerprint
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(choice.delta.content)
                    chunks += 1
        latency = time.perf_counter() - t0
        self._learn_version()
        version = fingerprint or self.server_version or self._header_version(raw.headers)
        return Completion("".join(text), model or self.served_model, version, latency, ttft,
                          usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else chunks)

    @staticmethod
    def _header_version(headers: Any) -> str:
        server = headers.get("server") if headers is not None else None
        return f"server={server}" if server else ""

    def complete_many(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None) -> list[Completion]:
        """All prompts at once (up to max_concurrency in flight): the server batches them."""
        if len(prompts) == 1:
            return [self.complete(prompts[0], max_new_tokens)]
        with ThreadPoolExecutor(min(len(prompts), self.server.max_concurrency), thread_name_prefix="vlm-request") as pool:
            return list(pool.map(lambda p: self.complete(p, max_new_tokens), prompts))

    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int | None = None, ignore_eos: bool = False) -> list[str]:
        t0 = time.perf_counter()
        done = self.complete_many(prompts, max_new_tokens)
        self.last = Timings(0.0, time.perf_counter() - t0, sum(c.completion_tokens for c in done))
        return [c.text for c in done]

    # --- errors --------------------------------------------------------------------------
    def _map(self, exc: Exception) -> Exception:
        import openai

        where = f"model server at {self.server.base_url}"
        if isinstance(exc, openai.APITimeoutError):
            return ModelServerUnavailable(f"{where} did not answer within vlm_timeout_seconds={self.server.timeout_s:g}")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__ or exc
            return ModelServerUnavailable(f"cannot reach {where}: {cause}")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            message = _server_message(exc)
            if status in TRANSIENT_STATUSES:
                return ModelServerUnavailable(f"{where} answered {status}: {message}")
            return ModelServerRejected(f"{where} refused the request ({status}): {message}")
        return exc
