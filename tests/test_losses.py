"""The loss registry: every method against an independent float64 numpy reference of its formula, in
value and in the gradient with respect to the student's outputs (central differences of the
reference), plus the registry's contract (config union, needs, checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import losses
from losses import StudentOutputs, TeacherTargets
from losses.spectralkd import SpectralKDConfig
from pipeline.config import ConfigError, config_from_dict
from stages.spectral import spectrum
from tests.conftest import tiny_tree

# ----------------------------------------------------------------------------- float64 references


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(z, y, smoothing=0.0):
    """Label-smoothed cross-entropy, batch mean; ``y`` class indices or class probabilities."""
    k = z.shape[1]
    target = np.eye(k)[y] if y.ndim == 1 else y
    target = target * (1 - smoothing) + smoothing / k
    return float(-(target * np_log_softmax(z)).sum(1).mean())


def np_kl(zs, zt, tau):
    """T^2 KL(softmax(zt/T) || softmax(zs/T)), batch mean."""
    ls, lt = np_log_softmax(zs / tau), np_log_softmax(zt / tau)
    return float((np.exp(lt) * (lt - ls)).sum(1).mean() * tau * tau)


def np_pool(x, c_out):
    """Adaptive average pooling of axis 1 (adjacent channel groups)."""
    c = x.shape[1]
    return np.stack([x[:, (i * c) // c_out: -(-((i + 1) * c) // c_out)].mean(axis=1) for i in range(c_out)], axis=1)


def np_spectrum(x):
    s = np.fft.rfft2(x, axes=(-2, -1), norm="ortho")
    return np.stack([s.real, s.imag], axis=-1)


def central_gradient(f, arrays: list[np.ndarray], eps: float = 1e-6) -> list[np.ndarray]:
    """d f / d each array, by central differences in float64."""
    grads = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for j in np.ndindex(a.shape):
            hi, lo = [x.copy() for x in arrays], [x.copy() for x in arrays]
            hi[i][j] += eps
            lo[i][j] -= eps
            g[j] = (f(*hi) - f(*lo)) / (2 * eps)
        grads.append(g)
    return grads


def check_method(loss: losses.DistillLoss, reference, student: dict, teacher: TeacherTargets, labels,
                 rtol: float = 1e-4, epoch: int = 0) -> dict:
    """The loss's total against ``reference(logits, *features[, dist_logits])`` (float64 numpy), in
    value and in its gradient with respect to each student output; returns the terms."""
    names = ["logits", *[f"f{i}" for i in range(len(student.get("features", [])))]]
    arrays = [student["logits"], *student.get("features", [])]
    if student.get("dist_logits") is not None:
        names.append("dist")
        arrays.append(student["dist_logits"])
    tensors = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in arrays]
    outs = StudentOutputs(tensors[0], tensors[1:1 + len(student.get("features", []))],
                          tensors[-1] if "dist" in names else None)
    terms = loss(outs, teacher, labels, epoch)
    terms["total"].backward()
    want = reference(*arrays)
    assert terms["total"].item() == pytest.approx(want, rel=rtol, abs=1e-6)
    total = sum(v for k, v in terms.items() if k != "total")
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-6, abs=1e-7)  # the terms sum to the total
    for name, t, g in zip(names, tensors, central_gradient(reference, arrays)):
        scale = max(np.abs(g).max(), 1e-3)
        np.testing.assert_allclose(t.grad.numpy(), g, rtol=0, atol=scale * 5e-3, err_msg=name)
    return terms


def f32(a):
    return torch.tensor(a, dtype=torch.float32)


# ----------------------------------------------------------------------------- SpectralKD's kinds


def np_spectral_term(fs, teacher_spectra):
    return float(np.mean([((np_spectrum(f) - np_pool(t, f.shape[1])) ** 2).mean()
                          for f, t in zip(fs, teacher_spectra)]))


@pytest.mark.parametrize("kind,pairs", [("none", 0), ("logits", 0), ("spectral", 2), ("spectral_only", 1),
                                        ("hard", 2), ("hard", 0)])
def test_spectralkd_kinds_match_numpy_float64(kind, pairs):
    rng = np.random.default_rng(pairs * 7 + len(kind))
    b, c_s, c_t, h, w, k = 3, 3, 6, 3, 4, 5
    zs, zt = rng.normal(size=(b, k)) * 2, rng.normal(size=(b, k)) * 2
    y = rng.integers(0, k, b)
    fs = [rng.normal(size=(b, c_s, h, w)) for _ in range(pairs)]
    t_spec = [np_spectrum(rng.normal(size=(b, c_t, h, w))) for _ in range(pairs)]
    cfg = SpectralKDConfig(kind=kind, alpha=0.7, tau=3.0, beta=0.5, w_fft=0.2, label_smoothing=0.1)
    t32 = [torch.tensor(t, dtype=torch.float32).numpy().astype(np.float64) for t in t_spec]

    def reference(z, *feats):
        ce = np_ce(z, y, 0.1)
        if kind == "none":
            return ce
        kd = {"logits": lambda: np_kl(z, zt, 3.0), "spectral": lambda: np_kl(z, zt, 3.0),
              "hard": lambda: np_ce(z, zt.argmax(1)), "spectral_only": lambda: 0.0}[kind]()
        spec = np_spectral_term(feats, t32) if feats else 0.0
        return 0.3 * ce + 0.7 * kd + 0.5 * 0.2 * spec

    loss = losses.build(cfg)
    terms = check_method(loss, reference, {"logits": zs, "features": fs},
                         TeacherTargets(f32(zt), [f32(t) for t in t_spec]), torch.tensor(y))
    want_terms = {"none": ["ce"], "logits": ["ce", "kd"], "spectral": ["ce", "kd", "spectral"],
                  "spectral_only": ["ce", "spectral"], "hard": ["ce", "kd"] + (["spectral"] if pairs else [])}[kind]
    assert list(terms) == ["total", *want_terms]


def test_teacher_targets_get_no_gradient():
    zs = torch.randn(2, 5, requires_grad=True)
    zt = torch.randn(2, 5, requires_grad=True)
    t_feat = torch.randn(2, 8, 4, 4, requires_grad=True)
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    for kind in ("spectral", "hard"):
        terms = losses.build(SpectralKDConfig(kind=kind))(StudentOutputs(zs, [f]),
                                                          TeacherTargets(zt, [spectrum(t_feat)]), torch.tensor([0, 3]))
        g = torch.autograd.grad(terms["total"], [zs, f, zt, t_feat], allow_unused=True)
        assert g[0].abs().sum() > 0 and g[1].abs().sum() > 0
        assert all(x is None or x.abs().sum() == 0 for x in g[2:]), kind


def test_a_kind_without_its_targets_is_named():
    zs = torch.randn(3, 4)
    with pytest.raises(ValueError, match="needs the teacher's logits"):
        losses.build(SpectralKDConfig(kind="logits"))(StudentOutputs(zs), TeacherTargets(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="spectral_only"):
        losses.build(SpectralKDConfig(kind="spectral_only"))(StudentOutputs(zs), TeacherTargets(),
                                                             torch.tensor([0, 1, 2]))


def test_spatial_mismatch_names_the_pair():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="layer pair #0"):
        losses.build(SpectralKDConfig())(StudentOutputs(torch.randn(2, 3), [torch.randn(2, 4, 4, 4)]),
                                         TeacherTargets(torch.randn(2, 3), [spectrum(torch.randn(2, 4, 5, 5))]),
                                         torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- the registry's contract


def test_every_kind_has_a_config_whose_kind_selects_it():
    assert len(losses.KINDS) == len(set(losses.KINDS))
    for kind in losses.KINDS:
        cls = losses.loss_class(kind)
        assert kind in cls.kinds and cls.Config(kind=kind).kind == kind
        tree = tiny_tree(**{"distill.students[0].loss": {"kind": kind}})
        errors = []
        try:
            cfg = config_from_dict(tree)
        except ConfigError as e:  # a kind that needs pairs names them; the student has none
            errors.append(str(e))
        if errors:
            assert "needs pairs" in errors[0] and "\n" not in errors[0]
        else:
            assert type(cfg.distill.students[0].loss) is cls.Config


def test_an_unknown_kind_and_a_field_of_another_kind_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"distill.students\[0\].loss: .* loss.kind is one of none, logits"):
        config_from_dict(tiny_tree(**{"distill.students[0].loss": {"kind": "soft"}}))
    with pytest.raises(ConfigError, match=r"distill.students\[0\].loss.bogus: unknown key \(allowed: kind,"):
        config_from_dict(tiny_tree(**{"distill.students[0].loss": {"kind": "none", "bogus": 1}}))


def test_needs_say_what_a_student_reads():
    assert losses.needs(SpectralKDConfig(kind="none"), []) == losses.Needs()
    assert losses.needs(SpectralKDConfig(kind="spectral"), [(0, 0)]) == losses.Needs(True, "spectra", True)
    assert losses.needs(SpectralKDConfig(kind="spectral_only"), [(0, 0)]) == losses.Needs(False, "spectra", True)
    assert losses.needs(SpectralKDConfig(kind="hard"), []) == losses.Needs(True, None, False)
    assert losses.needs(SpectralKDConfig(kind="hard"), [(0, 0)]).reads_layers


# ----------------------------------------------------------------------------- the comparison set's methods

B, K = 4, 5


def logits_case(seed: int, mixed: bool = False):
    """Student and teacher logits and labels (class indices, or class probabilities when ``mixed``)."""
    rng = np.random.default_rng(seed)
    zs, zt = rng.normal(size=(B, K)) * 2, rng.normal(size=(B, K)) * 2
    if mixed:
        y = rng.dirichlet(np.ones(K), size=B)
        return zs, zt, y, torch.tensor(y, dtype=torch.float32)
    y = rng.integers(0, K, B)
    return zs, zt, y, torch.tensor(y)


def zt32(zt):
    """The teacher's logits as the loss gets them (float32), back in float64 for the reference."""
    return f32(zt).numpy().astype(np.float64)


