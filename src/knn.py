"""The weighted k-NN classifier of eval_knn.py (Wu et al. 2018, DINO's knn_classifier), with
the train bank sharded over the ranks: each rank keeps the features it extracted, only the top-k
candidates of every rank travel."""
import torch
import torch.nn.functional as F

from . import distributed as du


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, num_classes, k=20, temperature=0.07,
                 batch_size=256):
    """Weighted k-NN (Wu et al. 2018, DINO's knn_classifier): cosine similarity to the
    L2-normalised train features, the k nearest vote for their class with weight exp(sim / T).

    Distributed, `train_features` / `train_labels` are this rank's shard of the bank (any split;
    none replicated) and every rank passes the same `test_features`: each chunk of
    `batch_size` queries is scored on the bank's device against the local shard, and only the
    local top-k (similarities, labels) of every rank are all-gathered and merged into the
    global top-k. In one process this is DINO's computation as it was (one `topk` over the
    whole bank; which of several equal similarities at the k-th place is kept is topk's choice,
    unspecified, as in DINO). Returns class scores [n_test, num_classes] (argmax = prediction)
    on test_features' device, the same on every rank."""
    device = train_features.device
    train_features = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    n_train = train_features.shape[0]
    world = du.get_world_size()
    if world > 1:
        n_train = int(du.all_reduce(torch.tensor([n_train])).item())
    k = min(k, n_train)
    scores = []
    for start in range(0, test_features.shape[0], batch_size):
        queries = F.normalize(test_features[start:start + batch_size].to(device).float(), dim=1)
        sim = queries @ train_features.t()
        top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
        top_labels = train_labels[top_idx]
        if world > 1:
            top_sim, top_labels = merge_topk(top_sim, top_labels, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=device)
        votes.scatter_add_(1, top_labels, weights)
        scores.append(votes.to(test_features.device))
    return (torch.cat(scores) if scores else
            torch.zeros(0, num_classes, device=test_features.device))


def merge_topk(values, labels, k):
    """The k largest `values` per row over every rank's candidates, with their `labels` (all
    ranks call; a rank with fewer than k candidates pads with -inf, never chosen)."""
    pad = k - values.shape[1]
    if pad > 0:
        values = torch.cat([values, values.new_full((values.shape[0], pad), float("-inf"))], 1)
        labels = torch.cat([labels, labels.new_zeros((labels.shape[0], pad))], 1)
    values = torch.cat(du.all_gather(values), dim=1)  # [queries, world_size * k], rank order
    labels = torch.cat(du.all_gather(labels), dim=1)
    top, pos = values.topk(k, dim=1)
    return top, labels.gather(1, pos)
