"""Cosine k-nearest-neighbour classification of pooled features."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class of each test vector by a vote of its k most cosine-similar train vectors, weighted exp(sim / T)."""
    num_classes = num_classes or int(train_y.max()) + 1
    k = min(k, len(train_x))
    train = F.normalize(train_x.float(), dim=1)
    predictions = []
    for start in range(0, len(test_x), chunk):
        test = F.normalize(test_x[start : start + chunk].float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)  # [n, k]
        votes = torch.zeros(len(test), num_classes)
        votes.scatter_add_(1, train_y[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(train_x, train_y, test_x, test_y, *, k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (in %) of the cosine kNN classifier."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    predicted = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes)
    return 100.0 * (predicted == test_y).float().mean().item()
