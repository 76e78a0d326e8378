"""User-facing errors. The CLI prints these as one line and exits with code 2."""

from __future__ import annotations


class FxpruneError(Exception):
    """A problem with the user's input (model, options, files), not a bug in fxprune."""


class ModelLoadError(FxpruneError):
    """The model spec could not be found or read."""


class CaptureError(FxpruneError):
    """torch.export could not capture the model with the given example inputs."""


class PlanError(FxpruneError):
    """A plan or selection request cannot be applied to this model."""


class VerificationError(FxpruneError):
    """A produced artefact (pruned graph, ONNX file) does not match its reference."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type name when it has none: what a user error
    built from a library's exception quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
