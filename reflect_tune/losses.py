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

Sparse teacher (a top-k logit cache, `topk_from_logits`). Per token the cache holds the
teacher's k most likely ids `I`, their log-probabilities `ℓ_i` at T = 1 and
`τ = log(1 − Σ_I exp ℓ_i)`, the log of the mass on the other `V − k` ids (−inf when k = V).
`sparse_kd_divergence`, `naive_sparse_distill_loss` and `chunked_sparse_distill_loss` take
the divergence on k + 1 buckets: the k ids and one tail bucket `R` holding every other id.

    student   q_i = softmax(s/T)_i for i ∈ I,   q_R = Σ_{j∉I} softmax(s/T)_j, computed as
              log q_R = logsumexp_{j∉I}(s_j/T) − logsumexp_j(s_j/T)   (no 1 − Σ cancellation)
    teacher   T = 1:  p_i = exp ℓ_i,  p_R = exp τ   (the cache as stored)
              T ≠ 1:  (p_I, p_R) = softmax(ℓ_I / T, ρ_T), the tail's tempered log-weight being
                      ρ_T = ½·[τ/T + (1 − 1/T)·log(V − k)] + ½·[τ + (1/T − 1)·ℓ_min],  ℓ_min = min_I ℓ_i

The tail's true tempered weight `Σ_{j∉I} p_j^{1/T}` is unknown: with total `e^τ` over
`V − k` ids, none above `e^{ℓ_min}`, it lies between `(V − k)^{1−1/T}·e^{τ/T}` (the mass
spread evenly) and `e^τ·e^{(1/T−1)·ℓ_min}` (the mass packed at the k-th probability); `ρ_T`
is the log of their geometric mean, continuous in T and exact at T = 1. Measured on the
bundled model's logits (4 sentences, 61 tokens, tests/test_sparse_kd.py), total variation
between these buckets and the full tempered teacher's at k = 64: 0.035 at T = 2 and 0.0004
at T = 0.5, against 0.57 and 0.068 for "the tail keeps its T = 1 share, the top-k tempered
over the rest" and 0.63 and 0.0006 for "no tail mass at T ≠ 1".

Per token, with Σ_b over the buckets b ∈ I ∪ {R}, the divergence is the dense one on buckets
(the same `token_divergence`), times T²:

    forward_kl   Σ_b p_b (log p_b − log q_b)
    reverse_kl   Σ_b q_b (log q_b − log p_b)
    jsd(β)       [β Σ_b p_b log(p_b / m_b) + (1 − β) Σ_b q_b log(q_b / m_b)] / (β (1 − β)),
                 m_b = β p_b + (1 − β) q_b   (unscaled without the division; β = 0, 1 as above)
    skew_kl(α)   Σ_b p_b log(p_b / (α p_b + (1 − α) q_b))
    skew_rkl(α)  Σ_b q_b log(q_b / ((1 − α) p_b + α q_b))

k = V: there is no tail bucket (the sum runs over the V ids, τ is not read) and
`softmax(ℓ/T) = softmax(teacher_logits/T)` at every T: exactly the dense divergence, with
finite values and gradients. τ = −inf with k < V (nothing outside the top-k) gives `p_R = 0`:
the tail's forward_kl, jsd and skew terms are exactly 0 in value and gradient; `log p_R` (and
any `ℓ_i` of −inf) is held at `−10⁴`, so reverse_kl charges `10⁴·q_R` where the true value
is +∞. At T = 1, forward KL splits exactly as `KL(p ‖ q) = KL_buckets + p_R·KL(p(·|R) ‖ q(·|R))`:
the sparse term never exceeds the dense one and misses only the divergence inside the tail.
Measured on the bundled model (its logits plus N(0, 1) noise as the student, same sentences),
the k = 64 forward-KL term is 11 % below the full one at T = 1 (20 % at k = 16, 5 % at k = 256)
and 57 % below at T = 2, where most of the tempered teacher's mass lies outside the top-k.
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


# ----------------------------------------------------------------------------- sparse teacher (top-k cache)

_LOG_ZERO = -1e4  # stands in for log 0: exp() of it is exactly 0 in float32 and float64


