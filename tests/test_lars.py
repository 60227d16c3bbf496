import pytest
import torch

from src.lars import LARC


def _setup(lr=0.1, wd=0.01, **larc_kw):
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))        # ||w|| = 5
    zero = torch.nn.Parameter(torch.zeros(2))               # ||w|| = 0
    nograd = torch.nn.Parameter(torch.tensor([1.0, 1.0]))   # grad None
    w.grad = torch.tensor([0.6, 0.8])                        # ||g|| = 1
    zero.grad = torch.tensor([1.0, 1.0])
    sgd = torch.optim.SGD([w, zero, nograd], lr=lr, momentum=0.0, weight_decay=wd)
    return w, zero, nograd, LARC(sgd, **larc_kw)


def test_no_clip_rule_folds_weight_decay():
    lr, wd, tc = 0.1, 0.01, 0.001
    w, zero, nograd, opt = _setup(lr, wd, trust_coefficient=tc, clip=False, eps=1e-8)
    w0, g0 = w.detach().clone(), w.grad.clone()
    opt.step()
    adaptive = tc * 5.0 / (1.0 + 5.0 * wd + 1e-8)
    expected = w0 - lr * adaptive * (g0 + wd * w0)
    torch.testing.assert_close(w.detach(), expected)
    # zero-norm parameter: neither scaled nor decayed (SGD sees weight_decay 0)
    torch.testing.assert_close(zero.detach(), -lr * torch.ones(2))
    # None grad: untouched
    torch.testing.assert_close(nograd.detach(), torch.ones(2))
    # weight decay of the group restored after the step
    assert opt.param_groups[0]["weight_decay"] == wd


def test_clip_rule_caps_at_one():
    lr, wd = 0.1, 0.0
    # large trust coefficient: adaptive/lr > 1 -> clipped to 1 -> plain SGD step
    w, _, _, opt = _setup(lr, wd, trust_coefficient=10.0, clip=True)
    w0, g0 = w.detach().clone(), w.grad.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - lr * g0)
    # small trust coefficient: adaptive/lr < 1 -> scale = adaptive / lr
    w, _, _, opt = _setup(lr, wd, trust_coefficient=0.002, clip=True)
    w0, g0 = w.detach().clone(), w.grad.clone()
    opt.step()
    scale = (0.002 * 5.0 / (1.0 + 1e-8)) / lr
    torch.testing.assert_close(w.detach(), w0 - lr * scale * g0)


def test_api_like_apex():
    w, _, _, opt = _setup(trust_coefficient=0.02)
    assert opt.trust_coefficient == 0.02 and opt.clip is True and opt.eps == 1e-8
    assert opt.param_groups is opt.optim.param_groups
    opt.param_groups[0]["lr"] = 0.5
    assert opt.optim.param_groups[0]["lr"] == 0.5
    sd = opt.state_dict()
    opt2 = LARC(torch.optim.SGD([w], lr=1.0, momentum=0.9))
    with pytest.raises(ValueError):
        opt2.load_state_dict(sd)  # 3 params vs 1: the wrapped optimizer's check applies
    opt.zero_grad()
    assert w.grad is None