def y_class(y):
    return y if y.ndim == 1 else y.argmax(1)


def np_kl_p(pt, ps):
    """KL(pt || ps) of probability rows, batch mean."""
    return float((pt * (np.log(pt) - np.log(ps))).sum(1).mean())


def drop_target(z, t):
    keep = np.ones(z.shape, dtype=bool)
    keep[np.arange(len(z)), t] = False
    return z[keep].reshape(len(z), -1)


def np_dkd(zs, zt, t, alpha, beta, tau):
    """alpha TCKD + beta NCKD (Zhao et al. 2022, Eq. 7), from the probabilities as written."""
    rows = np.arange(len(zs))
    ps, pt = np_softmax(zs / tau), np_softmax(zt / tau)
    bs = np.stack([ps[rows, t], 1 - ps[rows, t]], 1)
    bt = np.stack([pt[rows, t], 1 - pt[rows, t]], 1)
    ns, nt = np_softmax(drop_target(zs, t) / tau), np_softmax(drop_target(zt, t) / tau)
    return tau * tau * (alpha * np_kl_p(bt, bs) + beta * np_kl_p(nt, ns))


@pytest.mark.parametrize("epoch,mixed", [(0, False), (2, False), (5, True)])
def test_dkd_matches_numpy_float64_with_its_warmup(epoch, mixed):
    from losses.dkd import DKDConfig

    zs, zt, y, labels = logits_case(epoch, mixed)
    cfg = DKDConfig(alpha=1.5, beta=0.5, tau=2.0, warmup=4)
    w = min((epoch + 1) / 4, 1.0)  # mdistiller's min(epoch / warmup, 1), epochs counted from 1
    t = y_class(y)
    terms = check_method(losses.build(cfg), lambda z: np_ce(z, y, 0.1) + w * np_dkd(z, zt32(zt), t, 1.5, 0.5, 2.0),
                         {"logits": zs}, TeacherTargets(f32(zt)), labels, epoch=epoch)
    assert list(terms) == ["total", "ce", "tckd", "nckd"]
    assert terms["tckd"].item() == pytest.approx(w * np_dkd(zs, zt32(zt), t, 1.5, 0, 2.0), rel=1e-4)
    d = DKDConfig()  # mdistiller's ImageNet setting
    assert (d.alpha, d.beta, d.tau, d.warmup, d.label_smoothing) == (1.0, 0.5, 1.0, 1, 0.1)


