"""Mixed precision (`MixedPrecision`, notebook 03) on the CPU: accuracy against float32, float16 with its loss scaler,
the loss scale in checkpoints and through `lr_find`, autocast never left on, and the callbacks and norm layers that
must cope with 16-bit activations.

The accuracy test trains the lesson's CNN on a subset of Fashion-MNIST (12,000 training and 5,000 validation images,
one epoch, twice): a few seconds to a quarter of a minute each on two busy cores. Everything else uses the tiny 8x8
data and models of test_reliability.py.
"""
from functools import partial

import pytest
import torch
from torch import nn

from state_checks import assert_state_equal
from test_reliability import SIDE, full_state, tiny_cnn, tiny_dls
from minifast.foundations import set_seed
from minifast.data import load_fashion_mnist, normalize_to_train
from minifast.losses import cross_entropy
from minifast.learner import (CancelBatchException, CancelEpochException, CancelTrainException, Callback, CheckpointError,
                              Learner, MixedPrecision, SaveCheckpoint)
from minifast.lr_finder import lr_find
from minifast.hooks import ActivationStats, BatchTransformXCallback, view_tfm
from minifast.norms import BatchNorm, GroupNorm, LayerNorm, RunningBatchNorm, fit_cnn, get_norm_cnn

SGD_MOM = partial(torch.optim.SGD, momentum=0.9)


@pytest.fixture(autouse=True)
def no_progress(monkeypatch):
    monkeypatch.setenv('MINIFAST_PROGRESS', '0')


def learner(cbs=(), norm=None, seed=0, opt_func=SGD_MOM, **kwargs):
    set_seed(seed)
    return Learner(tiny_cnn(norm), tiny_dls(), cross_entropy, lr=0.1, opt_func=opt_func, default_cbs=False,
                   cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE))] + list(cbs), **kwargs)


def fast_growing_float16():
    "float16 whose loss scale doubles after every good step: it overflows, halves and grows again, so its state moves."
    mp = MixedPrecision(torch.float16)
    mp.scaler.load_state_dict({**mp.scaler.state_dict(), 'growth_interval': 1})
    return mp


# ---------------------------------------------------------------- the lesson's CNN, one epoch
def test_bfloat16_reaches_the_accuracy_of_float32_on_the_lessons_cnn():
    "Same seed, same data order: one epoch in bfloat16 ends within 0.01 of float32's validation accuracy."
    x_train, y_train, x_valid, y_valid = load_fashion_mnist(download=False)   # `make data` puts it in place
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    data = (x_train[:12_000], y_train[:12_000], x_valid[:5_000], y_valid[:5_000])
    accuracy = {}
    for name, cbs in [('float32', []), ('bfloat16', [MixedPrecision(torch.bfloat16)])]:
        set_seed(0)
        learn = fit_cnn(get_norm_cnn(BatchNorm), data, batch_size=256, lr=0.4, printer=None, cbs=cbs)
        accuracy[name] = learn.metrics.history[-1]['valid_accuracy']
    assert accuracy['float32'] > 0.7, accuracy                  # it learned something to compare
    assert abs(accuracy['bfloat16'] - accuracy['float32']) < 0.01, accuracy


# ---------------------------------------------------------------- the callback
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.int8, 'bfloat16'])
def test_other_dtypes_are_refused_by_name(dtype):
    with pytest.raises(ValueError, match=r'MixedPrecision: dtype must be torch\.bfloat16 or torch\.float16, got ' + repr(dtype).replace('.', r'\.')):
        MixedPrecision(dtype)


class Seen(Callback):
    "What a batch sees: the prediction's dtype, the learner's scaler, and the first batch's total gradient norm in after_backward."
    _order = 50
    def before_fit(self): self.pred_dtypes, self.scalers, self.grad_norms = set(), set(), []
    def after_pred(self): self.pred_dtypes.add(self.learn.pred.dtype)
    def after_backward(self):
        self.scalers.add(id(self.learn.grad_scaler))
        self.grad_norms.append(torch.cat([p.grad.reshape(-1) for p in self.learn.model.parameters()]).norm().item())


def test_float16_works_on_the_cpu_with_a_loss_scaler():
    "torch 2.13 runs float16 autocast on the CPU; the scaler is the learner's during the fit, and the weights stay float32."
    mp, seen = MixedPrecision(torch.float16), Seen()
    learn = learner([mp, seen], norm=BatchNorm)
    learn.fit(2)
    assert seen.pred_dtypes == {torch.float16}
    assert seen.scalers == {id(mp.scaler)} and learn.grad_scaler is None     # handed back after the fit
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in learn.model.parameters())
    assert mp.state_dict()['scaler']['_growth_tracker'] == 2 * len(learn.dls.train)   # every step was taken


