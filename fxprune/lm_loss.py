"""A causal LM's next-token cross-entropy without its full logits tensor.

Hugging Face's ``model(input_ids=ids, labels=ids).loss`` materialises every logit (SmolLM2: 640
tokens x 49,152 vocabulary = 126 MB in fp32), runs ``log_softmax`` over it, and in backward zero-fills
and reads a tensor of the same size again. :func:`lm_loss_fn` computes the same loss from the
decoder's last hidden state in chunks of tokens: each chunk's logits, log-sum-exp, and the gradient
with respect to the hidden state ``(softmax - onehot) @ W`` are made in one go, so no logits outlive
their chunk and backward only scales a stored ``(tokens, hidden)`` tensor. The arithmetic is the
head's own two matmuls; what goes is memory: SmolLM2's Taylor pass peaks 300 MB lower and, in a
fresh process, runs 3-5% faster (2-core AMX Xeon; bench/pipeline.py has the numbers). In a process
that has run for a while the model's own loss gets slower as its large tensors are page-faulted in
anew (5.4 s against 4.0 s for the same pass), and this one does not.

The split ``loss(head(decoder(ids)))`` is used only where it reproduces the model's own logits on a
probe and the config names no soft-capping or logit scale (which the probe's small logits could
hide); otherwise the caller falls back to the model's loss.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .capture import call_extras, main_outputs
from .errors import CaptureError

CHUNK = 256  # tokens per chunk: SmolLM2's logits chunk is 50 MB in fp32
PROBE = 8  # tokens of the probe that confirms the split

# config fields of models that transform the head's output (Gemma-2/3, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

LossFn = Callable[[torch.Tensor], torch.Tensor]


class Buffers:
    """Logits-sized scratch tensors kept from one call to the next.

    A fresh tensor of that size is page-faulted in on its first write: a 256 x 49,152 fp32 copy took
    11-12 ms into a new tensor against 1.8 ms into a kept one (this 2-core Xeon)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, slot: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A ``(rows, cols)`` tensor for ``slot``, reused while large enough (contents undefined)."""
        held = self._held.get((slot, dtype, device))
        if held is None or held.shape[0] < rows or held.shape[1] != cols:
            held = self._held[(slot, dtype, device)] = torch.empty(rows, cols, dtype=dtype, device=device)
        return held[:rows]


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The module under the LM head and the head itself, or None for a model of another shape."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or not isinstance(base, nn.Module) or base is model:
        return None
    return base, head


def _hidden(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return main_outputs(decoder(input_ids=ids, **call_extras(decoder)))[0][0]  # last_hidden_state


def lm_loss_fn(model: nn.Module, ids: torch.Tensor) -> LossFn | None:
    """A function ``ids -> mean next-token cross-entropy`` (Hugging Face's ``labels=ids`` loss) that
    computes the LM head in chunks, or None when ``model`` is not a causal LM whose logits are
    ``head(decoder(ids))``. ``ids`` (token ids, ``(n, seqlen)``) supplies the probe that checks it."""
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.is_floating_point():
        return None
    parts = _decoder_and_head(model)
    if parts is None:
        return None
    decoder, head = parts
    config = getattr(model, "config", None)
    if any(getattr(config, a, None) not in (None, 1, 1.0) for a in LOGIT_TRANSFORMS):
        return None  # the probe's small logits could hide these
    probe = ids[:1, :PROBE]
    try:
        with torch.no_grad(), torch.autocast(probe.device.type, enabled=False):
            want = model(input_ids=probe, use_cache=False).logits.float()
            got = head(_hidden(decoder, probe)).float()
    except (TypeError, AttributeError, ValueError, RuntimeError, CaptureError):
        return None  # a decoder that cannot be called this way: keep the model's own loss
    # the same matmul on the same hidden state: anything but rounding means the model does more
    if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-5, atol=1e-6):
        return None

    buffers = Buffers()

    def loss(batch: torch.Tensor) -> torch.Tensor:
        hidden = _hidden(decoder, batch)[:, :-1]
        targets = batch[:, 1:].reshape(-1)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, CHUNK, buffers)

    return loss


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = CHUNK, buffers: Buffers | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T, targets)`` (mean over rows), differentiable in ``hidden``
    and ``weight``, made ``chunk`` rows at a time. Inside an autocast region the matmuls run in its
    dtype, as ``nn.Linear`` would; log-sum-exp and softmax run in float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk, dtype, buffers or Buffers())


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward makes the loss and both gradients; backward scales them by the incoming gradient.
    The chunk's logits live in ``buffers`` (every chunk, and every call, reuses them)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype | None, buffers: Buffers) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype or weight.dtype)
            h_all = hidden.detach()
            grad_h = torch.empty_like(h_all) if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            rows = min(chunk, n)
            logits_buf = buffers.get(0, rows, vocab, torch.float32, hidden.device)
            low_buf = buffers.get(1, rows, vocab, w.dtype, hidden.device) if w.dtype != torch.float32 else None
            for s in range(0, n, chunk):
                h = h_all[s : s + chunk].to(w.dtype)
                t = targets[s : s + chunk]
                m = len(t)
                logits = logits_buf[:m]
                if low_buf is None:
                    torch.mm(h, w.t(), out=logits)
                else:
                    logits.copy_(torch.mm(h, w.t(), out=low_buf[:m]))
                # log-sum-exp and softmax in place (torch.logsumexp makes a logits-sized temporary)
                picked = logits.gather(1, t[:, None]).squeeze(1)
                top = logits.amax(dim=-1, keepdim=True)
                sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
                total += (top + sums.log()).squeeze(1).sub_(picked).sum()
                if grad_h is None and grad_w is None:
                    continue
                probs = logits.div_(sums)
                probs[torch.arange(m, device=t.device), t] -= 1.0
                g = probs if low_buf is None else low_buf[:m].copy_(probs)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g @ w
                if grad_w is not None:
                    grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        return (None if grad_h is None else grad_h * scale.to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype),
                None, None, None, None)

