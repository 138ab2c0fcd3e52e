"""Reliability of the training loop, checkpoints, hooks, the LR finder and the norm layers.

What happens when a fit is interrupted (Ctrl-C or an exception, from a callback or from the model),
when a callback fails, when the loss turns NaN/inf, when a checkpoint write is interrupted, when hooks
are dropped, when `lr_find` stops early or is interrupted; that a seeded CPU fit repeats bit for bit;
that 50 fits with `ActivationStats` leak neither hooks nor memory; and how the norm layers handle bad
shapes, tiny batches, constant inputs and half precision.

Everything is tiny (a few dozen 8x8 images, models with a few hundred weights): the whole file runs
in a few seconds on two CPU cores.
"""
import collections, contextlib, copy, gc, os, weakref
from functools import partial

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from fastprogress.fastprogress import ConsoleMasterBar, ConsoleProgressBar

import minifast.learner as learner_module
from state_checks import assert_state_equal
from minifast.foundations import set_seed
from minifast.data import DataLoaders
from minifast.losses import cross_entropy
from minifast.learner import CancelTrainException, Callback, Learner, NonFiniteLossError, ProgressCallback, progress_wanted
from minifast.schedule import Recorder, one_cycle
from minifast.lr_finder import LRFinder, lr_find
from minifast.hooks import (ActivationStats, BatchTransformXCallback, Hook, HookRemovedError, Hooks,
                            get_cnn_model, view_tfm)
from minifast.norms import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RunningBatchNorm

N_CLASSES, SIDE = 3, 8


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Tensors here are tiny: one intra-op thread is fastest, and on a busy shared machine a second one that waits"
    "for a free core makes each op ~100x slower. Restored afterwards for the other test files."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_progress_by_default(monkeypatch):
    "No progress bars unless a test asks for them (`MINIFAST_PROGRESS=1`)."
    monkeypatch.setenv('MINIFAST_PROGRESS', '0')


# ---------------------------------------------------------------- small helpers
def tiny_data(n_train=48, n_valid=16, seed=0):
    "Flat 8x8 'images' whose class is set by the mean of three horizontal bands: learnable, tiny."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, SIDE * SIDE, generator=g)
    y = torch.randint(0, N_CLASSES, (n_train + n_valid,), generator=g)
    x.view(-1, SIDE, SIDE)[torch.arange(len(x)), y * 2] += 2.   # a class-dependent row
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def tiny_dls(batch_size=16, **kwargs):
    return DataLoaders.from_tensors(*tiny_data(**kwargs), batch_size=batch_size)


def tiny_cnn(norm=None, nfs=(4, 8)):
    "The lesson's CNN at toy size: 8x8 -> 4x4 -> 2x2 -> pool -> linear; `GeneralRelu`s for ActivationStats."
    return get_cnn_model(N_CLASSES, nfs, n_in=1, norm=norm, leak=0.1, sub=0.4)


class TwoNorms(nn.Module):
    "A model with both a `BatchNorm` and a `RunningBatchNorm`, for checkpoints and the LR finder."
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False), BatchNorm(4), nn.ReLU(),
                                  nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), RunningBatchNorm(6), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, N_CLASSES))
    def forward(self, x): return self.body(x.view(-1, 1, SIDE, SIDE))


SGD_MOM = partial(torch.optim.SGD, momentum=0.9)


def n_forward_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def params_snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b): assert torch.equal(x, y)




def full_state(learn):
    "Everything that must survive a round trip: model params, buffers, extra state, optimiser state, mode."
    return dict(model=copy.deepcopy(learn.model.state_dict()), opt=copy.deepcopy(learn.opt.state_dict()),
                training=learn.model.training)


class AfterFitCounter(Callback):
    "Counts `after_fit` calls; `_order` set per instance so it runs before or after the others."
    def __init__(self, order): self._order, self.n_after_fit = order, 0
    def after_fit(self): self.n_after_fit += 1
    @property
    def name(self): return f'after_fit_counter_{self._order}'


class RaiseAt(Callback):
    "Raise `exc` at training batch `batch` of epoch `epoch` (the event: see `raise_at_class`); remembers the hook count then."
    def __init__(self, exc, epoch=1, batch=1):
        self.exc, self.at = exc, (epoch, batch)
        self.hooks_when_raised = None
    def _maybe_raise(self):
        learn = self.learn
        if learn.in_train and (learn.epoch, learn.iter) == self.at:
            self.hooks_when_raised = n_forward_hooks(learn.model)
            raise self.exc


def raise_at_class(event):
    "A fresh `RaiseAt` subclass that handles `event` (dispatch looks events up on the class)."
    return type(f'RaiseAt_{event}', (RaiseAt,), {event: lambda self: self._maybe_raise()})


class ExplodingForward(nn.Module):
    "Raises `exc` on its `at`-th forward pass in training mode."
    def __init__(self, exc, at):
        super().__init__()
        self.exc, self.at, self.calls, self.hooks_when_raised = exc, at, 0, None
        self.whole_model = lambda: None    # set by the test (a plain function: a module attribute would nest the model in itself)
    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                self.hooks_when_raised = n_forward_hooks(self.whole_model())
                raise self.exc
        return x


# ---------------------------------------------------------------- progress bars that remember being closed
@pytest.fixture
def recorded_bars(monkeypatch):
    "Force `ProgressCallback` on, and record every fastprogress bar it makes and each `on_iter_end` it gets."
    bars = []
    class RecordingMasterBar(ConsoleMasterBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs); self.n_iter_end = 0; bars.append(self)
        def on_iter_end(self): self.n_iter_end += 1; super().on_iter_end()
    class RecordingProgressBar(ConsoleProgressBar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs); self.n_iter_end = 0; bars.append(self)
        def on_iter_end(self): self.n_iter_end += 1; super().on_iter_end()
    monkeypatch.setenv('MINIFAST_PROGRESS', '1')
    monkeypatch.setattr(learner_module, 'master_bar', RecordingMasterBar)
    monkeypatch.setattr(learner_module, 'progress_bar', RecordingProgressBar)
    return bars


