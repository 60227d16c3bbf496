"""Linear classification on frozen features: same flags, defaults and RegLog head as
facebookresearch/swav's eval_linear.py, on CPU or CUDA, one process or many.

Differences: a --pretrained path that does not exist is an error (the original trained on random
weights); classes come from the data; the eval checkpoint/stats/log have their own names
(checkpoint_eval_linear.pth.tar, ...) so they can share a pre-training dump_path; validation is
sharded over ranks with each image counted once; sizes are flags for small images;
--cache_features trains the head on features computed once (no augmentation) for small data.
"""
import argparse
import logging
import os

import torch
import torch.nn as nn

from src.cli import add_distributed_args, run_main
from src.engine import build_loader, prepare_model
from src.errors import UsageError
from src.evaluation import (PIXELS, add_eval_data_args, add_eval_model_args,
                            add_eval_run_args, build_eval_datasets, build_frozen_backbone,
                            eval_scaler, eval_transforms, extract_features, fit, frozen_forward,
                            shard_loader, start_eval, tensor_loaders)
from src.utils import bool_flag

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate models: Linear classification",
                                     add_help=False)

    #########################
    #### main parameters ####
    #########################
    parser.add_argument("--dump_path", type=str, default=".",
                        help="experiment dump path for checkpoints and log")
    parser.add_argument("--seed", type=int, default=31, help="seed")
    parser.add_argument("--data_path", type=str, default="/path/to/imagenet",
                        help="path to dataset repository (with train/ and val/)")
    parser.add_argument("--workers", default=10, type=int, help="number of data loading workers")
    add_eval_data_args(parser)

    #########################
    #### model parameters ###
    #########################
    add_eval_model_args(parser)
    parser.add_argument("--global_pooling", default=True, type=bool_flag,
                        help="if True, we use the resnet50 global average pooling")
    parser.add_argument("--use_bn", default=False, type=bool_flag,
                        help="optionally add a batchnorm layer before the linear classifier")
    parser.add_argument("--cache_features", default=False, type=bool_flag,
                        help="compute the frozen features once (val transform, no augmentation) "
                             "and train the head on them: fast for small datasets")

    #########################
    #### optim parameters ###
    #########################
    parser.add_argument("--epochs", default=100, type=int, help="number of total epochs to run")
    parser.add_argument("--batch_size", default=32, type=int,
                        help="batch size per gpu, i.e. how many unique instances per gpu")
    parser.add_argument("--lr", default=0.3, type=float, help="initial learning rate")
    parser.add_argument("--wd", default=1e-6, type=float, help="weight decay")
    parser.add_argument("--nesterov", default=False, type=bool_flag, help="nesterov momentum")
    parser.add_argument("--scheduler_type", default="cosine", type=str, choices=["step", "cosine"])
    # for multi-step learning rate decay
    parser.add_argument("--decay_epochs", type=int, nargs="+", default=[60, 80],
                        help="Epochs at which to decay learning rate.")
    parser.add_argument("--gamma", type=float, default=0.1, help="decay factor")
    # for cosine learning rate schedule
    parser.add_argument("--final_lr", type=float, default=0, help="final learning rate")

    #########################
    #### dist parameters ###
    #########################
    add_distributed_args(parser)
    add_eval_run_args(parser)
    return parser


