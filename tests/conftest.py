import importlib
import pkgutil

import pytest
import torch

import normkit
import normkit.nn

# Import every module of normkit.nn so methods being added register before `import normkit`
# exports them (a test in test_registry checks that the public import registers all of them).
for _mod in pkgutil.iter_modules(normkit.nn.__path__):
    importlib.import_module(f"normkit.nn.{_mod.name}")


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    with normkit.set_backend("auto"):
        yield


BACKENDS = ["eager", "compiled"]
