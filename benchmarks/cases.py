"""The benchmark cases: lossbook against what a user would otherwise call, on the same inputs.

Each ``*_cases(device, quick)`` function yields :class:`~benchmarks.harness.Case` objects. ``quick``
shrinks every size (a smoke test of the suite in seconds); the recorded results use the full sizes.
A peer library that is not installed (pytorch-metric-learning, LibAUC: ``pip install -e ".[bench]"``)
drops its cases with a message instead of failing the run.
"""
from __future__ import annotations

import importlib.util
from typing import Iterator

import torch
import torch.nn.functional as F

from .harness import Case, Impl, forward_backward, loss_and_grads


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _leaf(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).requires_grad_(True)


def _loss_impl(label: str, loss_fn, inputs: list) -> Impl:
    return Impl(label, forward_backward(loss_fn, inputs), loss_and_grads(loss_fn, inputs))


# Why lossbook is slower than its yardstick where it is (shown under the tables when the recorded
# ratio exceeds 1.2). Kept next to the cases so that a change of implementation updates its reason.
WHY = {
    "comp-sum, tau=0.5": "not the same function as cross-entropy: the power of the target probability adds "
                         "element-wise work and autograd nodes on the B target values; the (B, C) work is the "
                         "same log-softmax.",
    "comp-sum, tau=2 (MAE)": "as for tau=0.5: extra work on the B target values only.",
    "LDR-KL": "not the same function: it needs the log-sum-exp of the non-target classes, so it makes a masked "
              "copy of the (B, C) scores and keeps their log-softmax for a closed-form backward: one (B, C) pass "
              "more than cross-entropy each way. It no longer forms the (B, C) matrix of gaps; where the loss is "
              "memory-bound (large C) it runs at the speed of cross-entropy.",
    "ALDR-KL": "as LDR-KL, plus the update of each example's lambda: a softmax, its entropy and a division by "
               "each row's lambda over (B, C), without gradient.",
    "Z-loss": "not the same function: the mean and the variance of every row (one fused reduction over (B, C)) "
              "and a backward written in closed form (centre, then one fused multiply-add, where autograd through the mean and the "
              "variance made several); cross-entropy's log-softmax is one fused kernel each way.",
    "log-Taylor softmax": "not the same function: it needs the sum and the sum of squares of every row (the (B, C) "
                          "polynomial is not formed), and the target's terms.",
    "log-spherical softmax": "not the same function: squares and sums every row of (B, C), plus the target's "
                             "terms.",
    "EnsLoss (sampled calibrated derivative)": "not the same function: every batch draws a random calibrated "
                                               "derivative, B normal draws and two sorts of B values (the k-th "
                                               "smallest derivative goes to the k-th smallest margin), O(B log B) "
                                               "where BCE is one element-wise pass.",
    "AnyLoss (F1)": "not the same function: the amplified sigmoid and the four sums of the soft confusion matrix, "
                    "several element-wise kernels over B where BCE is one fused kernel.",
    "SAM step (optimizer work only)": "SAM copies the weights, takes the global gradient norm, moves the weights "
                                      "and moves them back: about three extra passes over the parameters beside "
                                      "the base SGD step. Inherent to the method; in training, the second forward "
                                      "and backward pass (not timed here) costs far more.",
    "M-FAC step": "M-FAC multiplies the gradient by its inverse-Fisher estimate: O(dm) products with the window "
                  "of m gradients and an m x m refactorisation each step, the method's cost by design.",
    "UNPG (CosFace + batch negatives, filtered)": "not the same function: UNPG adds the N x N matrix of batch "
                                                  "similarities, its whisker filter (two order statistics) and "
                                                  "their log-sum-exp to the CosFace loss; with many classes the "
                                                  "N x C part dominates and the two cost the same.",
    "ArcFace": "ArcFace keeps the (N, C) cosines and a copy with the target's angle shifted, the inputs of its "
               "backward; the fused cross-entropy then needs its own (N, C) buffer.",
}


def _why(name: str) -> dict:
    return {"why": WHY[name]} if name in WHY else {}


