import pytest
import torch

from hessq.quantizer import ActQuantizer, RangeObserver, WeightQuantizer


def test_minmax_observer_tracks_extremes():
    obs = RangeObserver("minmax")
    obs(torch.tensor([0.0, 1.0]))
    obs(torch.tensor([-2.0, 0.5]))
    assert float(obs.min_val) == -2.0 and float(obs.max_val) == 1.0


def test_percentile_observer_ignores_outliers():
    x = torch.rand(100_000)
    x[0] = 1000.0
    obs = RangeObserver("percentile", percentile=99.9)
    obs(x)
    assert 0.99 < float(obs.max_val) < 1.0


def test_ema_observer():
    obs = RangeObserver("ema", momentum=0.5)
    obs(torch.tensor([0.0, 2.0]))
    obs(torch.tensor([0.0, 4.0]))
    assert float(obs.max_val) == pytest.approx(3.0)


def test_observer_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        RangeObserver()(torch.tensor([float("nan")]))


def test_act_quantizer_unsigned_after_relu_and_error_bound():
    q = ActQuantizer(8)
    q.observing = True
    x = torch.relu(torch.randn(1000))
    q(x)
    q.freeze()
    assert not bool(q.signed)
    assert float(q.scale) == pytest.approx(float(x.max()) / 255)
    y = q(x)
    assert torch.all((y - x).abs() <= q.scale / 2 + 1e-7)


def test_act_quantizer_signed_and_4_bit():
    q = ActQuantizer(4)
    q.observing = True
    q(torch.tensor([-1.0, 0.5]))
    q.freeze()
    assert bool(q.signed) and float(q.scale) == pytest.approx(1 / 7)
    q.eval()
    assert q(torch.tensor([3.0]))[0] == pytest.approx(1.0)
    # in training the range follows an EMA of each batch's extremes
    q.train()
    q(torch.tensor([7.0]))
    assert float(q.scale) == pytest.approx(0.9 / 7 + 0.1 * 7 / 7)


def test_uncalibrated_act_quantizer_errors():
    with pytest.raises(RuntimeError, match="never calibrated"):
        ActQuantizer(8)(torch.ones(2))


@pytest.mark.parametrize("bad", [2, 5, 32])
def test_act_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="activation bit width"):
        ActQuantizer(bad)


def test_weight_quantizer_backward_reaches_weight():
    w = torch.randn(4, 3, requires_grad=True)
    WeightQuantizer(4)(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def _squared_error(x: torch.Tensor, q: ActQuantizer) -> float:
    return float(((q(x) - x) ** 2).sum())


def test_mse_range_beats_extremes_and_percentile_on_outlier_channels():
    # a LayerNorm output's shape of trouble: most values N(0, 1), two channels near 40 (MiniLM's outlier dimensions)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, generator=g)
    x[:, 7] = 40 + torch.randn(64, generator=g)
    x[:, 99] = -35 + torch.randn(64, generator=g)
    errors = {}
    for method in ("minmax", "percentile", "mse"):
        q = ActQuantizer(8, method)
        q.observing = True
        q(x[:32])
        q(x[32:])
        q.freeze()
        errors[method] = _squared_error(x, q)
    # the clip search includes the extremes themselves, so it can only do better on the values it sampled
    assert errors["mse"] <= errors["minmax"]
    assert errors["mse"] < errors["percentile"]


def test_mse_range_keeps_the_whole_range_of_uniform_values():
    # uniform values have no tail worth clipping: the least-error clip is within a few steps of the extreme
    x = torch.linspace(-1, 1, 20001)
    q = ActQuantizer(8, "mse")
    q.observing = True
    q(x)
    q.freeze()
    assert float(q.scale) * 127 >= 0.95


def _full_error(x: torch.Tensor, clip: float, qmax: int) -> float:
    s = clip / qmax
    return float(((torch.clamp(torch.round(x.double() / s), -qmax, qmax) * s - x.double()) ** 2).sum())


def test_mse_clip_is_the_best_candidate_by_brute_force():
    from hessq.quantizer._observer import _MSE_FRACTIONS, mse_clip

    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(5000, generator=g), torch.tensor([25.0, -18.0])])
    c = mse_clip(x, 127, True)

    assert all(_full_error(x, c, 127) <= _full_error(x, float(f) * 25.0, 127) for f in _MSE_FRACTIONS)
    assert 2.0 < c < 25.0  # neither the outlier's extreme nor a clip into the bulk


def test_mse_range_weighs_rare_massive_values_a_stride_skips():
    # a transformer's massive activations: a few values hundreds of times the rest (a handful of tokens in one
    # channel), here where the strided sample never looks. Searched on the sample alone, the clip cut them to the
    # bulk's extreme (4.37), even on a 16-bit grid; on MiniLM-BBC that cost 0.9 points of W8A8 accuracy.
    from hessq.quantizer._observer import _MSE_FRACTIONS, _MSE_SAMPLES

    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    stride = x.numel() // 4 // (_MSE_SAMPLES // 8) + 1  # of each of the four calibration batches below
    x[torch.tensor([1, 2, 5, 7]) + 40 * stride] = torch.tensor([300.0, -280.0, 250.0, 300.0])
    top = float(x.abs().max())
    for bits in (16, 8):
        q = ActQuantizer(bits, "mse")
        q.observing = True
        for part in x.chunk(4):  # four calibration batches
            q(part)
        q.freeze()
        qmax = 2 ** (bits - 1) - 1
        clip = float(q.scale) * qmax
        errors = {float(f) * top: _full_error(x, float(f) * top, qmax) for f in _MSE_FRACTIONS}
        if bits == 16:  # rounding error is nothing on 65535 steps: no clip pays
            assert clip == pytest.approx(top, rel=1e-6)
        else:  # the clip's squared error over every value is within 2% of the best candidate's
            assert _full_error(x, clip, qmax) <= 1.02 * min(errors.values())


def test_mse_samples_do_not_keep_the_batches_alive():
    # the sample of each batch must be its own small tensor: a strided view would hold the whole activation
    # (calibrating MiniLM at T=256 kept 1.8 GB a batch that way)
    q = ActQuantizer(8, "mse")
    q.observing = True
    big = torch.randn(4, 12, 256, 256)
    q(big)
    sample = q.observer.samples[0]
    assert 0 < sample.numel() < big.numel() // 100
    assert sample.untyped_storage().nbytes() == sample.numel() * sample.element_size()


def test_mse_sample_weights_count_every_value_once():
    # the stratified estimate: the kept extremes stand for themselves and the sampled rest for the batch's other
    # values, so the weights add up to the number of values seen (summing over the sample counted the extremes
    # twice), and still do after the sample is thinned
    from hessq.quantizer._observer import _MSE_EXTREMES, _MSE_SAMPLES

    q = ActQuantizer(8, "mse")
    q.observing = True
    per_batch = _MSE_SAMPLES // 8  # a batch this size is sampled whole
    sizes = (300_000, 123_457) + (per_batch,) * 8  # the samples pass _MSE_SAMPLES: they are thinned
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=gen) * 3 for n in sizes]
    for x in batches:
        q(x)
    obs = q.observer
    first = ActQuantizer(8, "mse")
    first.observing = True
    first(batches[0])
    assert obs.samples[0].numel() < first.observer.samples[0].numel()  # the first batch's sample was thinned
    counted = sum(w * t.numel() for t, w in zip(obs.samples, obs.sample_weights))
    assert counted + sum(e.numel() for e in obs.extremes) == pytest.approx(sum(sizes), rel=1e-12)
    assert all(e.numel() == _MSE_EXTREMES for e in obs.extremes)
