import torch
from torch import nn

from hessq.graph import fold_batchnorm, fold_conv_bn, trace


def _randomise_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)


def test_fold_conv_bn_equals_unfolded():
    for groups, bias in [(1, False), (1, True), (8, False)]:
        conv = nn.Conv2d(8, 16 if groups == 1 else 8, 3, padding=1, groups=groups, bias=bias)
        bn = nn.BatchNorm2d(conv.out_channels)
        _randomise_bn(bn)
        bn.eval()
        x = torch.randn(4, 8, 10, 10)
        folded = fold_conv_bn(conv, bn)
        torch.testing.assert_close(folded(x), bn(conv(x)), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_on_resnet20_equals_unfolded():
    from hessq.models import resnet20

    model = resnet20()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            _randomise_bn(m)
    model.eval().double()  # 21 layers deep: float64 so the comparison tests the algebra, not rounding
    gm = trace(model)
    folded = fold_batchnorm(gm)
    assert len(folded) == 21  # 19 convs + 2 shortcut convs, each with its BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=1e-5)


def test_bn_with_a_shared_conv_output_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    gm = trace(Shared().eval())
    assert fold_batchnorm(gm) == []
