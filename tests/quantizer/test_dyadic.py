from fractions import Fraction

import pytest
import torch

from hessq.quantizer import dyadic, dyadic_value, requantize


def test_dyadic_is_close_and_31_bit():
    m = torch.logspace(-9, 6, 500, dtype=torch.float64)  # below ~2^-31 the 62-bit shift cap costs precision
    b, c = dyadic(m)
    assert (b < 2**31).all() and (b > 0).all() and (c >= 0).all()
    rel = (dyadic_value(b, c) / m - 1).abs()
    assert rel.max() < 2**-29


def test_requantize_is_round_half_up_of_the_exact_product():
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-(2**31), 2**31, (2000,), generator=g, dtype=torch.int64)
    m = torch.rand(2000, generator=g, dtype=torch.float64) * 1e-3
    b, c = dyadic(m)
    got = requantize(acc, b, c, -(2**40), 2**40)
    for a, bb, cc, y in zip(acc.tolist(), b.tolist(), c.tolist(), got.tolist()):
        exact = Fraction(a * bb, 2**cc)
        assert y == (exact + Fraction(1, 2)).__floor__()


def test_requantize_clamps_and_rejects_floats():
    out = requantize(torch.tensor([-1000, 5, 1000]), torch.tensor(1), torch.tensor(0), -127, 127)
    assert out.tolist() == [-127, 5, 127]
    with pytest.raises(TypeError, match="int64"):
        requantize(torch.tensor([1.0]), torch.tensor(1), torch.tensor(0), 0, 1)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_dyadic_rejects_bad_scales(bad):
    with pytest.raises(ValueError, match="positive and finite"):
        dyadic(torch.tensor([bad]))
