"""LARC: layer-wise adaptive rate control around any optimizer, with apex's semantics and API.

For each parameter with a gradient and non-zero weight and gradient norms:
    adaptive_lr = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)
    clip mode:  adaptive_lr = min(adaptive_lr / lr, 1)
    g <- (g + weight_decay * w) * adaptive_lr
then the wrapped optimizer steps with its weight decay temporarily set to 0 (the decay was folded
into the gradient above; a parameter with a zero norm gets neither decay nor scaling).

`foreach=True` (the default) computes the same thing with multi-tensor ops: all the norms in two
calls, the trust ratios as one vector, no host-device synchronisation (the per-parameter
`if norm != 0` of the reference path waits for the device twice per parameter).
tests/test_fastpath.py checks both paths give the same weights.
"""
import torch


class LARC:
    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8, foreach=True):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps
        self.foreach = foreach

    def __getstate__(self):
        return self.optim.__getstate__()

    def __setstate__(self, state):
        self.optim.__setstate__(state)

    @property
    def state(self):
        return self.optim.state

    def __repr__(self):
        return f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, " \
               f"eps={self.eps}, optim={self.optim!r})"

    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        self.optim.load_state_dict(state_dict)

    def zero_grad(self, set_to_none=True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        weight_decays = []
        for group in self.optim.param_groups:
            weight_decay = group.get("weight_decay", 0)
            weight_decays.append(weight_decay)
            group["weight_decay"] = 0
            if self.foreach:
                self._scale_grads_foreach(group, weight_decay)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                param_norm = torch.norm(p)
                grad_norm = torch.norm(p.grad)
                if param_norm != 0 and grad_norm != 0:
                    adaptive_lr = self.trust_coefficient * param_norm / (
                        grad_norm + param_norm * weight_decay + self.eps)
                    if self.clip:
                        adaptive_lr = torch.clamp(adaptive_lr / group["lr"], max=1)
                    p.grad.add_(p, alpha=weight_decay)
                    p.grad.mul_(adaptive_lr)
        try:
            return self.optim.step(closure) if closure is not None else self.optim.step()
        finally:
            for group, weight_decay in zip(self.optim.param_groups, weight_decays):
                group["weight_decay"] = weight_decay

    def _scale_grads_foreach(self, group, weight_decay):
        """The loop of `step` on a whole group at once: the same operations in the same order
        per parameter, so the same numbers."""
        by_device = {}
        for p in group["params"]:
            if p.grad is not None:
                by_device.setdefault((p.device, p.dtype), []).append(p)
        for params in by_device.values():
            grads = [p.grad for p in params]
            param_norms = torch.stack(torch._foreach_norm(params))
            grad_norms = torch.stack(torch._foreach_norm(grads))
            adaptive_lr = self.trust_coefficient * param_norms / (
                grad_norms + param_norms * weight_decay + self.eps)
            if self.clip:
                adaptive_lr = torch.clamp(adaptive_lr / group["lr"], max=1)
            # zero norms: the reference leaves g untouched. ||w|| = 0: g + wd * w = g, scale 1;
            # ||g|| = 0: g = 0 must stay 0, scale 0 cancels the added wd * w.
            keep = (grad_norms != 0).to(adaptive_lr.dtype)
            scale = torch.where((param_norms != 0) & (grad_norms != 0), adaptive_lr, keep)
            torch._foreach_add_(grads, params, alpha=weight_decay)
            torch._foreach_mul_(grads, list(scale.unbind()))