def topk_from_logits(teacher_logits: torch.Tensor, k: int, vocab_size: Optional[int] = None):
    """What a top-k cache stores per position, at T = 1: `(ids int32 [..., k], lp [..., k], tail [...])`.

    `lp` are the log-probabilities of the k most likely ids (largest first) and `tail` the log
    of the mass on the other ids, `logsumexp` over them minus the full `logsumexp` (−inf when
    k = V). Computed in float32 (float64 stays float64) over the first `vocab_size` logits.
    """
    V = vocab_size or teacher_logits.shape[-1]
    if V > teacher_logits.shape[-1]:
        raise ValueError(f"vocab_size {V} is larger than the teacher's {teacher_logits.shape[-1]} logits")
    if not 1 <= k <= V:
        raise ValueError(f"top-k size must be in [1, {V}], got {k}")
    x = _upcast(teacher_logits[..., :V].detach())
    lse = torch.logsumexp(x, dim=-1)
    vals, ids = x.topk(k, dim=-1)
    lp = vals - lse.unsqueeze(-1)
    if k == V:
        tail = torch.full_like(lse, -math.inf)
    else:
        tail = torch.logsumexp(x.scatter(-1, ids, -math.inf), dim=-1) - lse
    return ids.to(torch.int32), lp, tail


def _teacher_buckets(lp: torch.Tensor, tail: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """The teacher's log-probabilities on the k (+1 tail) buckets at temperature T (module docstring)."""
    k, T = lp.shape[-1], float(temperature)
    lp = lp.clamp(min=_LOG_ZERO)
    if k == vocab_size:
        return lp if T == 1.0 else F.log_softmax(lp / T, dim=-1)
    tail = tail.to(lp.dtype).clamp(min=_LOG_ZERO)
    if T == 1.0:
        return torch.cat([lp, tail.unsqueeze(-1)], dim=-1)
    spread = tail / T + (1.0 - 1.0 / T) * math.log(vocab_size - k)
    packed = tail + (1.0 / T - 1.0) * lp.min(dim=-1).values
    rho = torch.where(tail > _LOG_ZERO, 0.5 * (spread + packed), torch.full_like(tail, _LOG_ZERO))
    return F.log_softmax(torch.cat([lp / T, rho.unsqueeze(-1)], dim=-1), dim=-1)


def _student_buckets(lq: torch.Tensor, ids: torch.Tensor, tail_bucket: bool) -> torch.Tensor:
    """The student's log-probabilities `lq` `[n, V]` gathered on the k ids (+ the tail bucket)."""
    top = lq.gather(-1, ids)
    if not tail_bucket:
        return top
    rest = torch.logsumexp(lq.scatter(-1, ids, -math.inf), dim=-1, keepdim=True)
    return torch.cat([top, rest], dim=-1)


def sparse_kd_divergence(
    name: str,
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_lp: torch.Tensor,
    tail: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    scaled: bool = True,
    vocab_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """`T² · D` on the k + 1 buckets of a top-k cache (module docstring), from full student logits.

    `student_logits` `[..., V']` (the first `vocab_size` are used, default all), `top_ids` and
    `top_lp` `[..., k]`, `tail` `[...]`, all aligned with `labels` `[...]`.
    """
    _check_params(name, beta, alpha, temperature)
    V = vocab_size or student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    _check_sparse(top_ids, top_lp, tail, lead, V)
    t = float(temperature)
    lq = F.log_softmax(_upcast(student_logits[..., :V]) / t, dim=-1)
    flat = lq.reshape(-1, V)
    k = top_ids.shape[-1]
    lp = _teacher_buckets(top_lp.detach().to(lq.dtype).reshape(-1, k), tail.detach().to(lq.dtype).reshape(-1), t, V)
    lqb = _student_buckets(flat, top_ids.reshape(-1, k).long(), k < V)
    per_token = token_divergence(name, lqb, lp, beta=beta, alpha=alpha, scaled=scaled).reshape(lead) * (t * t)
    mask = None if labels is None else labels != ignore_index
    return _reduce(per_token, mask, reduction)


def _check_sparse(top_ids, top_lp, tail, lead, V: int, rows: Optional[torch.Tensor] = None) -> None:
    """Shapes and ids of a sparse teacher against `lead` positions and vocabulary `V`; `rows`: those to check."""
    if top_ids.dtype.is_floating_point or top_ids.dtype == torch.bool:
        raise ValueError(f"top_ids must be integer ids, got {top_ids.dtype}")
    if top_ids.dim() < 1 or top_ids.shape[:-1] != lead:
        raise ValueError(f"top_ids {tuple(top_ids.shape)} does not match the {tuple(lead)} positions")
    if top_lp.shape != top_ids.shape:
        raise ValueError(f"top_lp {tuple(top_lp.shape)} does not match top_ids {tuple(top_ids.shape)}")
    if tail.shape != lead:
        raise ValueError(f"tail {tuple(tail.shape)} does not match the {tuple(lead)} positions")
    k = top_ids.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"top-k size {k} is not in [1, {V}] (vocabulary {V})")
    ids = top_ids.reshape(-1, k) if rows is None else top_ids.reshape(-1, k).index_select(0, rows)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"a teacher top-k id ({bad}) is outside the vocabulary of {V}")


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
    per_token: bool = False  # return per-token values (no gradients) instead of sums


