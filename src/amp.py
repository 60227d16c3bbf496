"""Mixed precision with native torch.amp, replacing apex.

`--use_fp16 true` asks for mixed precision; what it means depends on the device:
- CUDA: fp16 autocast + GradScaler (bf16 with --amp_dtype bfloat16: no scaler needed);
- CPU: bf16 autocast only where the CPU computes bf16 natively (AMX or AVX-512 BF16). On an
  AVX2-only CPU bf16 autocast is 10-50x slower than fp32, so the run stays fp32 and says why.
"""
import functools
import logging
from contextlib import nullcontext

import torch

from .errors import UsageError

logger = logging.getLogger()

AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "auto": None}


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16():
    """True when the CPU has AMX-BF16 or AVX512-BF16 instructions."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    cpu = getattr(torch._C, "_cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks) if cpu else False


def resolve_amp(use_fp16, amp_dtype="auto", device="cpu"):
    """Return (dtype or None, use_grad_scaler, reason) for this device and these flags."""
    device = torch.device(device)
    if not use_fp16:
        return None, False, "mixed precision off (--use_fp16 false)"
    requested = AMP_DTYPES.get(str(amp_dtype).lower(), "invalid")
    if requested == "invalid":
        raise UsageError(f"--amp_dtype must be auto, float16 or bfloat16, got {amp_dtype!r}")
    if device.type == "cuda":
        dtype = requested or torch.float16
        return dtype, dtype == torch.float16, f"{dtype} autocast on CUDA"
    if device.type == "cpu":
        if requested == torch.float16:
            raise UsageError("--amp_dtype float16 is not supported on the CPU; use bfloat16")
        if requested == torch.bfloat16 or cpu_has_native_bf16():
            why = "" if cpu_has_native_bf16() else " (asked for; this CPU has no native bf16: slow)"
            return torch.bfloat16, False, "bfloat16 autocast on the CPU" + why
        return None, False, ("fp32: this CPU has no native bf16 (no AMX / AVX512-BF16), where "
                             "bf16 autocast is 10-50x slower than fp32")
    return None, False, f"fp32 on {device.type}"


def autocast(device, dtype):
    device = torch.device(device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(enabled, device="cuda"):
    return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)


def scaler_state_from_apex(amp_state):
    """Translate an apex amp state dict ({'loss_scaler0': {'loss_scale', 'unskipped'}}) into a
    GradScaler state dict, so checkpoints of the original resume with their loss scale."""
    if not isinstance(amp_state, dict) or "loss_scaler0" not in amp_state:
        return amp_state
    scale = float(amp_state["loss_scaler0"].get("loss_scale", 2.0 ** 16))
    return {"scale": scale, "growth_factor": 2.0, "backoff_factor": 0.5,
            "growth_interval": 2000, "_growth_tracker": 0}
