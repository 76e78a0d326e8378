"""The dense model's layer inputs one layer at a time, in step with the pruned model's forward.

The sequential refit (obs, reconstruct) compares each consumer's input in the pruned model with
its input in the dense model over the same calibration windows. Collecting the dense inputs of
every consumer first holds them all at once: SmolLM2's 26 ``down_proj`` with their residual streams
take 28 MB a 128-token window, 6.6 GiB for 250 windows. :class:`DenseStepper` instead runs the dense
forward in a helper thread that stops at each consumer's first call and waits: the pruned
forward, reaching the same consumer, takes that one input and lets the dense forward go on to the
next. Only one consumer's dense input (and the stream beside it) is alive at a time.

The two threads never run together (each waits on a queue while the other works), so results are
the same arithmetic as collecting first; the helper thread sets its own ``no_grad`` (grad mode is
per thread). Consumers must be asked for in the order the dense forward calls them.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch import nn

from ..errors import FxpruneError
from .importance.taylor import run_batch
from .residual import StreamRecorder, Tap

_GO, _STOP = "go", "stop"


class _Halt(Exception):
    """Raised inside the dense forward when the stepper is closed early."""


class DenseStepper:
    """``inputs(path)`` -> (dense input rows, float32; the residual stream ``path`` writes back to,
    or None without a tap), advancing the dense forward of ``model`` over ``batch`` to ``path``.
    Use as a context manager (``close`` ends the helper thread)."""

    def __init__(self, model: nn.Module, paths: list[str], taps: dict[str, Tap], batch: Any) -> None:
        self._model, self._paths, self._taps, self._batch = model, list(paths), taps, batch
        self._resume: queue.Queue[str] = queue.Queue()
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._done = False

    def __enter__(self) -> DenseStepper:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def inputs(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._done:
            raise FxpruneError(f"dense forward already ended before {path}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fxprune-dense", daemon=True)
            self._thread.start()
        else:
            self._resume.put(_GO)
        kind, value = self._out.get()
        if kind == "error":
            self._done = True
            raise value
        if kind == "end":
            self._done = True
            raise FxpruneError(f"the dense model's forward did not call {path}")
        got, x, stream = value
        if got != path:
            self.close()
            raise FxpruneError(f"the dense model called {got} where {path} was expected: consumers out of order")
        return x, stream

    def close(self) -> None:
        """Stop the dense forward where it waits, and wait for its thread."""
        if self._thread is not None and self._thread.is_alive():
            self._resume.put(_STOP)
            self._thread.join()
        self._done = True

    def _run(self) -> None:
        seen: set[str] = set()
        recorder = StreamRecorder(self._model, {p: self._taps[p] for p in self._paths if p in self._taps})

        def hook_for(path: str):
            def hook(_mod: nn.Module, args: tuple) -> None:
                if path in seen:  # a module called twice: its first call counts
                    return
                seen.add(path)
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                self._out.put(("input", (path, x, recorder.take(path))))
                del x
                if self._resume.get() == _STOP:
                    raise _Halt
            return hook

        handles = [self._model.get_submodule(p).register_forward_pre_hook(hook_for(p)) for p in self._paths]
        try:
            with torch.no_grad():
                run_batch(self._model, self._batch)
            self._out.put(("end", None))
        except _Halt:
            pass
        except BaseException as exc:  # handed to the caller's thread, which raises it
            self._out.put(("error", exc))
        finally:
            for h in handles:
                h.remove()
            recorder.close()
