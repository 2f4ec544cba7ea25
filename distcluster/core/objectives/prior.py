"""The cluster sizes the objectives' marginal terms pull towards (config `prior`).

Each objective rewards spread-out clusters with w H(m), the entropy of a head's marginal m
over the global batch (IIC's and IMC-SwAV's H(Y), CRLC's balance term). In the loss that is
-w H(m) = w (KL(m || u) - log K): a pull towards equal sizes u, which splits a large group
and merges small ones when the groups are not equal.

- `uniform` (the papers', the default): -H(m), exactly the papers' losses.
- `estimated`: the pull is towards a profile of sizes t instead, whichever cluster has which
  size: -H(m) - sum_k m_(k) log(K t_(k)) = KL(m_sorted || t) - log K, m_(k) the k-th largest
  share and t sorted the same way; as strong as the uniform pull, centred elsewhere. The
  profile comes from the data, not from the heads (a target that follows the heads' own
  marginal offers no resistance to a collapse: tried, it collapsed; one matched cluster by
  cluster to the heads fed their sizes back, and small clusters died): after every epoch,
  spherical k-means with K clusters on the backbone features of a fixed sample of images
  (k-means has no term that favours equal sizes), its cluster sizes sorted. The profile is
  mixed with equal sizes, t = (1 - a) u + a t_kmeans: a rises from 0 to ESTIMATE_WEIGHT over
  the first RAMP_SHARE of the epochs (early features are too poor for k-means), and every
  cluster's target stays at least (1 - ESTIMATE_WEIGHT) / K. The soft marginal meets the
  profile, but an image's most likely cluster is rarely a small one: on long-tailed digits
  the smallest clusters held their share of the probability mass and almost no image at
  argmax (benchmarks/RESULTS.md, imbalance-digits).
- `calibrated`: `estimated`, and the assignments calibrated: after each estimate, a shift b
  (one per sub-head and cluster) is fitted on the same sample so that argmax(log p + b) gives
  each cluster the share of the images the head's soft marginal gives it, and `assigned` adds
  b to the logits of every assignment (evaluation, predict, exported models). It moves the
  decision boundaries between clusters, not the training: the losses, so the trained weights,
  are those of `estimated`. It helps where the profile is right (long-tailed digits) and
  hurts where weak features give k-means a wrong one (small CIFAR-10 sets): a separate value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distcluster.core.metrics import departure_from_equal

PRIORS = ("uniform", "estimated", "calibrated")
ESTIMATE_WEIGHT = 0.75  # the largest share of the k-means sizes in the target
RAMP_SHARE = 0.25  # the share of the epochs over which that share rises from 0
KMEANS_RESTARTS = 4
KMEANS_ITERATIONS = 50
CALIBRATION_TEMPERATURE = 0.02  # argmax, smoothed enough for the shares to move continuously with b
CALIBRATION_ITERATIONS = 300


def check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)} (got {prior!r})")


def estimate_weight(epochs_done: int, epochs: int) -> float:
    """The share a of the k-means sizes in the target after `epochs_done` of `epochs`."""
    return ESTIMATE_WEIGHT * min(1.0, epochs_done / max(1.0, RAMP_SHARE * epochs))


class ClusterPrior(nn.Module):
    """The size profile `clusters` clusters are pulled to; `correction(m)` is added to -H(m).
    Under `calibrated`, also the shift of each of the `heads` sub-heads' assignment logits."""

    def __init__(self, clusters: int, prior: str = "uniform", heads: int = 1) -> None:
        super().__init__()
        check_prior(prior)
        self.prior = prior
        if prior != "uniform":  # buffers: checkpointed, and rank 0's on every rank
            self.register_buffer("target", torch.full((clusters,), 1.0 / clusters))  # largest first
        if prior == "calibrated":
            self.register_buffer("assignment_shift", torch.zeros(heads, clusters))

    def correction(self, marginals: torch.Tensor) -> torch.Tensor:
        """What turns -H(m) into KL(m_sorted || t) - log K: -sum_k m_(k) log(K t_(k)).
        marginals (..., K) -> (...); zeros under the uniform prior (adding them leaves the
        papers' losses exactly as they were)."""
        if self.prior == "uniform":
            return marginals.new_zeros(marginals.shape[:-1]).detach()
        largest_first = marginals.sort(dim=-1, descending=True).values
        return -(largest_first * (self.target * marginals.shape[-1]).log()).sum(-1)

    @torch.no_grad()
    def update(self, features: torch.Tensor, weight: float, generator: torch.Generator) -> None:
        """A new profile from features (n, D) of a sample: (1 - weight) u + weight * the k-means
        cluster sizes, largest first."""
        if self.prior == "uniform" or not torch.isfinite(features).all():  # keep the last profile
            return
        clusters = len(self.target)
        found = spherical_kmeans(features.cpu(), clusters, generator)  # the CPU generator's device
        sizes = torch.bincount(found, minlength=clusters).sort(descending=True).values / len(found)
        self.target.copy_((1 - weight) / clusters + weight * sizes.to(self.target))

    def profile_metrics(self) -> dict[str, float]:
        """The profile pulled towards, for the run's log: its largest and smallest shares and its
        departure from equal sizes (half the L1 distance to 1/K: 0 for equal, towards 1 for one
        cluster holding all); nothing under the uniform prior."""
        if self.prior == "uniform":
            return {}
        return {"prior/departure": departure_from_equal(self.target.double().cpu().numpy()),
                "prior/largest_share": float(self.target[0]),
                "prior/smallest_share": float(self.target[-1])}

    def assigned(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (S, B, K) of the sub-heads, shifted for assignment (unchanged unless calibrated)."""
        if self.prior != "calibrated":
            return logits
        return logits + self.assignment_shift.unsqueeze(-2).to(logits)

    @torch.no_grad()
    def calibrate(self, probs: torch.Tensor) -> None:
        """A new assignment shift from probabilities (S, n, K) of a sample, as `assigned` gave
        them (the current shift is taken out first); nothing unless calibrated."""
        if self.prior != "calibrated":
            return
        logits = probs.double().clamp_min(1e-300).log() - self.assignment_shift.unsqueeze(-2).double()
        self.assignment_shift.copy_(fitted_shift(logits))


def fitted_shift(logits: torch.Tensor, temperature: float = CALIBRATION_TEMPERATURE,
                 iterations: int = CALIBRATION_ITERATIONS) -> torch.Tensor:
    """b (S, K) such that argmax(logits + b) gives each cluster the share of the n rows of
    logits (S, n, K) that its soft marginal, mean softmax(logits), gives it. argmax is smoothed
    to softmax(./temperature); each iteration moves b_k by temperature * log(wanted / got), a
    step no larger than the shares' own sensitivity to b_k allows (the shares move at most
    1/temperature times as fast as b). The temperature is in logit units: on nearly flat
    heads (logits within a few hundredths) the hard shares only come within about 0.02."""
    wanted = logits.softmax(-1).mean(-2).clamp_min(1e-12)
    shift = torch.zeros_like(wanted)
    for _ in range(iterations):
        got = ((logits + shift.unsqueeze(-2)) / temperature).softmax(-1).mean(-2).clamp_min(1e-12)
        shift += temperature * (wanted.log() - got.log())
    return (shift - shift.mean(-1, keepdim=True)).float()


def spherical_kmeans(features: torch.Tensor, clusters: int, generator: torch.Generator,
                     restarts: int = KMEANS_RESTARTS, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """k-means of the L2-normalised rows of features (n, D) by cosine similarity, k-means++
    seeded, the best of `restarts`: (n,) cluster of each row."""
    x = F.normalize(features.double(), dim=-1)
    best, best_fit = None, -float("inf")
    for _ in range(restarts):
        centres = _kmeans_plus_plus(x, clusters, generator)
        for _ in range(iterations):
            labels = (x @ centres.T).argmax(1)
            moved = F.normalize(torch.zeros_like(centres).index_add_(0, labels, x), dim=-1)
            empty = torch.bincount(labels, minlength=clusters) == 0
            moved[empty] = centres[empty]  # an empty cluster keeps its centre
            if torch.equal(moved, centres):
                break
            centres = moved
        labels = (x @ centres.T).argmax(1)
        fit = float((x * centres[labels]).sum())
        if fit > best_fit:
            best, best_fit = labels, fit
    return best


def _kmeans_plus_plus(x: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """Centres drawn one by one with probability proportional to the cosine distance to the
    nearest centre so far (Arthur and Vassilvitskii's seeding)."""
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    distance = 1 - x @ x[chosen[0]]
    for _ in range(clusters - 1):
        weights = distance.clamp_min(0)
        pick = torch.multinomial(weights if weights.sum() > 0 else torch.ones_like(weights), 1,
                                 generator=generator)
        chosen.append(int(pick))
        distance = torch.minimum(distance, 1 - x @ x[chosen[-1]])
    return x[chosen]