def np_pearson(a, b):
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.sqrt((a * a).sum(1)) * np.sqrt((b * b).sum(1)) + 1e-8)


def test_dist_matches_numpy_float64():
    from losses.dist import DISTConfig

    zs, zt, y, labels = logits_case(11)
    cfg = DISTConfig(beta=0.7, gamma=1.3, tau=2.0, kd_weight=2.0)

    def reference(z):
        ys, yt = np_softmax(z / 2.0), np_softmax(zt32(zt) / 2.0)
        inter = 1 - np_pearson(ys, yt).mean()
        intra = 1 - np_pearson(ys.T, yt.T).mean()
        return np_ce(z, y, 0.1) + 2.0 * 4.0 * (0.7 * inter + 1.3 * intra)

    terms = check_method(losses.build(cfg), reference, {"logits": zs}, TeacherTargets(f32(zt)), labels)
    assert list(terms) == ["total", "ce", "inter", "intra"]
    d = DISTConfig()
    assert (d.beta, d.gamma, d.tau, d.kd_weight) == (1.0, 1.0, 1.0, 2.0)


@pytest.mark.parametrize("mixed", [False, True])
def test_nkd_matches_numpy_float64(mixed):
    from losses.nkd import NKDConfig

    zs, zt, y, labels = logits_case(21, mixed)
    t = y_class(y)
    rows = np.arange(B)

    def reference(z):
        zt_ = zt32(zt)
        target = -(np_softmax(zt_)[rows, t] * np_log_softmax(z)[rows, t]).mean()
        rest = -(np_softmax(drop_target(zt_, t) / 1.5) * np_log_softmax(drop_target(z, t) / 1.5)).sum(1).mean()
        return np_ce(z, y, 0.1) + target + 1.2 * 1.5**2 * rest

    terms = check_method(losses.build(NKDConfig(tau=1.5, gamma=1.2)), reference, {"logits": zs},
                         TeacherTargets(f32(zt)), labels)
    assert list(terms) == ["total", "ce", "target", "non_target"]
    assert (NKDConfig().tau, NKDConfig().gamma) == (1.0, 1.0)  # cls_KD's DeiT setting


