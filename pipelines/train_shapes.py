"""Trains the shipped ShapesNet, deterministically, on generated shapes; writes beam_infer/models/shapes_net.pt.

    python -m pipelines.train_shapes            # about 3 minutes on 2 CPU cores

The images go through the same JPEG encode and the same decode_resize as the job, so the model sees at
training time exactly what the engine feeds it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from beam_infer.models.shapes_net import INPUT_SIZE, WEIGHTS_PATH, ShapesNet
from beam_infer.sample import SHAPE_CLASSES, encode, render
from beam_infer.tasks.classify import decode_resize

TRAIN_SEED = 1  # held-out checks use other seeds
VALID_SEED = 2


def make_dataset(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (uint8 images (N, 64, 64, 3), int64 labels) for the stream `seed`."""
    images = np.empty((count, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    for i in range(count):
        label, image = render(seed, i)
        images[i] = decode_resize(encode(image), INPUT_SIZE)
        labels[i] = SHAPE_CLASSES.index(label)
    return torch.from_numpy(images), torch.from_numpy(labels)


@torch.inference_mode()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    preds = torch.cat([model(images[i:i + 512]).argmax(-1) for i in range(0, len(images), 512)])
    return float((preds == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=WEIGHTS_PATH)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)  # fixed thread count: same reduction order, same weights on every machine
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    x_train, y_train = make_dataset(TRAIN_SEED, args.train)
    x_valid, y_valid = make_dataset(VALID_SEED, 2000)
    print(f"data: {time.perf_counter() - t0:.0f}s", flush=True)

    model = ShapesNet()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (args.train // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    order = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(args.train, generator=order)
        for i in range(args.train // 128):
            idx = perm[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        acc = accuracy(model, x_valid, y_valid)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} valid top-1 {acc:.4f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    torch.save(model.state_dict(), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