def test_progress_wanted_follows_the_environment(monkeypatch):
    monkeypatch.setenv('MINIFAST_PROGRESS', '1'); assert progress_wanted()
    monkeypatch.setenv('MINIFAST_PROGRESS', '0'); assert not progress_wanted()
    monkeypatch.setenv('MINIFAST_PROGRESS', 'false'); assert not progress_wanted()


def test_progress_bars_are_closed_after_a_normal_fit(recorded_bars):
    learn = Learner(tiny_cnn(), tiny_dls(), cross_entropy, lr=0.1, cbs=BatchTransformXCallback(view_tfm(1, SIDE, SIDE)))
    assert isinstance(learn.progress, ProgressCallback)
    learn.metrics.printer = None
    learn.fit(2)
    assert len(recorded_bars) == 1 + 2 * 2          # a master bar, then a train and a valid bar per epoch
    assert all(bar.n_iter_end >= 1 for bar in recorded_bars)


# ---------------------------------------------------------------- 1. interrupts mid-epoch
INTERRUPTS = [pytest.param(lambda: KeyboardInterrupt(), id='KeyboardInterrupt'),
              pytest.param(lambda: RuntimeError('out of memory (simulated)'), id='RuntimeError')]


@pytest.mark.parametrize('make_exc', INTERRUPTS)
@pytest.mark.parametrize('source', ['callback', 'forward'])
def test_interrupt_mid_epoch_cleans_up_and_propagates_unchanged(recorded_bars, make_exc, source):
    exc = make_exc()
    cnn = tiny_cnn()
    stats = ActivationStats()
    first, last = AfterFitCounter(-20), AfterFitCounter(100)
    cbs = [BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), stats, first, last]
    if source == 'forward':
        bomb = ExplodingForward(exc, at=3 + 2)       # 3 training batches per epoch: epoch 1, batch 1
        model = nn.Sequential(cnn, bomb); bomb.whole_model = lambda: model
    else:
        model, raiser = cnn, raise_at_class('after_backward')(exc, epoch=1, batch=1)
        cbs.append(raiser)
    learn = Learner(model, tiny_dls(), cross_entropy, lr=0.1, cbs=cbs)
    learn.metrics.printer = None
    assert isinstance(learn.progress, ProgressCallback)

    with pytest.raises(type(exc)) as info: learn.fit(3)

    assert info.value is exc                                   # the very object, not a wrapper
    assert str(info.value) == str(make_exc())                  # and its message unchanged
    assert first.n_after_fit == 1 and last.n_after_fit == 1    # after_fit ran for every callback
    hooks_when_raised = bomb.hooks_when_raised if source == 'forward' else raiser.hooks_when_raised
    assert hooks_when_raised == 2                              # ActivationStats was watching both GeneralRelus...
    assert n_forward_hooks(model) == 0                         # ... and nothing is left on the model
    assert all(h.removed for h in stats.hooks)
    assert len(recorded_bars) == 1 + 2 + 1                     # master, epoch 0 train + valid, epoch 1 train
    assert all(bar.n_iter_end >= 1 for bar in recorded_bars), [bar.n_iter_end for bar in recorded_bars]
    assert learn.progress.pbar is None and learn.progress.mbar is None   # after_fit closed and released the bars
    if source == 'callback':
        assert any('RaiseAt_after_backward.after_backward' in n for n in info.value.__notes__)


# ---------------------------------------------------------------- 2. a callback that raises
@pytest.mark.parametrize('event', ['before_fit', 'before_epoch', 'before_batch', 'after_pred', 'after_loss',
                                   'after_backward', 'after_step', 'after_batch', 'before_validate', 'after_epoch'])
def test_callback_error_names_the_callback_and_event(event):
    class Boom(Exception): pass
    def fail(self): raise Boom(f'failed in {event}')
    FailingCallback = type('FailingCallback', (Callback,), {event: fail})
    first, last = AfterFitCounter(-20), AfterFitCounter(100)
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy, cbs=[FailingCallback(), first, last],
                    default_cbs=False)
    with pytest.raises(Boom, match=f'failed in {event}') as info: learn.fit(1)
    assert f'FailingCallback.{event}' in '\n'.join(info.value.__notes__)
    assert first.n_after_fit == last.n_after_fit == 1


@pytest.mark.parametrize('event', ['before_epoch', 'before_validate'])
def test_cancel_epoch_before_a_pass_skips_only_that_pass(event):
    "A `CancelEpochException` from a pass's first event ends that pass, as one from a batch does, and the fit goes on."
    class CancelPass(Callback):
        def __init__(self): self.seen = []
    for e in ('before_epoch', 'before_validate', 'before_batch', 'after_cancel_epoch', 'after_epoch', 'after_fit'):
        def handler(self, e=e):
            self.seen.append((e, self.learn.in_train) if e == 'before_batch' else e)
            if e == event: raise learner_module.CancelEpochException()
        setattr(CancelPass, e, handler)
    cb = CancelPass()
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy, cbs=cb)   # with the default callbacks
    learn.fit(2)
    per_epoch = [e for e in cb.seen if e != 'after_fit']
    assert cb.seen[-1] == 'after_fit' and per_epoch.count('after_cancel_epoch') == 2 and per_epoch.count('after_epoch') == 2
    trained = [e for e in cb.seen if e == ('before_batch', True)]
    validated = [e for e in cb.seen if e == ('before_batch', False)]
    assert (len(trained), len(validated)) == ((0, 2) if event == 'before_epoch' else (6, 0))   # 48 and 16 images, batches of 16
    assert len(learn.metrics.history) == 2


class FailingAfterFit(Callback):
    _order = 0
    def __init__(self, exc): self.exc = exc
    def after_fit(self): raise self.exc


