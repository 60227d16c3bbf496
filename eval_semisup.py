"""Semi-supervised evaluation: fine-tune the whole network on 1% / 10% of the labels. Same flags,
defaults and optimisation as facebookresearch/swav's eval_semisup.py (trunk lr --lr, head lr
--lr_last_layer, SGD momentum 0.9 without weight decay, MultiStepLR at 12 and 16, gamma 0.2, 20
epochs, SyncBN), on CPU or CUDA, one process or many.

Differences: the labelled subset is a local file (--subset_file, one image per line: a path
relative to train/, or SimCLR's ImageNet file names) or, without one, a deterministic
class-stratified sample of --labels_perc percent drawn with --seed; nothing is downloaded (the
original fetched SimCLR's list on every rank at start-up). Classes come from the data; files of
this evaluation have their own names in --dump_path.
"""
import argparse
import logging
import os

import torch

from src.cli import add_distributed_args, run_main
from src.engine import build_loader, prepare_model
from src.evaluation import (add_eval_data_args, add_eval_model_args, add_eval_run_args,
                            build_eval_datasets, eval_scaler, eval_transforms, fit,
                            forward_autocast, load_backbone_weights, shard_loader, start_eval)
from src.resnet50 import build_backbone
from src.subsets import read_subset_file, stratified_subset

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(
        description="Evaluate models: Fine-tuning with 1% or 10% labels", add_help=False)

    #########################
    #### main parameters ####
    #########################
    parser.add_argument("--labels_perc", type=float, default=10,
                        help="percent of the labels to fine-tune on (the paper: 1 or 10)")
    parser.add_argument("--subset_file", type=str, default="",
                        help="file listing the labelled images (one per line, e.g. SimCLR's "
                             "1percent.txt); empty: a class-stratified --labels_perc sample")
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
    add_eval_model_args(parser, pixels=False)
    parser.add_argument("--sync_bn", type=str, default="pytorch",
                        help="synchronize bn: pytorch (global), apex (groups), none")
    parser.add_argument("--syncbn_process_group_size", type=int, default=8,
                        help="ranks per SyncBN group with --sync_bn apex")

    #########################
    #### optim parameters ###
    #########################
    parser.add_argument("--epochs", default=20, type=int, help="number of total epochs to run")
    parser.add_argument("--batch_size", default=32, type=int,
                        help="batch size per gpu, i.e. how many unique instances per gpu")
    parser.add_argument("--lr", default=0.01, type=float,
                        help="initial learning rate - trunk (paper: 0.02 for 1%%, 0.01 for 10%%)")
    parser.add_argument("--lr_last_layer", default=0.2, type=float,
                        help="initial learning rate - head (paper: 5 for 1%%, 0.2 for 10%%)")
    parser.add_argument("--decay_epochs", type=int, nargs="+", default=[12, 16],
                        help="Epochs at which to decay learning rate.")
    parser.add_argument("--gamma", type=float, default=0.2, help="lr decay factor")

    #########################
    #### dist parameters ###
    #########################
    add_distributed_args(parser)
    add_eval_run_args(parser)
    return parser


def labelled_train_set(args, train_dataset):
    """Restrict train/ to the labelled images: --subset_file, else a stratified sample."""
    if args.subset_file:
        samples = read_subset_file(args.subset_file, train_dataset.root, train_dataset.class_to_idx)
        origin = args.subset_file
    else:
        samples = stratified_subset(train_dataset.samples, args.labels_perc, args.seed,
                                    train_dataset.classes)
        origin = f"{args.labels_perc}% per class, seed {args.seed}"
    train_dataset.samples = train_dataset.imgs = samples
    train_dataset.targets = [s[1] for s in samples]
    covered = len(set(train_dataset.targets))
    logger.info(f"labelled subset ({origin}): {len(samples)} images of "
                f"{covered}/{len(train_dataset.classes)} classes")
    return train_dataset


def main(args):
    paths, training_stats, tb = start_eval(args, "eval_semisup")

    # build data: the labelled part of train/, and val/
    train_tf, val_tf = eval_transforms(args)
    train_dataset, val_dataset = build_eval_datasets(args.data_path, train_tf, val_tf)
    train_dataset = labelled_train_set(args, train_dataset)
    train_loader = build_loader(train_dataset, args, drop_last=False)  # as the original
    val_loader = shard_loader(val_dataset, args)
    logger.info("Building data done with {} images loaded.".format(len(train_dataset)))

    # build model: the backbone and a linear head on the pooled features (no normalisation)
    model = build_backbone(args.arch, output_dim=len(train_dataset.classes),
                           cifar_stem=args.cifar_stem, width=args.width or None)
    load_backbone_weights(model, args.pretrained, args.allow_missing_keys)
    model = prepare_model(model, args, args.sync_bn)  # SyncBN (CUDA, ranks > 1), device, DDP

    # set optimizer: the head ("projection_head") gets its own learning rate
    trunk_parameters, head_parameters = [], []
    for name, param in model.named_parameters():
        (head_parameters if "head" in name else trunk_parameters).append(param)
    scaler = eval_scaler(args)
    optimizer = torch.optim.SGD([{"params": trunk_parameters},
                                 {"params": head_parameters, "lr": args.lr_last_layer}],
                                lr=args.lr, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.decay_epochs, gamma=args.gamma)

    forward = lambda x: forward_autocast(model, x, args)  # noqa: E731
    final = fit("eval_semisup", forward, model, (train_loader, val_loader), optimizer, scheduler,
                scaler, training_stats, tb, paths, args, lr_names=("lr_trunk", "lr_head"))
    logger.info("Fine-tuning with {} labels completed.\n"
                "Final top-1 {top1:.2f} top-5 {top5:.2f}; best top-1 {best_top1:.2f} "
                "top-5 {best_top5:.2f}".format(args.subset_file or f"{args.labels_perc}%", **final))
    logger.info(f"checkpoint: {os.path.abspath(paths['checkpoint'])}")
    return final


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("Semi-supervised evaluation",
                                           parents=[get_args_parser()]))
