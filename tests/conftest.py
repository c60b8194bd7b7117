import pytest
import torch

import normkit


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with normkit.set_backend("auto"):
        yield


BACKENDS = ["eager", "compiled", "inductor"]
