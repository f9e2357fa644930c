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
