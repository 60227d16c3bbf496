"""CUDA paths against the CPU fp32 reference (skipped without CUDA; run on a GPU machine with
`python -m pytest -q tests/test_gpu.py`).

Tolerances (relative, ‖a − b‖ / ‖b‖): Sinkhorn 1e-5 (fp32 on both, and against fp64); model
fp32 with TF32 off 1e-4 on outputs, 1e-3 on gradients (other kernels, other summation order); fp16/bf16 autocast
as tests/test_fastpath.py states for bf16: 3e-2 on the loss, 1e-1 on the embeddings, gradient
cosine > 0.99 for the head and prototypes and > 0.8 overall; multi-tensor LARC vs the loop 1e-6
(the CUDA multi-tensor norm sums in another order)."""
import copy

import numpy as np
import pytest
import torch

import main_swav
from src.engine import build_larc_sgd, prepare_model, setup_precision
from src.lars import LARC
from src.sinkhorn import distributed_sinkhorn
from test_fastpath import ListLoader, crops, rel, tiny_args, tiny_model
from test_sinkhorn import original_sinkhorn

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_sinkhorn_cuda_equals_cpu_fp32_and_fp64_reference_also_from_fp16_scores():
    scores = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 0.3
    for dtype in (torch.float32, torch.float16):
        s = scores.to(dtype)
        q = distributed_sinkhorn(s.cuda(), 0.05, 3)
        assert q.dtype == torch.float32  # computed in fp32 whatever the score dtype
        expected = distributed_sinkhorn(s.float(), 0.05, 3)
        assert rel(q.cpu(), expected) < 1e-5
        # the original's algorithm really in fp64 (distributed_sinkhorn casts its input to
        # fp32, so it cannot be the reference) on the same rounded scores: 1.6e-7 on the CPU
        ref = original_sinkhorn(s, 0.05, 3)
        assert ref.dtype == torch.float64
        assert rel(q.cpu().double(), ref) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_cuda_fp32_matches_cpu(channels_last):
    x = crops()
    res = {}
    for device in ("cpu", "cuda"):
        args = tiny_args(device=device, channels_last=channels_last)
        model = prepare_model(tiny_model(), args, "none")
        emb, out = model(x)
        out.square().sum().backward()
        res[device] = (emb.cpu(), out.detach().cpu(), model.conv1.weight.grad.cpu())
    for k, (a, b) in enumerate(zip(res["cuda"], res["cpu"])):
        assert rel(a, b) < (1e-4 if k < 2 else 1e-3)


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_amp_loss_and_grads_close_to_cpu_fp32(amp_dtype):
    losses, grads, embs = {}, {}, {}
    for name, device, use_fp16 in [("ref", "cpu", False), ("amp", "cuda", True)]:
        args = tiny_args(device=device, use_fp16=use_fp16, amp_dtype=amp_dtype, channels_last=True)
        model = prepare_model(tiny_model(), args, "none")
        with main_swav.forward_context(model, args):
            emb, out = model(crops())
        if use_fp16:
            assert out.dtype == getattr(torch, amp_dtype)
        q = [distributed_sinkhorn(out[8 * c: 8 * (c + 1)].detach()) for c in (0, 1)]
        loss = main_swav.swav_loss(out, q, [0, 1], 4, 8, 0.1)
        loss.backward()
        losses[name], embs[name] = loss.item(), emb.detach().float().cpu()
        grads[name] = {n: p.grad.flatten().float().cpu() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert abs(losses["amp"] - losses["ref"]) <= 3e-2 * abs(losses["ref"])
    assert rel(embs["amp"], embs["ref"]) < 1e-1
    cos = torch.nn.functional.cosine_similarity
    assert cos(*[torch.cat(list(grads[k].values())) for k in ("amp", "ref")], dim=0) > 0.8
    for n in ("prototypes.weight", "projection_head.3.weight"):
        assert cos(grads["amp"][n], grads["ref"][n], dim=0) > 0.99


@pytest.mark.parametrize("amp_dtype", ["float16", "bfloat16"])
def test_train_steps_on_cuda_with_scaler(amp_dtype):
    """The whole default step on CUDA: autocast, GradScaler (fp16), multi-tensor LARC."""
    args = tiny_args(device="cuda", use_fp16=True, amp_dtype=amp_dtype, channels_last=True)
    model = prepare_model(tiny_model(), args, "none")
    optimizer = build_larc_sgd(model, args)
    scaler = setup_precision(args)
    assert scaler.is_enabled() == (amp_dtype == "float16")
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    (_, loss), _ = main_swav.train(ListLoader([crops()] * 4), model, optimizer, 0,
                                   np.full(4, 0.5), None, args, scaler=scaler)
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert np.isfinite(loss) and torch.isfinite(w).all() and not torch.equal(w, w0)


def test_foreach_larc_cuda_matches_loop():
    model = tiny_model().cuda()
    ref = copy.deepcopy(model)
    opts = [LARC(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4),
                 trust_coefficient=0.001, clip=False, foreach=f) for m, f in [(ref, False),
                                                                              (model, True)]]
    g = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, device="cuda") for p in model.parameters()]
        for m, opt in zip((ref, model), opts):
            for p, gr in zip(m.parameters(), grads):
                p.grad = gr.clone()
            opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert rel(a.detach(), b.detach()) < 1e-6