class RegLog(nn.Module):
    """Logistic regression on frozen features, as the original's RegLog (same layers and init).

    global_avg: AdaptiveAvgPool2d(1) -> Linear(features -> labels) (features: 2048 x widen, or
    the backbone's `num_features`). Otherwise (resnet50 only, 7x7 maps): AvgPool2d(6, stride 1)
    -> 2x2x2048 = 8192 values -> optional BatchNorm2d(2048) before pooling's flatten -> Linear.
    As in the original, `use_bn` only applies without global pooling. Weights N(0, 0.01), bias 0.
    With global pooling it also takes already pooled features [N, D] (--cache_features).
    """

    WIDTHS = {"resnet50": 2048, "resnet50w2": 4096, "resnet50w4": 8192, "resnet50w5": 10240,
              "resnet18": 512, "resnet34": 512}

    def __init__(self, num_labels, arch="resnet50", global_avg=False, use_bn=True,
                 num_features=None):
        super().__init__()
        self.bn = None
        if global_avg:
            if num_features is None:
                if arch not in self.WIDTHS:
                    raise UsageError(f"RegLog: unknown arch {arch!r}: give num_features")
                num_features = self.WIDTHS[arch]
            s = num_features
            self.av_pool = nn.AdaptiveAvgPool2d((1, 1))
        else:
            if arch != "resnet50":
                raise UsageError(f"--global_pooling false is only defined for resnet50 "
                                 f"(2048 x 7 x 7 maps), not {arch}")
            s = 8192
            self.av_pool = nn.AvgPool2d(6, stride=1)
            if use_bn:
                self.bn = nn.BatchNorm2d(2048)
        self.linear = nn.Linear(s, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        # average pool the final feature map (features cached already pooled are [N, D])
        if x.dim() == 4:
            x = self.av_pool(x)
        # optional BN
        if self.bn is not None:
            x = self.bn(x)
        # flatten (reshape: the pooled map is not always contiguous)
        x = x.reshape(x.size(0), -1)
        return self.linear(x)


def build_scheduler(optimizer, args):
    if args.scheduler_type == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, args.decay_epochs, gamma=args.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=args.final_lr)


def main(args):
    paths, training_stats, tb = start_eval(args, "eval_linear")

    # build data
    train_tf, val_tf = eval_transforms(args)
    train_dataset, val_dataset = build_eval_datasets(args.data_path, train_tf, val_tf)
    num_labels = len(train_dataset.classes)

    # build the frozen backbone and the linear classifier
    model = build_frozen_backbone(args, args.center_crop if args.cache_features else args.train_crop)
    if args.arch == PIXELS and not args.cache_features and args.train_crop != args.center_crop:
        raise UsageError("--arch pixels needs --train_crop equal to --center_crop")
    linear_classifier = RegLog(num_labels, args.arch, args.global_pooling, args.use_bn,
                               num_features=model.num_features)
    # the original converts the head's BatchNorm (--use_bn) to one global SyncBN group
    linear_classifier = prepare_model(linear_classifier, args, sync_bn="pytorch")

    if args.cache_features:
        # frozen features are computed once: the head then trains on tensors
        train_dataset.transform = val_tf
        pool = args.global_pooling  # keep the maps only for the resnet50 AvgPool2d(6) head
        train_loader, val_loader = tensor_loaders(
            extract_features(model, train_dataset, args, pool=pool),
            extract_features(model, val_dataset, args, pool=pool), args)
        forward = lambda x: linear_classifier(x.to(args.device, non_blocking=True))  # noqa: E731
    else:
        # per-image seeded augmentations; the last partial batch kept, as the original
        train_loader = build_loader(train_dataset, args, drop_last=False)
        val_loader = shard_loader(val_dataset, args)
        forward = lambda x: linear_classifier(frozen_forward(model, x, args))  # noqa: E731
    logger.info("Building data done")

    # set optimizer and scheduler
    scaler = eval_scaler(args)
    optimizer = torch.optim.SGD(linear_classifier.parameters(), lr=args.lr, nesterov=args.nesterov,
                                momentum=0.9, weight_decay=args.wd)
    scheduler = build_scheduler(optimizer, args)

    final = fit("eval_linear", forward, linear_classifier, (train_loader, val_loader), optimizer,
                scheduler, scaler, training_stats, tb, paths, args)
    logger.info("Training of the supervised linear classifier on frozen features completed.\n"
                "Final top-1 {top1:.2f} top-5 {top5:.2f}; best top-1 {best_top1:.2f} "
                "top-5 {best_top5:.2f}".format(**final))
    logger.info(f"checkpoint: {os.path.abspath(paths['checkpoint'])}")
    return final


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("Linear evaluation", parents=[get_args_parser()]))
