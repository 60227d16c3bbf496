"""Each image of a folder to a cluster, with a pre-trained network (not in the original SwAV
code): SwAV's prototypes (DeepCluster-v2's, --head i) by nearest prototype (--mode argmax) or by
Sinkhorn-Knopp over the whole set (--mode balanced: near-equal sizes), either one optionally
with the prototypes grouped into K clusters (--prototype_groups K), or spherical k-means on
the backbone's features (--mode kmeans; any backbone, or --nmb_clusters K). Writes
assignments.csv, metrics.json (NMI, ARI, purity when the folder has classes), a contact sheet
per cluster under sheets/ and overview.png. src/clusters.py says how each confidence is defined.
"""
import argparse
import logging
import os

import torch

from src import distributed as du
from src.cli import add_distributed_args, run_main
from src.clusters import (MODES, FeatureProgress, ImageListDataset, assign_argmax,
                          assign_balanced, assign_kmeans, build_network, cluster_metrics,
                          contact_sheets, group_prototypes, prototype_scores,
                          prototype_weights, save_features, write_assignments, write_json)
from src.engine import job_image_list
from src.errors import UsageError
from src.evaluation import (ShardSampler, add_eval_data_args, add_eval_model_args,
                            add_eval_run_args, eval_transforms, extract_features, gather_shards,
                            start_eval)
from src.utils import bool_flag

logger = logging.getLogger()


def get_args_parser():
    parser = argparse.ArgumentParser(description="Assign images to clusters", add_help=False)
    parser.add_argument("--dump_path", type=str, default=".",
                        help="output folder: log, assignments.csv, metrics.json, sheets/")
    parser.add_argument("--seed", type=int, default=31, help="seed (k-means initialisation)")
    parser.add_argument("--data_path", type=str, default="/path/to/images",
                        help="images: an ImageFolder (its classes give the metrics), a flat "
                             "folder, a folder tree, or a list file")
    parser.add_argument("--workers", default=10, type=int, help="number of data loading workers")
    add_eval_data_args(parser, train_crop=False)
    add_eval_model_args(parser, pixels=False)
    parser.add_argument("--batch_size", type=int, default=128,
                        help="images per forward pass (per process)")

    # clustering
    parser.add_argument("--mode", type=str, default=None, choices=MODES,
                        help="argmax: nearest prototype; balanced: Sinkhorn-Knopp over the whole "
                             "set, then argmax; kmeans: spherical k-means on the backbone's "
                             "features (default: argmax with prototypes, else kmeans)")
    parser.add_argument("--nmb_clusters", type=int, default=0,
                        help="K for k-means (default: the number of prototypes of --head); "
                             "implies --mode kmeans")
    parser.add_argument("--prototype_groups", type=int, default=0,
                        help="argmax / balanced: group the prototypes into this many clusters "
                             "(k-means on the prototype vectors, each weighted by the images it "
                             "holds) and give each image its prototype's group (0: no grouping)")
    parser.add_argument("--head", type=int, default=0,
                        help="which prototype head (DeepCluster-v2 has several)")
    parser.add_argument("--epsilon", type=float, default=None,
                        help="Sinkhorn epsilon of --mode balanced (default: the checkpoint's "
                             "training --epsilon, else 0.05)")
    parser.add_argument("--sinkhorn_iterations", type=int, default=None,
                        help="Sinkhorn iterations (default: the checkpoint's, else 3)")
    parser.add_argument("--kmeans_iters", type=int, default=10, help="k-means iterations")

    # outputs
    parser.add_argument("--save_features", type=bool_flag, default=False,
                        help="also write features.npy (pooled backbone features) and "
                             "features_paths.txt (its row order)")
    parser.add_argument("--images_per_sheet", type=int, default=36,
                        help="most confident images shown per cluster's contact sheet")
    parser.add_argument("--thumb_size", type=int, default=96, help="thumbnail side in pixels")
    parser.add_argument("--overview_clusters", type=int, default=20,
                        help="clusters (the largest) shown in overview.png, one row each")
    add_distributed_args(parser)
    add_eval_run_args(parser)
    return parser