def test_a_raising_after_fit_does_not_stop_the_others():
    before, after = AfterFitCounter(-20), AfterFitCounter(100)
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy,
                    cbs=[before, FailingAfterFit(ValueError('cleanup failed')), after], default_cbs=False)
    with pytest.raises(ValueError, match='cleanup failed') as info: learn.fit(1)
    assert before.n_after_fit == after.n_after_fit == 1
    assert 'FailingAfterFit.after_fit' in '\n'.join(info.value.__notes__)


def test_after_fit_failure_does_not_hide_the_fits_own_error():
    fit_error = KeyboardInterrupt()
    after = AfterFitCounter(100)
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy, default_cbs=False,
                    cbs=[raise_at_class('after_step')(fit_error, epoch=0, batch=1), FailingAfterFit(ValueError('cleanup failed')), after])
    with pytest.raises(KeyboardInterrupt) as info: learn.fit(1)
    assert info.value is fit_error and after.n_after_fit == 1
    assert any('cleanup failed' in n for n in info.value.__notes__)   # the after_fit failure is reported too


def test_every_after_fit_failure_is_reported():
    class SecondFailure(FailingAfterFit): _order = 50
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy, default_cbs=False,
                    cbs=[FailingAfterFit(ValueError('first cleanup failed')), SecondFailure(KeyError('second cleanup failed'))])
    with pytest.raises(ValueError, match='first cleanup failed') as info: learn.fit(1)
    assert any('second cleanup failed' in n for n in getattr(info.value, '__notes__', []))


def test_before_fit_failure_gets_no_spurious_progress_note(recorded_bars):
    class FailsEarly(Callback):
        def before_fit(self): raise KeyError('bad setting')
    counter = AfterFitCounter(100)
    learn = Learner(nn.Linear(SIDE * SIDE, N_CLASSES), tiny_dls(), cross_entropy, cbs=[FailsEarly(), counter])
    assert isinstance(learn.progress, ProgressCallback) and FailsEarly._order < ProgressCallback._order
    with pytest.raises(KeyError, match='bad setting') as info: learn.fit(1)
    assert counter.n_after_fit == 1 and recorded_bars == []
    assert info.value.__notes__ == ['minifast: raised in FailsEarly.before_fit']


# ---------------------------------------------------------------- 3. NaN / inf losses
class PoisonLoss(Callback):
    "Turns the training loss into `value` at the given (epoch, batch) pairs; snapshots weights around them."
    _order = -1
    def __init__(self, at, value=float('nan')):
        self.at, self.value = set(at), value
        self.before, self.after, self.n_steps = {}, {}, 0
    def after_loss(self):
        learn = self.learn
        if learn.in_train and (learn.epoch, learn.iter) in self.at:
            self.before[(learn.epoch, learn.iter)] = params_snapshot(learn.model)
            learn.loss = learn.loss * self.value        # cross-entropy > 0, so nan, inf or -inf; its gradient too
    def after_step(self): self.n_steps += 1
    def after_batch(self):
        key = (self.learn.epoch, self.learn.iter)
        if self.learn.in_train and key in self.at: self.after[key] = params_snapshot(self.learn.model)


def all_finite(model): return all(torch.isfinite(t).all() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_nonfinite_loss_raises_by_default_and_weights_stay_untouched(value):
    poison = PoisonLoss(at=[(1, 2)], value=value)
    learn = Learner(tiny_cnn(BatchNorm), tiny_dls(), cross_entropy, lr=0.1, default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), poison])
    with pytest.raises(NonFiniteLossError, match=r'epoch 1, batch 2') as info: learn.fit(3)
    assert str(value) in str(info.value)
    assert isinstance(info.value, FloatingPointError)
    assert all_finite(learn.model)
    assert_same_tensors(params_snapshot(learn.model), poison.before[(1, 2)])   # the step was not taken
    assert poison.n_steps == 3 + 2


def test_nonfinite_loss_skip_skips_and_counts():
    poisoned = [(0, 1), (1, 0), (1, 2)]
    poison = PoisonLoss(at=poisoned)
    learn = Learner(tiny_cnn(BatchNorm), tiny_dls(), cross_entropy, lr=0.1, nonfinite='skip', default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), poison])
    learn.fit(2)
    assert learn.n_skipped_batches == len(poisoned)
    assert poison.n_steps == 2 * 3 - len(poisoned)              # every other batch still trained
    for key in poisoned: assert_same_tensors(poison.after[key], poison.before[key])
    assert all_finite(learn.model)


def test_nonfinite_ignore_turns_the_check_off():
    "The documented escape hatch: with 'ignore' the NaN reaches the weights (so the check above is what protects them)."
    learn = Learner(tiny_cnn(), tiny_dls(), cross_entropy, lr=0.1, nonfinite='ignore', default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), PoisonLoss(at=[(0, 1)])])
    learn.fit(1)
    assert learn.n_skipped_batches == 0
    assert not all(torch.isfinite(p).all() for p in learn.model.parameters())


def test_skipped_batches_do_not_poison_the_epoch_metrics():
    learn = Learner(tiny_cnn(), tiny_dls(), cross_entropy, lr=0.1, nonfinite='skip',
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), PoisonLoss(at=[(0, 1)])])
    learn.metrics.printer = None
    learn.fit(1)
    assert learn.n_skipped_batches == 1
    assert torch.isfinite(torch.tensor(learn.metrics.history[-1]['train_loss']))


@pytest.mark.parametrize('norm', [BatchNorm, RunningBatchNorm, partial(RunningBatchNorm, compiled=True)],
                         ids=['BatchNorm', 'RunningBatchNorm', 'RunningBatchNorm-compiled'])