# --------------------------------------------------------------------------- classification
def classification_cases(device, quick: bool = False) -> Iterator[Case]:
    """Multi-class losses against ``F.cross_entropy`` (the speed of light: one fused log-softmax),
    B = 4096, C in {10, 1000, 32000}; binary losses against ``binary_cross_entropy_with_logits``."""
    from lossbook.classification import comp_sum, ldr, z_loss

    batch = 256 if quick else 4096
    classes = [10, 100] if quick else [10, 1000, 32000]
    multi = [
        ("comp-sum, tau=1 (cross-entropy)", lambda lg, t: comp_sum.comp_sum_loss(lg, t, tau=1.0), True),
        ("comp-sum, tau=0.5", lambda lg, t: comp_sum.comp_sum_loss(lg, t, tau=0.5), False),
        ("comp-sum, tau=2 (MAE)", lambda lg, t: comp_sum.comp_sum_loss(lg, t, tau=2.0), False),
        ("LDR-KL", lambda lg, t: ldr.ldr_kl_loss(lg, t, lam=1.0), False),
        ("ALDR-KL", lambda lg, t: ldr.aldr_kl_loss(lg, t, lam0=1.0), False),
        ("Z-loss", lambda lg, t: z_loss.z_loss(lg, t), False),
        ("log-Taylor softmax", lambda lg, t: z_loss.log_taylor_softmax_loss(lg, t), False),
        ("log-spherical softmax", lambda lg, t: z_loss.log_spherical_softmax_loss(lg, t), False),
    ]
    for c in classes:
        for name, fn, same in multi:
            def build(dev, dtype, fn=fn, c=c):
                g = _gen(c)
                logits = torch.randn(batch, c, generator=g) * 3
                target = torch.randint(0, c, (batch,), generator=g).to(dev)
                a, b = _leaf(logits, dev, dtype), _leaf(logits, dev, dtype)
                return (_loss_impl("lossbook", lambda: fn(a, target), [a]),
                        _loss_impl("F.cross_entropy", lambda: F.cross_entropy(b, target), [b]))
            yield Case("classification", name, {"B": batch, "C": c}, build, peer="torch F.cross_entropy",
                       same_definition=same, extra=_why(name))

    from lossbook.classification import anyloss, ensloss
    binary = [
        ("EnsLoss (sampled calibrated derivative)", lambda s, t: ensloss.ensloss(s, t, generator=_gen(1))),
        ("AnyLoss (F1)", lambda s, t: anyloss.anyloss(s, t, "f1")),
    ]
    for n in ([1024] if quick else [4096, 1 << 20]):
        for name, fn in binary:
            def build(dev, dtype, fn=fn, n=n):
                g = _gen(n)
                s = torch.randn(n, generator=g)
                t = torch.randint(0, 2, (n,), generator=g).to(dev)
                a, b = _leaf(s, dev, dtype), _leaf(s, dev, dtype)
                return (_loss_impl("lossbook", lambda: fn(a, t), [a]),
                        _loss_impl("BCE with logits", lambda: F.binary_cross_entropy_with_logits(b, t.to(b.dtype)),
                                   [b]))
            yield Case("classification", name, {"B": n}, build, peer="torch F.binary_cross_entropy_with_logits",
                       extra=_why(name))


