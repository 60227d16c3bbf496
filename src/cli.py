"""Command-line flags that the entry points share (names and defaults as the original's
main_swav.py), so each main declares only its own method's flags, and the `__main__` block they
share (`run_main`). Defaults live here only: code reads `args.x`, never a restated default."""
import sys

from . import dali
from . import distributed as du
from .engine import NonFiniteLossError
from .errors import INPUT_ERRORS, UsageError
from .monitor import CollapseError
from .preemption import INT_EXIT_CODE
from .resnet50 import ARCHS
from .transforms import BLURS
from .utils import bool_flag


def run_main(main, parser):
    """Parse, run `main(args)`. Bad input (src/errors.py: UsageError, DataError,
    CheckpointError) and a run stopped on purpose (non-finite loss, collapse) end with a one-line
    `error: ...` (exit status 1); any other exception is a bug and keeps its traceback."""
    args = parser.parse_args()
    try:
        check_shared_args(args)
        return main(args)
    except (*INPUT_ERRORS, NonFiniteLossError, CollapseError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (src/preemption.py: inside)
        print(f"interrupted (Ctrl-C): no checkpoint written now; {args.dump_path} keeps the "
              "last one", file=sys.stderr)
        raise SystemExit(INT_EXIT_CODE) from None
    except RuntimeError as e:  # gloo/NCCL: a peer hung or died and a collective timed out
        if not (du.is_dist() and "timed out" in str(e).lower()):
            raise
        sys.exit(f"error: rank {du.get_rank()}: a collective timed out (--dist_timeout_min "
                 "reached): another rank died, hung or fell far behind; see its log "
                 f"(train.log-RANK) [{str(e).strip().splitlines()[0][:200]}]")
    finally:
        du.destroy()


def check_shared_args(args):
    """One-line errors for the flags every entry point shares, before any work."""
    if args.width < 0:  # 0 is the arch's default; a negative one fails in a conv
        raise UsageError(f"--width must be > 0 (or 0: the arch's default, 64 x widen), got "
                         f"{args.width}")
    if "data_backend" in vars(args):  # the pre-trainings' flag (add_data_backend_arg)
        dali.check_backend(args)  # --data_backend dali: the package, a GPU, the flags it supports


def add_multicrop_args(parser):
    """The multi-crop data flags of main_swav.py and main_deepclusterv2.py."""
    parser.add_argument("--data_path", type=str, default="/path/to/imagenet",
                        help="path to dataset repository")
    parser.add_argument("--nmb_crops", type=int, default=[2], nargs="+",
                        help="list of number of crops (example: [2, 6])")
    parser.add_argument("--size_crops", type=int, default=[224], nargs="+",
                        help="crops resolutions (example: [224, 96])")
    parser.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+",
                        help="argument in RandomResizedCrop (example: [0.14, 0.05])")
    parser.add_argument("--max_scale_crops", type=float, default=[1], nargs="+",
                        help="argument in RandomResizedCrop (example: [1., 0.14])")
    parser.add_argument("--blur", type=str, default="pil", choices=BLURS,
                        help="Gaussian blur: PIL radius (final code), the 23x23-kernel blur of "
                             "the published runs, or none (small images: no blur)")
    parser.add_argument("--augment", type=str, default="fast", choices=["fast", "pil"],
                        help="augmentation code: fast (src/fastaugment.py: same random draws and "
                             "same tensors as pil, faster) or pil (the original torchvision/PIL "
                             "transforms)")
    parser.add_argument("--strict_data", type=bool_flag, default=False,
                        help="stop on an unreadable image instead of skipping it with a warning")
    add_data_backend_arg(parser)
    return parser


def add_data_backend_arg(parser):
    """--data_backend of the pre-trainings (main_swav, main_deepclusterv2, main_simsiam)."""
    parser.add_argument("--data_backend", type=str, default="pytorch", choices=dali.BACKENDS,
                        help="pytorch: decode and augment in DataLoader workers on the CPU (the "
                             "original's); dali: decode and augment on the GPU with NVIDIA DALI "
                             "(optional: pip install -r requirements-dali.txt), the same crop "
                             "distribution, for nodes whose cores cannot keep up (--augment is "
                             "the pytorch backend's; untested on a GPU, see the README)")
    return parser


def add_larc_optim_args(parser, freeze_prototypes_niters=313):
    """LARC + SGD with warm-up and cosine schedule (main_swav.py, main_deepclusterv2.py)."""
    parser.add_argument("--epochs", default=100, type=int, help="number of total epochs to run")
    parser.add_argument("--batch_size", default=64, type=int,
                        help="batch size per gpu, i.e. how many unique instances per gpu")
    parser.add_argument("--base_lr", default=4.8, type=float, help="base learning rate")
    parser.add_argument("--final_lr", type=float, default=0, help="final learning rate")
    parser.add_argument("--freeze_prototypes_niters", default=freeze_prototypes_niters, type=int,
                        help="freeze the prototypes during this many iterations from the start")
    parser.add_argument("--wd", default=1e-6, type=float, help="weight decay")
    parser.add_argument("--warmup_epochs", default=10, type=int, help="number of warmup epochs")
    parser.add_argument("--start_warmup", default=0, type=float, help="initial warmup learning rate")
    return parser


