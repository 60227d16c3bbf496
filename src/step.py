"""The optimiser step of the pre-training loops, in the order the loops call it: set_lr, then
(after the loss) backward, freeze_prototypes where the method freezes them, optimizer_step.

Non-finite values: without a loss scaler, a NaN/inf loss or gradient raises NonFiniteLossError
before the update. Under an fp16 GradScaler an overflow skips the step (normal now and then);
the scaler's `nonfinite_guard` (src/amp.py Precision) stops after too many in a row.

progress=None: checked now (a host sync per check). Given the epoch's EpochProgress (the
training loops), the checks stay on the device and are read with the losses once per log
interval (no host sync per step but the scaler's own inf check): a non-finite loss or gradient
then stops the run at that read, up to a log interval after the bad update, but always before
the epoch ends or a mid-epoch checkpoint is written, so no weights updated from non-finite
values are ever saved."""
import torch

from .amp import NonFiniteLossError


def set_lr(optimizer, lr):
    """Set every group's rate, except groups marked `fix_lr` (SimSiam's --fix_pred_lr)."""
    for param_group in optimizer.param_groups:
        if param_group.get("fix_lr", False):
            continue
        param_group["lr"] = float(lr)  # a numpy scalar would not load with weights_only


def _scaled(scaler):
    return scaler is not None and scaler.is_enabled()


def backward(loss, optimizer, scaler, iteration, progress=None):
    """zero_grad, then the (loss-scaled under fp16) backward."""
    if progress is None and not _scaled(scaler) and not bool(torch.isfinite(loss.detach())):
        raise NonFiniteLossError(f"loss is {loss.item()} at iteration {iteration}: stopping "
                                 "(the last checkpoint was not overwritten)")
    optimizer.zero_grad(set_to_none=True)
    if _scaled(scaler):
        scaler.scale(loss).backward()
    else:
        loss.backward()


def freeze_prototypes(model, iteration, niters):
    """SwAV keeps the prototypes fixed for the first `niters` iterations (the paper: it helps
    the very start of training; DeepCluster-v2 sets them by k-means and never trains them):
    drop the gradients of every parameter named "prototypes", as the original, so the optimiser
    step (momentum and weight decay included) leaves them untouched."""
    if iteration < niters:
        for name, p in model.named_parameters():
            if "prototypes" in name:
                p.grad = None


def optimizer_step(loss, model, optimizer, scaler, iteration, progress=None):
    """The update after backward: unscale, non-finite checks (see the module's docstring), step."""
    if _scaled(scaler):
        # unscale before LARC's trust ratio, which needs the true gradient norms. The scaler
        # keeps its unscaled/stepped state per optimizer object: unscale and step the same one
        # (unscaling LARC's inner optimizer then stepping LARC would divide by the scale twice)
        scaler.unscale_(optimizer)
        if progress is not None:
            # what the scaler's step is about to read (its own sync): inf/NaN found by unscale_
            found = sum(f.to(loss.device) for f in scaler._found_inf_per_device(optimizer).values())
            scaler.step(optimizer)
            scaler.update()
            skipped = (found > 0) | ~torch.isfinite(loss.detach())
            # a copy: update() changes the scale tensor in place at every later step
            progress.defer_check(iteration, skipped, None, scaler._get_scale_async().clone(),
                                 scaler)
            return
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        # the scaler backs off its scale exactly when it found an inf/NaN and skipped the step
        skipped = scaler.get_scale() < scale or not bool(torch.isfinite(loss.detach()))
        scaler.nonfinite_guard.record(skipped, iteration, loss.item(), scaler.get_scale())
    elif progress is not None:
        names, grads = _named_grads(model)
        bad, first = ~torch.isfinite(loss.detach()), torch.zeros((), device=loss.device)
        if grads:
            nonfinite = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)))
            bad, first = bad | nonfinite.any(), nonfinite.int().argmax()
        progress.defer_check(iteration, bad, first, None, names)
        optimizer.step()
    else:
        bad = first_nonfinite_grad(model)
        if bad is not None:
            raise NonFiniteLossError(f"non-finite gradient of {bad} at iteration {iteration} "
                                     f"(loss {loss.item():.4f}): stopping before the update (the "
                                     "last checkpoint was not overwritten)")
        optimizer.step()


def backward_and_step(loss, model, optimizer, scaler, iteration, progress=None):
    """backward then optimizer_step, for the methods that freeze nothing (SimSiam)."""
    backward(loss, optimizer, scaler, iteration, progress)
    optimizer_step(loss, model, optimizer, scaler, iteration, progress)


def _named_grads(model):
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    return [n for n, _ in named], [g for _, g in named]


def first_nonfinite_grad(model):
    """Name of the first parameter whose gradient holds a NaN/inf, else None (one device sync)."""
    names, grads = _named_grads(model)
    if not grads:
        return None
    finite = torch.isfinite(torch.stack(torch._foreach_norm(grads)))
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0, 0])]
