"""The fast defaults compute what the plain fp32 path computes.

Tolerances (relative, ‖a − b‖ / ‖b‖, or as stated):
- multi-tensor LARC vs the reference loop: equal (same operations per parameter, CPU);
- channels_last vs NCHW, fp32: 1e-5 on outputs and loss, 1e-4 on gradients and on the weights
  after two LARC steps (other convolution summation order);
- bf16 autocast vs fp32 (8 mantissa bits; a tiny random-init net whose BatchNorms on 8x8 and
  16x16 crops amplify rounding): 3e-2 on the loss, 1e-1 on the embeddings, gradient cosine
  > 0.99 for the head and prototypes and > 0.8 over all parameters (a broken path gives ~0).
"""
import copy

import numpy as np
import pytest
import torch

import main_swav
from conftest import entry_args
from src.checkpoint import model_state_dict
from src.engine import build_larc_sgd, prepare_model, setup_precision
from src.lars import LARC
from src.resnet50 import build_backbone


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_backbone("resnet18", normalize=True, hidden_mlp=32, output_dim=16,
                          nmb_prototypes=20, cifar_stem=True, width=8)


def tiny_args(**overrides):
    """main_swav's args for tiny_model: one CPU process, fp32, NCHW; `overrides` are flags."""
    tiny = dict(nmb_crops=[2, 2], size_crops=[16, 8], crops_for_assign=[0, 1], batch_size=8,
                nmb_prototypes=20, feat_dim=16, freeze_prototypes_niters=0, queue_length=0,
                rank=0, world_size=1, device="cpu", base_lr=0.5, use_fp16=False,
                channels_last=False)
    return entry_args("main_swav", **{**tiny, **overrides})


def crops(seed=1, bs=8, sizes=(16, 16, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, s, s, generator=g) for s in sizes]


class ListLoader(list):
    dataset = None  # what EpochProgress asks a loader for


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- LARC
@pytest.mark.parametrize("clip", [False, True])
def test_foreach_larc_equals_reference_loop(clip):
    model = tiny_model()
    params = list(model.parameters())
    with torch.no_grad():
        params[3].zero_()                      # ||w|| = 0: no decay, no scaling
    ref_model = copy.deepcopy(model)
    opts = []
    for m, foreach in [(ref_model, False), (model, True)]:
        sgd = torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
        opts.append(LARC(sgd, trust_coefficient=0.001, clip=clip, foreach=foreach))
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        grads[5].zero_()                       # ||g|| = 0: untouched
        for m, opt in zip((ref_model, model), opts):
            for i, p in enumerate(m.parameters()):
                p.grad = None if i == 7 else grads[i].clone()  # None grad: skipped
            opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    for group in opts[1].param_groups:
        assert group["weight_decay"] == 1e-4   # restored after the step


def test_larc_is_foreach_by_default():
    assert build_larc_sgd(tiny_model(), tiny_args()).foreach is True


# ----------------------------------------------------------------------------- channels_last
def test_prepare_model_channels_last_by_default_and_state_dict_stays_nchw():
    model = prepare_model(tiny_model(), tiny_args(channels_last=True), "none")
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(v.is_contiguous() for v in model_state_dict(model).values())
    plain = prepare_model(tiny_model(), tiny_args(channels_last=False), "none")
    assert plain.conv1.weight.is_contiguous()
    args = main_swav.get_args_parser().parse_args([])
    assert args.channels_last is True


def test_channels_last_forward_backward_match_nchw():
    x = crops()
    outs = []
    for cl in (False, True):
        model = prepare_model(tiny_model(), tiny_args(channels_last=cl), "none")
        emb, out = model(x)
        out.square().sum().backward()
        outs.append((emb, out, model.conv1.weight.grad, model.layer4[0].conv1.weight.grad))
    for k, (a, b) in enumerate(zip(outs[1], outs[0])):
        assert rel(a, b) < (1e-5 if k < 2 else 1e-4)


