import pytest
import torch

from hessq.data._datasets import fashion_mnist_available


@pytest.fixture(autouse=True)
def _seed():
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)  # a test that narrows the thread pool must not slow the ones after it


@pytest.fixture(scope="session")
def fashion_test():
    if not fashion_mnist_available():
        pytest.fail("Fashion-MNIST is missing: install it with `apt-get install dataset-fashion-mnist` (make test does)")
    from hessq.data import fashion_mnist

    return fashion_mnist("test", batch_size=500)


@pytest.fixture(scope="session")
def fashion_train():
    from hessq.data import fashion_mnist

    return fashion_mnist("train", batch_size=128)


@pytest.fixture(scope="session")
def pretrained_resnet20():
    from hessq.models import resnet20

    return resnet20(pretrained=True)