def check_crops_for_assign(args):
    """--crops_for_assign must name existing crops (ids 0 .. total crops - 1)."""
    ncrops = sum(args.nmb_crops)
    if not args.crops_for_assign or any(c < 0 or c >= ncrops for c in args.crops_for_assign):
        raise UsageError(f"--crops_for_assign {args.crops_for_assign} out of range: there are "
                         f"{ncrops} crops (ids 0..{ncrops - 1})")
    return ncrops


def add_distributed_args(parser):
    """The process-group flags of every entry point (src/distributed.py init_distributed_mode
    reads them and sets rank, world_size and local_rank from the launcher)."""
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--world_size", default=-1, type=int,
                        help="number of processes: set automatically from the launcher")
    parser.add_argument("--rank", default=0, type=int,
                        help="rank of this process: set automatically from the launcher")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="GPU of this process on its node, read only when no launcher set "
                             "the environment (torchrun and Slurm give LOCAL_RANK / "
                             "SLURM_LOCALID, which win)")
    parser.add_argument("--dist_timeout_min", default=30, type=float,
                        help="minutes a collective may wait before the job fails")
    parser.add_argument("--allow_batch_change", type=bool_flag, default=False,
                        help="resume a run whose global batch (--batch_size x processes) was "
                             "another: the schedule is mapped by epochs done (refused otherwise; "
                             "another number of processes with the same global batch always "
                             "resumes)")
    return parser


def add_backbone_args(parser):
    parser.add_argument("--arch", default="resnet50", type=str, choices=sorted(ARCHS),
                        help="convnet architecture")
    parser.add_argument("--cifar_stem", type=bool_flag, default=False,
                        help="small images: 3x3 stride-1 stem conv and no max-pool")
    parser.add_argument("--width", type=int, default=0,
                        help="stem width of the backbone (0: the arch's default, 64 x widen)")
    return parser


def add_tf32_arg(parser):
    """--tf32 (pre-trainings and evaluations; src/engine.py configure_backends applies it)."""
    parser.add_argument("--tf32", type=bool_flag, default=False,
                        help="TF32 (10-bit mantissa) for fp32 matmuls and convolutions on Ampere "
                             "and newer GPUs: faster fp32, less exact. Off by default: fp32 then "
                             "means IEEE fp32 as in the original (V100s, no TF32); under "
                             "--use_fp16 the heavy convolutions run in fp16 anyway, and the fp32 "
                             "ops left are those that need the precision (the queue scores fed "
                             "to Sinkhorn, whose exp(score / epsilon) multiplies their error by "
                             "1/epsilon = 20; the k-means dot products whose argmax picks the "
                             "clusters)")
    return parser


def add_run_args(parser):
    """The run flags of every pre-training: loader workers, checkpoint and log frequency,
    precision (fp16/bf16, TF32, the non-finite step guard), device and memory format, SyncBN,
    output folder, seed, resume, TensorBoard."""
    parser.add_argument("--workers", default=10, type=int, help="number of data loading workers")
    parser.add_argument("--checkpoint_freq", type=int, default=25,
                        help="Save the model periodically")
    parser.add_argument("--log_freq", type=int, default=50,
                        help="log the progress line every this many iterations")
    parser.add_argument("--use_fp16", type=bool_flag, default=True,
                        help="mixed precision: fp16 + GradScaler on CUDA; bf16 on a CPU with "
                             "native bf16, else fp32")
    parser.add_argument("--amp_dtype", type=str, default="auto",
                        choices=["auto", "float16", "bfloat16"],
                        help="autocast dtype under --use_fp16 (auto: fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--device", type=str, default="auto",
                        help="auto (CUDA when available), cuda or cpu")
    parser.add_argument("--channels_last", type=bool_flag, default=True,
                        help="NHWC memory format for the convolutions (faster; same math)")
    add_tf32_arg(parser)
    parser.add_argument("--sync_bn", type=str, default="pytorch",
                        help="synchronize bn: pytorch (global), apex (groups), none")
    parser.add_argument("--syncbn_process_group_size", type=int, default=8,
                        help="ranks per SyncBN group with --sync_bn apex")
    parser.add_argument("--dump_path", type=str, default=".",
                        help="experiment dump path for checkpoints and log")
    parser.add_argument("--seed", type=int, default=31, help="seed")
    parser.add_argument("--resume", type=str, default="",
                        help="resume from this checkpoint (an error if it does not load); by "
                             "default dump_path/checkpoint.pth.tar, or when it is corrupt the "
                             "newest loadable checkpoints/ckp-N.pth")
    parser.add_argument("--tensorboard", type=bool_flag, default=False,
                        help="also write the per-epoch scalars (loss, lr, the method's collapse "
                             "metric) under dump_path/tb (rank 0; needs the tensorboard package)")
    parser.add_argument("--max_nonfinite_steps", type=int, default=20,
                        help="fp16 loss scaler: stop after this many consecutive steps skipped "
                             "for inf/NaN (without a scaler the first one stops the run)")
    return parser