# ----------------------------------------------------------------------------- whole step
def run_steps(args, model_seed=0, iters=2, foreach=True):
    model = prepare_model(tiny_model(model_seed), args, "none")
    optimizer = build_larc_sgd(model, args)
    optimizer.foreach = foreach  # LARC's multi-tensor path (the default) or its reference loop
    scaler = setup_precision(args)
    batch = crops()
    (_, loss), _ = main_swav.train(ListLoader([batch] * iters), model, optimizer, 0,
                                   np.full(iters, args.base_lr), None, args, scaler=scaler)
    return loss, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_default_fp32_step_equals_plain_fp32_step():
    """channels_last + multi-tensor LARC (the defaults) vs NCHW + the reference loop."""
    loss_ref, w_ref = run_steps(tiny_args(channels_last=False), foreach=False)
    loss, w = run_steps(tiny_args(channels_last=True), foreach=True)
    assert abs(loss - loss_ref) <= 1e-5 * abs(loss_ref)
    assert rel(w, w_ref) < 1e-4


def test_bf16_step_close_to_fp32_step():
    """--use_fp16 true on a CPU: bf16 autocast (Sinkhorn and the loss stay fp32)."""
    grads, losses, embs = {}, {}, {}
    for name, over in [("fp32", dict(use_fp16=False)),
                       ("bf16", dict(use_fp16=True, amp_dtype="bfloat16", channels_last=True))]:
        args = tiny_args(**over)
        model = prepare_model(tiny_model(), args, "none")
        with main_swav.forward_context(model, args):
            emb, out = model(crops())
        assert out.dtype == (torch.bfloat16 if name == "bf16" else torch.float32)
        q = [main_swav.distributed_sinkhorn(out[8 * c: 8 * (c + 1)].detach()) for c in (0, 1)]
        assert all(qq.dtype == torch.float32 for qq in q)
        loss = main_swav.swav_loss(out, q, [0, 1], 4, 8, 0.1)
        assert loss.dtype == torch.float32
        loss.backward()
        losses[name], embs[name] = loss.item(), emb.detach().float()
        grads[name] = {n: p.grad.flatten().float() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert abs(losses["bf16"] - losses["fp32"]) <= 3e-2 * abs(losses["fp32"])
    assert rel(embs["bf16"], embs["fp32"]) < 1e-1
    cos = torch.nn.functional.cosine_similarity
    everything = [torch.cat(list(grads[k].values())) for k in ("bf16", "fp32")]
    assert cos(*everything, dim=0) > 0.8
    for n in ("prototypes.weight", "projection_head.3.weight"):
        assert cos(grads["bf16"][n], grads["fp32"][n], dim=0) > 0.99


def test_bf16_autocast_only_where_native_and_not_capped(monkeypatch):
    """--use_fp16 true on a CPU: bf16 where AVX512-BF16 / AMX exist, fp32 on an AVX2-only CPU
    and under ONEDNN_MAX_CPU_ISA=AVX2 or ATEN_CPU_CAPABILITY=avx2 (an AVX-512 machine made to run
    as an AVX2 one, where bf16 convolutions are emulated and 10-50x slower)."""
    from src import amp

    def resolved(flags, **env):
        for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            monkeypatch.setenv(var, value)
        monkeypatch.setattr(amp, "cpu_flags", lambda: set(flags))
        amp.cpu_has_native_bf16.cache_clear()
        return amp.resolve_amp(True, "auto", "cpu")

    try:
        zen4 = {"avx2", "avx512f", "avx512_bf16"}
        assert resolved(zen4)[0] == torch.bfloat16
        assert resolved({"avx2", "amx_bf16"}, ONEDNN_MAX_CPU_ISA="AVX512_CORE_AMX")[0] \
            == torch.bfloat16
        for env in ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"DNNL_MAX_CPU_ISA": "avx512_core"},
                    {"ATEN_CPU_CAPABILITY": "avx2"}):
            dtype, scaler, why = resolved(zen4, **env)
            assert (dtype, scaler) == (None, False) and "capped" in why, env
        assert resolved({"avx2", "fma"})[0] is None
        # asked for explicitly, bf16 is honoured and said to be slow
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        amp.cpu_has_native_bf16.cache_clear()
        dtype, _, why = amp.resolve_amp(True, "bfloat16", "cpu")
        assert dtype == torch.bfloat16 and "slow" in why
    finally:
        monkeypatch.undo()
        amp.cpu_has_native_bf16.cache_clear()