def test_skipped_batch_leaves_no_trace_in_running_statistics(norm):
    "A NaN from the data is only seen after the forward pass, which has folded it into the running statistics: undone."
    x, y, x_valid, y_valid = tiny_data()
    x[5, 0] = float('nan')                                           # one bad pixel in one training image
    dls = DataLoaders.from_tensors(x, y, x_valid, y_valid, batch_size=16)
    learn = Learner(tiny_cnn(norm), dls, cross_entropy, lr=0.1, nonfinite='skip', default_cbs=False,
                    cbs=BatchTransformXCallback(view_tfm(1, SIDE, SIDE)))
    learn.fit(1)
    assert learn.n_skipped_batches == 1
    assert all_finite(learn.model)                                   # weights and buffers
    with torch.no_grad(): assert torch.isfinite(learn.model.eval()(x_valid.view(-1, 1, SIDE, SIDE))).all()
    rbns = [m for m in learn.model.modules() if isinstance(m, RunningBatchNorm)]
    assert all(m.n_batches == len(dls.train) - 1 for m in rbns)     # its count and step counters were put back too


# ---------------------------------------------------------------- 3b. the check on the device
# The default off the CPU (no host read per batch), forced here on the CPU with `check_on_device = True`.
def device_checked(cbs=(), n_train=48, loss_func=cross_entropy, **kwargs):
    learn = Learner(tiny_cnn(BatchNorm), tiny_dls(n_train=n_train), loss_func, lr=0.1, default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE))] + list(cbs), **kwargs)
    learn.check_on_device = True
    return learn


@pytest.mark.parametrize('value', [float('nan'), float('inf'), float('-inf')])
def test_device_check_names_the_first_bad_batch_and_no_weight_turns_nonfinite(value):
    poison = PoisonLoss(at=[(1, 1), (1, 2)], value=value)
    learn = device_checked([poison])
    with pytest.raises(NonFiniteLossError, match=rf'the training loss is {value} at epoch 1, batch 1; checked on the device'):
        learn.fit(3)
    assert all_finite(learn.model)
    for key in poison.at: assert_same_tensors(poison.after[key], poison.before[key])   # zero gradients: plain SGD did not move
    assert poison.n_steps == 3 + 3            # on the CPU the flag is read at the end of the training pass, and no later


def test_device_check_keeps_momentum_finite():
    poison = PoisonLoss(at=[(0, 1)])
    learn = device_checked([poison], opt_func=SGD_MOM)
    with pytest.raises(NonFiniteLossError, match='epoch 0, batch 1'): learn.fit(2)
    assert all_finite(learn.model)
    assert all(torch.isfinite(st['momentum_buffer']).all() for st in learn.opt.state.values())


class ArrivedAtOnce:
    "Stands in for the CUDA event of a copy to pinned memory that has always arrived by the next batch."
    def record(self, stream=None): pass
    def query(self): return True


class FakeCopyToHost(Callback):
    "Gives the CPU learner the CUDA path's copy to the host, with an event that has always arrived: the flag is looked at one batch later."
    def before_epoch(self): self.learn._flag_copied = ArrivedAtOnce()


def test_device_check_reads_an_arrived_copy_one_batch_later():
    poison = PoisonLoss(at=[(0, 1)])
    learn = device_checked([poison, FakeCopyToHost()])
    with pytest.raises(NonFiniteLossError, match=r'at epoch 0, batch 1; checked on the device and read at batch 2'): learn.fit(2)
    assert poison.n_steps == 2                # batch 2 stopped after its backward pass, before its step
    assert all_finite(learn.model)


def test_device_check_after_training_was_cancelled_mid_epoch():
    class CancelAfterBatch1(Callback):
        def after_batch(self):
            if self.learn.in_train and self.learn.iter == 1: raise CancelTrainException()
    learn = device_checked([PoisonLoss(at=[(0, 0)]), CancelAfterBatch1()])
    with pytest.raises(NonFiniteLossError, match='epoch 0, batch 0'): learn.fit(2)


def test_device_check_changes_no_result_and_skip_stays_on_the_host():
    "Without a bad loss, the same seed gives the same bits with either check; 'skip' needs the per-batch read, and keeps it."
    states = []
    for on_device in (False, True):
        set_seed(0)
        learn = device_checked(opt_func=SGD_MOM)
        learn.check_on_device = on_device
        learn.fit(2)
        states.append(full_state(learn))
    assert_state_equal(states[1], states[0])
    learn = device_checked([PoisonLoss(at=[(0, 1)])], nonfinite='skip')
    learn.fit(1)
    assert learn.n_skipped_batches == 1 and learn._nonfinite_flag is None


def test_device_check_reads_the_host_once_per_epoch():
    "The flag is read once per epoch: as often with 12 training batches per epoch as with 3 (the host check reads every batch)."
    def host_reads(n_train):
        set_seed(0)
        learn = device_checked(n_train=n_train, loss_func=F.cross_entropy)   # minifast's cross_entropy reads CPU labels
        with counting_host_reads() as counts: learn.fit(2)
        assert len(learn.dls.train) == n_train // 16
        return counts
    few, many = host_reads(48), host_reads(192)
    assert few == {'tolist': 2}, few          # the flag, at the end of each training pass; nothing else
    assert many == few, (few, many)


# ---------------------------------------------------------------- 4. same seed, same result
def seeded_fit(seed, n_epochs=2):
    set_seed(seed)
    model = nn.Sequential(tiny_cnn(BatchNorm), nn.Dropout(0.2))   # dropout and shuffling both draw random numbers
    recorder = Recorder()
    learn = Learner(model, tiny_dls(), cross_entropy, lr=0.1, opt_func=SGD_MOM, default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), recorder])
    learn.fit(n_epochs)
    return recorder.losses, learn.model.state_dict()


def test_same_seed_same_losses_and_weights_bit_for_bit():
    losses_a, state_a = seeded_fit(0)
    losses_b, state_b = seeded_fit(0)
    assert len(losses_a) == 2 * 3
    assert torch.equal(losses_a, losses_b)
    assert_state_equal(state_a, state_b)
    losses_c, _ = seeded_fit(1)                                   # and the seed matters: the check is not vacuous
    assert not torch.equal(losses_a, losses_c)