# --------------------------------------------------------------------------- contrastive
def contrastive_cases(device, quick: bool = False) -> Iterator[Case]:
    """InfoNCE (NT-Xent) and the supervised contrastive loss against pytorch-metric-learning's
    ``NTXentLoss`` and ``SupConLoss``; N embeddings (N/2 images x 2 views for NT-Xent) of dimension D."""
    if not have("pytorch_metric_learning"):
        print("contrastive: pytorch-metric-learning is not installed; skipped")
        return
    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml

    from lossbook.representation.contrastive_temperature import info_nce, supcon_loss

    ver = pytorch_metric_learning.__version__
    sizes = [(64, 32)] if quick else [(n, d) for n in (256, 1024, 4096) for d in (128, 512)]
    tau = 0.1
    for n, d in sizes:
        def build_nt(dev, dtype, n=n, d=d):
            z = torch.randn(n, d, generator=_gen(n + d))
            a, b = _leaf(z, dev, dtype), _leaf(z, dev, dtype)
            labels = torch.arange(n // 2).repeat(2).to(dev)
            peer = pml.NTXentLoss(temperature=tau)
            return (_loss_impl("lossbook info_nce", lambda: info_nce(a[: n // 2], a[n // 2:], tau), [a]),
                    _loss_impl("PML NTXentLoss", lambda: peer(b, labels), [b]))
        yield Case("contrastive", "InfoNCE / NT-Xent", {"N": n, "D": d}, build_nt,
                   peer=f"pytorch-metric-learning {ver} NTXentLoss", same_definition=True, check=n == sizes[0][0],
                   note="pml builds a (positive pairs x negative pairs) indicator: O(N^3) memory")

        def build_sc(dev, dtype, n=n, d=d):
            g = _gen(n * d)
            z = torch.randn(n, d, generator=g)
            labels = torch.randint(0, max(2, n // 16), (n,), generator=g).to(dev)
            a, b = _leaf(z, dev, dtype), _leaf(z, dev, dtype)
            peer = pml.SupConLoss(temperature=tau)
            return (_loss_impl("lossbook supcon_loss", lambda: supcon_loss(a, labels, tau), [a]),
                    _loss_impl("PML SupConLoss", lambda: peer(b, labels), [b]))
        yield Case("contrastive", "supervised contrastive", {"N": n, "D": d}, build_sc,
                   peer=f"pytorch-metric-learning {ver} SupConLoss", same_definition=True, check=n == sizes[0][0],
                   note="16 examples per class on average")


# --------------------------------------------------------------------------- metric learning
def metric_cases(device, quick: bool = False) -> Iterator[Case]:
    """Pair losses over the N x N similarity matrix against pytorch-metric-learning's, which index
    lists of pairs (the contrastive loss and TCM) or masks (multi-similarity)."""
    if not have("pytorch_metric_learning"):
        print("metric: pytorch-metric-learning is not installed; skipped")
        return
    import pytorch_metric_learning
    from pytorch_metric_learning import distances, losses as pml, reducers

    from lossbook.representation.metrix import pair_loss
    from lossbook.representation.tcm import tcm_loss
    from lossbook.retrieval import pair_masks, similarity_matrix

    ver = pytorch_metric_learning.__version__
    d = 128
    ns = [64] if quick else [256, 512, 1024]

    def data(n, dev, dtype):
        g = _gen(n)
        z = torch.randn(n, d, generator=g)
        labels = torch.randint(0, max(2, n // 8), (n,), generator=g).to(dev)
        return _leaf(z, dev, dtype), _leaf(z, dev, dtype), labels

    for n in ns:
        def build_con(dev, dtype, n=n):
            a, b, y = data(n, dev, dtype)
            peer = pml.ContrastiveLoss(pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity(),
                                       reducer=reducers.SumReducer())

            def ours():
                pos, neg = pair_masks(y)
                return pair_loss(similarity_matrix(a), pos, neg, loss="contrastive", margin=0.5).sum()
            return _loss_impl("lossbook pair_loss", ours, [a]), _loss_impl("PML ContrastiveLoss", lambda: peer(b, y), [b])
        yield Case("metric", "contrastive (pairs)", {"N": n, "D": d}, build_con,
                   peer=f"pytorch-metric-learning {ver} ContrastiveLoss", same_definition=True, check=n == ns[0],
                   note="cosine similarity, margin 0.5, summed over pairs")

        def build_ms(dev, dtype, n=n):
            a, b, y = data(n, dev, dtype)
            peer = pml.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)

            def ours():
                pos, neg = pair_masks(y)
                return pair_loss(similarity_matrix(a), pos, neg, loss="multi_similarity").mean()
            return (_loss_impl("lossbook pair_loss", ours, [a]),
                    _loss_impl("PML MultiSimilarityLoss", lambda: peer(b, y), [b]))
        yield Case("metric", "multi-similarity", {"N": n, "D": d}, build_ms,
                   peer=f"pytorch-metric-learning {ver} MultiSimilarityLoss", same_definition=True, check=n == ns[0])

        def build_tcm(dev, dtype, n=n):
            a, b, y = data(n, dev, dtype)
            peer = pml.ThresholdConsistentMarginLoss()
            return (_loss_impl("lossbook tcm_loss", lambda: tcm_loss(a, y), [a]),
                    _loss_impl("PML ThresholdConsistentMarginLoss", lambda: peer(b, y), [b]))
        yield Case("metric", "TCM regulariser", {"N": n, "D": d}, build_tcm,
                   peer=f"pytorch-metric-learning {ver} ThresholdConsistentMarginLoss", same_definition=True,
                   check=n == ns[0])


# --------------------------------------------------------------------------- M-FAC
def mfac_cases(device, quick: bool = False) -> Iterator[Case]:
    """One M-FAC step (replace the oldest of m gradients, multiply by the inverse) against the dense
    reference (form the damped d x d empirical Fisher of the same window, Cholesky, solve)."""
    from lossbook.optimizers.m_fac import SlidingWindowIHVP, empirical_fisher

    damp = 0.1
    grid = [(256, 8)] if quick else [(d, m) for d in (1024, 2048, 4096) for m in (16, 64)]
    for d, m in grid:
        def build(dev, dtype, d=d, m=m):
            g = _gen(d + m)
            grads = torch.randn(m, d, generator=g).to(dev, dtype)
            new = torch.randn(d, generator=g).to(dev, dtype)
            h = SlidingWindowIHVP.from_grads(grads, damp)

            def dense_solve(window):
                fisher = empirical_fisher(window, damp)
                return torch.cholesky_solve(new[:, None], torch.linalg.cholesky(fisher))[:, 0]

            def ours_values():
                h2 = SlidingWindowIHVP.from_grads(grads, damp)
                return [h2.update_mul(new)]

            def dense_values():
                window = grads.clone()
                window[0] = new          # the oldest row is the one replaced
                return [dense_solve(window)]
            return (Impl("lossbook SlidingWindowIHVP.update_mul", lambda: h.update_mul(new), ours_values),
                    Impl("dense Cholesky solve", lambda: dense_solve(grads), dense_values))
        yield Case("optimizers", "M-FAC inverse-Fisher-vector product", {"d": d, "m": m}, build,
                   peer="dense reference (torch.linalg.cholesky)", same_definition=True)


# --------------------------------------------------------------------------- optimizer steps
def optimizer_cases(device, quick: bool = False) -> Iterator[Case]:
    """``step()`` on a ResNet-18-sized list of parameters with gradients in place, against plain
    ``torch.optim.SGD`` with momentum (the step a user would take without the method)."""
    from lossbook.optimizers.m_fac import MFAC
    from lossbook.optimizers.saf import SAM

    shapes = [(64, 64)] * 4 if quick else \
        [(64, 3 * 49)] + [(64, 64 * 9)] * 4 + [(128, 64 * 9), (128, 128 * 9)] + [(128, 128 * 9)] * 2 + \
        [(256, 128 * 9), (256, 256 * 9)] + [(256, 256 * 9)] * 2 + [(512, 256 * 9), (512, 512 * 9)] + \
        [(512, 512 * 9)] * 2 + [(10, 512)]
    n_params = sum(a * b for a, b in shapes)

    def params(dev, dtype):
        g = _gen(1)
        ps = [torch.randn(*s, generator=g).to(dev, dtype).requires_grad_(True) for s in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(dev, dtype) * 1e-3
        return ps

    def build_sam(dev, dtype):
        a, b = params(dev, dtype), params(dev, dtype)
        sam = SAM(a, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        sgd = torch.optim.SGD(b, lr=0.1, momentum=0.9)

        def sam_step():
            sam.first_step()
            sam.second_step()
        return Impl("lossbook SAM (first + second step)", sam_step), Impl("torch.optim.SGD.step", sgd.step)
    yield Case("optimizers", "SAM step (optimizer work only)", {"params": n_params}, build_sam,
               peer="torch.optim.SGD (momentum 0.9)",
               note="SAM's two steps without the extra forward/backward pass", extra=_why("SAM step (optimizer work only)"))

    for m in ([4] if quick else [8, 32]):
        def build_mfac(dev, dtype, m=m):
            a, b = params(dev, dtype), params(dev, dtype)
            mfac = MFAC(a, lr=1e-3, ngrads=m, damp=1e-5)
            sgd = torch.optim.SGD(b, lr=0.1, momentum=0.9)
            return Impl(f"lossbook MFAC.step (m={m})", mfac.step), Impl("torch.optim.SGD.step", sgd.step)
        yield Case("optimizers", "M-FAC step", {"params": n_params, "m": m}, build_mfac,
                   peer="torch.optim.SGD (momentum 0.9)", extra=_why("M-FAC step"))


# --------------------------------------------------------------------------- margin softmax, UNPG
def unpg_cases(device, quick: bool = False) -> Iterator[Case]:
    """CosFace and ArcFace against pytorch-metric-learning's ``CosFaceLoss`` / ``ArcFaceLoss`` (same
    class weights, transposed: theirs are (D, C)); UNPG on CosFace against CosFace alone."""
    if not have("pytorch_metric_learning"):
        print("unpg: pytorch-metric-learning is not installed; skipped")
        return
    import math

    import pytorch_metric_learning
    from pytorch_metric_learning import losses as pml

    from lossbook.representation.unpg import (arcface_logits, batch_negative_similarities, cosface_logits, unpg_loss,
                                              whisker_filter)

    ver = pytorch_metric_learning.__version__
    n, d = (64, 32) if quick else (512, 512)
    for c in ([100] if quick else [1000, 10000, 100000]):
        def data(dev, dtype, c=c):
            g = _gen(c)
            emb, w = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
            y = torch.randint(0, c, (n,), generator=g).to(dev)
            return _leaf(emb, dev, dtype), _leaf(w, dev, dtype), _leaf(emb, dev, dtype), _leaf(w, dev, dtype), y

        def pml_impl(label, peer, e, y):
            values = loss_and_grads(lambda: peer(e, y), [e, peer.W])
            return Impl(label, forward_backward(lambda: peer(e, y), [e, peer.W]),
                        lambda: [*values()[:2], values()[2].T])          # their W is (D, C)

        def pml_loss(cls, w, dev, dtype, **kw):
            loss = cls(num_classes=w.shape[0], embedding_size=d, **kw).to(dev, dtype)
            loss.W = torch.nn.Parameter(w.detach().T.contiguous())
            return loss

        def build_cos(dev, dtype):
            e1, w1, e2, w2, y = data(dev, dtype)
            peer = pml_loss(pml.CosFaceLoss, w2, dev, dtype, margin=0.35, scale=30.0)
            return (_loss_impl("lossbook cosface_logits + unpg_loss",
                               lambda: unpg_loss(cosface_logits(e1, w1, y, m=0.35), y, s=30.0), [e1, w1]),
                    pml_impl("PML CosFaceLoss", peer, e2, y))
        yield Case("unpg", "CosFace", {"N": n, "D": d, "C": c}, build_cos,
                   peer=f"pytorch-metric-learning {ver} CosFaceLoss", same_definition=True)

        def build_arc(dev, dtype):
            e1, w1, e2, w2, y = data(dev, dtype)
            peer = pml_loss(pml.ArcFaceLoss, w2, dev, dtype, margin=math.degrees(0.5), scale=32.0)
            return (_loss_impl("lossbook arcface_logits + unpg_loss",
                               lambda: unpg_loss(arcface_logits(e1, w1, y, m=0.5), y, s=32.0), [e1, w1]),
                    pml_impl("PML ArcFaceLoss", peer, e2, y))
        yield Case("unpg", "ArcFace", {"N": n, "D": d, "C": c}, build_arc,
                   peer=f"pytorch-metric-learning {ver} ArcFaceLoss", same_definition=True,
                   note="margin 0.5 rad (pml takes degrees)", extra=_why("ArcFace"))

        def build_unpg(dev, dtype):
            e1, w1, e2, w2, y = data(dev, dtype)
            peer = pml_loss(pml.CosFaceLoss, w2, dev, dtype, margin=0.35, scale=30.0)

            def ours():
                sims, neg = batch_negative_similarities(e1, y)
                keep = whisker_filter(sims, neg, wisk=1.5)
                return unpg_loss(cosface_logits(e1, w1, y, m=0.35), y, sims, keep, s=30.0)
            return _loss_impl("lossbook UNPG", ours, [e1, w1]), pml_impl("PML CosFaceLoss", peer, e2, y)
        name = "UNPG (CosFace + batch negatives, filtered)"
        yield Case("unpg", name, {"N": n, "D": d, "C": c}, build_unpg,
                   peer=f"pytorch-metric-learning {ver} CosFaceLoss", extra=_why(name))


# --------------------------------------------------------------------------- iSogCLR
def isogclr_cases(device, quick: bool = False) -> Iterator[Case]:
    """The iSogCLR loss with its per-sample state (moving average u, temperature, momentum) updated by
    index on the inputs' device, against LibAUC's ``GCLoss_v1(enable_isogclr=True)``, which keeps
    that state on the CPU. Same hyper-parameters (LibAUC's defaults, no gradient clip); gamma is 1,
    the value LibAUC's loss uses until ``adjust_gamma`` is called. Forward, backward and the state
    update, on a dataset of 50,000 samples."""
    if not have("libauc"):
        print("isogclr: LibAUC is not installed (pip install --no-deps libauc); skipped")
        return
    import libauc
    from libauc.losses import GCLoss_v1

    from lossbook.representation.isogclr import ISogCLRLoss

    n_data, d = (512, 16) if quick else (50_000, 128)
    hp = dict(rho=0.3, eta=0.01, beta=0.9, tau_min=0.05, tau_max=0.7)
    for b in ([32] if quick else [256, 1024, 4096]):
        def build(dev, dtype, b=b):
            g = _gen(b)
            z1, z2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
            index = torch.randperm(n_data, generator=g)[:b].to(dev)
            a1, a2, p1, p2 = (_leaf(z, dev, dtype) for z in (z1, z2, z1, z2))

            def make_ours():
                return ISogCLRLoss(n_data, gamma=1.0, tau_init=0.1, grad_clip=None, **hp).to(dev, dtype)

            def make_theirs():
                loss = GCLoss_v1(N=n_data, tau=0.1, gamma=1.0, enable_isogclr=True, device=dev, **hp)
                for name in ("u", "learnable_tau", "grad_tau"):      # its CPU state, in the inputs' dtype
                    setattr(loss, name, getattr(loss, name).to(dtype))
                return loss
            ours_fn, theirs_fn = make_ours(), make_theirs()

            # the two return different surrogate *values* (LibAUC's is linear in the similarities, ours
            # is the estimate -s+ + tau log u); their gradients are the same estimator, compared here.
            # LibAUC sums the two views where we average: a factor 2.
            def ours_values():
                return loss_and_grads(lambda: 2 * make_ours()(a1, a2, index), [a1, a2])()[1:]

            def theirs_values():
                return loss_and_grads(lambda: make_theirs()(p1, p2, index), [p1, p2])()[1:]
            return (Impl("lossbook ISogCLRLoss", forward_backward(lambda: ours_fn(a1, a2, index), [a1, a2]),
                         ours_values),
                    Impl("LibAUC GCLoss_v1(enable_isogclr)", forward_backward(lambda: theirs_fn(p1, p2, index),
                                                                              [p1, p2]), theirs_values))
        yield Case("isogclr", "iSogCLR (individual temperatures)", {"B": b, "D": d, "n_data": n_data}, build,
                   peer=f"LibAUC {libauc.__version__} GCLoss_v1", same_definition=True,
                   note="gradients of the first call from a fresh state compared (the surrogate values differ)")


SUITES = {
    "classification": classification_cases,
    "contrastive": contrastive_cases,
    "metric": metric_cases,
    "mfac": mfac_cases,
    "optimizers": optimizer_cases,
    "unpg": unpg_cases,
    "isogclr": isogclr_cases,
}