def choose_mode(args, has_prototypes):
    """The clustering mode from --mode, --nmb_clusters and whether the file has prototypes."""
    if args.nmb_clusters and args.mode in ("argmax", "balanced"):
        raise UsageError(f"--nmb_clusters {args.nmb_clusters} runs k-means, --mode {args.mode} "
                         "uses the checkpoint's prototypes: give one of them")
    if args.mode in ("argmax", "balanced") and not has_prototypes:
        raise UsageError(f"--mode {args.mode} needs prototypes, and --pretrained "
                         f"{args.pretrained or '(none)'} has none (SimSiam, torchvision, a "
                         "backbone): use --mode kmeans --nmb_clusters K")
    mode = args.mode or ("argmax" if has_prototypes and not args.nmb_clusters else "kmeans")
    if args.prototype_groups < 0 or (args.prototype_groups and mode == "kmeans"):
        raise UsageError(f"--prototype_groups {args.prototype_groups} groups the prototypes of "
                         "--mode argmax|balanced: give K >= 1 with one of them, 0 otherwise")
    if mode == "kmeans" and not args.nmb_clusters and not has_prototypes:
        raise UsageError(f"--pretrained {args.pretrained or '(none)'} has no prototypes: give "
                         "--nmb_clusters K for k-means")
    return mode


def mode_settings(args, mode, flags):
    """The mode's settings: the flag when given, else the training run's (our checkpoints'
    saved flags), else the original's default."""
    if mode == "kmeans":
        if args.kmeans_iters < 0:
            raise UsageError(f"--kmeans_iters must be >= 0, got {args.kmeans_iters}")
        return {"mode": mode, "kmeans_iters": args.kmeans_iters, "seed": args.seed}
    settings = {"mode": mode, "head": args.head, "prototype_groups": args.prototype_groups}
    if mode == "argmax":
        settings["temperature"] = flags.get("temperature", 0.1)
        return settings
    for name, default in (("epsilon", 0.05), ("sinkhorn_iterations", 3)):
        given = getattr(args, name)
        settings[name] = given if given is not None else flags.get(name, default)
    if settings["epsilon"] <= 0 or settings["sinkhorn_iterations"] < 1:
        raise UsageError("--epsilon must be > 0 and --sinkhorn_iterations >= 1")
    return settings


def assign(settings, net, prototypes, feats, local, args):
    """(cluster, confidence) of this rank's rows `local` of the features, and K (all ranks call)."""
    if settings["mode"] == "kmeans":
        K = args.nmb_clusters or len(prototypes)
        return (*assign_kmeans(feats, local, K, args.kmeans_iters, args.seed, args.device), K)
    scores = prototype_scores(net, feats[local], prototypes)
    if settings["mode"] == "argmax":
        return (*assign_argmax(scores, settings["temperature"]), len(prototypes))
    return (*assign_balanced(scores.to(args.device), settings["epsilon"],
                             settings["sinkhorn_iterations"]), len(prototypes))


def log_sizes(what, cluster, K, settings):
    """The K cluster sizes of `cluster`, logged with `settings`."""
    sizes = torch.bincount(cluster, minlength=K)
    logger.info(f"{what}: {len(cluster)} images in {int((sizes > 0).sum())} non-empty of {K} "
                f"clusters (largest {int(sizes.max())}, smallest non-empty "
                f"{int(sizes[sizes > 0].min())}) " + " ".join(f"{k}={v}" for k, v in
                                                             settings.items() if k != "mode"))
    return sizes


