"""A served probability means what it says, after negative downsampling."""

import numpy as np
import pytest
import torch

from serving.calibration import Calibrator, estimate_negative_rate


def _fit_logistic(x, y, steps=300):
    """Unweighted logistic regression (what a naive trainer on the downsampled stream learns)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def test_calibrated_probabilities_match_observed_click_rates_on_the_full_stream():
    rng = np.random.default_rng(0)
    n, rate = 400_000, 0.1
    x = rng.normal(size=(n, 3)).astype(np.float32)
    true_logit = x @ np.array([1.0, -0.7, 0.4], np.float32) - 3.0  # ~6% CTR
    y = (rng.random(n) < 1 / (1 + np.exp(-true_logit))).astype(np.float32)
    # The joiner keeps every positive and 10% of negatives, recording sample_rate.
    keep = (y == 1) | (rng.random(n) < rate)
    sample_rate = np.where(y == 1, 1.0, rate).astype(np.float32)[keep]
    w, b = _fit_logistic(x[keep], y[keep])

    r = estimate_negative_rate(y[keep], sample_rate)
    assert r == pytest.approx(rate)
    logits = torch.from_numpy(x) @ w + b
    raw = torch.sigmoid(logits).numpy()
    served = Calibrator(r).probabilities(logits).numpy()
    # Uncorrected, the model over-predicts badly; corrected, the mean matches the true CTR ...
    assert raw.mean() > 2.5 * y.mean()
    assert served.mean() == pytest.approx(y.mean(), rel=0.05)
    # ... and per decile of the prediction, the predicted rate is the observed rate.
    edges = np.quantile(served, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges, served, side="right") - 1, 0, 9)
    for k in range(10):
        sel = bins == k
        assert served[sel].mean() == pytest.approx(y[sel].mean(), rel=0.15, abs=0.002), k


def test_the_shift_is_log_rate_in_logit_space_and_identity_at_rate_one():
    logits = torch.tensor([-30.0, -2.0, 0.0, 3.0, 30.0])
    assert torch.equal(Calibrator(1.0).probabilities(logits), torch.sigmoid(logits))
    p = Calibrator(0.25).probabilities(logits)
    odds = torch.exp(logits)
    expected = 0.25 * odds / (1 + 0.25 * odds)
    torch.testing.assert_close(p[1:4], expected[1:4])
    assert torch.isfinite(p).all() and p[0] > 0 and p[-1] <= 1


def test_rate_estimate_weights_mixed_rates_by_what_they_represent():
    labels = np.array([0, 0, 0, 1], np.float32)
    rates = np.array([0.5, 0.5, 0.25, 1.0], np.float32)  # 3 kept negatives stand for 2+2+4 = 8
    assert estimate_negative_rate(labels, rates) == pytest.approx(3 / 8)
    assert estimate_negative_rate(np.ones(3), np.ones(3)) == 1.0
    with pytest.raises(ValueError):
        estimate_negative_rate(np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError):
        Calibrator(0.0)
