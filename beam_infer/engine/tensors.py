"""Small tensor helpers of the engine: host outputs as numpy, outputs aliasing inputs, joining bisected chunks."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(host_tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy: a view, or a float32 copy for half precisions (which numpy cannot hold)."""
    if host_tensor.dtype in (torch.bfloat16, torch.float16):
        return host_tensor.float().numpy()
    return host_tensor.numpy()


def unaliased(output: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`output`, or a copy of it when it shares storage with `source`."""
    if output.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        return output.clone()
    return output


def concat_chunks(chunks: list[tuple[int, int, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    """Joins the outputs of consecutive row ranges back into one tensor per output."""
    if len(chunks) == 1:
        return chunks[0][2]
    return tuple(torch.cat(parts) for parts in zip(*(outs for _, _, outs in chunks), strict=True))