def main(args):
    if args.images_per_sheet < 1 or args.thumb_size < 8 or args.batch_size < 1:
        raise UsageError("--images_per_sheet and --batch_size must be >= 1, --thumb_size >= 8")
    _, stats, tb = start_eval(args, "assign_clusters", ("mode", "clusters", "nmi", "ari", "purity"))
    stats.truncate(0)  # one run per file

    # data: any layout, listed once per job (rank 0 walks); an ImageFolder's classes are kept
    images = job_image_list(args)
    _, transform = eval_transforms(args)
    dataset = ImageListDataset(images, transform)
    if len(dataset) < args.world_size:  # every rank needs a share (Sinkhorn takes a max of it)
        raise UsageError(f"{len(dataset)} images for {args.world_size} processes: use fewer")

    # network: backbone, and the projection head + prototypes when the file has them
    net, flags = build_network(args)
    has_prototypes = net.prototypes is not None
    mode = choose_mode(args, has_prototypes)
    prototypes = prototype_weights(net, args.head) if has_prototypes else None
    settings = mode_settings(args, mode, flags)

    # pooled backbone features of every image, on every rank (each rank computes its shard)
    nmb_batches = -(-len(ShardSampler(len(dataset))) // args.batch_size)
    feats, _ = extract_features(FeatureProgress(net, nmb_batches, args.log_freq), dataset, args,
                                pool=False)
    logger.info(f"features: {tuple(feats.shape)}")
    local = torch.tensor(list(ShardSampler(len(dataset))), dtype=torch.long)

    # each rank assigns its shard; Sinkhorn and k-means sums run over all shards
    cluster, conf, K = assign(settings, net, prototypes, feats, local, args)
    conf, cluster = gather_shards(conf.float().cpu(), cluster.long().cpu(), len(dataset))
    sizes = log_sizes(mode, cluster, K, settings)
    result = {**settings, "images": len(dataset)}
    if args.prototype_groups:  # the same on every rank: every rank holds all assignments
        groups = group_prototypes(prototypes.cpu(), cluster.numpy(), args.prototype_groups,
                                  args.seed)
        result["prototypes"] = {"clusters": K, "non_empty": int((sizes > 0).sum())}
        if images.labels is not None and args.rank == 0:
            result["prototypes"].update(cluster_metrics(images.labels, cluster.numpy()))
        result["prototype_group"] = groups.tolist()
        cluster, K = torch.from_numpy(groups)[cluster], args.prototype_groups
        sizes = log_sizes(f"{K} groups of the prototypes", cluster, K, {})
    result.update({"clusters": K, "non_empty": int((sizes > 0).sum()), "sizes": sizes.tolist()})
    if images.labels is not None and args.rank == 0:
        result.update(cluster_metrics(images.labels, cluster.numpy()))
        logger.info(f"NMI {result['nmi']:.4f}  ARI {result['ari']:.4f}  purity "
                    f"{result['purity']:.4f}  ({len(images.classes)} classes, {K} clusters)")
    elif images.labels is None:
        logger.info(f"{images.layout}: no class labels, so no NMI / ARI / purity "
                    "(metrics.json holds the cluster sizes)")
    if args.rank == 0:
        write_assignments(os.path.join(args.dump_path, "assignments.csv"), images, cluster, conf)
        write_json(os.path.join(args.dump_path, "metrics.json"), result)
        if args.save_features:
            save_features(args.dump_path, feats, images.paths)
        sheets = contact_sheets(args.dump_path, images.paths, cluster.numpy(), conf.numpy(), K,
                                args.images_per_sheet, args.thumb_size, args.overview_clusters)
        logger.info(f"wrote {os.path.join(args.dump_path, 'assignments.csv')}, metrics.json, "
                    f"{len(sheets) - 1} contact sheets under sheets/ and overview.png")
    stats.update((mode, K, *(result.get(m, float("nan")) for m in ("nmi", "ari", "purity"))),
                 save=args.rank == 0)
    tb.scalars(0, "assign_clusters", **{m: result[m] for m in ("nmi", "ari", "purity")
                                        if m in result})
    tb.close()
    du.barrier()
    return {**result, "assignments": cluster, "confidence": conf}


if __name__ == "__main__":
    run_main(main, argparse.ArgumentParser("Assign images to clusters",
                                           parents=[get_args_parser()]))
