import pytest
import torch
from torch import nn

import hessq
from hessq.data import digits


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.max_pool2d(x, 2).flatten(1))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(4):
        for x, y in digits("train"):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def _fresh_quantized(model):
    return hessq.quantize(model, (2, 4), digits("train").take(4), first_last_bits=None)


def _weights(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


def test_qat_recovers_accuracy_lost_to_2_bit_weights(trained):
    test = digits("test", batch_size=500)
    fp32 = hessq.accuracy(trained, test)
    q = _fresh_quantized(trained)
    ptq = hessq.accuracy(q, test)
    hessq.finetune(q, digits("train"), teacher=trained, epochs=3, lr=0.02, progress=False)
    qat = hessq.accuracy(q, test)
    assert fp32 > 0.9
    assert qat > ptq + 0.02, (fp32, ptq, qat)
    assert qat > fp32 - 0.05, (fp32, ptq, qat)


def test_checkpoint_resumes_to_the_same_state(trained, tmp_path):
    straight = _fresh_quantized(trained)
    hist = hessq.finetune(straight, digits("train"), epochs=2, lr=0.01, progress=False, seed=3)
    assert hist["steps"] == 2 * len(digits("train"))

    ckpt = tmp_path / "qat.ckpt"
    interrupted = _fresh_quantized(trained)
    # stop mid-way through the first epoch, with a checkpoint every 5 steps
    hessq.finetune(interrupted, digits("train"), epochs=2, lr=0.01, progress=False, seed=3,
                   checkpoint=ckpt, checkpoint_every=5, max_steps=17)
    assert ckpt.exists()
    resumed = _fresh_quantized(trained)  # a new process would rebuild the model like this
    hist2 = hessq.finetune(resumed, digits("train"), epochs=2, lr=0.01, progress=False, seed=3, checkpoint=ckpt)
    assert hist2["steps"] == hist["steps"]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_checkpoint_of_another_model_is_refused(trained, tmp_path):
    ckpt = tmp_path / "qat.ckpt"
    hessq.finetune(_fresh_quantized(trained), digits("train"), epochs=1, max_steps=2, progress=False, checkpoint=ckpt)
    other = hessq.quantize(hessq.models.resnet20().eval(), 8, [torch.randn(2, 1, 28, 28)])
    with pytest.raises(ValueError, match="another quantized model"):
        hessq.finetune(other, digits("train"), epochs=1, progress=False, checkpoint=ckpt)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="truncated or not a checkpoint"):
        hessq.finetune(_fresh_quantized(trained), digits("train"), epochs=1, progress=False, checkpoint=ckpt)


def test_fractional_epochs_run_a_whole_shorter_schedule(trained):
    q = _fresh_quantized(trained)
    train = digits("train")
    hist = hessq.finetune(q, train, epochs=0.5, lr=0.01, progress=False)
    assert hist["steps"] == round(0.5 * len(train))
    # Same steps, but stopped by max_steps out of a whole epoch: the schedule differs, so do the weights.
    q2 = _fresh_quantized(trained)
    hessq.finetune(q2, train, epochs=1, max_steps=hist["steps"], lr=0.01, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(q.state_dict().values(), q2.state_dict().values()))
    with pytest.raises(ValueError, match="epochs must be > 0"):
        hessq.finetune(q, train, epochs=0, progress=False)
