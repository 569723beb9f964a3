"""What the training loop trains and evaluates on: pretraining windows, fine-tuning examples,
preference pairs, prompts. Each kind subclasses Samples."""

from __future__ import annotations

import numpy as np
import torch


class Samples:
    """A sample set, indexed 0 .. len - 1; `batch` makes a micro-batch of some of them.

    A mixture of sources names them in `source_names` (one source: empty) and says which one
    holds a sample; its validation pass reports each source's loss."""

    source_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(model inputs, next-token targets with -100 where no loss is taken)."""
        raise NotImplementedError

    def num_tokens(self, indices: np.ndarray) -> int:
        """Tokens the model reads for these samples (padding excluded)."""
        raise NotImplementedError

    def num_targets(self, indices: np.ndarray) -> int:
        """What the loss is a mean over: target tokens (not -100), or pairs, or rows."""
        raise NotImplementedError

    def source_of(self, index: int) -> int:
        """Which of `source_names` holds sample `index` (0 for one source)."""
        return 0