@dataclass(frozen=True)
class _Dense:
    """A teacher given as final hidden states `[n, H_t]` and its output weight cut to `[V, H_t]`."""

    hidden: torch.Tensor
    weight: torch.Tensor

    def chunk(self, rows: slice) -> torch.Tensor:
        return _upcast(F.linear(self.hidden[rows], self.weight))


@dataclass(frozen=True)
class _Sparse:
    """A teacher given as a top-k cache: ids `[n, k]` (int64), their T = 1 log-probs `[n, k]`, tail `[n]`."""

    ids: torch.Tensor
    lp: torch.Tensor
    tail: torch.Tensor

    def chunk(self, rows: slice) -> "_Sparse":
        return _Sparse(self.ids[rows], self.lp[rows], self.tail[rows])


def _chunk_loss(s: torch.Tensor, t, labels: torch.Tensor, o: _Opts, need_grad: bool):
    """Per-row CE and T²·D over one chunk of float logits `s`, and d(total)/d(s) when asked.

    `t` is the teacher for these rows: None, its float logits, or a `_Sparse` slice. CE alone
    and forward KL (the default) use the closed form
    `d/ds = (1 − r)(softmax(s) − onehot) + r·T·(softmax(s/T) − softmax(t/T))`; from a sparse
    teacher the last term is `r·T·(P·q − p_I at the ids − p_R·q_j/q_R at the other ids j)`,
    with `q = softmax(s/T)` and `P = Σ_b p_b` (1 up to the cache's rounding). The other
    divergences take autograd through the chunk.
    """
    T, r = o.temperature, (o.kd_ratio if t is not None else 0.0)
    rows = torch.arange(s.shape[0], device=s.device)
    sparse = isinstance(t, _Sparse)
    if sparse:
        k = t.ids.shape[-1]
        tail_bucket = k < o.vocab_size
        lp = _teacher_buckets(t.lp.to(s.dtype), t.tail.to(s.dtype), T, o.vocab_size)
    if t is None or o.kd_loss == "forward_kl":
        ls = F.log_softmax(s, dim=-1)
        ce = -ls[rows, labels]
        kd = torch.zeros_like(ce)
        if t is not None:
            lq = ls if T == 1.0 else F.log_softmax(s / T, dim=-1)
            if not sparse:
                lp = F.log_softmax(t / T, dim=-1)
            p = lp.exp()
            lqb = _student_buckets(lq, t.ids, tail_bucket) if sparse else lq
            kd = (p * (lp - lqb)).sum(-1) * (T * T)
        if not need_grad:
            return ce, kd, None
        if sparse:  # the KD gradient w.r.t. s/T, before ls (= lq at T = 1) is overwritten
            gk = lq.exp().mul_(p.sum(-1, keepdim=True))
            if tail_bucket:
                gk.sub_(lq.scatter(-1, t.ids, -math.inf).sub_(lqb[:, -1:]).exp_().mul_(p[:, -1:]))
            gk.scatter_add_(-1, t.ids, -p[:, :k])
        g = ls.exp_()  # softmax(s), in place: ls is no longer needed
        if sparse:
            g.mul_(1.0 - r).add_(gk, alpha=r * T)
        elif t is not None and T == 1.0:
            g.sub_(p, alpha=r)  # (1 − r)·softmax + r·(softmax − p)
        elif t is not None:
            g.mul_(1.0 - r).add_(lq.exp_().sub_(p), alpha=r * T)
        g[rows, labels] -= 1.0 - r
        return ce, kd, g
    with torch.enable_grad():
        s = s.detach().requires_grad_(need_grad)
        ce = F.cross_entropy(s, labels, reduction="none")
        lq = F.log_softmax(s / T, dim=-1)
        if sparse:
            lq = _student_buckets(lq, t.ids, tail_bucket)
        else:
            lp = F.log_softmax(t / T, dim=-1)
        kd = token_divergence(o.kd_loss, lq, lp, beta=o.beta, alpha=o.alpha, scaled=o.scaled) * (T * T)
        g = torch.autograd.grad((1.0 - r) * ce.sum() + r * kd.sum(), s)[0] if need_grad else None
    return ce.detach(), kd.detach(), g