# ---------------------------------------------------------------- 5. save / load
def trained_two_norms(seed=0, n_epochs=1):
    set_seed(seed)
    learn = Learner(TwoNorms(), tiny_dls(), cross_entropy, lr=0.05, opt_func=SGD_MOM, default_cbs=False)
    learn.fit(n_epochs)
    return learn


def test_save_load_round_trip_bit_for_bit(tmp_path):
    learn = trained_two_norms()
    rbn = learn.model.body[4]
    assert rbn.n_batches > 0 and rbn.n_items > 0                      # the Python counters have something to save
    assert not torch.equal(learn.model.body[1].means, torch.zeros(4))  # BatchNorm's running stats too
    assert len(learn.opt.state) == len(list(learn.model.parameters()))   # and SGD has momentum buffers
    saved = full_state(learn)
    path = learn.save(tmp_path/'ckpt'/'model.pth')
    assert path.exists()

    other = trained_two_norms(seed=1)                                  # a different model and optimiser state
    other.model.eval()
    other.load(path)
    loaded = full_state(other)
    loaded['training'] = saved['training']                             # the mode is not part of a checkpoint
    assert_state_equal(loaded, saved)
    assert (other.model.body[4].n_batches, other.model.body[4].n_items) == (rbn.n_batches, rbn.n_items)

    # and training on from either gives the same result
    for l in (learn, other): set_seed(7); l.fit(1)
    assert_state_equal(full_state(other), full_state(learn))


def half_write_then_interrupt(real_save):
    def fake_save(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO(); real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue(); f.write(data[:len(data) // 2]); f.flush()
        raise KeyboardInterrupt()
    return fake_save


def raise_inside(exc):
    def fake_save(obj, f, *args, **kwargs): raise exc
    return fake_save


@pytest.mark.parametrize('make_fake, exc_type', [
    pytest.param(lambda real: half_write_then_interrupt(real), KeyboardInterrupt, id='half-written-then-KeyboardInterrupt'),
    pytest.param(lambda real: raise_inside(OSError(28, 'No space left on device')), OSError, id='OSError-before-writing'),
])
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, make_fake, exc_type):
    learn = trained_two_norms()
    path = learn.save(tmp_path/'model.pth')
    good_bytes, good_state = path.read_bytes(), full_state(learn)
    learn.fit(1)                                                       # the next save would differ
    assert not torch.equal(learn.model.body[0].weight, good_state['model']['body.0.weight'])

    with monkeypatch.context() as m:
        m.setattr(torch, 'save', make_fake(torch.save))
        with pytest.raises(exc_type): learn.save(path)

    assert sorted(os.listdir(tmp_path)) == ['model.pth']               # no temporary file left behind
    assert path.read_bytes() == good_bytes
    fresh = trained_two_norms(seed=3).load(path)
    loaded = full_state(fresh); loaded['training'] = good_state['training']
    assert_state_equal(loaded, good_state)


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    learn = trained_two_norms()
    monkeypatch.setattr(torch, 'save', half_write_then_interrupt(torch.save))
    with pytest.raises(KeyboardInterrupt): learn.save(tmp_path/'model.pth')
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- 6. Hook and Hooks
def three_layers(): return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_hooks_are_removed_on_normal_exit():
    model, seen = three_layers(), []
    with Hooks(list(model), lambda hook, m, i, o: seen.append(type(m).__name__)) as hooks:
        assert n_forward_hooks(model) == 3
        model(torch.randn(2, 4))
    assert seen == ['Linear', 'ReLU', 'Linear']
    assert n_forward_hooks(model) == 0 and all(h.removed for h in hooks)
    model(torch.randn(2, 4))
    assert len(seen) == 3                                              # removed hooks are not called


def test_hooks_are_removed_on_an_exception():
    model = three_layers()
    with pytest.raises(ZeroDivisionError):
        with Hooks(list(model), lambda *args: None):
            assert n_forward_hooks(model) == 3
            1 / 0
    assert n_forward_hooks(model) == 0


def test_hooks_are_removed_on_garbage_collection():
    model = three_layers()
    hooks = Hooks(list(model), lambda *args: None)
    single = Hook(model[0], lambda *args: None)
    assert n_forward_hooks(model) == 4
    del hooks, single
    gc.collect()
    assert n_forward_hooks(model) == 0


def test_hook_used_after_removal_raises_clearly():
    model = three_layers()
    hook = Hook(model[1], lambda *args: None)
    hook.check_attached()                                              # fine while attached
    hook.remove(); hook.remove()                                       # removing twice is allowed
    with pytest.raises(HookRemovedError, match=r'Hook on ReLU was removed') as info: hook.check_attached()
    assert isinstance(info.value, RuntimeError)


# ---------------------------------------------------------------- 7. 50 fits with ActivationStats
def rss_bytes():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


@pytest.mark.skipif(not os.path.exists('/proc/self/statm'), reason='needs Linux /proc')
def test_fifty_fits_with_activation_stats_leak_nothing():
    """50 fits with a fresh `ActivationStats` each: no hook left on the model after any fit; no fit's
    callback kept alive (a weakref check, which catches a leaked callback with its `Hooks`, closures and
    statistics however small); and the resident set size (from /proc/self/statm) grows by less than 8 MB
    between fit 10 and fit 60. Measured growth is ~0.1 MB; 8 MB over 50 fits flags a per-fit leak of 160 kB
    or more (for scale: all the activations of one fit come to about 90 kB, the training set to 12 kB), so
    the RSS bound catches bulk leaks and the weakref check the small ones."""
    set_seed(0)
    model = tiny_cnn()
    learn = Learner(model, tiny_dls(), cross_entropy, lr=0.1, default_cbs=False,
                    cbs=BatchTransformXCallback(view_tfm(1, SIDE, SIDE)))
    layers, batches_per_fit = 2, 2 * 3
    refs = []
    def one_fit(every=1):
        stats = ActivationStats(every=every)
        learn.fit(2, cbs=stats)
        assert n_forward_hooks(model) == 0
        assert stats.n_recorded == -(-batches_per_fit // every)
        assert stats.stats.numel() <= layers * stats.n_recorded * (stats.bins + 5)  # + sums, count, below and above the range
        assert torch.isfinite(stats.means).all() and (stats.hists.sum(-1) > 0).all()
        refs.append(weakref.ref(stats))
    for _ in range(10): one_fit()
    gc.collect(); start = rss_bytes()
    for i in range(50): one_fit(every=1 + i % 3)
    gc.collect(); growth = rss_bytes() - start
    assert growth < 8 * 2**20, f'RSS grew by {growth / 2**20:.1f} MB over 50 fits'
    assert sum(r() is not None for r in refs) == 0                     # no fit's ActivationStats is kept alive
    assert n_forward_hooks(model) == 0


def test_activation_stats_attached_to_the_learner_leaves_no_hook():
    model = tiny_cnn()
    stats = ActivationStats()
    learn = Learner(model, tiny_dls(), cross_entropy, lr=0.1, default_cbs=False,
                    cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), stats])
    for _ in range(3):
        learn.fit(1)
        assert n_forward_hooks(model) == 0 and stats.n_recorded == 3


HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')


@contextlib.contextmanager
def counting_host_reads():
    "Count calls of the tensor methods that copy a value to the host (a sync on a GPU) inside the `with` block."
    counts = collections.Counter()
    with pytest.MonkeyPatch.context() as patcher:
        for name in HOST_READS:
            def counted(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)
            patcher.setattr(torch.Tensor, name, counted)
        yield counts


def test_no_host_read_per_batch_with_activation_stats():
    """The CPU stand-in for "no host sync per batch" (issue #5; the count with `torch.cuda.set_sync_debug_mode`
    needs a GPU): a fit with the default callbacks, a one-cycle schedule, RunningBatchNorm and ActivationStats,
    with `nonfinite='ignore'` (the one documented per-batch read is the non-finite check), reads values back to
    the host as often with 12 training batches per epoch as with 3: only at the ends of epochs and of the fit.
    The loss is `F.cross_entropy`: minifast's `cross_entropy` checks the labels' range, which reads them, but only
    when they are on the CPU (no device is involved then)."""
    def host_reads(n_train):
        set_seed(0)
        learn = Learner(tiny_cnn(RunningBatchNorm), tiny_dls(n_train=n_train), F.cross_entropy, lr=0.1, nonfinite='ignore',
                        cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), ActivationStats(), *one_cycle(0.1)])
        learn.metrics.printer = None
        with counting_host_reads() as counts: learn.fit(2)
        assert len(learn.dls.train) == n_train // 16
        return counts
    few, many = host_reads(48), host_reads(192)
    assert sum(few.values()) > 0          # the counting works: the epochs' metrics are read back
    assert many == few, (few, many)
    learn = Learner(tiny_cnn(), tiny_dls(), F.cross_entropy, lr=0.1,   # with the default check: a read per batch
                    cbs=BatchTransformXCallback(view_tfm(1, SIDE, SIDE)))
    with counting_host_reads() as counts: learn.fit(1)
    assert counts['item'] >= len(learn.dls.train)


