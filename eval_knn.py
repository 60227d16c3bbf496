"""Weighted k-NN classification on frozen features (not in the original SwAV code; the protocol of
Wu et al. 2018 / DINO): L2-normalised pooled features, cosine similarity, the k nearest training
images vote for their class with weight exp(sim / T). No training, so it is a quick check of a
checkpoint. Features are computed once, batched, sharded over ranks and all-gathered; each rank
classifies its share of val/ and the hits are all-reduced.
"""
import argparse
import logging

import torch

from src import distributed as du
from src.cli import add_distributed_args, run_main
from src.evaluation import (ShardSampler, add_eval_data_args, add_eval_model_args,
                            add_eval_run_args, build_eval_datasets, build_frozen_backbone,
                            eval_transforms, extract_features, knn_classify, start_eval)
from src.utils import accuracy

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate models: weighted k-NN", add_help=False)
    parser.add_argument("--dump_path", type=str, default=".",
                        help="experiment dump path for the log and results")
    parser.add_argument("--seed", type=int, default=31, help="seed")
    parser.add_argument("--data_path", type=str, default="/path/to/imagenet",
                        help="path to dataset repository (with train/ and val/)")
    parser.add_argument("--workers", default=10, type=int, help="number of data loading workers")
    add_eval_data_args(parser, train_crop=False)
    add_eval_model_args(parser)
    parser.add_argument("--nb_knn", type=int, nargs="+", default=[20],
                        help="number of nearest neighbours (several values: one result each)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="temperature T of the vote weights exp(sim / T)")
    parser.add_argument("--batch_size", type=int, default=128,
                        help="images per forward pass (per process)")
    add_distributed_args(parser)
    add_eval_run_args(parser)
    return parser


def main(args):
    if args.temperature <= 0 or min(args.nb_knn) < 1:
        raise ValueError("--temperature must be > 0 and --nb_knn >= 1")
    paths, stats, tb = start_eval(args, "eval_knn", ("k", "temperature", "top1", "top5"))
    stats.truncate(0)  # one run per file: this run's results only

    # train/ and val/ with the validation transform: no augmentation
    _, val_tf = eval_transforms(args)
    train_dataset, val_dataset = build_eval_datasets(args.data_path, val_tf, val_tf)
    num_classes = len(train_dataset.classes)
    model = build_frozen_backbone(args, args.center_crop)

    # features once, gathered on every rank
    train_feats, train_labels = extract_features(model, train_dataset, args)
    val_feats, val_labels = extract_features(model, val_dataset, args)
    logger.info(f"features: train {tuple(train_feats.shape)}, val {tuple(val_feats.shape)}")

    # each rank classifies its share of val/; hits are summed over ranks
    mine = torch.tensor(list(ShardSampler(len(val_dataset))), dtype=torch.long)
    results = {}
    for k in args.nb_knn:
        scores = knn_classify(train_feats, train_labels, val_feats[mine], num_classes, k,
                              args.temperature)
        hits = torch.zeros(3, dtype=torch.float64)
        if len(mine):
            top1, top5 = accuracy(scores, val_labels[mine], topk=(1, 5))
            hits += torch.tensor([top1.item() * len(mine) / 100, top5.item() * len(mine) / 100,
                                  len(mine)], dtype=torch.float64)
        hits = du.all_reduce(hits)
        top1, top5 = (100 * hits[0] / hits[2]).item(), (100 * hits[1] / hits[2]).item()
        results[k] = {"top1": top1, "top5": top5}
        stats.update((k, args.temperature, top1, top5), save=args.rank == 0)
        tb.scalars(k, "eval_knn", top1=top1, top5=top5)
        logger.info(f"{k}-NN classifier (T={args.temperature}): top-1 {top1:.2f}, top-5 {top5:.2f}")
    tb.close()
    return results


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("k-NN evaluation", parents=[get_args_parser()]))
