import pytest
import torch
from torch import nn

from beam_infer.models import UInt8ImageInput, WithWeights, resolve_task, with_weights

pytestmark = pytest.mark.timeout(60)


class _Mine(nn.Module):
    """A user's model that has a `.model` of its own."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


def test_weights_load_into_the_named_model_inside_the_tasks_adapters(tmp_path):
    path = tmp_path / "w.pt"
    source = _Mine()
    torch.save(source.state_dict(), path)
    loaded = WithWeights(lambda: UInt8ImageInput(_Mine()), str(path))()
    assert torch.equal(loaded.model.head.weight, source.head.weight)


def test_a_checkpoint_saved_from_a_compiled_model_loads(tmp_path):
    path = tmp_path / "w.pt"
    source = _Mine()
    torch.save({f"_orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    loaded = WithWeights(_Mine, str(path))()
    assert torch.equal(loaded.model.weight, source.model.weight)


def test_a_checkpoint_missing_a_key_is_refused_naming_the_key_of_the_named_model(tmp_path):
    path = tmp_path / "w.pt"
    state = _Mine().state_dict()
    del state["head.bias"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match=r'for _Mine:\s+Missing key\(s\) in state_dict: "head.bias"'):
        WithWeights(lambda: UInt8ImageInput(_Mine()), str(path))()


def test_the_shipped_classifier_takes_its_own_weights_through_top_k(tmp_path):
    from beam_infer.models.shapes_net import WEIGHTS_PATH

    task = with_weights(resolve_task("shapes_net"), WEIGHTS_PATH)
    model = task.load_model()
    reference = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
    assert torch.equal(model.model.head.weight, reference["head.weight"])