def test_no_host_read_per_batch_with_gradient_and_update_stats():
    """As above, with GradientStats (its tensor hooks) and UpdateStats (norms and copies of every parameter) recording
    every batch, and with every third batch: the host reads the same as often with 12 training batches per epoch as with 3."""
    from minifast.gradients import GradientStats, UpdateStats
    def host_reads(n_train, every):
        set_seed(0)
        grads, updates = GradientStats(every=every), UpdateStats(every=every)
        learn = Learner(tiny_cnn(RunningBatchNorm), tiny_dls(n_train=n_train), F.cross_entropy, lr=0.1, nonfinite='ignore',
                        cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), ActivationStats(), grads, updates, *one_cycle(0.1)])
        learn.metrics.printer = None
        with counting_host_reads() as counts: learn.fit(2)
        assert grads.n_recorded == updates.n_recorded == -(-2 * (n_train // 16) // every)
        return counts
    for every in (1, 3):
        few, many = host_reads(48, every), host_reads(192, every)
        assert sum(few.values()) > 0
        assert many == few, (every, few, many)


# ---------------------------------------------------------------- 8. lr_find puts everything back
class Spy(Callback):
    "Checks, at the end of the finder's fit (before `lr_find` restores), that the run changed the model."
    _order = 50
    def __init__(self, before): self.before, self.changed = before, None
    def after_fit(self):
        now = self.learn.model.state_dict()
        self.changed = any(not torch.equal(now[k], self.before[k]) for k in self.before if isinstance(now[k], torch.Tensor))


class PoisonAtIter(Callback):
    "Makes the training loss NaN at batch `at` of the run; runs before the finder's after_loss."
    _order = 0
    def __init__(self, at): self.at = at
    def after_loss(self):
        if self.learn.in_train and self.learn.n_iter == self.at: self.learn.loss = self.learn.loss * float('nan')


class InterruptAtIter(Callback):
    def __init__(self, at): self.at = at
    def after_step(self):
        if self.learn.n_iter == self.at: raise KeyboardInterrupt()


def lr_find_learner():
    learn = trained_two_norms()           # momentum buffers, running stats and RunningBatchNorm counters all non-trivial
    learn.model.eval()                    # a mode that lr_find's training must not leave behind
    return learn


@pytest.mark.parametrize('case', ['diverges', 'max_iter', 'nan_loss', 'keyboard_interrupt'])
def test_lr_find_restores_everything(case):
    learn = lr_find_learner()
    before = full_state(learn)
    cbs_before = list(learn.cbs)
    spy = Spy(before['model'])
    extra = {'nan_loss': [PoisonAtIter(at=2)], 'keyboard_interrupt': [InterruptAtIter(at=2)]}.get(case, [])
    learn.add_cbs([spy] + extra)
    kwargs = dict(diverges=dict(min_lr=1e-2, max_lr=1e6, max_iter=12), max_iter=dict(min_lr=1e-4, max_lr=1e-2, max_iter=4),
                  nan_loss=dict(max_iter=12), keyboard_interrupt=dict(max_iter=12))[case]
    if case == 'keyboard_interrupt':
        with pytest.raises(KeyboardInterrupt): lr_find(learn, **kwargs)
    else:
        result = lr_find(learn, **kwargs)
        if case == 'max_iter': assert len(result.losses) == 4 and not result.stopped_early
        else: assert result.stopped_early and len(result.losses) < 12
        if case == 'nan_loss': assert len(result.losses) == 3 and result.losses[-1] != result.losses[-1]
    assert spy.changed                                          # the run did change the weights...
    assert_state_equal(full_state(learn), before)               # ...and lr_find put back every bit
    learn.remove_cbs([spy] + extra)
    assert learn.cbs == cbs_before and not any(isinstance(cb, LRFinder) for cb in learn.cbs)


# ---------------------------------------------------------------- 9. norm layers: errors, tiny batches, precision
NORMS = {'BatchNorm': BatchNorm, 'LayerNorm': LayerNorm, 'InstanceNorm': InstanceNorm,
         'GroupNorm': partial(GroupNorm, 2), 'RunningBatchNorm': RunningBatchNorm}


@pytest.mark.parametrize('name', NORMS)
def test_channel_mismatch_names_expected_and_actual(name):
    layer = NORMS[name](6)
    with pytest.raises(ValueError) as info: layer(torch.randn(2, 5, 3, 3))
    msg = str(info.value)
    assert name in msg and '6 channels' in msg and 'with 5' in msg, msg


@pytest.mark.parametrize('name', NORMS)
@pytest.mark.parametrize('shape', [(4, 6), (4, 6, 3), (2, 6, 3, 3, 3)])
def test_non_4d_input_is_a_clear_error(name, shape):
    with pytest.raises(ValueError, match=r'expects a 4D input .*got shape ' + re_shape(shape)): NORMS[name](6)(torch.randn(*shape))


def re_shape(shape): return r'\(' + r', '.join(map(str, shape)) + r'\)'


def test_layer_norm_without_channel_count_accepts_any():
    assert LayerNorm()(torch.randn(2, 5, 3, 3)).shape == (2, 5, 3, 3)


def test_group_norm_needs_equal_groups():
    with pytest.raises(ValueError, match='6 channels cannot be split into 4'): GroupNorm(4, 6)


def test_batch_norm_in_training_needs_more_than_one_value_per_channel():
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match='more than 1 value per channel'): bn(torch.randn(1, 3, 1, 1))
    assert torch.equal(bn.means, torch.zeros(3))              # the failed call changed no statistics
    assert bn(torch.randn(2, 3, 1, 1)).shape == (2, 3, 1, 1)  # two values are enough
    bn.eval()
    assert torch.isfinite(bn(torch.randn(1, 3, 1, 1))).all()  # and in eval mode one is fine


@pytest.mark.parametrize('shape', [(1, 3, 4, 4), (1, 3, 1, 1)])
def test_running_batch_norm_at_batch_size_one_is_finite(shape):
    torch.manual_seed(0)
    rbn = RunningBatchNorm(3)
    for step in range(30):                                     # through the warm-up and past it
        x = torch.randn(*shape, requires_grad=True)
        out = rbn(x); out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), step
    rbn.eval()
    assert torch.isfinite(rbn(torch.randn(*shape))).all()


