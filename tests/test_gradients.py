"""GradientStats, UpdateStats and to_tensorboard (nbs/08_gradients.ipynb): what the notebook does not check itself.

Against autograd's own answer (`retain_grad`): with an in-place ReLU after the watched layer and with a module
called twice; validation adds nothing; no hook is left after a fit, an exception or a KeyboardInterrupt; the update
ratio of plain SGD, of SGD with momentum and weight decay, and its cost on batches that are not recorded; the
out-of-range counts of both stats callbacks; a TensorBoard export of ActivationStats read back; TensorBoard missing.
Everything is tiny (8x8 images, a few hundred weights) and runs in seconds on one CPU thread.
"""
import subprocess, sys
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from minifast.foundations import set_seed
from minifast.data import DataLoaders
from minifast.learner import Callback, CancelEpochException, Learner
from minifast.hooks import ActivationStats, BatchTransformXCallback, GeneralRelu, Hooks, Lambda, get_cnn_model, init_cnn, view_tfm
from minifast.gradients import GradientStats, UpdateStats, count_edges_below, edge_lookup

SIDE, N_CLASSES = 8, 3


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_progress(monkeypatch): monkeypatch.setenv('MINIFAST_PROGRESS', '0')


def tiny_data(n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, SIDE * SIDE, generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def tiny_dls(n_train=48, n_valid=16, batch_size=16):
    x, y = tiny_data(n_train + n_valid)
    return DataLoaders.from_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:], batch_size=batch_size)


def tiny_cnn(**relu):
    set_seed(0)
    return init_cnn(get_cnn_model(N_CLASSES, nfs=(4, 8), **relu), leak=relu.get('leak', 0.))


def learner(model, cbs, dls=None, lr=0.1, **kwargs):
    learn = Learner(model, dls or tiny_dls(), F.cross_entropy, lr=lr,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), *cbs], **kwargs)
    learn.metrics.printer = None
    return learn


def n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def reference_grads(model, modules, xb, yb):
    "Each call's output gradient of `modules`, by `retain_grad`, in call order."
    outs = []
    def keep(hook, module, inputs, output):
        output.retain_grad(); outs.append(output)
    with Hooks(modules, keep):
        F.cross_entropy(model(xb.view(-1, 1, SIDE, SIDE)), yb).backward()
    model.zero_grad()
    return [o.grad.detach().double() for o in outs]


def one_batch_dls(n=32):
    x, y = tiny_data(n)
    return DataLoaders.from_tensors(x, y, x[:4], y[:4], batch_size=n), x, y


# ---------------------------------------------------------------- GradientStats against retain_grad
@pytest.mark.parametrize('hist_sample', [None, 4096, 64])
def test_gradient_stats_match_retain_grad(hist_sample):
    dls, x, y = one_batch_dls()
    model = tiny_cnn(leak=0.1, sub=0.4, maxv=6)
    relus = [m for m in model.modules() if isinstance(m, GeneralRelu)]
    stats = GradientStats(hist_sample=hist_sample)
    learner(model, [stats], dls, lr=0.).fit(1)
    assert stats.n_recorded == 1
    for layer, g in enumerate(reference_grads(model, relus, x, y)):
        assert stats.means[layer, 0].item() == pytest.approx(g.mean().item(), rel=1e-5)
        assert stats.stds[layer, 0].item() == pytest.approx(g.std(unbiased=False).item(), rel=1e-5)
        if hist_sample is None:
            logs = g[g != 0].abs().log10()
            low, high = stats.hist_range
            assert stats.zero_share[layer, 0].item() == pytest.approx((g == 0).double().mean().item(), abs=1e-6)
            assert stats.below_range[layer, 0].item() == pytest.approx((logs < low).double().mean().item() * (g != 0).double().mean().item(), abs=1e-6)
            expected = torch.histc(logs.float(), stats.bins, low, high)
            assert torch.allclose(stats.hists[layer, 0], expected, atol=0.5)


