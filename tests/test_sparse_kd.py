"""Distillation from a top-k teacher cache (issue 17): reflect_tune.losses' sparse path.

The k + 1 bucket distributions are written out plainly here (probabilities, sums over the ids
outside the top-k, float64) and compared with `sparse_kd_divergence`, the naive and the chunked
losses; with every id cached (k = V) the sparse loss must be the dense one. The last test
measures, on the bundled model's real logits, how far the sparse forward-KL term is from the
full one for k = 16, 64, 256 at T = 1 and 2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reflect_tune import losses
from reflect_tune.losses import (
    KD_LOSSES,
    chunked_distill_loss,
    chunked_sparse_distill_loss,
    kd_divergence,
    naive_distill_loss,
    naive_sparse_distill_loss,
    sparse_kd_divergence,
    topk_from_logits,
)

# every divergence, jsd at two betas: (kd_loss, beta, alpha)
CASES = [("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.1), ("jsd", 0.5, 0.1), ("jsd", 0.1, 0.1),
         ("skew_kl", 0.5, 0.2), ("skew_rkl", 0.5, 0.2)]
IDS = [f"{n}-b{b}" if n == "jsd" else n for n, b, _ in CASES]


def _models(seed=0, n=23, h_s=12, h_t=20, v=40, pad=3, dtype=torch.float64):
    """Student hidden [2, n, h_s] and weight [v + pad, h_s], teacher logits [2, n, v], labels with ignored spans."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, n, h_s, generator=g, dtype=dtype)
    ws = torch.randn(v + pad, h_s, generator=g, dtype=dtype) * 0.6
    ht = torch.randn(2, n, h_t, generator=g, dtype=dtype)
    wt = torch.randn(v, h_t, generator=g, dtype=dtype) * 0.8
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[0, :5] = -100
    labels[1, -3:] = -100
    return hs, ws, ht, wt, labels, v


def _close(a, b, rel):
    assert abs(a.item() - b.item()) <= rel * max(1.0, abs(b.item())), (a.item(), b.item())


# ----------------------------------------------------------------------------- plain bucket formulas


def plain_buckets(s_logits, t_logits, k, T):
    """Student and teacher probabilities on the k + 1 buckets, [N, k + 1] each, from full logits (float64).

    The teacher's top-k and its tail mass come from its T = 1 probabilities; at T ≠ 1 the top-k
    weigh exp(ℓ_i / T) and the tail the geometric mean of its two extreme tempered weights,
    (V − k)·(m / (V − k))^(1/T) (the mass m spread evenly) and m·p_min^(1/T − 1) (packed at
    the k-th probability), all normalized.
    """
    s, t = s_logits.double().reshape(-1, s_logits.shape[-1]), t_logits.double().reshape(-1, t_logits.shape[-1])
    V = t.shape[-1]
    p1 = torch.softmax(t, -1)
    q = torch.softmax(s / T, -1)
    ps, qs = [], []
    for row in range(t.shape[0]):
        order = sorted(range(V), key=lambda j: -p1[row, j].item())
        top, rest = order[:k], order[k:]
        qs.append([q[row, j].item() for j in top] + [sum(q[row, j].item() for j in rest)])
        m = sum(p1[row, j].item() for j in rest)
        if T == 1.0:
            ps.append([p1[row, j].item() for j in top] + [m])
            continue
        w = [p1[row, j].item() ** (1 / T) for j in top]
        spread = (V - k) * (m / (V - k)) ** (1 / T)
        packed = m * p1[row, top[-1]].item() ** (1 / T - 1)
        w.append(math.sqrt(spread * packed))
        ps.append([x / sum(w) for x in w])
    return torch.tensor(qs, dtype=torch.float64), torch.tensor(ps, dtype=torch.float64)


def kl(a, b):
    return (a * (torch.log(a) - torch.log(b))).sum(-1)


def plain_divergence(name, q, p, beta, alpha):
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (beta * (1 - beta))
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, (1 - alpha) * p + alpha * q)


# ----------------------------------------------------------------------------- k = V is the dense loss