def test_callbacks_see_unscaled_gradients():
    "float16's gradients are divided back before after_backward: the first batch's gradient norm is float32's, not 65,536 times it."
    norms = {}
    for name, extra in [('float32', []), ('float16', [MixedPrecision(torch.float16)]), ('bfloat16', [MixedPrecision()])]:
        seen = Seen()
        learner(extra + [seen], norm=BatchNorm).fit(1)
        norms[name] = seen.grad_norms[0]
    for name in ('float16', 'bfloat16'): assert norms[name] == pytest.approx(norms['float32'], rel=0.05), norms


# ---------------------------------------------------------------- autocast is never left on
class AutocastProbe(Callback):
    "Whether autocast is on at the start of each batch (before MixedPrecision's before_batch) and at its end."
    _order = -9
    def before_fit(self): self.at_start, self.at_end = [], []
    def before_batch(self): self.at_start.append(torch.is_autocast_enabled('cpu'))
    def after_batch(self): self.at_end.append(torch.is_autocast_enabled('cpu'))


class RaiseInForward(Callback):
    "Raises `exc` in after_pred (autocast is on then) at batch 1 of the training pass, or batch 0 of the (one-batch) validation pass."
    def __init__(self, exc, in_train=True): self.exc, self.in_train_pass = exc, in_train
    def after_pred(self):
        assert torch.is_autocast_enabled('cpu')
        if self.learn.in_train == self.in_train_pass and self.learn.iter == int(self.in_train_pass): raise self.exc


@pytest.mark.parametrize('exc', [RuntimeError('boom'), KeyboardInterrupt(), CancelBatchException(), CancelEpochException(),
                                 CancelTrainException()], ids=lambda e: type(e).__name__)
@pytest.mark.parametrize('in_train', [True, False], ids=['training', 'validation'])
def test_autocast_is_off_after_anything_that_ends_a_batch_early(exc, in_train):
    probe = AutocastProbe()
    learn = learner([MixedPrecision(), RaiseInForward(exc, in_train), probe], norm=BatchNorm)
    if isinstance(exc, (RuntimeError, KeyboardInterrupt)):
        with pytest.raises(type(exc)): learn.fit(2)
    else: learn.fit(2)
    assert not torch.is_autocast_enabled('cpu')
    assert probe.at_start and not any(probe.at_start)        # no batch began with autocast still on from the last
    assert not any(probe.at_end)


# ---------------------------------------------------------------- the loss scale in checkpoints and through lr_find
class Crash(Callback):
    def __init__(self, epoch, batch): self.at = (epoch, batch)
    def after_step(self):
        if (self.learn.epoch, self.learn.iter) == self.at: raise RuntimeError('crash')


@pytest.mark.parametrize('every_n_batches', [None, 1], ids=['after-an-epoch', 'mid-epoch'])
def test_loss_scale_round_trips_through_a_checkpoint(tmp_path, every_n_batches):
    "A float16 fit crashed and resumed ends with the weights, the optimiser and the loss scale of the uninterrupted fit."
    whole_mp = fast_growing_float16()
    whole = learner([whole_mp], norm=RunningBatchNorm)
    whole.fit(3)
    path = tmp_path / 'fit.pth'
    crashed = learner([fast_growing_float16(), SaveCheckpoint(path, every_n_batches=every_n_batches)], norm=RunningBatchNorm)
    with pytest.raises(RuntimeError, match='crash'): crashed.fit(3, cbs=Crash(epoch=1, batch=1))
    resumed_mp = MixedPrecision(torch.float16)                           # a fresh scaler: the checkpoint's state goes in
    resumed = learner([resumed_mp, SaveCheckpoint(path, every_n_batches=every_n_batches)], norm=RunningBatchNorm, seed=1)
    resumed.fit(3, resume_from=path)
    assert resumed_mp.state_dict() == whole_mp.state_dict()
    assert whole_mp.state_dict()['scaler']['scale'] != 2. ** 16          # the scale did move, so the test means something
    assert_state_equal(full_state(resumed), full_state(whole))


