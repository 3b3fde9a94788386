"""Errors of the VLM layer. Each names the path / setting at fault and what was expected."""

from __future__ import annotations


class VLMError(Exception):
    """Base class: anything the node should report as a clear message, not a stack."""


class ModelConfigError(VLMError):
    """model.yaml missing, unreadable or with a wrong field."""


class ModelNotFoundError(VLMError):
    """The model folder or its weights directory is missing / incomplete."""


class BackendUnavailableError(VLMError):
    """The requested backend needs a library or device that is not present here."""


class EngineError(VLMError):
    """A compiled engine is missing or incompatible with this GPU / library stack."""


class ModelServerUnavailable(VLMError):
    """The model server cannot answer now (refused connection, timeout, 429, 503): worth a retry later."""


class ModelServerRejected(VLMError):
    """The model server refused the request itself (400 and other 4xx): retrying the same request cannot help."""
