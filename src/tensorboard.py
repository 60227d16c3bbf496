"""Optional TensorBoard scalars (`--tensorboard true`), written on rank 0 under dump_path/tb.

`tensorboard` is not a requirement: when it is missing, the run goes on and says once how to
get it. Every method is a no-op when disabled, so callers never branch on it.
"""
import logging
import os

logger = logging.getLogger()

MISSING = ("--tensorboard true needs the tensorboard package (pip install tensorboard): "
           "no TensorBoard logs are written")


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        return None


class TensorBoard:
    """add_scalar-style logging to `dump_path/tb[/subdir]` when args.tensorboard, on rank 0:
    `args.rank` as src/distributed.py init_distributed_mode set it (built after it)."""

    def __init__(self, args, subdir=""):
        self.writer = None
        self.logdir = os.path.join(args.dump_path, "tb", subdir) if subdir else \
            os.path.join(args.dump_path, "tb")
        if not args.tensorboard or args.rank != 0:
            return
        writer_class = _summary_writer_class()
        if writer_class is None:
            logger.warning(MISSING)
            return
        self.writer = writer_class(log_dir=self.logdir)
        logger.info(f"TensorBoard: tensorboard --logdir {os.path.join(args.dump_path, 'tb')}")

    @property
    def enabled(self):
        return self.writer is not None

    def scalars(self, step, prefix="", **values):
        """Write each value (a number; None is skipped) as `prefix/name` at `step`."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}/{name}" if prefix else name, float(value), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
