"""Training precision: the bf16 autocast is on only when asked and only while gradients are on."""
import torch

from eartalk.model.precision import bf16_native, train_autocast


def test_bf16_native_is_a_bool():
    assert isinstance(bf16_native(), bool)


def test_train_autocast_casts_matmuls_only_with_gradients_and_when_enabled():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with torch.enable_grad():
        with train_autocast(True):
            assert lin(x).dtype == torch.bfloat16
        with train_autocast(False):
            assert lin(x).dtype == torch.float32
    with torch.no_grad(), train_autocast(True):     # validation measures the float32 model
        assert lin(x).dtype == torch.float32
