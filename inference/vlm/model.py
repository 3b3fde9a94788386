"""The public VLM object: comparative prompting -> backend -> validated structured result."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ..types import ChangeRegion, ImageInput
from .backends import BackendOptions, load_backend
from .errors import ModelConfigError, ModelServerRejected, ModelServerUnavailable
from .parsing import fallback_result, parse_output
from .prompting import Prompt, PromptSet, build_prompt, load_prompt_set
from .schema import FLAG_BACKEND_ERROR, FLAG_SINGLE_IMAGE, VLMResult
from .spec import ModelSpec, resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareRequest:
    current: ImageInput
    prior: ImageInput | None
    regions: tuple[ChangeRegion, ...] = ()
    prior_report: str | None = None
    indication: str | None = None
    references: tuple[tuple[ImageInput, str], ...] = ()  # no prior: normal images of other people, and why matched
    older_priors: tuple[ImageInput, ...] = ()  # measured on too, oldest first (shown before the prior)


class VLM:
    def __init__(self, spec: ModelSpec, backend: Any, prompt_set: PromptSet | None = None):
        self.spec = spec
        self.backend = backend
        self.prompt_set = prompt_set or load_prompt_set(spec.prompt_set)

    @property
    def prompt_version(self) -> str:
        return f"{self.prompt_set.name}@{self.prompt_set.version}"

    def prompt(self, req: CompareRequest) -> Prompt:
        return build_prompt(self.prompt_set, req.current, req.prior, req.regions, req.prior_report,
                            req.indication, self.spec.max_regions, req.references, req.older_priors)

    def compare(self, current: ImageInput, prior: ImageInput | None, regions: Sequence[ChangeRegion] = (),
                prior_report: str | None = None, indication: str | None = None) -> VLMResult:
        return self.compare_many([CompareRequest(current, prior, tuple(regions), prior_report, indication)])[0]

    def compare_many(self, requests: Sequence[CompareRequest]) -> list[VLMResult]:
        """One backend batch for all requests (the Batcher's run function); with a model server, one
        request each, all in flight at once. A server that is down or refuses the request raises
        (ModelServerUnavailable / ModelServerRejected): the caller decides to retry or report."""
        prompts = [self.prompt(r) for r in requests]  # bad input (pixels) raises here, naming the problem
        served: list[Any] = [None] * len(prompts)
        t0 = time.perf_counter()
        try:
            if hasattr(self.backend, "complete_many"):
                served = self.backend.complete_many(prompts)
                texts = [c.text for c in served]
            else:
                texts = self.backend.run_batch(prompts)
        except (ModelServerUnavailable, ModelServerRejected):
            raise
        except Exception as exc:  # noqa: BLE001 - the worker keeps serving; result says the model failed
            log.exception("VLM backend %s failed on a batch of %d", self.backend.name, len(prompts))
            texts = [None] * len(prompts)
            err = f"{type(exc).__name__}: {exc}"
        batch_s = time.perf_counter() - t0
        results = []
        for req, prompt, text, done in zip(requests, prompts, texts, served):
            if text is None:
                res = fallback_result(req.regions, err)
                res.flags.append(FLAG_BACKEND_ERROR)
            else:
                res = parse_output(text, req.regions)
            if done is not None:
                res = replace(res, served_model=done.served_model, server_version=done.server_version)
            res = replace(res, latency_s=round(done.latency_s if done is not None else batch_s, 3))
            results.append(self._finish(res, prompt))
        return results

    def _finish(self, res: VLMResult, prompt: Prompt) -> VLMResult:
        flags = list(res.flags)
        if prompt.single_image and FLAG_SINGLE_IMAGE not in flags:
            flags.insert(0, FLAG_SINGLE_IMAGE)
        return replace(res, flags=flags, mode="single_image" if prompt.single_image else "comparison",
                       model=self.spec.name, prompt_set=prompt.prompt_set)


def load_model(model: str | os.PathLike, models_root: str | os.PathLike | None = None, backend: str = "torch",
               options: BackendOptions | None = None, warm_up: bool = False) -> VLM:
    """A ready VLM from the model repository (by name under models_root, or a folder path).

    backend "openai" needs no weights, and no model folder at all: without one (model empty)
    the server's model is described by its served name, with the default prompt set."""
    if backend == "openai":
        spec = resolve_model(model, models_root) if str(model) else served_spec(options)
    else:
        spec = resolve_model(model, models_root)
        spec.require_weights()
    vlm = VLM(spec, load_backend(spec, backend, options))
    if warm_up:
        import numpy as np

        img = ImageInput(np.zeros((64, 64), np.float32), (1.0, 1.0))
        vlm.backend.warm_up(vlm.prompt(CompareRequest(img, img)))
    return vlm


def served_spec(options: BackendOptions | None) -> ModelSpec:
    """The spec of a model known only by the name a server serves it under (no local folder)."""
    name = options.server.served_model if options and options.server else ""
    if not name:
        raise ModelConfigError("backend 'openai' without vlm_model needs vlm_served_model (the name the server serves)")
    return ModelSpec(name=name, folder=Path("."), family="served", weights_dir=Path("."))