def test_logit_standardization_matches_numpy_float64():
    from losses.logit_std import LogitStdConfig

    zs, zt, y, labels = logits_case(31)

    def z_score(z):
        return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)

    reference = lambda z: np_ce(z, y, 0.1) + 9.0 * np_kl(z_score(z), z_score(zt32(zt)), 2.0)  # noqa: E731
    terms = check_method(losses.build(LogitStdConfig()), reference, {"logits": zs}, TeacherTargets(f32(zt)), labels)
    assert list(terms) == ["total", "ce", "kd"]
    # invariant to each row's shift and scale of either side's logits
    again = losses.build(LogitStdConfig())(StudentOutputs(f32(zs * 3 + 1)), TeacherTargets(f32(zt * 0.5 - 2)),
                                           labels)["kd"]
    assert again.item() == pytest.approx(terms["kd"].item(), rel=1e-4)


@pytest.mark.parametrize("kind,alpha", [("hard", 0.5), ("soft", 0.3)])
def test_distillation_token_matches_numpy_float64(kind, alpha):
    from losses.distill_token import DistillTokenConfig

    zs, zt, y, labels = logits_case(41)
    zd = np.random.default_rng(42).normal(size=(B, K))
    cfg = DistillTokenConfig(type=kind, alpha=alpha, tau=2.0)

    def reference(z, d):
        kd = np_ce(d, zt32(zt).argmax(1)) if kind == "hard" else np_kl(d, zt32(zt), 2.0)
        return (1 - alpha) * np_ce(z, y, 0.1) + alpha * kd

    terms = check_method(losses.build(cfg), reference, {"logits": zs, "dist_logits": zd}, TeacherTargets(f32(zt)),
                         labels)
    assert list(terms) == ["total", "ce", "kd"]
    with pytest.raises(ValueError, match="distillation head"):
        losses.build(cfg)(StudentOutputs(f32(zs)), TeacherTargets(f32(zt)), labels)
    d = DistillTokenConfig()
    assert (d.type, d.alpha, d.tau, d.label_smoothing) == ("hard", 0.5, 1.0, 0.1)  # DeiT's main.py


