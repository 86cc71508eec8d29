"""Distillation losses on logits, and a memory-lean variant that never builds full logits.

Conventions shared by every function here:

- `student_logits` and `teacher_logits` have shape `[..., V]`; `labels` has the shape of the
  leading dimensions and is *aligned with the logits*: `labels[..., t]` is the token that
  `logits[..., t, :]` predicts. HF-style labels (the same positions as `input_ids`) need
  `shift_labels` first. Positions whose label is `ignore_index` (-100) do not count; with
  `labels=None` every position counts.
- `p = softmax(teacher_logits / T)` and `q = softmax(student_logits / T)`. Each divergence
  returns `T² · D`, the Hinton scaling that keeps gradient sizes comparable across
  temperatures, so a total loss is `(1 − kd_ratio) · CE + kd_ratio · forward_kl(...)`.
- `reduction`: `"mean"` over counted tokens (0 when there are none), `"sum"`, or `"none"`
  (per token, 0 at ignored positions).
- The divergence is computed in float32 (float64 inputs stay float64).

Divergences, per token, summed over the vocabulary:

    forward_kl   KL(p ‖ q) = Σ p (log p − log q)                   (torchtune, Hinton)
    reverse_kl   KL(q ‖ p) = Σ q (log q − log p)                   (MiniLLM)
    jsd(β)       [β KL(p ‖ m) + (1 − β) KL(q ‖ m)] / (β (1 − β)),  m = β p + (1 − β) q
                 β = 0 is exactly forward_kl and β = 1 exactly reverse_kl; the 1/(β(1 − β))
                 scale makes those limits continuous. `scaled=False` gives TRL GKD's
                 unscaled value (which vanishes as β → 0 or 1 except at the endpoints).
    skew_kl(α)   KL(p ‖ α p + (1 − α) q)                            (DistiLLM SKL)
    skew_rkl(α)  KL(q ‖ (1 − α) p + α q)                            (DistiLLM SRKL)
                 α = 0 gives forward_kl and reverse_kl respectively.

`chunked_distill_loss` computes CE and any divergence above from final hidden states and
output weights, chunk by chunk over tokens, so neither model's `B×T×V` logits ever exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl")
_CHUNK_ELEMENTS = 1 << 25  # logits per chunk when chunk_size is None: 128 MiB of float32


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """HF-style labels (aligned with input_ids) to labels aligned with the logits."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def _check_params(name: str, beta: float, alpha: float, temperature: float) -> None:
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; choose one of {', '.join(KD_LOSSES)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if name == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if name in ("skew_kl", "skew_rkl") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")


def _mix_log(lp: torch.Tensor, lq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1 − w)·q) from log p and log q, for 0 < w < 1."""
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def token_divergence(
    name: str,
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    scaled: bool = True,
) -> torch.Tensor:
    """The divergence per token from log-probabilities `[..., V]` (no temperature, no T²)."""
    lq, lp = student_logp, teacher_logp
    if name == "forward_kl" or (name == "skew_kl" and alpha == 0.0) or (name == "jsd" and beta == 0.0):
        return (lp.exp() * (lp - lq)).sum(-1)
    if name == "reverse_kl" or (name == "skew_rkl" and alpha == 0.0) or (name == "jsd" and beta == 1.0):
        return (lq.exp() * (lq - lp)).sum(-1)
    if name == "jsd":
        lm = _mix_log(lp, lq, beta)
        value = beta * (lp.exp() * (lp - lm)).sum(-1) + (1.0 - beta) * (lq.exp() * (lq - lm)).sum(-1)
        return value / (beta * (1.0 - beta)) if scaled else value
    if name == "skew_kl":
        if alpha == 1.0:
            return torch.zeros_like(lp[..., 0])
        return (lp.exp() * (lp - _mix_log(lp, lq, alpha))).sum(-1)
    if name == "skew_rkl":
        if alpha == 1.0:
            return torch.zeros_like(lq[..., 0])
        return (lq.exp() * (lq - _mix_log(lp, lq, 1.0 - alpha))).sum(-1)
    raise ValueError(f"unknown KD loss {name!r}; choose one of {', '.join(KD_LOSSES)}")


def _reduce(per_token: torch.Tensor, mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if mask is not None:
        per_token = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        count = per_token.numel() if mask is None else int(mask.sum())
        return per_token.sum() / max(count, 1)
    raise ValueError(f"unknown reduction {reduction!r}; choose mean, sum or none")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def kd_divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scaled: bool = True,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """`T² · D(teacher^T ‖ student^T)` for the divergence `name` (one of KD_LOSSES)."""
    _check_params(name, beta, alpha, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; slice both to the shared tokenizer's vocabulary"
        )
    t = float(temperature)
    lq = F.log_softmax(_upcast(student_logits) / t, dim=-1)
    lp = F.log_softmax(_upcast(teacher_logits).detach() / t, dim=-1)
    per_token = token_divergence(name, lq, lp, beta=beta, alpha=alpha, scaled=scaled) * (t * t)
    mask = None if labels is None else labels != ignore_index
    return _reduce(per_token, mask, reduction)


def forward_kl(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=IGNORE_INDEX, reduction="mean"):
    """`T² · KL(p ‖ q)`: the teacher's distribution is the target (mode-covering)."""
    return kd_divergence("forward_kl", student_logits, teacher_logits, labels, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction)


