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