@pytest.mark.parametrize('value', [0., 1., -3., 1e3, 1e-20])
@pytest.mark.parametrize('batch_size', [1, 2, 16])
def test_running_batch_norm_on_constant_input_is_finite(value, batch_size):
    rbn = RunningBatchNorm(3)
    x = torch.full((batch_size, 3, 4, 4), value)
    for step in range(30):
        out = rbn(x)
        assert torch.isfinite(out).all(), (step, out)
        assert out.abs().max() <= 1e3                         # constant in, bounded out: no 1/sqrt(tiny) blow-up
    rbn.eval()
    assert torch.isfinite(rbn(x)).all()


def test_compiled_running_batch_norm_matches_the_default_at_batch_size_one():
    "A batch of one compiles its own kernel: outputs, every gradient and the running averages, through the warm-up and past it."
    torch.manual_seed(0)
    ours, compiled = RunningBatchNorm(3), RunningBatchNorm(3, compiled=True)
    for step in range(25):
        x = torch.randn(1, 3, 4, 4) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out1, out2 = ours(x1), compiled(x2)
        weights = torch.randn_like(out1)
        (out1 * weights).sum().backward(); (out2 * weights).sum().backward()
        for a, b in [(out2, out1), (x2.grad, x1.grad), (compiled.mults.grad, ours.mults.grad),
                     (compiled.adds.grad, ours.adds.grad), (compiled.running, ours.running)]:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f'step {step}: {m}')


@pytest.mark.parametrize('value', [0., 1e3])
def test_compiled_running_batch_norm_on_constant_input_is_finite(value):
    compiled = RunningBatchNorm(3, compiled=True)
    x = torch.full((16, 3, 4, 4), value, requires_grad=True)
    for step in range(25):
        out = compiled(x); out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), step
        assert out.abs().max() <= 1e3, step                   # constant in, bounded out


@pytest.mark.parametrize('cast_layer', [False, True], ids=['float32-layer', 'half-layer'])
def test_compiled_running_batch_norm_in_half_precision(cast_layer):
    torch.manual_seed(0)
    x32 = torch.randn(16, 3, 4, 4) * 3 + 2
    reference = RunningBatchNorm(3)(x32)
    compiled = RunningBatchNorm(3, compiled=True)
    if cast_layer: compiled = compiled.half()
    out = compiled(x32.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=0)
    assert compiled.running.dtype == (torch.float16 if cast_layer else torch.float32)