def reverse_kl(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=IGNORE_INDEX, reduction="mean"):
    """`T² · KL(q ‖ p)`: the student's distribution weighs the error (mode-seeking)."""
    return kd_divergence("reverse_kl", student_logits, teacher_logits, labels, temperature=temperature,
                         ignore_index=ignore_index, reduction=reduction)


def jsd(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0, scaled=True,
        ignore_index=IGNORE_INDEX, reduction="mean"):
    """`T² · JSD_β`, generalized Jensen-Shannon (GKD); see the module docstring for the scale."""
    return kd_divergence("jsd", student_logits, teacher_logits, labels, temperature=temperature, beta=beta,
                         scaled=scaled, ignore_index=ignore_index, reduction=reduction)


def skew_kl(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
            ignore_index=IGNORE_INDEX, reduction="mean"):
    """`T² · KL(p ‖ α p + (1 − α) q)`, DistiLLM's skew KL."""
    return kd_divergence("skew_kl", student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                         ignore_index=ignore_index, reduction=reduction)


def skew_rkl(student_logits, teacher_logits, labels=None, *, alpha=0.1, temperature=1.0,
             ignore_index=IGNORE_INDEX, reduction="mean"):
    """`T² · KL(q ‖ (1 − α) p + α q)`, DistiLLM's skew reverse KL."""
    return kd_divergence("skew_rkl", student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha,
                         ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------- memory-lean


@dataclass(kw_only=True)
class DistillLoss:
    """What `chunked_distill_loss` returns. Only `loss` carries gradients."""

    loss: torch.Tensor  # (1 − kd_ratio) · ce + kd_ratio · kd, reduced as asked
    ce: torch.Tensor  # cross-entropy of the student at temperature 1 (detached)
    kd: torch.Tensor  # T² · D(teacher^T ‖ student^T) (detached; 0 without a teacher)
    tokens: int  # tokens counted


@dataclass(kw_only=True, frozen=True)
class _Opts:
    kd_ratio: float
    kd_loss: str
    temperature: float
    beta: float
    alpha: float
    scaled: bool
    vocab_size: int
    chunk_size: int
    grad: bool = True  # False under torch.no_grad(): no gradient work in forward


def _chunk_loss(s: torch.Tensor, t: Optional[torch.Tensor], labels: torch.Tensor, o: _Opts, need_grad: bool):
    """Sums of CE and T²·D over one chunk of float logits, and d(total)/d(s) when asked.

    CE alone and forward KL (the default) use the closed form
    `d/ds = (1 − r)(softmax(s) − onehot) + r·T·(softmax(s/T) − softmax(t/T))`; the other
    divergences take autograd through the chunk.
    """
    T, r = o.temperature, (o.kd_ratio if t is not None else 0.0)
    rows = torch.arange(s.shape[0], device=s.device)
    if t is None or o.kd_loss == "forward_kl":
        ls = F.log_softmax(s, dim=-1)
        ce = -ls[rows, labels].sum()
        kd = torch.zeros((), dtype=s.dtype, device=s.device)
        if t is not None:
            lp = F.log_softmax(t / T, dim=-1)
            lq = ls if T == 1.0 else F.log_softmax(s / T, dim=-1)
            p = lp.exp()
            kd = (p * (lp - lq)).sum() * (T * T)
        if not need_grad:
            return ce, kd, None
        g = ls.exp_()  # softmax(s), in place: ls is no longer needed
        if t is not None and T == 1.0:
            g.sub_(p, alpha=r)  # (1 − r)·softmax + r·(softmax − p)
        elif t is not None:
            g.mul_(1.0 - r).add_(lq.exp_().sub_(p), alpha=r * T)
        g[rows, labels] -= 1.0 - r
        return ce, kd, g
    with torch.enable_grad():
        s = s.detach().requires_grad_(need_grad)
        ce = F.cross_entropy(s, labels, reduction="sum")
        lq = F.log_softmax(s / T, dim=-1)
        kd = token_divergence(o.kd_loss, lq, F.log_softmax(t / T, dim=-1), beta=o.beta, alpha=o.alpha, scaled=o.scaled)
        kd = kd.sum() * (T * T)
        g = torch.autograd.grad((1.0 - r) * ce + r * kd, s)[0] if need_grad else None
    return ce.detach(), kd.detach(), g


class _ChunkedDistill(torch.autograd.Function):
    """Loss over counted tokens only, one chunk of rows at a time.

    Per chunk: both models' logits (`hidden @ weight[:V].T`, in the weights' dtype, then
    float32), CE and the divergence, and, when gradients are wanted, the gradient of the
    chunk's loss with respect to its logits, turned at once into the chunk's rows of
    d/d hidden and an accumulated d/d weight. The chunk's logits are then freed. Backward only
    scales the stored gradients, which have the size of the inputs; taking them during the
    forward pass is what makes a recompute of the logits in backward unnecessary.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, opts: _Opts):
        need_h, need_w = ctx.needs_input_grad[0] and opts.grad, ctx.needs_input_grad[1] and opts.grad
        V = opts.vocab_size
        ws = w_s[:V]
        wt = w_t[:V] if w_t is not None else None
        grad_h = torch.zeros_like(h_s) if need_h else None
        acc_dtype = torch.float64 if w_s.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device) if need_w else None
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        for start in range(0, h_s.shape[0], opts.chunk_size):
            rows = slice(start, start + opts.chunk_size)
            hs = h_s[rows]
            s_logits = _upcast(F.linear(hs, ws))
            t_logits = _upcast(F.linear(h_t[rows], wt)) if wt is not None else None
            ce, kd, g = _chunk_loss(s_logits, t_logits, labels[rows], opts, need_h or need_w)
            ce_sum += ce.double()
            kd_sum += kd.double()
            del s_logits, t_logits
            if g is not None:
                g = g.to(ws.dtype)
                if need_h:
                    grad_h[rows] = (g @ ws).to(grad_h.dtype)
                if need_w:
                    grad_w[:V].addmm_(g.t().to(grad_w.dtype), hs.to(grad_w.dtype))
                del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        loss = ce_sum * (1.0 - opts.kd_ratio) + kd_sum * opts.kd_ratio if wt is not None else ce_sum
        out = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        loss, ce_sum, kd_sum = loss.to(out), ce_sum.to(out), kd_sum.to(out)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: Optional[torch.Tensor] = None,
    teacher_weight: Optional[torch.Tensor] = None,
    *,
    kd_ratio: float = 0.5,
    kd_loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scaled: bool = True,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> DistillLoss:
    """`(1 − kd_ratio)·CE + kd_ratio·T²·D(teacher^T ‖ student^T)` without building full logits.

    `student_hidden` `[..., H]` are the student's final (normed) hidden states and
    `student_weight` `[V_s, H]` its output embedding; the teacher's likewise with its own
    hidden size. `labels` are aligned with the hidden states (see `shift_labels`). Only the
    first `vocab_size` rows of each weight are used (default: the smaller vocabulary), which
    drops the padding rows some model families add. Without a teacher the result is plain CE.
    Gradients flow to `student_hidden` and `student_weight` (if they require them); the
    teacher's inputs are treated as constants. `chunk_size` rows are processed at a time
    (default: about 2^25 logits per chunk). `reduction` is "mean" or "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_distill_loss supports reduction 'mean' or 'sum', got {reduction!r}")
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass both teacher_hidden and teacher_weight, or neither")
    has_teacher = teacher_hidden is not None
    if has_teacher:
        _check_params(kd_loss, beta, alpha, temperature)
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    H = student_hidden.shape[-1]
    if student_weight.shape[-1] != H:
        raise ValueError(f"student hidden size {H} does not match its weight {tuple(student_weight.shape)}")
    flat_labels = labels.reshape(-1)
    h_s = student_hidden.reshape(-1, H)
    if h_s.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"{h_s.shape[0]} student positions but {flat_labels.shape[0]} labels")
    V = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0] if has_teacher else student_weight.shape[0])
    if V > student_weight.shape[0] or (has_teacher and V > teacher_weight.shape[0]):
        raise ValueError(f"vocab_size {V} is larger than a model's output vocabulary")
    keep = (flat_labels != ignore_index).nonzero().squeeze(-1)
    n = int(keep.numel())
    h_s = h_s.index_select(0, keep)
    h_t = None
    if has_teacher:
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if h_t.shape[0] != flat_labels.shape[0]:
            raise ValueError(f"{h_t.shape[0]} teacher positions but {flat_labels.shape[0]} labels")
        h_t = h_t.detach().index_select(0, keep)
        teacher_weight = teacher_weight.detach()
    kept_labels = flat_labels.index_select(0, keep)
    if n and int(kept_labels.max()) >= V:
        raise ValueError(f"a label id ({int(kept_labels.max())}) is outside the vocabulary of {V}")
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // V)
    opts = _Opts(kd_ratio=kd_ratio if has_teacher else 0.0, kd_loss=kd_loss, temperature=float(temperature), beta=beta,
                 alpha=alpha, scaled=scaled, vocab_size=V, chunk_size=chunk, grad=torch.is_grad_enabled())
    loss, ce, kd = _ChunkedDistill.apply(h_s, student_weight, h_t, teacher_weight, kept_labels, opts)
    if reduction == "mean":
        loss, ce, kd = loss / max(n, 1), ce / max(n, 1), kd / max(n, 1)
    return DistillLoss(loss=loss, ce=ce, kd=kd, tokens=n)


