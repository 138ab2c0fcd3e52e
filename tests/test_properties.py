"""Property tests: minifast's statistics, `bce_with_logits` and norm layers against PyTorch on random shapes
and extreme values (hypothesis, a fixed and derandomised example budget: the file runs in a few seconds).

Tolerances follow float32's error analysis rather than a blanket `allclose`; `EPS` is float32's machine
epsilon (1.19e-7), and a float64 computation on the same float32 inputs tells how large the exact result
is. Where float32 itself gives out, the strategies stop short and say so.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from minifast.foundations import correlation, covariance, std, variance
from minifast.losses import bce_with_logits
from minifast.norms import BatchNorm, GroupNorm, InstanceNorm, LayerNorm
from minifast.hooks import sample_step

EPS = torch.finfo(torch.float32).eps
FAST = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tiny tensors: one intra-op thread, so a busy shared machine cannot stall every op (restored afterwards)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- data
# Raw float32 arrays, anything hypothesis likes (zeros, repeats, mixed magnitudes, subnormals), with
# |x| <= 1e17: the statistics square deviations and sum up to 300 of them, and float32 overflows above
# 3.4e38, so deviations must stay below about 1e18.
def f32(v): return float(np.float32(v))   # hypothesis wants bounds that float32 holds exactly

MAX_ABS = f32(1e17)
raw_vectors = hnp.arrays(np.float32, st.integers(2, 300),
                         elements=st.floats(-MAX_ABS, MAX_ABS, width=32, allow_nan=False, allow_infinity=False))


@st.composite
def gaussian_vectors(draw, min_n=2, max_n=300):
    "Normal data of any scale from 1e-15 to 1e15, shifted by up to 1e5 standard deviations (ill-conditioned)."
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.floats(-15, 15))
    shift = draw(st.sampled_from([0., 1., -1.])) * 10.0 ** draw(st.floats(-2, 5))
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(n, generator=g, dtype=torch.float64) + shift) * scale).float()


vectors = st.one_of(raw_vectors.map(torch.from_numpy), gaussian_vectors())


def var64(t): return torch.var(t.double(), unbiased=False).item()
def maxabs(t): return t.abs().max().double().item()


# ---------------------------------------------------------------- variance, std
def variance_tolerance(t):
    """Two-pass variance in float32: relative error a few EPS, plus EPS^2 * max|x|^2 from the rounded mean
    (which dominates when the spread is tiny next to the values, e.g. a near-constant vector)."""
    return 8 * (EPS * var64(t) + EPS**2 * maxabs(t)**2) + 1e-38   # + float32's smallest normal: squares underflow


@FAST
@given(vectors)
def test_variance_matches_torch(t):
    ours, theirs = variance(t), torch.var(t, unbiased=False)
    assert ours.dtype == torch.float32 and ours.shape == ()
    assert abs(ours.item() - theirs.item()) <= variance_tolerance(t), (ours.item(), theirs.item(), var64(t))


@FAST
@given(vectors)
def test_std_matches_torch(t):
    ours, theirs = std(t).item(), torch.std(t, unbiased=False).item()
    # sqrt halves the relative error; the absolute part becomes sqrt(tolerance)
    assert abs(ours - theirs) <= 4 * EPS * theirs + math.sqrt(variance_tolerance(t)), (ours, theirs)


@FAST
@given(st.integers(1, 4), st.integers(2, 30), st.integers(0, 2**31 - 1), st.floats(-10, 10), st.booleans())
def test_variance_along_a_dim_matches_torch(rows, cols, seed, log_scale, keepdim):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) * 10.0 ** log_scale + 3 * 10.0 ** log_scale
    for dim in (0, 1, -1):
        ours, theirs = variance(t, dim, keepdim), torch.var(t, dim, unbiased=False, keepdim=keepdim)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=16 * EPS, atol=1e-38)
        torch.testing.assert_close(std(t, dim, keepdim), torch.std(t, dim, unbiased=False, keepdim=keepdim),
                                   rtol=16 * EPS, atol=1e-19)


# ---------------------------------------------------------------- covariance, correlation
@st.composite
def vector_pairs(draw):
    "`t` from `vectors`, `u` a float32 mix of `t` and independent noise of its own scale."
    t = draw(vectors)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a = draw(st.sampled_from([0., 1., -1., 0.5, 1e-3, 1e3]))
    u_scale = 10.0 ** draw(st.floats(-10, 10))
    noise = torch.randn(len(t), generator=g, dtype=torch.float64) * u_scale
    u = (a * t.double() + noise + u_scale * draw(st.floats(-100, 100))).float()
    assume(torch.isfinite(u).all())
    return t, u


def stats64(t, u):
    return math.sqrt(var64(t)), math.sqrt(var64(u)), maxabs(t), maxabs(u)


@FAST
@given(vector_pairs())
def test_covariance_matches_torch(pair):
    t, u = pair
    ours, theirs = covariance(t, u).item(), torch.cov(torch.stack([t, u]), correction=0)[0, 1].item()
    st_, su, mt, mu = stats64(t, u)
    # |cov| <= st*su, so the error is bounded relative to that product, not to cov (which may cancel to 0)
    assert abs(ours - theirs) <= 8 * (EPS * st_ * su + EPS**2 * mt * mu) + 1e-38, (ours, theirs)


def test_covariance_needs_equal_shapes():
    with pytest.raises(ValueError, match=r'\(3,\) and \(4,\)'): covariance(torch.zeros(3), torch.zeros(4))


@FAST
@given(vector_pairs())
def test_correlation_matches_torch(pair):
    t, u = pair
    st_, su, mt, mu = stats64(t, u)
    # Below a spread of about 1e-3 of the largest value, float32 deviations from the mean lose too many
    # digits for a correlation to mean anything (and torch and minifast then disagree arbitrarily).
    assume(st_ > 1e-3 * mt and su > 1e-3 * mu)
    ours, theirs = correlation(t, u).item(), torch.corrcoef(torch.stack([t, u]))[0, 1].item()
    conditioning = (mt / st_) * (mu / su)
    assert abs(ours - theirs) <= 8 * EPS * (1 + conditioning * EPS), (ours, theirs)
    assert abs(ours) <= 1 + 8 * EPS


def test_correlation_of_perfectly_related_vectors():
    t = torch.linspace(-3, 7, 50)
    torch.testing.assert_close(correlation(t, 2 * t + 1), torch.tensor(1.), rtol=0, atol=4 * EPS)
    torch.testing.assert_close(correlation(t, -t), torch.tensor(-1.), rtol=0, atol=4 * EPS)


# ---------------------------------------------------------------- bce_with_logits
FINITE32 = st.floats(f32(-3e38), f32(3e38), width=32, allow_nan=False, allow_infinity=False)


@st.composite
def logits_and_targets(draw, hard=None, elements=FINITE32):
    n = draw(st.integers(1, 64))
    logits = draw(hnp.arrays(np.float32, n, elements=st.one_of(elements, st.floats(-120, 120, width=32))))
    hard = draw(st.booleans()) if hard is None else hard
    targets = draw(hnp.arrays(np.float32, n, elements=st.sampled_from([0., 1.]) if hard else st.floats(0, 1, width=32)))
    return torch.from_numpy(logits), torch.from_numpy(targets)


@FAST
@given(logits_and_targets(hard=True))
def test_bce_with_logits_matches_torch_for_hard_targets(pair):
    """0/1 targets: max(x,0) - x*t is exact, so the loss is as accurate as exp and log1p make it: within
    8 EPS of the float64 value. torch's float32 kernel adds max(-x, 0) and log(exp(..) + exp(..)) in an
    order that leaves an absolute error of about EPS * (1 + |x|) (thousands of EPS relative to a small loss),
    so the comparison with torch allows that."""
    x, t = pair
    ours, theirs = bce_with_logits(x, t, reduction='none'), nn.BCEWithLogitsLoss(reduction='none')(x, t)
    xd, td = x.double(), t.double()   # float64, by the formula (exact terms for 0/1 targets, then log1p)
    exact = xd.clamp_min(0) - xd * td + torch.log1p(torch.exp(-xd.abs()))
    assert torch.isfinite(ours).all() and (ours >= 0).all()
    torch.testing.assert_close(ours.double(), exact, rtol=8 * EPS, atol=1e-44)   # 1e-44: float32's subnormals
    assert ((ours - theirs).abs() <= 16 * EPS * ours + 2 * EPS * (1 + x.abs())).all(), (x, t, ours, theirs)


@FAST
@given(logits_and_targets(hard=False))
def test_bce_with_logits_matches_torch_for_soft_targets(pair):
    """Soft targets: max(x,0) - x*t cancels when t is close to 1 (torch computes (1-t)*x instead), so the
    error is a few EPS of |x|, not of the loss; with |x| up to 3e38 that is still float32 precision."""
    x, t = pair
    ours, theirs = bce_with_logits(x, t, reduction='none'), nn.BCEWithLogitsLoss(reduction='none')(x, t)
    assert torch.isfinite(ours).all()
    assert ((ours - theirs).abs() <= 4 * EPS * (x.abs() + 1)).all(), (x, t, ours, theirs)


@FAST
@given(logits_and_targets(elements=st.floats(f32(-1e30), f32(1e30), width=32)), st.sampled_from(['mean', 'sum']))
def test_bce_with_logits_reductions_match_torch(pair, reduction):
    "|x| <= 1e30, so that the sum of up to 64 losses cannot overflow float32."
    x, t = pair
    ours, theirs = bce_with_logits(x, t, reduction=reduction), nn.BCEWithLogitsLoss(reduction=reduction)(x, t)
    bound = 4 * EPS * (x.abs() + 1).sum() / (len(x) if reduction == 'mean' else 1)
    assert abs(ours.item() - theirs.item()) <= 2 * bound.item() + 4 * EPS * abs(theirs.item())


@FAST
@given(logits_and_targets(elements=st.floats(-1e4, 1e4, width=32)))
def test_bce_with_logits_gradient_matches_torch(pair):
    "The gradient is (sigmoid(x) - t) / n for both; at x = 0 minifast's max and |x| split it correctly too."
    x, t = pair
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    bce_with_logits(x1, t).backward()
    nn.BCEWithLogitsLoss()(x2, t).backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=4 * EPS, atol=2 * EPS / len(x))


def test_bce_with_logits_at_100_and_beyond():
    x = torch.tensor([100., -100., 1e4, -1e4, 1e30, -1e30, 3e38, -3e38])
    for t in (torch.zeros(8), torch.ones(8)):
        ours = bce_with_logits(x, t, reduction='none')
        expected = torch.where(t.bool(), (-x).clamp_min(0), x.clamp_min(0))   # a confident mistake costs |x|
        torch.testing.assert_close(ours, expected, rtol=EPS, atol=1e-38)


def test_bce_with_logits_infinite_logits_are_never_silently_finite():
    "Infinite logits are outside both implementations' domain (each gives nan for some target); neither hides it."
    x = torch.tensor([math.inf, -math.inf] * 3)
    t = torch.tensor([0., 0., 1., 1., .5, .5])
    assert not torch.isfinite(bce_with_logits(x, t, reduction='none')).any()
    assert not torch.isfinite(bce_with_logits(x, t)).any()


# ---------------------------------------------------------------- norm layers vs PyTorch
@st.composite
def images(draw, n_groups=1, min_per_group=1):
    """A (N, C, H, W) float32 batch, C a multiple of `n_groups`, values N(shift, 1) times 10^±3, shift up to
    10 standard deviations; `min_per_group` is how many values each normalised group needs at least, as a
    function of (n, c, h, w) (PyTorch refuses a single value per group in training)."""
    n, h, w = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    c = n_groups * draw(st.integers(1, 3)) if n_groups > 1 else draw(st.integers(1, 6))
    assume(min_per_group(n, c, h, w) >= 2 if callable(min_per_group) else True)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale, shift = 10.0 ** draw(st.floats(-3, 3)), draw(st.floats(-10, 10))
    return (torch.randn(n, c, h, w, generator=g) + shift) * scale


def norm_tolerance(x, groups, eps=1e-5):
    """Normalising subtracts each group's mean: float32 keeps EPS * |x| / sqrt(var + eps) absolute accuracy,
    for minifast's `add - mean*scale + x*scale` as for torch's `(x - mean) * rstd` (`groups` views `x` as
    (n_groups, values)). Affine mults are below 1.5 and adds of order 1."""
    g = groups(x.double())
    conditioning = (g.abs().amax(1) / (g.var(1, correction=0) + eps).sqrt()).max().item()
    return dict(rtol=1e-5, atol=16 * EPS * (2 + conditioning))


per_channel = lambda x: x.transpose(0, 1).reshape(x.shape[1], -1)
per_item = lambda x: x.reshape(x.shape[0], -1)
per_item_channel = lambda x: x.reshape(x.shape[0] * x.shape[1], -1)


def random_affine(c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)


@FAST
@given(images(min_per_group=lambda n, c, h, w: n * h * w), st.integers(1, 3), st.integers(0, 1000))
def test_batch_norm_matches_torch_with_running_buffers(x, n_steps, seed):
    c = x.shape[1]
    mults, adds = random_affine(c, seed)
    ours, theirs = BatchNorm(c), nn.BatchNorm2d(c)   # both momentum 0.1, eps 1e-5, unbiased running variance
    with torch.no_grad():
        ours.mults.copy_(mults.view(c, 1, 1)); ours.adds.copy_(adds.view(c, 1, 1))
        theirs.weight.copy_(mults); theirs.bias.copy_(adds)
    for step in range(n_steps):
        xs = x * (1 + step) - step                       # a different batch each step
        torch.testing.assert_close(ours(xs), theirs(xs), **norm_tolerance(xs, per_channel))
        largest = xs.abs().max().item()
        torch.testing.assert_close(ours.means, theirs.running_mean, rtol=1e-5, atol=16 * EPS * largest)
        torch.testing.assert_close(ours.vars, theirs.running_var, rtol=16 * EPS, atol=16 * EPS**2 * largest**2 + 1e-38)
    ours.eval(); theirs.eval()
    conditioning = x.abs().max().item() / math.sqrt(theirs.running_var.min().item() + 1e-5)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=16 * EPS * (2 + conditioning))


@FAST
@given(images(), st.integers(0, 1000))
def test_layer_norm_matches_torch(x, seed):
    g = torch.Generator().manual_seed(seed)
    mult, add = torch.rand((), generator=g) + 0.5, torch.randn((), generator=g)
    layer = LayerNorm(x.shape[1])
    with torch.no_grad(): layer.mult.copy_(mult); layer.add.copy_(add)
    expected = F.layer_norm(x, x.shape[1:], eps=1e-5) * mult + add
    torch.testing.assert_close(layer(x), expected, **norm_tolerance(x, per_item))


@FAST
@given(images(min_per_group=lambda n, c, h, w: h * w), st.integers(0, 1000))
def test_instance_norm_matches_torch(x, seed):
    c = x.shape[1]
    mults, adds = random_affine(c, seed)
    layer = InstanceNorm(c)
    with torch.no_grad(): layer.mults.copy_(mults.view(c, 1, 1)); layer.adds.copy_(adds.view(c, 1, 1))
    expected = F.instance_norm(x, weight=mults, bias=adds, eps=1e-5)
    torch.testing.assert_close(layer(x), expected, **norm_tolerance(x, per_item_channel))


@FAST
@given(st.integers(1, 3).flatmap(lambda g: st.tuples(st.just(g), images(n_groups=g, min_per_group=lambda n, c, h, w: c // g * h * w))),
       st.integers(0, 1000))
def test_group_norm_matches_torch(case, seed):
    n_groups, x = case
    c = x.shape[1]
    mults, adds = random_affine(c, seed)
    ours, theirs = GroupNorm(n_groups, c), nn.GroupNorm(n_groups, c, eps=1e-5)
    with torch.no_grad():
        ours.mults.copy_(mults.view(c, 1, 1)); ours.adds.copy_(adds.view(c, 1, 1))
        theirs.weight.copy_(mults); theirs.bias.copy_(adds)
    per_item_group = lambda t: t.reshape(t.shape[0] * n_groups, -1)
    torch.testing.assert_close(ours(x), theirs(x), **norm_tolerance(x, per_item_group))


# ---------------------------------------------------------------- ActivationStats' histogram sample
@FAST
@given(st.integers(1, 4_000_000), st.integers(1, 10_000))
def test_sample_step_is_coprime_and_keeps_the_sample_small(n, max_samples):
    "The step shares no factor with the size (so it cannot line up with rows or channels), and no smaller step would do."
    step = sample_step(n, max_samples)
    assert math.gcd(step, n) == 1
    assert len(range(0, n, step)) <= max_samples
    assert all(math.gcd(s, n) != 1 for s in range(-(-n // max_samples), step))


@FAST
@given(st.tuples(st.integers(1, 64), st.integers(1, 64), st.integers(1, 16), st.integers(1, 16)))
def test_sampled_histogram_visits_every_channel(shape):
    "Every channel of a batch of activations is in the histogram's sample (default size), when it has room for them all."
    n = math.prod(shape)
    channel_of = torch.arange(n).view(shape).div(shape[2] * shape[3], rounding_mode='floor').remainder(shape[1])
    sampled = channel_of.view(-1)[::sample_step(n, 4096)]
    assume(len(sampled) >= 4 * shape[1])
    assert sampled.unique().numel() == shape[1]