# ----------------------------------------------------------------------------- feature methods

H = W = 3
PAIRS = (losses.LayerPair(0, 0, (3, H, W), (4, H, W)), losses.LayerPair(1, 3, (4, H, W), (4, H, W)))


def feature_case(seed: int):
    """Student maps (one 3 channels wide, one 4) and the teacher's maps (4 wide) of PAIRS."""
    rng = np.random.default_rng(seed)
    zs, zt, y, labels = logits_case(seed)
    fs = [rng.normal(size=(B, p.student_shape[0], H, W)) for p in PAIRS]
    ft = [rng.normal(size=(B, p.teacher_shape[0], H, W)) for p in PAIRS]
    return zs, zt, y, labels, fs, ft


def weights64(loss: torch.nn.Module) -> dict[str, np.ndarray]:
    """The loss's extras' current weights as float64 arrays, by name."""
    return {n: p.detach().double().numpy() for n, p in loss.state_dict().items()}


def np_conv(x, w, b):
    """2-D convolution, stride 1, 'same' zero padding, of (B, C, H, W) by (O, C, k, k)."""
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((x.shape[0], w.shape[0], *x.shape[2:])) + b[None, :, None, None]
    for i in range(k):
        for j in range(k):
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], xp[:, :, i:i + x.shape[2], j:j + x.shape[3]])
    return out


def np_generate(x, wt, prefix):
    """conv3x3 - ReLU - conv3x3 with the weights under ``prefix``."""
    h = np.maximum(np_conv(x, wt[f"{prefix}.0.weight"], wt[f"{prefix}.0.bias"]), 0)
    return np_conv(h, wt[f"{prefix}.2.weight"], wt[f"{prefix}.2.bias"])


def np_linear_map(x, wt, prefix):
    """A 1x1 convolution, or the identity where the loss has none under ``prefix``."""
    if f"{prefix}.weight" not in wt:
        return x
    return np_conv(x, wt[f"{prefix}.weight"], wt[f"{prefix}.bias"])


def test_fitnets_matches_numpy_float64():
    from losses.fitnets import FitNetsConfig

    zs, zt, y, labels, fs, ft = feature_case(51)
    loss = losses.build(FitNetsConfig(), PAIRS)
    wt = weights64(loss)
    assert [wt[f"regressors.{i}.weight"].shape for i in range(2)] == [(4, 3, 1, 1), (4, 4, 1, 1)]

    def reference(z, *feats):
        hint = sum(((np_linear_map(f, wt, f"regressors.{i}") - t) ** 2).mean()
                   for i, (f, t) in enumerate(zip(feats, ft)))
        return np_ce(z, y, 0.1) + 100.0 * hint

    terms = check_method(loss, reference, {"logits": zs, "features": fs}, TeacherTargets(None, [f32(t) for t in ft]),
                         labels)
    assert list(terms) == ["total", "ce", "hint"]


def test_attention_transfer_matches_numpy_float64():
    from losses.at import ATConfig

    zs, zt, y, labels, fs, ft = feature_case(61)
    ft[1] = ft[1][:, :2]  # the teacher's width need not be the student's

    def att(f):
        a = (np.abs(f) ** 2).mean(1).reshape(len(f), -1)
        return a / np.sqrt((a * a).sum(1, keepdims=True))

    reference = lambda z, *feats: np_ce(z, y, 0.1) + 1000.0 * sum(  # noqa: E731
        ((att(f) - att(t)) ** 2).mean() for f, t in zip(feats, ft))
    loss = losses.build(ATConfig(), PAIRS)
    assert not list(loss.parameters())
    terms = check_method(loss, reference, {"logits": zs, "features": fs}, TeacherTargets(None, [f32(t) for t in ft]),
                         labels)
    assert list(terms) == ["total", "ce", "at"]