def test_inplace_relu_after_a_watched_conv():
    dls, x, y = one_batch_dls()
    def net(inplace):
        set_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, N_CLASSES, 3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = net(True)
    stats = GradientStats(modules=[model[0]], hist_sample=None)
    learner(model, [stats], dls, lr=0.).fit(1)
    plain = net(False)
    (g,) = reference_grads(plain, [plain[0]], x, y)
    assert stats.stds[0, 0].item() == pytest.approx(g.std(unbiased=False).item(), rel=1e-5)
    assert stats.zero_share[0, 0].item() == pytest.approx((g == 0).double().mean().item(), abs=1e-6)
    assert 0.2 < stats.zero_share[0, 0].item() < 0.8       # the ReLU cut about half


class Twice(nn.Module):
    "A hidden layer used twice in one forward pass, the second time on a smaller input."
    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(SIDE * SIDE, SIDE * SIDE), nn.Linear(SIDE * SIDE, N_CLASSES)
    def forward(self, x):
        x = x.flatten(1)
        return self.out(self.hidden(torch.tanh(self.hidden(x))))


def test_a_module_used_twice_adds_both_calls():
    dls, x, y = one_batch_dls()
    set_seed(0)
    model = Twice()
    stats = GradientStats(modules=[model.hidden], hist_sample=None)
    Learner(model, dls, F.cross_entropy, lr=0., default_cbs=False, cbs=[stats]).fit(1)
    outs = []
    with Hooks([model.hidden], lambda h, m, i, o: (o.retain_grad(), outs.append(o))):
        F.cross_entropy(model(x), y).backward()
    g = torch.cat([o.grad.reshape(-1).double() for o in outs])
    assert len(outs) == 2
    assert stats.stats[0, 0, 2].item() == g.numel()
    assert stats.means[0, 0].item() == pytest.approx(g.mean().item(), rel=1e-5)
    assert stats.stds[0, 0].item() == pytest.approx(g.std(unbiased=False).item(), rel=1e-5)
    n = stats.stats[0, 0, 2]
    total = stats.hists[0, 0].sum() / n + stats.below_range[0, 0] + stats.above_range[0, 0] + stats.zero_share[0, 0]
    assert total.item() == pytest.approx(1., abs=1e-6)


class CountingGradientStats(GradientStats):
    calls = 0
    def _record_grad(self, layer, grad):
        type(self).calls += 1
        return super()._record_grad(layer, grad)


