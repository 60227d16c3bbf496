"""Weighted k-NN classification on frozen features (not in the original SwAV code; the protocol of
Wu et al. 2018 / DINO): L2-normalised pooled features, cosine similarity, the k nearest training
images vote for their class with weight exp(sim / T). No training, so it is a quick check of a
checkpoint. Features are computed once, batched and sharded over ranks. The train bank stays
sharded (1.28M x 2048 fp32 is 10 GB: one copy in all, not one per rank), on each rank's device;
every rank scores every val image against its shard in chunks and only the top-k (similarity,
label) of each rank are gathered and merged.
"""
import argparse
import logging

from src.cli import add_distributed_args, run_main
from src.errors import UsageError
from src.evaluation import (add_eval_data_args, add_eval_model_args, add_eval_run_args,
                            build_eval_datasets, build_frozen_backbone, eval_transforms,
                            extract_features, start_eval)
from src.knn import knn_classify
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
        raise UsageError("--temperature must be > 0 and --nb_knn >= 1")
    paths, stats, tb = start_eval(args, "eval_knn", ("k", "temperature", "top1", "top5"))
    stats.truncate(0)  # one run per file: this run's results only

    # train/ and val/ with the validation transform: no augmentation
    _, val_tf = eval_transforms(args)
    train_dataset, val_dataset = build_eval_datasets(args.data_path, val_tf, val_tf)
    num_classes = len(train_dataset.classes)
    model = build_frozen_backbone(args, args.center_crop)

    # features once: the train bank stays sharded (each rank keeps the features it extracted,
    # on its device), the val features (the queries) are gathered on every rank
    train_feats, train_labels = extract_features(model, train_dataset, args, gather=False)
    val_feats, val_labels = extract_features(model, val_dataset, args)
    logger.info(f"features: train {len(train_dataset)} x {train_feats.shape[1]} ({len(train_feats)}"
                f" on this rank), val {tuple(val_feats.shape)}")
    train_feats, train_labels = train_feats.to(args.device), train_labels.to(args.device)

    # every rank scores every val image against its shard; the merged top-k are the same on
    # every rank, and so are the accuracies
    results = {}
    for k in args.nb_knn:
        scores = knn_classify(train_feats, train_labels, val_feats, num_classes, k,
                              args.temperature)
        top1, top5 = (a.item() for a in accuracy(scores, val_labels, topk=(1, 5)))
        results[k] = {"top1": top1, "top5": top5}
        stats.update((k, args.temperature, top1, top5), save=args.rank == 0)
        tb.scalars(k, "eval_knn", top1=top1, top5=top5)
        logger.info(f"{k}-NN classifier (T={args.temperature}): top-1 {top1:.2f}, top-5 {top5:.2f}")
    tb.close()
    return results


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("k-NN evaluation", parents=[get_args_parser()]))
