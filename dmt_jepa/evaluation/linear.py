"""Logistic-regression probe on pooled features."""

from __future__ import annotations

import numpy as np
import torch


def linear_top1(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *, c: float = 1.0
) -> float:
    """Top-1 accuracy (in %) of an L2-regularised multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    probe.fit(train_x.numpy().astype(np.float64), train_y.numpy())
    predicted = probe.predict(test_x.numpy().astype(np.float64))
    return 100.0 * float(np.mean(predicted == test_y.numpy()))