def test_compiled_running_batch_norm_names_itself_when_compiling_fails(monkeypatch):
    import minifast.norms as norms_module
    def no_compiler(*args): raise RuntimeError('no C++ compiler found')
    monkeypatch.setattr(norms_module, '_compiled_step', no_compiler)
    with pytest.raises(RuntimeError, match='no C\\+\\+ compiler') as info:
        RunningBatchNorm(3, compiled=True)(torch.randn(4, 3, 2, 2))
    assert any('compiled=True' in note and 'compiled=False' in note for note in info.value.__notes__)


def test_running_batch_norm_in_eval_before_training_is_a_clear_error():
    with pytest.raises(RuntimeError, match='no statistics yet'): RunningBatchNorm(3).eval()(torch.randn(2, 3, 2, 2))


# Half precision. Tolerances are absolute, on outputs of order 1 (inputs ~ N(2, 3^2), unit mults):
# float16 has an 11-bit significand (unit roundoff 4.9e-4), bfloat16 an 8-bit one (3.9e-3); outputs
# reach about 4, and the statistics are themselves rounded, hence 2e-2 and 1e-1.
HALF_TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def half_case(name, dtype, cast_layer, x32, eval_too=False):
    """The layer's float32 output on `x32` rounded to `dtype`, and its output on the `dtype` input; with
    `eval_too`, both layers then also run in eval mode (running statistics) and the outputs are concatenated."""
    torch.manual_seed(0)
    layer = NORMS[name](8)
    with torch.no_grad():
        for p in layer.parameters(): p.uniform_(0.5, 1.5)
    x = x32.to(dtype)
    reference = copy.deepcopy(layer)
    low = copy.deepcopy(layer).to(dtype) if cast_layer else copy.deepcopy(layer)
    ref, out = reference(x.float()), low(x)
    if eval_too:
        reference.eval(); low.eval()
        ref, out = torch.cat([ref, reference(x.float())]), torch.cat([out, low(x)])
    return ref, out


@pytest.mark.parametrize('dtype', HALF_TOL, ids=str)
@pytest.mark.parametrize('cast_layer', [False, True], ids=['float32-layer', 'layer-cast-too'])
@pytest.mark.parametrize('name', NORMS)
def test_half_precision_inputs_work_within_tolerance(name, dtype, cast_layer):
    torch.manual_seed(1)
    ref, out = half_case(name, dtype, cast_layer, torch.randn(16, 8, 5, 5) * 3 + 2, eval_too=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=HALF_TOL[dtype])


@pytest.mark.parametrize('dtype', HALF_TOL, ids=str)
@pytest.mark.parametrize('cast_layer', [False, True], ids=['float32-layer', 'layer-cast-too'])
@pytest.mark.parametrize('name', NORMS)
def test_half_precision_output_keeps_the_input_dtype(name, dtype, cast_layer, request):
    _, out = half_case(name, dtype, cast_layer, torch.randn(4, 8, 3, 3))
    assert out.dtype == dtype


@pytest.mark.parametrize('name', NORMS)
def test_float16_inputs_with_a_large_spread_are_normalised(name):
    "std 300: float16 holds these values (max 65504), and torch's own norm layers normalise them correctly."
    torch.manual_seed(2)
    ref, out = half_case(name, torch.float16, False, torch.randn(16, 8, 5, 5) * 300)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=HALF_TOL[torch.float16])


def test_torch_batch_norm_handles_the_same_float16_input():
    "The reference for the test above: nn.BatchNorm2d normalises the same float16 values in float32."
    torch.manual_seed(2)
    x = (torch.randn(16, 8, 5, 5) * 300).half()
    out = nn.BatchNorm2d(8)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), nn.BatchNorm2d(8)(x.float()), rtol=0, atol=HALF_TOL[torch.float16])


def test_running_batch_norm_float16_moderate_batch():
    torch.manual_seed(3)
    x32 = torch.randn(16, 8, 8, 8) * 10
    for name in ('BatchNorm', 'LayerNorm', 'InstanceNorm', 'GroupNorm'):   # the others cope with this input
        ref, out = half_case(name, torch.float16, False, x32)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=HALF_TOL[torch.float16])
    ref, out = half_case('RunningBatchNorm', torch.float16, False, x32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=HALF_TOL[torch.float16])


# ---------------------------------------------------------------- edges found by a bug hunt (2026-12-07)
def test_a_model_without_parameters_resumes(tmp_path):
    "A model with only a buffer, its optimiser training a tensor of the loss's: resuming once raised a bare StopIteration."
    from minifast.learner import SaveCheckpoint
    class Scale(nn.Module):
        def __init__(self): super().__init__(); self.register_buffer('by', torch.tensor(2.))
        def forward(self, x): return x[:, :N_CLASSES] * self.by
    extra = torch.zeros(1, requires_grad=True)
    def learner(path):
        learn = Learner(Scale(), tiny_dls(), lambda pred, yb: cross_entropy(pred, yb) + 0 * extra.sum(), lr=0.1,
                        opt_func=lambda params, lr: torch.optim.SGD([extra], lr=lr), cbs=[SaveCheckpoint(path)])
        learn.metrics.printer = None
        return learn
    done = learner(tmp_path / 'a.pth').fit(1)
    again = learner(tmp_path / 'b.pth').fit(1, resume_from=tmp_path / 'a.pth')
    assert again.metrics.history == done.metrics.history


def test_lr_finder_runs_on_a_negative_loss():
    "A loss below zero (a log-likelihood, say): the finder once stopped at its second batch, 10 × a negative best being far below it."
    set_seed(0)
    learn = Learner(tiny_cnn(), tiny_dls(), lambda pred, yb: cross_entropy(pred, yb) - 5., cbs=[BatchTransformXCallback(view_tfm(1, SIDE, SIDE))])
    found = lr_find(learn, min_lr=1e-7, max_lr=1e-5, max_iter=12)   # lrs too small to move the loss: no reason to stop
    assert len(found.losses) == 12 and not found.stopped_early and max(found.losses) < 0
