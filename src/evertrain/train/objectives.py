"""Objectives: the loss of one micro-batch, one function per kind of example, in one place.

The loop deals a step's rows to micro-batches and asks the objective of each row for its share of the step's
loss: the share is the micro-batch's sum divided by the whole global batch's count (`count`), so that the
micro-batches' shares add up, over every process, to the mean over the global batch, whatever the accumulation
and the number of processes. A second objective is a new class here and a new example shape in data/, not new
branches through the loop.

    supervised   next-token cross-entropy on the trained tokens (labels), mean over the global batch's tokens

    evertrain train --dataset FILE --output-dir DIR     # every file of today is supervised
"""

from __future__ import annotations

from contextlib import nullcontext

from evertrain.data import Example
from evertrain.data.packing import collate
from evertrain.train import chunked_loss


class Supervised:
    """Next-token prediction of the trained tokens: transformers' own loss, told the global batch's token count
    (`num_items_in_batch`), so that it returns this micro-batch's share of the global mean."""

    name = "supervised"

    def __init__(self, config):
        self.chunked = config.chunked_loss

    def count(self, rows: list[list[Example]]) -> int:
        """The global batch's denominator, from every row of the step (all processes): its trained tokens."""
        return sum(e.target_tokens for row in rows for e in row)

    def loss(self, model, rows: list[list[Example]], count: int, pad_id: int, device):
        """This micro-batch's share of the step's mean loss (a tensor that backward is called on)."""
        batch = collate(rows, pad_id, device)
        with chunked_loss.active(model) if self.chunked else nullcontext():
            return model(**batch, use_cache=False, num_items_in_batch=max(count, 1)).loss