class _ChunkedDistill(torch.autograd.Function):
    """Loss over counted tokens only, one chunk of rows at a time.

    Per chunk: the student's logits (`hidden @ weight[:V].T`, in the weights' dtype, then
    float32), the teacher's (its logits likewise, or its slice of a top-k cache), CE and the
    divergence, and, when gradients are wanted, the gradient of the chunk's loss with respect
    to its logits, turned at once into the chunk's rows of d/d hidden and an accumulated
    d/d weight. The chunk's logits are then freed. Backward only scales the stored gradients,
    which have the size of the inputs; taking them during the forward pass is what makes a
    recompute of the logits in backward unnecessary. With `opts.per_token` the outputs are
    per-row values and carry no gradients.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, labels, opts: _Opts, teacher):
        need_h, need_w = ctx.needs_input_grad[0] and opts.grad, ctx.needs_input_grad[1] and opts.grad
        V = opts.vocab_size
        ws = w_s[:V]
        grad_h = torch.zeros_like(h_s) if need_h else None
        acc_dtype = torch.float64 if w_s.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device) if need_w else None
        n = h_s.shape[0] if opts.per_token else ()
        ce_sum = torch.zeros(n, dtype=torch.float64, device=h_s.device)
        kd_sum = torch.zeros(n, dtype=torch.float64, device=h_s.device)
        for start in range(0, h_s.shape[0], opts.chunk_size):
            rows = slice(start, start + opts.chunk_size)
            hs = h_s[rows]
            s_logits = _upcast(F.linear(hs, ws))
            t_chunk = teacher.chunk(rows) if teacher is not None else None
            ce, kd, g = _chunk_loss(s_logits, t_chunk, labels[rows], opts, need_h or need_w)
            if opts.per_token:
                ce_sum[rows], kd_sum[rows] = ce.double(), kd.double()
            else:
                ce_sum += ce.double().sum()
                kd_sum += kd.double().sum()
            del s_logits, t_chunk
            if g is not None:
                g = g.to(ws.dtype)
                if need_h:
                    grad_h[rows] = (g @ ws).to(grad_h.dtype)
                if need_w:
                    grad_w[:V].addmm_(g.t().to(grad_w.dtype), hs.to(grad_w.dtype))
                del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = w_s.dtype
        loss = ce_sum * (1.0 - opts.kd_ratio) + kd_sum * opts.kd_ratio if teacher is not None else ce_sum
        out = torch.float64 if h_s.dtype == torch.float64 else torch.float32
        loss, ce_sum, kd_sum = loss.to(out), ce_sum.to(out), kd_sum.to(out)
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_loss).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def _counted_rows(student_hidden, student_weight, labels, ignore_index):
    """The student's hidden states `[n, H]` and labels `[n]` at counted positions, and their indices."""
    H = student_hidden.shape[-1]
    if student_weight.shape[-1] != H:
        raise ValueError(f"student hidden size {H} does not match its weight {tuple(student_weight.shape)}")
    flat_labels = labels.reshape(-1)
    h_s = student_hidden.reshape(-1, H)
    if h_s.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"{h_s.shape[0]} student positions but {flat_labels.shape[0]} labels")
    keep = (flat_labels != ignore_index).nonzero().squeeze(-1)
    return h_s.index_select(0, keep), flat_labels.index_select(0, keep), keep


def _check_labels(kept_labels: torch.Tensor, V: int) -> None:
    if kept_labels.numel() and int(kept_labels.max()) >= V:
        raise ValueError(f"a label id ({int(kept_labels.max())}) is outside the vocabulary of {V}")


def _check_kd(kd_loss: str, beta: float, alpha: float, temperature: float, kd_ratio: float) -> None:
    _check_params(kd_loss, beta, alpha, temperature)
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")


def _reduced(loss, ce, kd, n: int, reduction: str, keep=None, labels=None) -> DistillLoss:
    """DistillLoss from the sums (or, for "none", the per-row values at `keep`, placed in `labels`' shape)."""
    if reduction == "none":
        def place(x):
            return torch.zeros(labels.numel(), dtype=x.dtype, device=x.device).index_copy(0, keep, x).reshape(labels.shape)
        return DistillLoss(loss=place(loss), ce=place(ce), kd=place(kd), tokens=n)
    if reduction == "mean":
        loss, ce, kd = loss / max(n, 1), ce / max(n, 1), kd / max(n, 1)
    return DistillLoss(loss=loss, ce=ce, kd=kd, tokens=n)


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
        _check_kd(kd_loss, beta, alpha, temperature, kd_ratio)
    h_s, kept_labels, keep = _counted_rows(student_hidden, student_weight, labels, ignore_index)
    V = vocab_size or min(student_weight.shape[0], teacher_weight.shape[0] if has_teacher else student_weight.shape[0])
    if V > student_weight.shape[0] or (has_teacher and V > teacher_weight.shape[0]):
        raise ValueError(f"vocab_size {V} is larger than a model's output vocabulary")
    teacher = None
    if has_teacher:
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if h_t.shape[0] != labels.numel():
            raise ValueError(f"{h_t.shape[0]} teacher positions but {labels.numel()} labels")
        teacher = _Dense(h_t.detach().index_select(0, keep), teacher_weight.detach()[:V])
    _check_labels(kept_labels, V)
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // V)
    opts = _Opts(kd_ratio=kd_ratio if has_teacher else 0.0, kd_loss=kd_loss, temperature=float(temperature), beta=beta,
                 alpha=alpha, scaled=scaled, vocab_size=V, chunk_size=chunk, grad=torch.is_grad_enabled())
    loss, ce, kd = _ChunkedDistill.apply(h_s, student_weight, kept_labels, opts, teacher)
    return _reduced(loss, ce, kd, int(keep.numel()), reduction)


