"""A real OpenAI-compatible model server for tests: `transformers serve` on CPU, serving a tiny
random Gemma 3 folder, and a small recording proxy in front of it.

The proxy forwards every request to the real server and records how many were in flight at
once. It can also make the server look slow, busy (429/503) or refusing (400), and it can put a
well-formed answer in place of the random model's text: a trained model is what this machine
cannot have (no weights can be downloaded), so that one substitution stands in for it; the
request itself is still served by the real server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dicom_node.local_stack.procs import free_port, stop


def transformers_cli() -> list[str]:
    return [str(Path(sys.executable).with_name("transformers")), "serve"]


@dataclass
class ModelServer:
    weights: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def served_model(self) -> str:
        return str(self.weights)  # transformers serve names a local model by its path

    def start(self, timeout: float = 180.0) -> "ModelServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "transformers-serve.log", "ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [*transformers_cli(), str(self.weights), "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited {self.proc.returncode}; see {self.workdir / 'transformers-serve.log'}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    if json.load(resp)["data"][0]["status"]["value"] == "loaded":
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"transformers serve did not come up in {timeout:.0f} s; see {self.workdir / 'transformers-serve.log'}")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, timeout=20)
            self.proc = None


@dataclass
class Behaviour:
    delay_s: float = 0.0  # before forwarding
    status: int | None = None  # answer this status instead of forwarding
    message: str = "overloaded"
    answer: str | None = None  # replace the model's text with this (stands in for a trained model)
    version: str | None = None  # answer GET /version like vLLM / SGLang / trtllm-serve (transformers serve has none)


class RecordingProxy:
    """Forwards to the model server; counts requests and the most in flight at once."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.behaviour = Behaviour()
        self.lock = threading.Lock()
        # Requests are counted per reset() generation: a request an earlier test gave up on (its
        # timeout) may still be held here and must not count as in flight for the next test.
        self.generation = 0
        self.in_flight: dict[int, int] = {}
        self.max_in_flight = 0
        self.requests: list[dict] = []  # the JSON bodies of chat completion requests
        self.authorizations: list[str] = []  # their Authorization headers
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._forward(body)

            def _forward(self, body: bytes | None) -> None:
                chat = self.path.endswith("/chat/completions")
                with proxy.lock:
                    generation = proxy.generation
                    proxy.in_flight[generation] = proxy.in_flight.get(generation, 0) + chat  # comparisons only
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight[generation])
                    if chat and body:
                        proxy.requests.append(json.loads(body))
                        proxy.authorizations.append(self.headers.get("Authorization", ""))
                try:
                    b = proxy.behaviour
                    if chat and b.delay_s:
                        time.sleep(b.delay_s)
                    if self.path == "/version" and b.version:
                        return self._reply(200, json.dumps({"version": b.version}).encode(), {})
                    if chat and b.status is not None:
                        return self._reply(b.status, json.dumps({"detail": b.message}).encode(), {})
                    req = urllib.request.Request(f"http://127.0.0.1:{proxy.upstream}{self.path}", data=body,
                                                 method=self.command, headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(req, timeout=300) as resp:
                            status, data, headers = resp.status, resp.read(), dict(resp.headers)
                    except urllib.error.HTTPError as exc:
                        status, data, headers = exc.code, exc.read(), dict(exc.headers)
                    if chat and status == 200 and b.answer is not None:
                        doc = json.loads(data)
                        doc["choices"][0]["message"]["content"] = b.answer
                        data = json.dumps(doc).encode()
                    self._reply(status, data, {"server": headers.get("server", "")})
                finally:
                    with proxy.lock:
                        proxy.in_flight[generation] -= chat

            def _reply(self, status: int, data: bytes, headers: dict) -> None:
                try:
                    self.send_response_only(status)  # no Server header of ours: the upstream's is passed on
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in headers.items():
                        if v:
                            self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self, **behaviour) -> None:
        with self.lock:
            self.behaviour = Behaviour(**behaviour)
            self.generation += 1
            self.max_in_flight = 0
            self.requests.clear()
            self.authorizations.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Served:
    """The session's model server, the proxy in front of it, and the model folder it serves."""

    server: ModelServer
    proxy: RecordingProxy
    folder: Path

    def settings_env(self, **extra: str) -> dict[str, str]:
        """DICOM_NODE_* variables pointing a node at the proxy with backend openai."""
        return {"DICOM_NODE_VLM_BACKEND": "openai", "DICOM_NODE_VLM_BASE_URL": self.proxy.base_url,
                "DICOM_NODE_VLM_SERVED_MODEL": self.server.served_model, **extra}


def start_served(root: Path) -> Served:
    from inference.vlm.tiny import write_serving_files, write_tiny_model

    folder = write_tiny_model(root, "gemma3", name="tiny-gemma-served", max_new_tokens=8)
    server = ModelServer(write_serving_files(folder), root / "server").start()
    return Served(server, RecordingProxy(server.port), folder)