def test_resuming_in_another_dtype_is_refused_and_changes_nothing(tmp_path):
    path = tmp_path / 'fit.pth'
    with pytest.raises(RuntimeError, match='crash'):
        learner([MixedPrecision(torch.bfloat16), SaveCheckpoint(path)]).fit(2, cbs=Crash(epoch=1, batch=0))
    other = learner([MixedPrecision(torch.float16), SaveCheckpoint(path)], seed=1)
    before = full_state(other)
    with pytest.raises(CheckpointError, match=r'trained in bfloat16, this callback trains in float16; resume with MixedPrecision\(torch\.bfloat16\)'):
        other.fit(2, resume_from=path)
    assert_state_equal(full_state(other), before)


def test_lr_find_puts_the_loss_scale_back():
    mp = MixedPrecision(torch.float16)
    learn = learner([mp], norm=BatchNorm)
    learn.fit(1)
    scale_before, state_before = mp.state_dict(), full_state(learn)
    assert scale_before['scaler']['_growth_tracker'] == 3                # three good steps in a row so far
    class ScalerAtTheEnd(Callback):
        def after_fit(self): self.state = mp.state_dict()                # the finder's run is over, lr_find has not restored yet
    at_end = ScalerAtTheEnd()
    learn.add_cbs(at_end)
    lr_find(learn, max_iter=12)
    assert at_end.state != scale_before, at_end.state                    # the finder's run changed the scaler's state...
    assert mp.state_dict() == scale_before                               # ...and lr_find put it back
    assert_state_equal(full_state(learn), state_before)


# ---------------------------------------------------------------- callbacks and norm layers in 16 bits
def fitted_in_both(make_stats, dtype, n_epochs=1, check_learner=lambda learn: None, **kwargs):
    "The same fit from the same seed in float32 and with `MixedPrecision(dtype)`: the two stats callbacks (16-bit, float32)."
    stats = {}
    for name, extra in [('float32', []), ('16', [MixedPrecision(dtype)])]:
        stats[name] = make_stats()
        learn = learner(extra + [stats[name]], **kwargs)
        learn.fit(n_epochs)
        check_learner(learn)
    return stats['16'], stats['float32']


def rbns_finite(learn):
    "RunningBatchNorm keeps float32, finite statistics, and the model's eval output is finite."
    rbns = [m for m in learn.model.modules() if isinstance(m, RunningBatchNorm)]
    assert all(m.running.dtype == torch.float32 and torch.isfinite(m.running).all() for m in rbns)
    with torch.no_grad(): assert torch.isfinite(learn.model.eval()(torch.randn(4, 1, SIDE, SIDE))).all()

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_activation_stats_and_running_batch_norm_cope_with_16_bit_activations(dtype):
    "ActivationStats records 16-bit activations in float32; RunningBatchNorm keeps float32 statistics; both close to float32's."
    half, full = fitted_in_both(ActivationStats, dtype, n_epochs=2, check_learner=rbns_finite, norm=RunningBatchNorm)
    assert half.n_recorded == full.n_recorded == 2 * 3 and half.stats.dtype == torch.float32
    assert torch.isfinite(half.means).all() and torch.isfinite(half.stds).all()
    torch.testing.assert_close(half.means[:, 0], full.means[:, 0], rtol=0.05, atol=0.02)   # the first batch: same weights
    torch.testing.assert_close(half.stds[:, 0], full.stds[:, 0], rtol=0.05, atol=0.02)


@pytest.mark.parametrize('norm', [BatchNorm, nn.BatchNorm2d, partial(GroupNorm, 2), LayerNorm, RunningBatchNorm],
                         ids=['BatchNorm', 'nn.BatchNorm2d', 'GroupNorm', 'LayerNorm', 'RunningBatchNorm'])
def test_norm_layers_train_in_bfloat16(norm):
    learn = learner([MixedPrecision()], norm=norm)
    learn.fit(2)
    assert all(torch.isfinite(t).all() for t in learn.model.state_dict().values() if torch.is_tensor(t) and t.is_floating_point())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bfloat16', 'float16'])
def test_gradient_stats_record_unscaled_gradients(dtype):
    "In float16 the backward pass carries the loss scale (65,536 at first): GradientStats divides it out, so its stds match float32's."
    from minifast.gradients import GradientStats
    half, full = fitted_in_both(GradientStats, dtype)
    assert torch.isfinite(half.stds[:, 0]).all()
    torch.testing.assert_close(half.stds[:, 0], full.stds[:, 0], rtol=0.1, atol=1e-6)   # the first batch: same weights