def test_validation_adds_nothing_and_every_skips():
    model = tiny_cnn()
    for every in (1, 2):
        CountingGradientStats.calls = 0
        stats = CountingGradientStats(every=every)
        learner(model, [stats]).fit(2)                      # 3 training and 1 validation batches per epoch
        n_layers, recorded = 2, -(-6 // every)
        assert stats.n_recorded == recorded
        assert CountingGradientStats.calls == n_layers * recorded
        assert torch.isfinite(stats.stds).all()
        assert n_hooks(model) == 0


class Boom(Callback):
    def __init__(self, error): self.error = error
    def after_backward(self):
        if self.learn.iter == 1: raise self.error


@pytest.mark.parametrize('error', [RuntimeError('boom'), KeyboardInterrupt()])
def test_no_hook_left_after_an_exception_or_interrupt(error):
    model = tiny_cnn()
    stats = GradientStats()
    with pytest.raises(type(error)): learner(model, [stats, UpdateStats(), Boom(error)]).fit(1)
    assert n_hooks(model) == 0
    # and the model still trains, with no stale hook firing
    learner(model, [GradientStats()]).fit(1)
    assert n_hooks(model) == 0


# ---------------------------------------------------------------- UpdateStats
def step_with(lr, opt_func=torch.optim.SGD):
    dls, x, y = one_batch_dls()
    model = tiny_cnn()
    weights = [p.detach().clone().double() for p in model.parameters()]
    F.cross_entropy(model(x.view(-1, 1, SIDE, SIDE)), y).backward()
    grads = [p.grad.detach().clone().double() for p in model.parameters()]
    model.zero_grad()
    updates = UpdateStats()
    learner(model, [updates], dls, lr=lr, opt_func=opt_func).fit(1)
    return updates, weights, grads


def test_plain_sgd_ratio_is_lr_times_grad_over_weight():
    updates, weights, grads = step_with(0.1)
    rows = [i for i, name in enumerate(updates.names) if name.endswith('weight')]
    for i in rows:
        expected = torch.log10(0.1 * grads[i].norm() / weights[i].norm()).item()
        assert updates.update_ratios[i, 0].item() == pytest.approx(expected, abs=1e-6)
        assert updates.grad_norms[i, 0].item() == pytest.approx(grads[i].norm().item(), rel=1e-5)
    faster, _, _ = step_with(1.0)
    shift = faster.update_ratios[rows, 0] - updates.update_ratios[rows, 0]
    assert ((shift - 1).abs() < 0.05).all(), shift


class StepSpy(Callback):
    "Measures each step by hand: the weights before and after, on every training batch."
    _order = 30
    def before_fit(self): self.ratios = []
    def after_backward(self): self.before = [p.detach().clone().double() for p in self.learn.model.parameters()]
    def after_step(self):
        after = [p.detach().double() for p in self.learn.model.parameters()]
        self.ratios.append([torch.log10((b - a).norm() / b.norm()).item() for b, a in zip(self.before, after)])


def test_momentum_and_weight_decay_count():
    model = tiny_cnn()
    updates, spy = UpdateStats(), StepSpy()
    opt = lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.1)
    learner(model, [updates, spy], opt_func=opt).fit(2)
    measured = torch.tensor(spy.ratios, dtype=torch.float64).t()
    weights = [i for i, name in enumerate(updates.names) if name.endswith('weight')]
    assert torch.allclose(updates.update_ratios[weights].double(), measured[weights], atol=1e-4)


def test_every_k_costs_nothing_on_other_batches(monkeypatch):
    calls = []
    for name in ('_foreach_norm', '_foreach_copy_', '_foreach_sub_'):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    model = tiny_cnn()
    updates = UpdateStats(every=3)
    learner(model, [updates]).fit(2)                        # 6 training batches: batches 0 and 3 are recorded
    assert updates.n_recorded == 2
    assert calls.count('_foreach_copy_') == 2 and calls.count('_foreach_sub_') == 2
    assert calls.count('_foreach_norm') == 2 * 2                # gradients and weights in one call, the step in another


def test_nonfinite_gradients_are_flagged_and_cancelled_batches_are_not():
    model = tiny_cnn()
    updates = UpdateStats()
    bad = lambda pred, yb: F.cross_entropy(pred, yb) * float('inf')
    Learner(model, tiny_dls(), bad, lr=0.1, nonfinite='ignore', default_cbs=False,
            cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), updates]).fit(1)
    assert updates.n_recorded == 3 and updates.nonfinite.all()   # every batch: after the first, weights and gradients are NaN
    model = tiny_cnn()
    updates = UpdateStats()
    Learner(model, tiny_dls(), bad, lr=0.1, nonfinite='skip', default_cbs=False,
            cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), updates]).fit(1)
    assert updates.n_recorded == 3 and updates.grad_norms.isnan().all() and not updates.nonfinite.any()


# ---------------------------------------------------------------- out-of-range counts
def test_in_range_plus_below_plus_above_is_the_count():
    model = tiny_cnn(leak=0.1, sub=0.4, maxv=6)
    acts, grads = ActivationStats(), GradientStats(hist_sample=64)
    learner(model, [acts, grads]).fit(1)
    n = acts.stats[:, :acts.n_recorded, 2].cpu()
    total = acts.hists.sum(-1) / n + acts.below_range + acts.above_range
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    n = grads.stats[:, :grads.n_recorded, 2].cpu()
    total = grads.hists.sum(-1) / n + grads.below_range + grads.above_range + grads.zero_share
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)


