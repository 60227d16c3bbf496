"""Mixed precision with native torch.amp, replacing apex.

`--use_fp16 true` asks for mixed precision; what it means depends on the device:
- CUDA: fp16 autocast + GradScaler (bf16 with --amp_dtype bfloat16: no scaler needed);
- CPU: bf16 autocast only where the CPU computes bf16 natively (AMX or AVX-512 BF16). On an
  AVX2-only CPU bf16 autocast is 10-50x slower than fp32, so the run stays fp32 and says why.
"""
import functools
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UsageError

logger = logging.getLogger()

AMP_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "auto": None}


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, the convolutions' kernels) without bf16 instructions:
# under such a cap bf16 convolutions run emulated, as slow as on an AVX2-only CPU
NO_BF16_ISAS = {"sse41", "avx", "avx2", "avx2_vnni", "avx512_core", "avx512_core_vnni"}


def cpu_flags():
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16():
    """True when the CPU has AMX-BF16 or AVX512-BF16 instructions and torch may use them: not
    under ONEDNN_MAX_CPU_ISA=AVX2 (or another cap without bf16), nor ATEN_CPU_CAPABILITY=avx2
    or lower, the settings that make an AVX-512 / AMX machine run as an AVX2-only one."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "")
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if cap.strip().lower() in NO_BF16_ISAS or aten in ("default", "avx2"):
        return False
    flags = cpu_flags()
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
        return None, False, ("fp32: no native bf16 here (no AMX / AVX512-BF16, or capped by "
                             "ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY), where bf16 autocast "
                             "is 10-50x slower than fp32")
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


class _ScalerFromCheckpoint:
    """Loads a GradScaler from our 'scaler' entry or from an old apex 'amp' entry."""

    def __init__(self, scaler):
        self.scaler = scaler

    def load_state_dict(self, state):
        self.scaler.load_state_dict(scaler_state_from_apex(state))


def scaler_to_restore(scaler):
    """What a checkpoint's loss-scaler state is loaded into (restart_from_checkpoint's `scaler`):
    None without an enabled scaler (fp32, bf16: nothing to restore)."""
    return _ScalerFromCheckpoint(scaler) if scaler is not None and scaler.is_enabled() else None


def scaler_entry(scaler):
    """The checkpoint entry of an enabled loss scaler ({"scaler": state}), else {}."""
    return {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Counts optimiser steps skipped for a non-finite loss or gradient under an fp16 loss
    scaler; `max_steps` (--max_nonfinite_steps) in a row mean the run diverged (the scale only
    keeps halving): stop."""

    def __init__(self, max_steps):
        if max_steps < 1:
            raise UsageError(f"--max_nonfinite_steps must be >= 1, got {max_steps}")
        self.max_steps, self.consecutive, self.total = max_steps, 0, 0

    def record(self, skipped, iteration, loss, scale):
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        logger.debug(f"iteration {iteration}: non-finite values, step skipped (loss {loss}, "
                     f"loss scale now {scale:g})")
        if self.consecutive >= self.max_steps:
            raise NonFiniteLossError(
                f"{self.consecutive} consecutive steps skipped for a non-finite loss or gradient "
                f"under the fp16 loss scaler, the last at iteration {iteration} (loss {loss}, "
                f"scale now {scale:g}): stopping (--max_nonfinite_steps {self.max_steps}; the "
                "last checkpoint was not overwritten)")


@dataclass(frozen=True)
class Precision:
    """The run's precision, decided once from --use_fp16 / --amp_dtype / --max_nonfinite_steps
    and the device, then passed along: the autocast dtype of the forward passes (None: fp32),
    the loss scaler (enabled only for fp16 on CUDA, or when the caller gives an enabled one) and,
    on the scaler, the guard against endless skipped steps (`scaler.nonfinite_guard`)."""
    device: torch.device
    dtype: Optional[torch.dtype]
    scaler: torch.amp.GradScaler
    reason: str

    @classmethod
    def from_args(cls, args, device, scaler=None):
        """`scaler`: use this one (e.g. a test's CPU GradScaler) instead of making one; it gets
        a guard from --max_nonfinite_steps unless it has one."""
        device = torch.device(device)
        dtype, use_scaler, reason = resolve_amp(args.use_fp16, args.amp_dtype, device)
        scaler = make_scaler(use_scaler, device) if scaler is None else scaler
        if getattr(scaler, "nonfinite_guard", None) is None:
            scaler.nonfinite_guard = NonFiniteGuard(args.max_nonfinite_steps)
        return cls(device, dtype, scaler, reason)

    def autocast(self):
        """The forward passes' context: autocast to `dtype`, or nothing in fp32."""
        return autocast(self.device, self.dtype)
