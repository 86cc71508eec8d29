"""reflect_tune.losses against divergences written out plainly here, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reflect_tune import losses
from reflect_tune.losses import (
    KD_LOSSES,
    chunked_distill_loss,
    chunked_kd_loss,
    forward_kl,
    jsd,
    kd_divergence,
    naive_distill_loss,
    reverse_kl,
    shift_labels,
    skew_kl,
    skew_rkl,
)

# ----------------------------------------------------------------------------- plain references


def probs(logits, t):
    z = logits.double() / t
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kl(a, b):
    """KL(a ‖ b) per row: Σ a log(a / b)."""
    return (a * (torch.log(a) - torch.log(b))).sum(-1)


def plain(name, s_logits, t_logits, t=1.0, beta=0.5, alpha=0.1, scaled=True):
    p, q = probs(t_logits, t), probs(s_logits, t)
    if name == "forward_kl":
        d = kl(p, q)
    elif name == "reverse_kl":
        d = kl(q, p)
    elif name == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
        if scaled:
            d = d / (beta * (1 - beta))
    elif name == "skew_kl":
        d = kl(p, alpha * p + (1 - alpha) * q)
    elif name == "skew_rkl":
        d = kl(q, (1 - alpha) * p + alpha * q)
    return t * t * d


def masked_mean(per_token, labels):
    keep = labels != -100
    return per_token[keep].sum() / keep.sum()


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, 50, generator=g) * 3
    t = torch.randn(3, 7, 50, generator=g) * 3
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[0, :3] = -100
    labels[2, -2:] = -100
    return s, t, labels


FUNCS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl, "skew_rkl": skew_rkl}


@pytest.mark.parametrize("name", KD_LOSSES)
@pytest.mark.parametrize("t", [1.0, 2.0, 0.5])
def test_each_divergence_matches_its_plain_formula(logits, name, t):
    s, tl, labels = logits
    kw = {"beta": 0.3} if name == "jsd" else {"alpha": 0.2} if name.startswith("skew") else {}
    got = FUNCS[name](s, tl, labels, temperature=t, **kw)
    want = masked_mean(plain(name, s, tl, t=t, **kw), labels)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("name", KD_LOSSES)
def test_gradients_match_the_plain_formula(logits, name):
    s, tl, labels = logits
    s64 = s.double().requires_grad_()
    kd_divergence(name, s64, tl.double(), labels, temperature=1.5).backward()
    ref = s.double().requires_grad_()
    masked_mean(plain(name, ref, tl.double(), t=1.5), labels).backward()
    torch.testing.assert_close(s64.grad, ref.grad, atol=1e-10, rtol=1e-8)


def test_reductions_and_masking(logits):
    s, tl, labels = logits
    per = forward_kl(s, tl, labels, reduction="none")
    assert per.shape == labels.shape
    assert torch.all(per[labels == -100] == 0)
    want = plain("forward_kl", s, tl)
    keep = labels != -100
    torch.testing.assert_close(per[keep].double(), want[keep], atol=1e-5, rtol=1e-5)
    assert forward_kl(s, tl, labels, reduction="sum").item() == pytest.approx(want[keep].sum().item(), rel=1e-5)
    # no labels: every position counts
    assert forward_kl(s, tl).item() == pytest.approx(want.mean().item(), rel=1e-5)
    # nothing counted: 0, not NaN
    none = torch.full_like(labels, -100)
    assert forward_kl(s, tl, none).item() == 0.0


def test_divergence_of_identical_distributions_is_zero(logits):
    s, _, labels = logits
    for name in KD_LOSSES:
        assert abs(kd_divergence(name, s, s.clone(), labels).item()) < 1e-6


def test_jsd_limits_reach_forward_and_reverse_kl(logits):
    s, tl, labels = logits
    s, tl = s.double() / 3, tl.double() / 3  # milder logits: the limit is reached sooner
    fkl, rkl = forward_kl(s, tl, labels).item(), reverse_kl(s, tl, labels).item()
    assert jsd(s, tl, labels, beta=0.0).item() == pytest.approx(fkl, rel=1e-12)
    assert jsd(s, tl, labels, beta=1.0).item() == pytest.approx(rkl, rel=1e-12)
    # scaled (default): continuous at both ends, the gap shrinking with beta
    gaps = [abs(jsd(s, tl, labels, beta=b).item() - fkl) for b in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5 * max(fkl, 1)
    gaps = [abs(jsd(s, tl, labels, beta=1 - b).item() - rkl) for b in (1e-2, 1e-4, 1e-6)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-5 * max(rkl, 1)
    # unscaled (TRL GKD's value): beta·KL(p‖m) + (1−beta)·KL(q‖m)
    want = masked_mean(plain("jsd", s, tl, beta=0.7, scaled=False), labels).item()
    assert jsd(s, tl, labels, beta=0.7, scaled=False).item() == pytest.approx(want, rel=1e-10)


def test_skew_alpha_zero_is_plain_kl(logits):
    s, tl, labels = logits
    assert skew_kl(s, tl, labels, alpha=0.0).item() == pytest.approx(forward_kl(s, tl, labels).item(), rel=1e-6)
    assert skew_rkl(s, tl, labels, alpha=0.0).item() == pytest.approx(reverse_kl(s, tl, labels).item(), rel=1e-6)
    assert skew_kl(s, tl, labels, alpha=1.0).item() == 0.0


def test_bad_arguments_raise_clear_errors(logits):
    s, tl, labels = logits
    with pytest.raises(ValueError, match="unknown KD loss 'kl'"):
        kd_divergence("kl", s, tl, labels)
    with pytest.raises(ValueError, match="differ in shape"):
        forward_kl(s, tl[..., :40], labels)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        forward_kl(s, tl, labels, temperature=0)
    with pytest.raises(ValueError, match="beta must be in"):
        jsd(s, tl, labels, beta=1.5)


def test_shift_labels():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[-100, 5, 6, 7, -100]]


# ----------------------------------------------------------------------------- memory-lean


def _pair(seed=0, n=37, h_s=16, h_t=24, v=300, pad_s=5, pad_t=12):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, n, h_s, generator=g)
    ws = torch.randn(v + pad_s, h_s, generator=g) * 0.5
    ht = torch.randn(2, n, h_t, generator=g)
    wt = torch.randn(v + pad_t, h_t, generator=g) * 0.5
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[0, :9] = -100
    labels[1, -4:] = -100
    return hs, ws, ht, wt, labels, v


@pytest.mark.parametrize("name", KD_LOSSES)
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_chunked_equals_naive_loss_and_gradients(name, t):
    hs, ws, ht, wt, labels, v = _pair()
    kw = dict(kd_ratio=0.3, kd_loss=name, temperature=t, beta=0.4, alpha=0.2, vocab_size=v)

    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lean = chunked_distill_loss(h1, w1, labels, ht, wt, chunk_size=10, **kw)  # 10 does not divide the rows
    lean.loss.backward()

    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = naive_distill_loss(h2 @ w2.T, labels, ht @ wt.T, **kw)  # full logits, padding rows sliced off
    ref.loss.backward()

    assert lean.tokens == ref.tokens == int((labels != -100).sum())
    for a, b in ((lean.loss, ref.loss), (lean.ce, ref.ce), (lean.kd, ref.kd)):
        assert abs(a.item() - b.item()) <= 1e-5 * max(1.0, abs(b.item()))
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-4, rtol=1e-4)
    assert torch.all(w1.grad[v:] == 0)  # padding rows take no part


def test_chunked_matches_a_plain_total_loss():
    """(1 − r)·CE + r·T²·D against the formula written out, not against naive_distill_loss."""
    hs, ws, ht, wt, labels, v = _pair(seed=3)
    got = chunked_distill_loss(hs, ws, labels, ht, wt, kd_ratio=0.25, temperature=3.0, vocab_size=v, chunk_size=7)
    s_logits, t_logits = (hs @ ws[:v].T).double(), (ht @ wt[:v].T).double()
    keep = labels != -100
    ce = -torch.log(probs(s_logits, 1.0)).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    d = plain("forward_kl", s_logits, t_logits, t=3.0)
    want = (0.75 * ce[keep] + 0.25 * d[keep]).mean()
    assert abs(got.loss.item() - want.item()) <= 1e-5 * max(1.0, want.item())


def test_chunked_sum_reduction_frozen_weight_and_no_teacher():
    hs, ws, _, _, labels, v = _pair(seed=1)
    h = hs.clone().requires_grad_()
    out = chunked_distill_loss(h, ws, labels, vocab_size=v, reduction="sum", chunk_size=16)  # ws frozen (LoRA)
    out.loss.backward()
    assert h.grad is not None and ws.grad is None
    want = F.cross_entropy((hs @ ws[:v].T).reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert abs(out.loss.item() - want.item()) <= 1e-5 * want.item()
    assert out.kd.item() == 0.0


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_chunked_under_no_grad_gives_the_same_values_and_no_graph(name, monkeypatch):
    """An evaluation pass (torch.no_grad) skips the gradient work done in forward, same numbers."""
    hs, ws, ht, wt, labels, v = _pair(seed=4)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    kw = dict(kd_ratio=0.4, kd_loss=name, vocab_size=v, chunk_size=9)
    with_grad = chunked_distill_loss(h, w, labels, ht, wt, **kw)
    seen = []
    real = losses._chunk_loss
    monkeypatch.setattr(losses, "_chunk_loss", lambda *a: seen.append(a[-1]) or real(*a))
    with torch.no_grad():
        no_grad = chunked_distill_loss(h, w, labels, ht, wt, **kw)
    assert seen and not any(seen)  # need_grad was False for every chunk
    assert not no_grad.loss.requires_grad
    for a, b in ((with_grad.loss, no_grad.loss), (with_grad.ce, no_grad.ce), (with_grad.kd, no_grad.kd)):
        assert a.item() == b.item()


def test_chunked_kd_only_and_no_counted_tokens():
    hs, ws, ht, wt, labels, v = _pair(seed=2)
    got = chunked_kd_loss(hs, ws, ht, wt, labels, kd_loss="reverse_kl", vocab_size=v)
    want = reverse_kl(hs @ ws[:v].T, ht @ wt[:v].T, labels)
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, want.item())
    h = hs.clone().requires_grad_()
    empty = chunked_distill_loss(h, ws, torch.full_like(labels, -100), ht, wt, vocab_size=v)
    empty.loss.backward()
    assert empty.loss.item() == 0.0 and empty.tokens == 0 and torch.all(h.grad == 0)


def test_chunked_default_chunk_bounds_logits_memory(monkeypatch):
    """The default chunk keeps each chunk's logits near 2^25 values whatever V is."""
    hs, ws, ht, wt, labels, v = _pair(seed=4, n=50)
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", v * 8)  # force several chunks of 8 rows
    a = chunked_distill_loss(hs, ws, labels, ht, wt, vocab_size=v)
    b = chunked_distill_loss(hs, ws, labels, ht, wt, vocab_size=v, chunk_size=10_000)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_chunked_rejects_mismatches():
    hs, ws, ht, wt, labels, v = _pair()
    with pytest.raises(ValueError, match="both teacher_hidden and teacher_weight"):
        chunked_distill_loss(hs, ws, labels, ht, None)
    with pytest.raises(ValueError, match="does not match its weight"):
        chunked_distill_loss(hs, wt, labels)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        chunked_distill_loss(hs, ws, labels, ht, wt, vocab_size=10)