def test_an_output_scaled_by_100_is_above_the_range():
    set_seed(0)
    scale = Lambda(lambda x: 100 * x)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.Sigmoid(), scale, nn.Linear(32, N_CLASSES))
    stats = ActivationStats(modules=[scale])
    Learner(model, tiny_dls(), F.cross_entropy, lr=0.01, default_cbs=False, cbs=[stats]).fit(1)
    assert (stats.above_range > 0.9).all(), stats.above_range
    assert stats.hists.sum(-1).max() < 0.1 * stats.stats[0, 0, 2]


@pytest.mark.parametrize('bins, hist_range', [(40, (-10., 0.)), (7, (-3.3, 2.1)), (1, (-1., 1.)), (60, (-5., 0.))])
def test_the_edge_lookup_counts_as_bucketize_does(bins, hist_range):
    edges = torch.tensor(GradientStats(bins=bins, hist_range=hist_range)._edges)
    g = torch.Generator().manual_seed(bins)
    spread = torch.randn(50_000, generator=g).abs() * 10 ** (torch.rand(50_000, generator=g) * 90 - 50)   # 1e-50 .. 1e40
    near_edges = [edges, torch.nextafter(edges, torch.tensor(0.)), torch.nextafter(edges, torch.tensor(float('inf')))]
    specials = torch.tensor([0., 1e-45, 1e-40, 1.1754944e-38, 3.4028235e38, float('inf'), float('nan')])
    values = torch.cat([spread.float(), *near_edges, specials])
    assert (count_edges_below(values, edge_lookup(edges.tolist())) == torch.bucketize(values, edges, out_int32=True)).all()


def test_edges_sharing_a_cell_fall_back_to_bucketize_with_the_same_counts():
    "100 bins a decade put neighbouring edges 2% apart, two to a cell: `bucketize` counts, and merged ten bins at a time its counts are the lookup's for 10 bins a decade."
    dense, sparse = GradientStats(bins=400, hist_range=(-4., 0.)), GradientStats(bins=40, hist_range=(-4., 0.))
    for stats in (dense, sparse): learner(tiny_cnn(leak=0.1, sub=0.4, maxv=6), [stats]).fit(1)   # same seed, same gradients
    assert dense._lookup is False and sparse._lookup   # bucketize for the dense edges, the table for the sparse ones
    counts = dense.stats[:, :dense.n_recorded, 3:]
    merged = torch.cat([counts[..., :2], counts[..., 2:-2].unflatten(-1, (40, 10)).sum(-1), counts[..., -2:]], -1)
    assert torch.equal(merged, sparse.stats[:, :sparse.n_recorded, 3:])


# ---------------------------------------------------------------- TensorBoard
def test_activation_stats_tensorboard_export_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, HISTOGRAMS, SCALARS
    model = tiny_cnn(leak=0.1, sub=0.4, maxv=6)
    stats = ActivationStats(every=2)
    learner(model, [stats]).fit(2)
    stats.to_tensorboard(tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={HISTOGRAMS: 0, SCALARS: 0})
    events.Reload()
    sums, squares, n, counts = stats._recorded()
    for layer in range(2):
        hists = events.Histograms(f'activations/layer {layer}')
        assert [h.step for h in hists] == [0, 2, 4]
        for i, h in enumerate(hists):
            v = h.histogram_value
            assert list(v.bucket) == pytest.approx(counts[layer, i].tolist(), rel=1e-6)
            assert (v.num, v.sum, v.sum_squares) == pytest.approx((n[layer, i].item(), sums[layer, i].item(), squares[layer, i].item()), rel=1e-9)
        for name, values in (('mean', stats.means), ('above_range', stats.above_range), ('near_zero_share', stats.near_zero_share)):
            got = [s.value for s in events.Scalars(f'activations/layer {layer}/{name}')]
            assert got == pytest.approx(values[layer].tolist(), rel=1e-6, abs=1e-9)