def chunked_sparse_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    labels: torch.Tensor,
    top_ids: torch.Tensor,
    top_lp: torch.Tensor,
    tail: torch.Tensor,
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
    """`(1 − kd_ratio)·CE + kd_ratio·T²·D` against a top-k cache (module docstring), memory-lean.

    As `chunked_distill_loss`, with the teacher given by `top_ids` `[..., k]` (integers),
    `top_lp` `[..., k]` and `tail` `[...]` as `topk_from_logits` makes them, aligned with
    `labels` `[...]`; rows at ignored positions are not read. Pass only counted tokens
    (`student_hidden` `[N, H]`, `labels` `[N]`) or the full batch with ignored labels.
    `vocab_size` defaults to the student's output rows. `reduction` is "mean", "sum" or
    "none" (values per position in `labels`' shape, 0 where ignored, without gradients:
    call it under `torch.no_grad()` or on inputs that need none).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose mean, sum or none")
    _check_kd(kd_loss, beta, alpha, temperature, kd_ratio)
    if reduction == "none" and torch.is_grad_enabled() and (student_hidden.requires_grad or student_weight.requires_grad):
        raise ValueError("reduction 'none' gives per-token values without gradients; use it under torch.no_grad()")
    h_s, kept_labels, keep = _counted_rows(student_hidden, student_weight, labels, ignore_index)
    V = vocab_size or student_weight.shape[0]
    if V > student_weight.shape[0]:
        raise ValueError(f"vocab_size {V} is larger than the student's output vocabulary {student_weight.shape[0]}")
    _check_sparse(top_ids, top_lp, tail, labels.shape, V, rows=keep)
    _check_labels(kept_labels, V)
    k = top_ids.shape[-1]
    teacher = _Sparse(top_ids.reshape(-1, k).index_select(0, keep).long(),
                      top_lp.detach().reshape(-1, k).index_select(0, keep),
                      tail.detach().reshape(-1).index_select(0, keep))
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // V)
    opts = _Opts(kd_ratio=kd_ratio, kd_loss=kd_loss, temperature=float(temperature), beta=beta, alpha=alpha,
                 scaled=scaled, vocab_size=V, chunk_size=chunk, grad=torch.is_grad_enabled(),
                 per_token=reduction == "none")
    loss, ce, kd = _ChunkedDistill.apply(h_s, student_weight, kept_labels, opts, teacher)
    return _reduced(loss, ce, kd, int(keep.numel()), reduction, keep, labels)


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


def naive_sparse_distill_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    top_ids: torch.Tensor,
    top_lp: torch.Tensor,
    tail: torch.Tensor,
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
    """The same as `chunked_sparse_distill_loss`, from full student logits `[..., V]`: the reference."""
    _check_kd(kd_loss, beta, alpha, temperature, kd_ratio)
    V = vocab_size or student_logits.shape[-1]
    s = _upcast(student_logits[..., :V])
    mask = labels != ignore_index
    n = int(mask.sum())
    ce = F.cross_entropy(s.reshape(-1, V), labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    ce = _reduce(ce.reshape(labels.shape), mask, reduction)
    ids = torch.where(mask.unsqueeze(-1), top_ids, torch.zeros_like(top_ids))  # ignored rows are not read
    kd = sparse_kd_divergence(kd_loss, s, ids, top_lp, tail, labels, temperature=temperature, beta=beta, alpha=alpha,
                              scaled=scaled, vocab_size=V, ignore_index=ignore_index, reduction=reduction)
    loss = (1.0 - kd_ratio) * ce + kd_ratio * kd
    return DistillLoss(loss=loss, ce=ce.detach(), kd=kd.detach(), tokens=n)
