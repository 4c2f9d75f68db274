"""``TripletMarginLossWithSampler``: triplets formed inside the batch, then torch's
``TripletMarginLoss`` (Catalyst 21.12's name and arguments)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ddprun.contrib.data.sampler_inbatch import IInbatchTripletSampler

__all__ = ["TripletMarginLossWithSampler"]


class TripletMarginLossWithSampler(nn.Module):
    """``mean(max(d(a, p) - d(a, n) + margin, 0))`` over the triplets ``sampler_inbatch`` forms.

    ``d`` is torch's ``pairwise_distance`` (Euclidean, with its ``eps = 1e-6`` added to the
    difference), as in ``torch.nn.TripletMarginLoss(margin=margin)``.

    Args:
        margin: the margin.
        sampler_inbatch: forms ``(anchor, positive, negative)`` from a batch, e.g.
            ``HardTripletsSampler()`` or ``AllTripletsSampler()``.
    """

    def __init__(self, margin: float, sampler_inbatch: IInbatchTripletSampler) -> None:
        super().__init__()
        if not callable(getattr(sampler_inbatch, "sample", None)):
            raise TypeError(
                "sampler_inbatch must have sample(features, labels) -> (anchor, positive, "
                f"negative), e.g. HardTripletsSampler(); got {type(sampler_inbatch).__name__}"
            )
        self._sampler_inbatch = sampler_inbatch
        self._triplet_margin_loss = nn.TripletMarginLoss(margin=margin)

    def forward(self, features: Tensor, labels: Tensor | Sequence[int]) -> Tensor:
        """Returns the loss of ``[batch_size, dim]`` embeddings with ``batch_size`` labels."""
        anchor, positive, negative = self._sampler_inbatch.sample(features, labels)
        return self._triplet_margin_loss(anchor, positive, negative)