def test_gradient_and_update_stats_export_steps_as_index_times_every(tmp_path):
    "08 states the rule: a recorded batch's TensorBoard step is its index times `every`, for both callbacks."
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator, HISTOGRAMS, SCALARS
    grads, updates = GradientStats(every=2), UpdateStats(every=2)
    learner(tiny_cnn(leak=0.1, sub=0.4, maxv=6), [grads, updates]).fit(2)
    assert grads.n_recorded == updates.n_recorded == 3
    for stats, tag in ((grads, 'gradients/layer 0'), (updates, 'updates/0.0.weight/update_ratio')):
        events = EventAccumulator(str(stats.to_tensorboard(tmp_path / tag.split('/')[0])), size_guidance={HISTOGRAMS: 0, SCALARS: 0})
        events.Reload()
        records = events.Histograms(tag) if stats is grads else events.Scalars(tag)
        assert [r.step for r in records] == [0, 2, 4]


def test_without_tensorboard_import_works_and_export_says_what_to_install(monkeypatch, tmp_path):
    blocked = "import sys; sys.modules['tensorboard'] = None; sys.modules['torch.utils.tensorboard'] = None\n"
    out = subprocess.run([sys.executable, '-c', blocked + 'import minifast, minifast.gradients; print("ok")'],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == 'ok'
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    stats = GradientStats()
    learner(tiny_cnn(), [stats]).fit(1)
    with pytest.raises(ImportError, match=r"minifast\[tensorboard\]"): stats.to_tensorboard(tmp_path)


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match='every must be an integer'): GradientStats(every=0)
    with pytest.raises(ValueError, match='every must be an integer'): UpdateStats(every=1.5)
    with pytest.raises(ValueError, match='hist_sample'): GradientStats(hist_sample=0)
    with pytest.raises(ValueError, match='low < high'): GradientStats(hist_range=(0, -3))
    with pytest.raises(ValueError, match='no layers to watch'):
        learner(nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, N_CLASSES)), [GradientStats()]).fit(1)
    with pytest.raises(TypeError, match='returned a tuple'):
        lstm = nn.LSTM(SIDE, 4, batch_first=True)
        model = nn.Sequential(Lambda(lambda x: x.view(-1, SIDE, SIDE)), lstm, Lambda(lambda o: o[0][:, -1]), nn.Linear(4, N_CLASSES))
        Learner(model, tiny_dls(), F.cross_entropy, default_cbs=False, cbs=[GradientStats(modules=[lstm])]).fit(1)
    frozen = tiny_cnn().requires_grad_(False)
    for cb in (GradientStats(), UpdateStats()):
        with pytest.raises(ValueError, match='no parameters that need gradients'): learner(frozen, [cb]).fit(1)
    stats = GradientStats()
    with pytest.raises(ValueError, match='nothing recorded yet'): stats.to_tensorboard(tmp_path)
    learner(tiny_cnn(), [stats]).fit(1)
    (tmp_path / 'file').write_text('')
    with pytest.raises(OSError, match='cannot write TensorBoard logs to'): stats.to_tensorboard(tmp_path / 'file' / 'logs')


class CutEpochAfterStep(Callback):
    "Ends epoch 0 after its second step, before any callback's `after_batch`."
    _order = 20
    def after_step(self):
        if self.learn.epoch == 0 and self.learn.iter == 1: raise CancelEpochException()

@pytest.mark.parametrize('cut', [False, True])
def test_a_batch_cut_short_leaves_nothing_in_the_next_row(cut):
    "Every row's counts (zeros, below, the bins, above, NaN) add up to its number of gradients, a cut-short batch before it or not."
    stats = GradientStats(hist_sample=None)
    learner(tiny_cnn(leak=0.1, sub=0.4), [stats] + ([CutEpochAfterStep()] if cut else [])).fit(2)
    rows = stats.stats[:, :stats.n_recorded].cpu().double()
    torch.testing.assert_close(rows[..., 3:].sum(-1) / rows[..., 2], torch.ones(rows.shape[:2], dtype=torch.float64))
