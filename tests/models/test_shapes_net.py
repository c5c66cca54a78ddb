import numpy as np
import pytest
import torch

from beam_infer.models.shapes_net import INPUT_SIZE, load_shapes_net
from beam_infer.sample import SHAPE_CLASSES, encode, render
from beam_infer.tasks.classify import decode_resize

pytestmark = pytest.mark.timeout(120)
HELD_OUT_SEED = 424242  # neither the training (1) nor the validation (2) stream


def test_shipped_model_reaches_95_percent_top1_on_fresh_held_out_images():
    images, labels = [], []
    for i in range(800):
        label, image = render(HELD_OUT_SEED, i)
        images.append(decode_resize(encode(image), INPUT_SIZE))
        labels.append(SHAPE_CLASSES.index(label))
    model = load_shapes_net()
    with torch.inference_mode():
        preds = model(torch.from_numpy(np.stack(images))).argmax(-1).numpy()
    accuracy = float((preds == np.array(labels)).mean())
    assert accuracy >= 0.95, f"top-1 {accuracy:.3f} on held-out shapes"
    assert len(set(labels)) == len(SHAPE_CLASSES)  # every class was tested


def test_shipped_weights_are_small_package_data():
    import os

    from beam_infer.models.shapes_net import WEIGHTS_PATH
    assert os.path.getsize(WEIGHTS_PATH) < 2_000_000