@pytest.mark.parametrize("name,beta,alpha", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_full_cache_equals_the_dense_loss_and_gradients(name, beta, alpha, T):
    hs, ws, ht, wt, labels, v = _models()
    ids, lp, tail = topk_from_logits(ht @ wt.T, v)
    assert torch.all(tail == -math.inf)
    kw = dict(kd_ratio=0.3, kd_loss=name, temperature=T, beta=beta, alpha=alpha, vocab_size=v)

    def run(fn):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        out = fn(h, w)
        out.loss.backward()
        return out, h.grad, w.grad

    sparse, gh, gw = run(lambda h, w: chunked_sparse_distill_loss(h, w, labels, ids, lp, tail, chunk_size=5, **kw))
    dense, dh, dw = run(lambda h, w: chunked_distill_loss(h, w, labels, ht, wt, chunk_size=5, **kw))
    naive, nh, nw = run(lambda h, w: naive_distill_loss(h @ w.T, labels, ht @ wt.T, **kw))
    naive_sp, sh, sw = run(lambda h, w: naive_sparse_distill_loss(h @ w.T, labels, ids, lp, tail, **kw))
    assert sparse.tokens == dense.tokens == naive.tokens == naive_sp.tokens == int((labels != -100).sum())
    assert sparse.kd.item() > 0.01
    for ref in (dense, naive, naive_sp):
        for a, b in ((sparse.loss, ref.loss), (sparse.ce, ref.ce), (sparse.kd, ref.kd)):
            _close(a, b, 1e-9)
    for g_h, g_w in ((dh, dw), (nh, nw), (sh, sw)):
        torch.testing.assert_close(gh, g_h, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(gw, g_w, rtol=1e-8, atol=1e-10)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()


# ----------------------------------------------------------------------------- k < V: the bucketed formula


@pytest.mark.parametrize("name,beta,alpha", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 6])
def test_top_k_cache_matches_the_plain_bucket_formula(name, beta, alpha, T, k):
    hs, ws, ht, wt, labels, v = _models(seed=1)
    s_logits, t_logits = hs @ ws[:v].T, ht @ wt.T
    ids, lp, tail = topk_from_logits(t_logits, k)
    q, p = plain_buckets(s_logits, t_logits, k, T)
    want = (T * T * plain_divergence(name, q, p, beta, alpha)).reshape(labels.shape)
    keep = labels != -100
    kw = dict(temperature=T, beta=beta, alpha=alpha)

    per_token = sparse_kd_divergence(name, s_logits, ids, lp, tail, labels, reduction="none", **kw)
    torch.testing.assert_close(per_token[keep], want[keep], rtol=1e-9, atol=1e-12)
    assert torch.all(per_token[~keep] == 0)
    lean = chunked_sparse_distill_loss(hs, ws, labels, ids, lp, tail, kd_ratio=1.0, kd_loss=name, vocab_size=v,
                                       chunk_size=4, **kw)
    _close(lean.kd, want[keep].mean(), 1e-9)
    _close(lean.loss, want[keep].mean(), 1e-9)


def test_temperature_one_reads_the_cache_as_stored():
    """At T = 1 the teacher buckets are (exp ℓ, exp τ) as given, even for a cache not summing to 1."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 10, generator=g, dtype=torch.float64)
    lp = torch.log(torch.tensor([[0.5, 0.2]] * 4, dtype=torch.float64))
    tail = torch.log(torch.full((4,), 0.2, dtype=torch.float64))  # 0.5 + 0.2 + 0.2 = 0.9
    ids = torch.tensor([[3, 7]] * 4)
    q = torch.softmax(s, -1)
    qb = torch.stack([q[:, 3], q[:, 7], 1 - q[:, 3] - q[:, 7]], -1)
    pb = torch.tensor([[0.5, 0.2, 0.2]] * 4, dtype=torch.float64)
    want = (pb * (pb.log() - qb.log())).sum(-1)
    got = sparse_kd_divergence("forward_kl", s, ids, lp, tail, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- chunked = naive


@pytest.mark.parametrize("name", KD_LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_naive_loss_and_gradients(name, T, chunk):
    hs, ws, ht, wt, labels, v = _models(seed=2)
    ids, lp, tail = topk_from_logits(ht @ wt.T, 8)
    kw = dict(kd_ratio=0.4, kd_loss=name, temperature=T, beta=0.3, alpha=0.2, vocab_size=v)
    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    lean = chunked_sparse_distill_loss(h1, w1, labels, ids, lp, tail, chunk_size=chunk, **kw)
    lean.loss.backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = naive_sparse_distill_loss(h2 @ w2.T, labels, ids, lp, tail, **kw)
    ref.loss.backward()
    assert lean.tokens == ref.tokens
    for a, b in ((lean.loss, ref.loss), (lean.ce, ref.ce), (lean.kd, ref.kd)):
        _close(a, b, 1e-10)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-8, atol=1e-11)
    assert torch.all(w1.grad[v:] == 0)  # padding rows take no part


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_chunked_reductions_and_ignored_positions(name):
    hs, ws, ht, wt, labels, v = _models(seed=3)
    ids, lp, tail = topk_from_logits(ht @ wt.T, 5)
    keep = labels != -100
    n = int(keep.sum())
    ids[~keep], lp[~keep], tail[~keep] = 10**6, float("nan"), float("nan")  # ignored rows are never read
    kw = dict(kd_ratio=0.25, kd_loss=name, temperature=1.5, vocab_size=v)
    per = naive_sparse_distill_loss(hs @ ws[:v].T, labels, ids, lp, tail, reduction="none", **kw)
    assert per.loss.shape == labels.shape and per.tokens == n
    assert torch.all(per.loss[~keep] == 0) and torch.all(per.kd[~keep] == 0)
    torch.testing.assert_close(per.loss, 0.75 * per.ce + 0.25 * per.kd)
    assert torch.isfinite(per.loss).all() and (per.kd[keep] > 0).all()
    for reduction, fold in (("none", lambda x: x), ("sum", torch.sum), ("mean", lambda x: x.sum() / n)):
        ref = naive_sparse_distill_loss(hs @ ws[:v].T, labels, ids, lp, tail, reduction=reduction, **kw)
        for chunk in (3, 64):
            with torch.no_grad():
                lean = chunked_sparse_distill_loss(hs, ws, labels, ids, lp, tail, chunk_size=chunk,
                                                   reduction=reduction, **kw)
            assert lean.tokens == n
            for a, b, c in ((lean.loss, ref.loss, per.loss), (lean.ce, ref.ce, per.ce), (lean.kd, ref.kd, per.kd)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(b, fold(c), rtol=1e-12, atol=1e-12)
    # the counted tokens alone, flat [N, H], give the same
    flat = chunked_sparse_distill_loss(hs[keep], ws, labels[keep], ids[keep], lp[keep], tail[keep], **kw)
    _close(flat.loss, per.loss.sum() / n, 1e-10)
    with pytest.raises(ValueError, match="use it under torch.no_grad"):
        chunked_sparse_distill_loss(hs.clone().requires_grad_(), ws, labels, ids, lp, tail, reduction="none", **kw)


def test_float32_chunked_matches_float64_reference():
    hs, ws, ht, wt, labels, v = _models(seed=4, dtype=torch.float32)
    ids, lp, tail = topk_from_logits(ht @ wt.T, 7)
    h = hs.clone().requires_grad_()
    lean = chunked_sparse_distill_loss(h, ws, labels, ids, lp.half(), tail, temperature=2.0, vocab_size=v)
    lean.loss.backward()
    assert lean.loss.dtype == torch.float32 and h.grad.dtype == torch.float32
    h64 = hs.double().requires_grad_()
    ref = naive_sparse_distill_loss(h64 @ ws[:v].double().T, labels, ids, lp.half().double(), tail.double(),
                                    temperature=2.0)
    ref.loss.backward()
    _close(lean.loss, ref.loss, 1e-5)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- empty tail, topk_from_logits, errors


@pytest.mark.parametrize("name", KD_LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_empty_tail_contributes_nothing_and_no_nan(name, T):
    """A teacher with no mass outside its top-k (τ = −inf, k < V): finite values and gradients."""
    hs, ws, ht, wt, labels, v = _models(seed=6)
    t_logits = ht @ wt.T
    k = 6
    top = t_logits.topk(k, -1).indices
    t_logits = torch.full_like(t_logits, -math.inf).scatter(-1, top, t_logits.gather(-1, top))
    ids, lp, tail = topk_from_logits(t_logits, k)
    assert torch.all(tail == -math.inf)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = chunked_sparse_distill_loss(h, w, labels, ids, lp, tail, kd_ratio=0.5, kd_loss=name, temperature=T,
                                      alpha=0.2, vocab_size=v, chunk_size=6)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    if name in ("forward_kl", "skew_kl"):  # p_R = 0: the tail term is exactly 0; the top-k terms as usual
        keep = labels != -100
        h2 = hs.clone().requires_grad_()
        s_logits = h2 @ ws[:v].T
        q = torch.softmax(s_logits / T, -1).gather(-1, ids.long())
        p = torch.softmax(lp / T, -1)
        m = q if name == "forward_kl" else 0.2 * p + 0.8 * q
        d = (T * T * (p * (p.log() - m.log())).sum(-1))[keep].mean()
        _close(out.kd, d, 1e-9)
        (0.5 * F.cross_entropy(s_logits[keep], labels[keep]) + 0.5 * d).backward()
        torch.testing.assert_close(h.grad, h2.grad, rtol=1e-8, atol=1e-11)


def test_student_tail_is_exact_when_far_below_float32_resolution():
    """q_R from a logsumexp over the other ids, not 1 − Σ q_I (which rounds to 0 in float32 here)."""
    V, k = 50, 4
    s = torch.zeros(3, V)
    s[:, :k] = 40.0  # q_R = 46·e^−40 / (4 + 46·e^−40) ≈ 5e−17
    ids = torch.arange(k).expand(3, k)
    lp = torch.log(torch.full((3, k), 0.2))
    tail = torch.log(torch.full((3,), 0.2))
    got = chunked_sparse_distill_loss(torch.eye(3), s.T.contiguous(), torch.zeros(3, dtype=torch.long), ids, lp,
                                      tail, kd_ratio=1.0, vocab_size=V)
    q_r = math.log(46) - 40 - math.log(4)
    want = 4 * 0.2 * math.log(0.2 / 0.25) + 0.2 * (math.log(0.2) - q_r)
    assert torch.isfinite(got.kd) and abs(got.kd.item() - want) < 1e-5 * want
    _close(sparse_kd_divergence("forward_kl", s, ids, lp, tail), torch.tensor(want), 1e-5)


def test_topk_from_logits_against_plain_probabilities():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 30, generator=g, dtype=torch.float64) * 2
    ids, lp, tail = topk_from_logits(x, 4)
    assert ids.dtype == torch.int32 and ids.shape == lp.shape == (3, 5, 4) and tail.shape == (3, 5)
    p = torch.softmax(x, -1)
    want_ids = p.argsort(-1, descending=True)[..., :4]
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(lp, p.gather(-1, want_ids).log())
    rest = p.sum(-1) - p.gather(-1, want_ids).sum(-1)
    torch.testing.assert_close(tail, rest.log())
    # float32 in, float32 out; k = V: tail −inf
    ids32, lp32, tail32 = topk_from_logits(x.float(), 30)
    assert lp32.dtype == tail32.dtype == torch.float32 and torch.all(tail32 == -math.inf)
    # a tail far below float32 resolution (1 − Σ p rounds to 0) stays exact
    y = torch.zeros(1, 50)
    y[0, :3] = 100.0
    _, lp_y, tail_y = topk_from_logits(y, 3)
    want = math.log(47) - 100 - math.log(3)  # log(47·e^0 / (3·e^100 + 47))
    assert abs(tail_y.item() - want) < 1e-4
    # vocab_size cuts padding logits off
    _, _, tail_v = topk_from_logits(torch.cat([x, torch.full_like(x[..., :3], 50.0)], -1), 4, vocab_size=30)
    torch.testing.assert_close(tail_v, tail)


def test_bad_sparse_inputs_raise_clear_errors():
    hs, ws, ht, wt, labels, v = _models()
    ids, lp, tail = topk_from_logits(ht @ wt.T, 5)
    with pytest.raises(ValueError, match=r"top-k size must be in \[1, 40\], got 41"):
        topk_from_logits(ht @ wt.T, 41)
    with pytest.raises(ValueError, match="top_ids must be integer ids"):
        chunked_sparse_distill_loss(hs, ws, labels, lp, lp, tail, vocab_size=v)
    with pytest.raises(ValueError, match=r"top_lp \(2, 23, 4\) does not match top_ids \(2, 23, 5\)"):
        chunked_sparse_distill_loss(hs, ws, labels, ids, lp[..., :4], tail, vocab_size=v)
    with pytest.raises(ValueError, match=r"tail \(2, 22\) does not match the \(2, 23\) positions"):
        chunked_sparse_distill_loss(hs, ws, labels, ids, lp, tail[:, 1:], vocab_size=v)
    bad = ids.clone()
    bad[1, 0, 2] = v  # a counted position
    with pytest.raises(ValueError, match=f"a teacher top-k id \\({v}\\) is outside the vocabulary of {v}"):
        chunked_sparse_distill_loss(hs, ws, labels, bad, lp, tail, vocab_size=v)
    with pytest.raises(ValueError, match="unknown reduction"):
        chunked_sparse_distill_loss(hs, ws, labels, ids, lp, tail, reduction="avg")
    with pytest.raises(ValueError, match="kd_ratio must be in"):
        naive_sparse_distill_loss(hs @ ws.T, labels, ids, lp, tail, kd_ratio=2.0)


# ----------------------------------------------------------------------------- the bundled model: measured error

SENTENCES = [
    "The capital of France is Paris, a city known for its museums and cafes.",
    "To reverse a list in Python, you can use slicing with a step of minus one.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the window and the cold morning air filled the quiet room.",
]

# Relative error of the k-sparse forward-KL term against the full one, student = the bundled
# model's logits + N(0, 1) noise (seed 0), 4 sentences (61 tokens); measured (2-core CPU, float32
# model, float64 loss):
#   T = 1: k 16 −0.197, k 64 −0.107, k 256 −0.053      T = 2: k 16 −0.667, k 64 −0.574, k 256 −0.448
# At T = 1 the gap is exactly p_R·KL inside the tail (checked below); at T = 2 most of the tempered
# teacher's mass lies outside the top-k (≈ 0.63 at k = 64) and so does most of the divergence.
# Bounds on |error|: the measurement + 0.03 (T = 1) and + 0.05 (T = 2).
BOUNDS = {(1.0, 16): 0.23, (1.0, 64): 0.14, (1.0, 256): 0.085, (2.0, 16): 0.72, (2.0, 64): 0.625, (2.0, 256): 0.50}


@pytest.mark.slow
def test_bundled_model_sparse_kd_within_measured_bounds(bundled_dir):
    from transformers import AutoTokenizer

    from reflect_tune.models import load_model

    tok = AutoTokenizer.from_pretrained(str(bundled_dir))
    model = load_model(str(bundled_dir), dtype="float32", device="cpu")
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits[enc["attention_mask"].bool()]  # [N, V] real tokens
    V = logits.shape[-1]
    t = logits.double()
    s = t + torch.randn(t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {}
    for k in (16, 64, 256):
        ids, lp, tail = topk_from_logits(logits, k)  # what the cache stores: float32
        for T in (1.0, 2.0):
            full = kd_divergence("forward_kl", s, t, temperature=T, reduction="sum")
            sparse = sparse_kd_divergence("forward_kl", s, ids, lp.double(), tail.double(), temperature=T,
                                          reduction="sum")
            errors[T, k] = (sparse - full).item() / full.item()
            if T == 1.0:
                # exact chain rule: full = buckets + p_R · KL(p(·|R) ‖ q(·|R)); the sparse term misses only that
                p, q = torch.softmax(t, -1), torch.softmax(s, -1)
                out = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids.long(), False)
                p_r, q_r = (p * out).sum(-1, keepdim=True), (q * out).sum(-1, keepdim=True)
                inside = torch.where(out, (p / p_r) * ((p / p_r).log() - (q / q_r).log()), 0.0).sum(-1)
                assert abs((full - sparse).item() - (p_r.squeeze(-1) * inside).sum().item()) < 1e-5 * full.item()
    print("relative error of the sparse forward-KL term:", {f"T={T} k={k}": round(e, 4) for (T, k), e in errors.items()})
    for key, bound in BOUNDS.items():
        assert abs(errors[key]) <= bound, (key, errors[key])
        if key[0] == 1.0:
            assert errors[key] < 0  # never above the full term at T = 1
    for T in (1.0, 2.0):
        assert abs(errors[T, 16]) > abs(errors[T, 64]) > abs(errors[T, 256])

    # the tempered tail: the buckets used against the full tempered teacher's own buckets
    ids, lp, tail = topk_from_logits(logits, 64)
    ids, lp, tail = ids.long(), lp.double(), tail.double()
    for T, best in ((2.0, 0.05), (0.5, 0.001)):
        pt = torch.softmax(t / T, -1)
        truth = torch.cat([pt.gather(-1, ids), (pt.sum(-1) - pt.gather(-1, ids).sum(-1)).unsqueeze(-1)], -1)
        ours = losses._teacher_buckets(lp, tail, T, V).exp()  # the buckets the loss uses
        keep_share = torch.cat([(lp.logsumexp(-1, keepdim=True) + F.log_softmax(lp / T, -1)).exp(), tail.exp()[:, None]], -1)
        no_tail = torch.cat([torch.softmax(lp / T, -1), torch.zeros_like(tail)[:, None]], -1)
        tv = {n: 0.5 * (b - truth).abs().sum(-1).mean().item() for n, b in
              (("ours", ours), ("keep_share", keep_share), ("no_tail", no_tail))}
        print(f"T={T} k=64 total variation to the tempered teacher's buckets:", {n: round(x, 4) for n, x in tv.items()})
        assert tv["ours"] < best and tv["ours"] < tv["keep_share"] and tv["ours"] < tv["no_tail"]