def perturbed(loss: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``loss`` with every extra moved off its initial value (a zero mask token would hide its use)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return loss


def test_vitkd_matches_numpy_float64_with_the_same_mask():
    from losses.vitkd import ViTKDConfig

    zs, zt, y, labels, fs, ft = feature_case(71)
    cfg = ViTKDConfig(alpha=0.05, beta=0.02, mask_ratio=0.5)
    loss = perturbed(losses.build(cfg, PAIRS), 0)
    wt = weights64(loss)
    assert "mimic.0.weight" in wt and "align.weight" not in wt  # the deep pair's widths are equal
    torch.manual_seed(5)
    mask = loss.token_mask(B, H * W).numpy().reshape(B, 1, H, W)
    torch.manual_seed(5)
    order = np.argsort(torch.rand(B, H * W).numpy(), axis=1)  # the draws: a random order of the tokens per sample
    want = np.zeros((B, H * W))
    np.put_along_axis(want, order[:, int(H * W * 0.5):], 1.0, axis=1)  # masked: all but the first int(L(1-lambda))
    assert np.array_equal(mask.reshape(B, -1), want) and (want.sum(1) == 5).all()

    def reference(z, f0, f1):
        mimic = ((np_linear_map(f0, wt, "mimic.0") - ft[0]) ** 2).sum() / B
        x = f1 * (1 - mask) + wt["mask_token"][None, :, None, None] * mask
        gen = (((np_generate(x, wt, "generation") - ft[1]) ** 2) * mask).sum() / (B * 0.5)
        return np_ce(z, y, 0.1) + 0.05 * mimic + 0.02 * gen

    torch.manual_seed(5)  # the loss draws the same mask
    terms = check_method(loss, reference, {"logits": zs, "features": fs}, TeacherTargets(None, [f32(t) for t in ft]),
                         labels)
    assert list(terms) == ["total", "ce", "mimic", "generation"]
    d = ViTKDConfig()
    assert (d.alpha, d.beta, d.mask_ratio) == (3e-5, 3e-6, 0.5)  # cls_KD's DeiT setting
    one = losses.build(cfg, PAIRS[1:])  # one pair: generation only
    assert list(one(StudentOutputs(f32(zs), [f32(fs[1])]), TeacherTargets(None, [f32(ft[1])]), labels)) == \
        ["total", "ce", "generation"]


def test_mgd_matches_numpy_float64_with_the_same_masks():
    from losses.mgd import MGDConfig

    zs, zt, y, labels, fs, ft = feature_case(81)
    cfg = MGDConfig(alpha=0.01, mask_ratio=0.4)
    loss = perturbed(losses.build(cfg, PAIRS), 1)
    wt = weights64(loss)
    assert "aligns.0.weight" in wt and "aligns.1.weight" not in wt
    torch.manual_seed(6)
    masks = [loss.channel_mask(B, 4).numpy() for _ in PAIRS]  # one per pair, in order
    torch.manual_seed(6)
    draws = [torch.rand(B, 4, 1, 1).numpy() for _ in PAIRS]  # the draws: a channel is zeroed below lambda
    assert all(np.array_equal(m, (u >= 0.4).astype(np.float32)) for m, u in zip(masks, draws))
    assert 0 < sum(m.sum() for m in masks) < 2 * B * 4

    def reference(z, *feats):
        sq = sum(((np_generate(np_linear_map(f, wt, f"aligns.{i}") * m, wt, f"generators.{i}") - t) ** 2).sum()
                 for i, (f, t, m) in enumerate(zip(feats, ft, masks)))
        return np_ce(z, y, 0.1) + 0.01 * sq / B

    torch.manual_seed(6)
    terms = check_method(loss, reference, {"logits": zs, "features": fs}, TeacherTargets(None, [f32(t) for t in ft]),
                         labels)
    assert list(terms) == ["total", "ce", "mgd"]
    assert (MGDConfig().alpha, MGDConfig().mask_ratio) == (7e-5, 0.15)  # cls_KD's ImageNet setting


@pytest.mark.parametrize("kind", ["fitnets", "at", "vitkd", "mgd"])
def test_feature_methods_need_layer_pairs_and_read_features(kind):
    cls = losses.loss_class(kind)
    assert losses.needs(cls.Config(kind=kind), [(0, 0)]) == losses.Needs(form="features")
    assert "needs pairs" in losses.check(cls.Config(kind=kind), [])
    assert losses.check(cls.Config(kind=kind), [(0, 0)]) is None
