import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pollen.client.training import train_locally
from pollen.config import TrainConfig
from pollen.data import Split


class TwoHeads(nn.Module):
    """A linear layer that trains, a frozen one, and a trainable one no loss reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(self.frozen(x))


def test_local_run_reports_the_loss_and_the_rms_of_each_trainable_gradient():
    torch.manual_seed(0)
    model = TwoHeads()
    data = Split(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    expected_loss = F.cross_entropy(model(data.images), data.labels)
    expected_loss.backward()
    expected_rms = model.used.weight.grad.abs().numpy().copy()  # one AdamW step: RMS = |g|
    model.zero_grad()

    run = train_locally(model, data, TrainConfig(local_epochs=1, batch_size=8, lr=0.01))  # one batch, one step
    assert abs(run.loss - expected_loss.item()) < 1e-6
    assert list(run.gradient_rms) == ["used.weight", "used.bias", "unused.weight", "unused.bias"]
    np.testing.assert_allclose(run.gradient_rms["used.weight"], expected_rms, rtol=1e-4)
    assert run.gradient_rms["unused.weight"].shape == (3, 4) and not run.gradient_rms["unused.weight"].any()


def test_adam_eps_shrinks_the_steps_of_gradients_much_smaller_than_it():
    data = Split(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    steps = {}
    for eps in (1e-8, 1e3):
        torch.manual_seed(0)
        model = TwoHeads()
        before = model.used.weight.detach().clone()
        train_locally(model, data, TrainConfig(local_epochs=1, batch_size=8, lr=0.01, adam_eps=eps))  # one step
        steps[eps] = (model.used.weight.detach() - before).abs()
    np.testing.assert_allclose(steps[1e-8].numpy(), 0.01, rtol=1e-3)  # plain Adam: lr per entry
    assert steps[1e3].max() < 1e-4  # |g| << eps: about lr * |g| / eps