def chunked_kd_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, kd_loss="forward_kl",
    temperature=1.0, beta=0.5, alpha=0.1, scaled=True, vocab_size=None, chunk_size=None,
    ignore_index=IGNORE_INDEX, reduction="mean",
) -> torch.Tensor:
    """The divergence term alone, `T²·D`, from hidden states and output weights (memory-lean)."""
    return chunked_distill_loss(
        student_hidden, student_weight, labels, teacher_hidden, teacher_weight, kd_ratio=1.0, kd_loss=kd_loss,
        temperature=temperature, beta=beta, alpha=alpha, scaled=scaled, vocab_size=vocab_size,
        chunk_size=chunk_size, ignore_index=ignore_index, reduction=reduction,
    ).loss


def naive_distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    *,
    kd_ratio: float = 0.5,
    kd_loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scaled: bool = True,
    vocab_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> DistillLoss:
    """The same total as `chunked_distill_loss`, from full logits (float32): the reference."""
    V = vocab_size or min(student_logits.shape[-1], teacher_logits.shape[-1] if teacher_logits is not None else 1 << 62)
    s = _upcast(student_logits[..., :V])
    mask = labels != ignore_index
    n = int(mask.sum())
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    kd = torch.zeros((), dtype=s.dtype, device=s.device)
    loss = ce
    if teacher_logits is not None:
        kd = kd_divergence(kd_loss, s, teacher_logits[..., :V], labels, temperature=temperature, beta=beta,
                           alpha=alpha, scaled=scaled, ignore_index=ignore_index, reduction="sum")
        loss = (1.0 - kd_ratio) * ce + kd_ratio * kd
    if reduction == "mean":
        loss, ce, kd = loss / max(n, 1), ce / max(n, 1), kd / max(n, 1)
    return DistillLoss(loss=loss, ce=ce.detach(), kd=kd.detach(), tokens=n)
