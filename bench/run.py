"""minifast's benchmark suite. `make bench` runs it in full; `python bench/run.py --quick` is a smoke run.

Every speed figure is a ratio of epoch times, measured interleaved in one process. In round r each arm
trains one epoch (a training pass, then a validation pass under no_grad) from the same initial weights
over the same batches, made once before the first round; the order of the arms rotates from round to
round (with two arms: A then B, then B then A). A figure is the median over rounds of
arm seconds / reference seconds in the same round, so a slow spell on a busy machine hits both.

A full run writes bench/RESULTS.md and bench/results.png (committed); other runs (--quick, --only)
write to bench/out/ (ignored by git) unless --out says otherwise. Raw data: results.json beside them.
"""
import argparse, datetime, gc, json, math, os, platform, signal, statistics, subprocess, sys, tempfile, time, weakref
from functools import partial
from pathlib import Path

os.environ['MINIFAST_PROGRESS'] = '0'  # the same callbacks however we are launched: no progress bar
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from minifast.data import DataLoader, load_fashion_mnist, normalize_to_train
from minifast.foundations import set_seed
from minifast.hooks import ActivationStats, BatchTransformXCallback, DeviceCallback, default_device, view_tfm
from minifast.gradients import GradientStats, UpdateStats
from minifast.learner import Callback, Learner
from minifast.losses import accuracy
from minifast.norms import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RunningBatchNorm, get_norm_cnn

import report
from lesson_rbn import LessonRunningBatchNorm

BENCH = Path(__file__).resolve().parent
THREADS = 2
NFS = (8, 16, 32, 32)  # the lesson's CNN; `get_norm_cnn` adds GeneralRelu(0.1, 0.4, 6) and Kaiming init (leak 0.1)
LR = {512: 0.1, 32: 0.1, 2: 0.01}  # plain SGD; speed does not depend on it, but a NaN would stop the Learner
DEVICE = default_device()

# Batches per epoch, per batch size: (training batches, validation batches); None is the whole set.
# Validation batches are twice the training batch size, as `DataLoaders.from_tensors` makes them.
SIZES = {
    'full':  {512: (None, None), 32: (800, 80), 2: (1000, 500)},   # at batch size 2, validation as large as training
    'quick': {512: (8, 2), 32: (60, 10), 2: (100, 50)},
}
ROUNDS = {'full': 7, 'quick': 5}
MEMORY_FITS = {'full': 6, 'quick': 4}

NORMS = {
    'nn.BatchNorm2d': nn.BatchNorm2d,
    'BatchNorm': BatchNorm,
    'LayerNorm': LayerNorm,
    'GroupNorm(4)': partial(GroupNorm, 4),
    'InstanceNorm': InstanceNorm,
    'RunningBatchNorm': RunningBatchNorm,
}

# The loop measure's targets (2% and 3%) are finer than this machine's spread from one epoch to the next, so its rounds
# are slices of the epoch: the batches are cut into this many consecutive slices, and in each round every arm runs a
# one-epoch fit over the round's slice. The arms then run seconds apart, not half a minute, and there are as many times
# more rounds, so each batch is still trained `rounds` times per arm.
LOOP_SLICES = {512: 7, 32: 8}

# Learner.fit at batch size 32 with less of what the hand-written loop does not do: the training metrics
LOOP_LOSS_ONLY, LOOP_NO_METRICS = 'Learner.fit, loss only', 'Learner.fit, no MetricsCallback'

# RunningBatchNorm training through torch.compile: measured next to the default, as the notebook's opt-in
RBN_COMPILED = 'RunningBatchNorm(compiled=True)'
# The 2019 lesson's RunningBatchNorm (bench/lesson_rbn.py): ours must never be slower than it
LESSON_RBN = "course-v3 RunningBatchNorm"

# Targets from the issue: (measure, arm, batch size) -> the most the median ratio may be.
TARGETS = {('loop', 'Learner.fit', 512): 1.02, ('loop', 'Learner.fit', 32): 1.03,
           ('stats', 'with ActivationStats', 512): 1.10, ('stats', 'with ActivationStats', 32): 1.10,
           ('rbn', 'RunningBatchNorm', 512): 1.05, ('rbn', 'RunningBatchNorm', 2): 1.25,
           ('rbn', RBN_COMPILED, 512): 1.05,
           ('grads', 'with GradientStats', 512): 1.10, ('grads', 'with GradientStats', 32): 1.15,
           ('grads', 'with UpdateStats', 512): 1.05, ('grads', 'with UpdateStats', 32): 1.10}
DDP_ARM, DDP_REFERENCE = '2 processes × 1 thread', '1 process × 2 threads'
TARGETS[('ddp', DDP_ARM, 512)] = 1.25   # at least 0.8 of the single process's samples per second
DDP_BATCHES = {'full': 96, 'quick': 4}   # training batches of 512 per epoch in the ddp measure
for _norm in ('BatchNorm', 'LayerNorm', 'GroupNorm(4)', 'InstanceNorm'):
    for _bs in (512, 32): TARGETS[('norms', _norm, _bs)] = 1.10
for _bs in (512, 32, 2): TARGETS[('lesson', 'RunningBatchNorm', _bs)] = 1.00   # never slower than the lesson's
# The layers alone (measure 'layer'): RunningBatchNorm in eval mode no dearer than nn.BatchNorm2d's eval mode; a training
# step (forward and backward) at batch size 2 at most twice nn.BatchNorm2d's
RBN_EVAL, RBN_STEP = 'RunningBatchNorm, eval mode', 'RunningBatchNorm, training step'
for _bs in (4, 64, 1024): TARGETS[('layer', RBN_EVAL, _bs)] = 1.00
TARGETS[('layer', RBN_STEP, 2)] = 2.00


# --- data -----------------------------------------------------------------------------------------
class Batches:
    "Training and validation batches made once, as lists: a `Learner` takes it as `dls`, the hand loop iterates it."
    def __init__(self, train, valid): self.train, self.valid = train, valid
    def head(self, n_train, n_valid): return Batches(self.train[:n_train], self.valid[:n_valid])
    def slice(self, i, n_slices):
        "The `i`-th of `n_slices` consecutive slices of the training and of the validation batches."
        part = lambda b: b[i * len(b) // n_slices:(i + 1) * len(b) // n_slices]
        return Batches(part(self.train), part(self.valid))
    def describe(self):
        n_train, n_valid = sum(len(y) for _, y in self.train), sum(len(y) for _, y in self.valid)
        return f'{len(self.train)}+{len(self.valid)} batches ({n_train:,}+{n_valid:,} images)'


def load_data():
    "Fashion-MNIST, 50,000 training and 10,000 validation images, normalised with the training set's statistics."
    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    return x_train, y_train, x_valid, y_valid


def make_batches(data, batch_size, n_train=None, n_valid=None, seed=0):
    "The first `n_train` shuffled training batches and `n_valid` validation batches, by minifast's `DataLoader`."
    x_train, y_train, x_valid, y_valid = data
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(x_train, y_train, batch_size, shuffle=True, generator=generator)
    valid = DataLoader(x_valid, y_valid, 2 * batch_size)
    take = lambda dl, n: [b for _, b in zip(range(len(dl) if n is None else n), dl)]
    return Batches(take(train, n_train), take(valid, n_valid))


# --- the arms: each is `prepare(batches) -> run`, where `run()` trains one epoch and returns the valid loss --
def fresh_model(norm=None):
    "The lesson's CNN with `norm` after each conv, always from the same initial weights."
    set_seed(0)
    return get_norm_cnn(norm, nfs=NFS)


class PhaseTimer(Callback):
    "The seconds of the training pass and of the validation pass of the last epoch: two clock reads per pass."
    _order = -100
    def before_epoch(self): self.start = time.perf_counter()
    def before_validate(self): self.train_s, self.start = time.perf_counter() - self.start, time.perf_counter()
    def after_epoch(self): self.valid_s = time.perf_counter() - self.start


def learner_arm(batch_size, norm=None, extra_cbs=list, metrics=accuracy, default_cbs=True):
    "`Learner.fit(1)` with its default callbacks, plus what the CNN needs and `extra_cbs()`; the valid loss is NaN without `MetricsCallback`."
    def prepare(batches):
        timer = PhaseTimer()
        learn = Learner(fresh_model(norm), batches, F.cross_entropy, lr=LR[batch_size], metrics=metrics, default_cbs=default_cbs,
                        cbs=[DeviceCallback(DEVICE), BatchTransformXCallback(view_tfm(1, 28, 28)), timer, *extra_cbs()])
        if default_cbs: learn.metrics.printer = None  # the history is still kept; we only skip two print() calls
        def run():
            learn.fit(1)
            return learn.metrics.history[-1]['valid_loss'] if default_cbs else math.nan, (timer.train_s, timer.valid_s)
        return run
    return prepare


def hand_written_epoch(model, opt, batches):
    "A plain PyTorch epoch: the training loop, then validation loss and accuracy summed on the device; (loss, pass seconds)."
    start = time.perf_counter()
    model.train()
    for xb, yb in batches.train:
        xb, yb = xb.to(DEVICE, non_blocking=True), yb.to(DEVICE, non_blocking=True)
        pred = model(xb.view(-1, 1, 28, 28))
        loss = F.cross_entropy(pred, yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
    train_s, start = time.perf_counter() - start, time.perf_counter()
    model.eval()
    with torch.no_grad():
        loss_sum, correct, count = torch.zeros((), device=DEVICE), torch.zeros((), device=DEVICE), 0
        for xb, yb in batches.valid:
            xb, yb = xb.to(DEVICE, non_blocking=True), yb.to(DEVICE, non_blocking=True)
            pred = model(xb.view(-1, 1, 28, 28))
            loss_sum += F.cross_entropy(pred, yb) * len(yb)
            correct += (pred.argmax(dim=1) == yb).float().sum()
            count += len(yb)
    loss = (loss_sum / count).item()
    return loss, (train_s, time.perf_counter() - start)


def loop_arm(batch_size):
    def prepare(batches):
        model = fresh_model().to(DEVICE)
        opt = torch.optim.SGD(model.parameters(), lr=LR[batch_size])
        return lambda: hand_written_epoch(model, opt, batches)
    return prepare


# --- timing ---------------------------------------------------------------------------------------
def interleave(arms, batches, rounds, log, slices=1):
    """Time one epoch of each arm per round, in an order that rotates each round; seconds and valid losses per arm.
    With `slices` > 1 there are `rounds * slices` rounds, and round r's epoch is the batches' slice r % slices."""
    names = list(arms)
    warm = batches.head(3, 1)
    first_s = {}
    for name in names:  # untimed: first calls allocate, pick kernels and, for compiled arms, compile
        start = time.perf_counter(); arms[name](warm)(); first_s[name] = time.perf_counter() - start
    seconds, losses, phases = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
    for r in range(rounds * slices):
        shift = (r // slices + r % slices) % len(names)   # each slice meets the arms in another order on each pass
        part = batches if slices == 1 else batches.slice(r % slices, slices)
        for name in names[shift:] + names[:shift]:
            run = arms[name](part)
            gc.collect()
            start = time.perf_counter()
            loss, train_valid_s = run()
            seconds[name].append(time.perf_counter() - start)
            losses[name].append(loss)
            phases[name].append(train_valid_s)
        log(f'    round {r + 1}/{rounds * slices}: ' + ', '.join(f'{n} {seconds[n][-1]:.2f}s' for n in names))
    return seconds, losses, first_s, phases


def ratio_row(measure, arm, reference, batch_size, batches, seconds, ref_seconds, log, **extra):
    "A comparison: the per-round ratios of `seconds` to `ref_seconds`, their median, and the target if there is one."
    ratios = [a / b for a, b in zip(seconds, ref_seconds)]
    row = dict(measure=measure, arm=arm, reference=reference, batch_size=batch_size, batches=batches, rounds=len(ratios),
               ratios=ratios, median=statistics.median(ratios), seconds=seconds, ref_seconds=ref_seconds,
               target=TARGETS.get((measure, arm, batch_size)), note='', **extra)
    log(f'    -> {arm} / {reference}: median {row["median"]:.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f})')
    return row


def compare(measure, batch_size, arms, reference, batches, rounds, log, passes=False, slices=1):
    "Interleave `arms` and turn the seconds into one comparison per arm against `reference` (and per pass if `passes`)."
    described = batches.describe() + ('' if slices == 1 else f', timed as {slices} slices of about '
                                      f'{len(batches.train) // slices}+{max(1, len(batches.valid) // slices)} batches')
    log(f'  {measure} at batch size {batch_size}: {", ".join(arms)} ({described}, {rounds * slices} rounds)')
    seconds, losses, first_s, phases = interleave(arms, batches, rounds, log, slices)
    rows = []
    for name in arms:
        if name == reference: continue
        rows.append(ratio_row(measure, name, reference, batch_size, described, seconds[name], seconds[reference], log,
                              losses=losses[name], ref_losses=losses[reference], warmup_s=first_s[name],
                              ref_warmup_s=first_s[reference], phases=phases[name], ref_phases=phases[reference]))
        if passes:
            for i, what in enumerate(('training pass', 'validation pass')):
                rows.append(ratio_row(measure, f'{name}: {what}', f'{reference}: {what}', batch_size, described,
                                      [p[i] for p in phases[name]], [p[i] for p in phases[reference]], log,
                                      losses=losses[name], ref_losses=losses[reference], pass_of=name))
    return rows


def compare_at(measure, reference, make_arms, data, sizes, rounds, log, batch_sizes=(512, 32), passes=False, slices=None):
    "`compare` the arms `make_arms(batch_size)` against `reference` at each of `batch_sizes`; `slices`: {batch size: slices}."
    rows = []
    for bs in batch_sizes:
        batches = make_batches(data, bs, *sizes[bs])
        n_slices = min((slices or {}).get(bs, 1), len(batches.train), len(batches.valid))   # a quick run has few batches
        rows += compare(measure, bs, make_arms(bs), reference, batches, rounds, log, passes, n_slices)
    return rows


def measure_loop(data, sizes, rounds, log):
    """1. `Learner.fit` against a hand-written loop over the same batches; at batch size 32 also without the accuracy metric
    (`MetricsCallback` averages the loss alone) and without `MetricsCallback`, to say where the difference goes."""
    arms = lambda bs: {'hand-written loop': loop_arm(bs), 'Learner.fit': learner_arm(bs),
                       **({LOOP_LOSS_ONLY: learner_arm(bs, metrics=None), LOOP_NO_METRICS: learner_arm(bs, metrics=None, default_cbs=False)}
                          if bs == 32 else {})}
    return compare_at('loop', 'hand-written loop', arms, data, sizes, rounds, log, slices=LOOP_SLICES)


def measure_stats(data, sizes, rounds, log):
    """2. The same `Learner.fit` with and without `ActivationStats` on every GeneralRelu, every training batch;
    also with every activation counted in the histograms (`hist_sample=None`), for comparison."""
    arms = lambda bs: {'without': learner_arm(bs),
                       'with ActivationStats': learner_arm(bs, extra_cbs=lambda: [ActivationStats()]),
                       'with ActivationStats(hist_sample=None)': learner_arm(bs, extra_cbs=lambda: [ActivationStats(hist_sample=None)])}
    return compare_at('stats', 'without', arms, data, sizes, rounds, log)


def measure_grads(data, sizes, rounds, log):
    """7. The same `Learner.fit` with and without `GradientStats` (every GeneralRelu) and `UpdateStats` (every
    parameter tensor), each recording every training batch."""
    arms = lambda bs: {'without': learner_arm(bs),
                       'with GradientStats': learner_arm(bs, extra_cbs=lambda: [GradientStats()]),
                       'with UpdateStats': learner_arm(bs, extra_cbs=lambda: [UpdateStats()])}
    return compare_at('grads', 'without', arms, data, sizes, rounds, log)


def against_lesson(rows, log):
    "From the same rounds: RunningBatchNorm's epoch against the 2019 lesson's, per batch size."
    out = []
    for bs in sorted({r['batch_size'] for r in rows}, reverse=True):
        ours = next(r for r in rows if r['arm'] == 'RunningBatchNorm' and r['batch_size'] == bs)
        lesson = next(r for r in rows if r['arm'] == LESSON_RBN and r['batch_size'] == bs)
        out.append(ratio_row('lesson', 'RunningBatchNorm', LESSON_RBN, bs, ours['batches'], ours['seconds'], lesson['seconds'],
                             log, losses=ours['losses'], ref_losses=lesson['losses']))
    return out


def measure_norms(data, sizes, rounds, log):
    """3 and 4. Each norm layer, RunningBatchNorm (as it is and compiled) and the lesson's RunningBatchNorm against
    nn.BatchNorm2d in the same CNN; at batch size 2 with the training and validation passes apart."""
    norms = {**NORMS, RBN_COMPILED: partial(RunningBatchNorm, compiled=True), LESSON_RBN: LessonRunningBatchNorm}
    rows = compare_at('norms', 'nn.BatchNorm2d', lambda bs: {name: learner_arm(bs, norm) for name, norm in norms.items()},
                      data, sizes, rounds, log)
    for row in rows:
        if row['arm'].startswith('RunningBatchNorm') or row['arm'] == LESSON_RBN:
            row['measure'], row['target'] = 'rbn', TARGETS.get(('rbn', row['arm'], row['batch_size']))
    rbn_arms = lambda bs: {name: learner_arm(bs, norms[name]) for name in ('nn.BatchNorm2d', 'RunningBatchNorm', RBN_COMPILED, LESSON_RBN)}
    rows += compare_at('rbn', 'nn.BatchNorm2d', rbn_arms, data, sizes, rounds, log, batch_sizes=(2,), passes=True)
    return rows + against_lesson([r for r in rows if 'pass_of' not in r], log)


# --- the layers alone -----------------------------------------------------------------------------
LAYER_SHAPES = [(8, 14, 14), (16, 7, 7), (32, 4, 4), (32, 2, 2)]   # what the bench CNN's four norm layers see


def layer_arm(norm, batch_size, train):
    "The four norm layers of the bench CNN on inputs of their shapes: one call runs each once (eval: under no_grad)."
    set_seed(0)
    layers = [norm(c) for c, _, _ in LAYER_SHAPES]
    inputs = [torch.randn(batch_size, *shape) * 2 + 1 for shape in LAYER_SHAPES]
    for layer, x in zip(layers, inputs):                 # statistics first, as after some training
        for _ in range(30): layer(x)
    if train:
        inputs = [x.requires_grad_() for x in inputs]
        grads = [torch.randn_like(x) for x in inputs]   # a contiguous gradient, as the next layer's backward gives
        def call():
            for layer, x, g in zip(layers, inputs, grads): layer(x).backward(g)
    else:
        for layer in layers: layer.eval()
        def call():
            with torch.no_grad():
                for layer, x in zip(layers, inputs): layer(x)
    return call


def measure_layer(mode, rounds, log):
    """8. The norm layers alone, interleaved: RunningBatchNorm and the lesson's against nn.BatchNorm2d, in eval mode at batch
    sizes 4, 64 and 1024, and one training step (forward and backward) at batch size 2. Seconds per call, per round."""
    arms = {'nn.BatchNorm2d': nn.BatchNorm2d, 'RunningBatchNorm': RunningBatchNorm, LESSON_RBN: LessonRunningBatchNorm}
    quick = mode == 'quick'
    # about a second per arm and round: shorter rounds measured the machine's jitter more than the layers
    plans = [(RBN_EVAL, 'eval mode', bs, False, n) for bs, n in ((4, 30_000), (64, 15_000), (1024, 1_000))] + [(RBN_STEP, 'training step', 2, True, 5_000)]
    rows = []
    for arm_name, what, bs, train, n_calls in plans:
        n_calls = max(n_calls // 20, 5) if quick else n_calls
        calls = {name: layer_arm(norm, bs, train) for name, norm in arms.items()}
        described = f'4 layers, {n_calls:,} calls a round'
        log(f'  layer, {what} at batch size {bs}: {", ".join(arms)} ({described}, {rounds} rounds)')
        seconds = {name: [] for name in arms}
        names = list(arms)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                call = calls[name]
                start = time.perf_counter()
                for _ in range(n_calls): call()
                seconds[name].append((time.perf_counter() - start) / n_calls)
        ref = seconds['nn.BatchNorm2d']
        rows.append(ratio_row('layer', arm_name, f'nn.BatchNorm2d, {what}', bs, described, seconds['RunningBatchNorm'], ref, log, unit='µs per call'))
        rows.append(ratio_row('layer', f'{LESSON_RBN}, {what}', f'nn.BatchNorm2d, {what}', bs, described, seconds[LESSON_RBN], ref, log, unit='µs per call'))
    return rows


# --- mixed precision ------------------------------------------------------------------------------
def measure_amp(data, sizes, rounds, log):
    "9. bfloat16 mixed precision (`MixedPrecision(torch.bfloat16)`) against float32, the same Learner.fit, on this device."
    from minifast.learner import MixedPrecision
    arms = lambda bs: {'float32': learner_arm(bs), 'MixedPrecision(bfloat16)': learner_arm(bs, extra_cbs=lambda: [MixedPrecision(torch.bfloat16)])}
    rows = compare_at('amp', 'float32', arms, data, sizes, rounds, log)
    for row in rows: row['device'] = str(DEVICE)
    return rows


# --- memory ---------------------------------------------------------------------------------------
def rss_mib():
    "Resident set size of this process, from /proc/self/statm."
    with open('/proc/self/statm') as f: resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf('SC_PAGE_SIZE') / 2**20


def forward_hooks(model): return sum(len(m._forward_hooks) for m in model.modules())


def memory_row(fit, stats, model, previous_freed):
    n_layers, bins = stats.stats.shape[0], stats.bins
    return dict(fit=fit, rss_mib=rss_mib(), numel=stats.stats.numel(), recorded=stats.n_recorded,
                bound=n_layers * stats.n_recorded * (bins + 5), previous_freed=previous_freed,
                hooks_left=forward_hooks(model))


def measure_memory(data, sizes, n_fits, log):
    "5. Repeated fits with ActivationStats: RSS, the stats tensor's size, hooks left behind, old tensors freed."
    bs = 32
    batches = make_batches(data, bs, *sizes[bs])
    log(f'  memory: {n_fits} fits of one epoch at batch size {bs} ({batches.describe()}), two ways')
    result = {'batch_size': bs, 'batches': batches.describe(), 'n_fits': n_fits}

    # (a) one ActivationStats attached to the learner, fitted again and again
    model = fresh_model()
    stats = ActivationStats()
    learn = Learner(model, batches, F.cross_entropy, lr=LR[bs], metrics=accuracy,
                    cbs=[DeviceCallback(DEVICE), BatchTransformXCallback(view_tfm(1, 28, 28)), stats])
    learn.metrics.printer = None
    rows, previous = [], None
    for fit in range(1, n_fits + 1):
        learn.fit(1)
        gc.collect()
        rows.append(memory_row(fit, stats, model, previous is None or previous() is None))
        previous = weakref.ref(stats.stats)
    result['same_callback'] = rows

    # (b) a new ActivationStats for each fit, passed to `fit(cbs=...)` and dropped afterwards
    learn.remove_cbs(stats); del stats
    rows, previous = [], None
    for fit in range(1, n_fits + 1):
        stats = ActivationStats()
        learn.fit(1, cbs=[stats])
        gc.collect()
        rows.append(memory_row(fit, stats, model, previous is None or all(ref() is None for ref in previous)))
        previous = (weakref.ref(stats), weakref.ref(stats.stats))
        del stats
    result['new_callback'] = rows

    # the verdicts
    all_rows = result['same_callback'] + result['new_callback']
    stats_mib = result['same_callback'][-1]['numel'] * 4 / 2**20
    growth = {k: result[k][-1]['rss_mib'] - result[k][1]['rss_mib'] for k in ('same_callback', 'new_callback')}
    result.update(stats_mib=stats_mib, growth_mib=growth,
                  numel_ok=all(r['numel'] <= r['bound'] for r in all_rows),
                  freed_ok=all(r['previous_freed'] for r in all_rows),
                  hooks_ok=all(r['hooks_left'] == 0 for r in all_rows),
                  # a leak of one stats tensor per fit would add (n_fits - 2) of them after the second fit
                  rss_ok=all(g < max(0.5 * stats_mib * (n_fits - 2), 0.25) for g in growth.values()))
    log(f'    stats tensor {stats_mib:.3f} MiB; RSS growth after fit 2: '
        + ', '.join(f'{k} {v:+.2f} MiB' for k, v in growth.items())
        + f"; numel ok {result['numel_ok']}, freed {result['freed_ok']}, hooks removed {result['hooks_ok']}")
    return result


# --- profiles -------------------------------------------------------------------------------------
def profile_epoch(prepare, batches, trace_path=None):
    "Profile one epoch: per-op self CPU time, the profiled wall time, and the epoch's time without the profiler (best of 2)."
    plain = []
    for _ in range(2):
        unprofiled = prepare(batches)
        start = time.perf_counter(); unprofiled(); plain.append(time.perf_counter() - start)
    plain_s = min(plain)
    run = prepare(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter(); run(); wall_s = time.perf_counter() - start
    if trace_path is not None: prof.export_chrome_trace(str(trace_path))
    ops = [dict(name=e.key, self_ms=e.self_cpu_time_total / 1e3, calls=e.count) for e in prof.key_averages()]
    ops.sort(key=lambda o: -o['self_ms'])
    return dict(wall_s=wall_s, plain_s=plain_s, ops_ms=sum(o['self_ms'] for o in ops), ops=ops)


def measure_profiles(data, sizes, log, traces=None):
    "6. Where an epoch's time goes, with and without ActivationStats; and for the norms that cost the most."
    if traces is not None: traces.mkdir(parents=True, exist_ok=True)
    profiles = []
    plans = [('ActivationStats', 512, {'without': learner_arm(512),
                                       'with ActivationStats': learner_arm(512, extra_cbs=lambda: [ActivationStats()])}),
             ('ActivationStats', 32, {'without': learner_arm(32),
                                      'with ActivationStats': learner_arm(32, extra_cbs=lambda: [ActivationStats()])}),
             ('loop', 32, {'hand-written loop': loop_arm(32), 'Learner.fit': learner_arm(32)}),
             ('norms', 512, {n: learner_arm(512, NORMS[n]) for n in NORMS}),
             ('norms', 2, {n: learner_arm(2, NORMS[n]) for n in ('nn.BatchNorm2d', 'RunningBatchNorm')})]
    for topic, bs, arms in plans:
        n_train, n_valid = sizes[bs]
        if bs == 512 and topic == 'norms': n_train, n_valid = 20 if n_train is None else n_train, 2 if n_valid is None else n_valid
        batches = make_batches(data, bs, n_train, n_valid)
        log(f'  profile {topic} at batch size {bs} ({batches.describe()}): {", ".join(arms)}')
        entry = dict(topic=topic, batch_size=bs, batches=batches.describe(), arms={})
        for name, prepare in arms.items():
            prepare(batches.head(3, 1))()  # warm up, as for the timings
            slug = f'{topic}-bs{bs}-{name}'.replace(' ', '_').replace('(', '').replace(')', '').replace('.', '')
            entry['arms'][name] = profile_epoch(prepare, batches, traces and traces / f'{slug}.json')
        profiles.append(entry)
    return profiles


def measure_ddp(data, mode, rounds, log):
    """7. Data parallel: one epoch at a global batch of 512 on 2 processes × 1 thread (DistributedCallback, gloo) against
    1 process × 2 threads, interleaved: the two-process run waits for a file per round (bench/ddp_worker.py)."""
    import ddp_worker
    n_train = DDP_BATCHES[mode] * 512
    folder = Path(tempfile.mkdtemp(prefix='minifast-bench-ddp-'))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(BENCH / 'ddp_worker.py'), str(folder), str(n_train), str(rounds)]
    log(f'  ddp at global batch size 512: {DDP_ARM} vs {DDP_REFERENCE} ({DDP_BATCHES[mode]}+1 batches, {rounds} rounds)')
    proc = subprocess.Popen(cmd, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    def wait_done(r):
        while not (folder / f'done{r}').exists():
            if proc.poll() is not None: raise RuntimeError(f'bench ddp: torchrun exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}')
            time.sleep(0.01)
        return float((folder / f'done{r}').read_text())
    try:
        ddp_worker.make_learner(data, 3 * 512).fit(1)   # untimed warm-up, as for the other measures
        seconds, ref_seconds, ref_losses = [], [], []
        for r in range(rounds):
            for arm in ((DDP_REFERENCE, DDP_ARM) if r % 2 == 0 else (DDP_ARM, DDP_REFERENCE)):
                if arm == DDP_ARM:
                    (folder / f'go{r}').touch()
                    seconds.append(wait_done(r))
                    continue
                learn = ddp_worker.make_learner(data, n_train)
                gc.collect()
                start = time.perf_counter()
                learn.fit(1)
                ref_seconds.append(time.perf_counter() - start)
                ref_losses.append(learn.metrics.history[-1]['valid_loss'])
            log(f'    round {r + 1}/{rounds}: {DDP_REFERENCE} {ref_seconds[-1]:.2f}s, {DDP_ARM} {seconds[-1]:.2f}s')
        proc.wait(timeout=120)
        info = json.loads((folder / 'info.json').read_text())
    finally:
        if proc.poll() is None: os.killpg(proc.pid, signal.SIGKILL)
    ratios = [a / b for a, b in zip(seconds, ref_seconds)]
    row = dict(measure='ddp', arm=DDP_ARM, reference=DDP_REFERENCE, batch_size=512,
               batches=f'{DDP_BATCHES[mode]}+1 batches ({n_train:,}+1,024 images)', rounds=rounds, ratios=ratios,
               median=statistics.median(ratios), seconds=seconds, ref_seconds=ref_seconds, losses=info['losses'],
               ref_losses=ref_losses, warmup_s=None, ref_warmup_s=None, target=TARGETS[('ddp', DDP_ARM, 512)], note='',
               n_train=n_train, bytes_per_step=info['bytes_per_step'])
    log(f"    -> {DDP_ARM} / {DDP_REFERENCE}: median {row['median']:.3f}; {info['bytes_per_step']['total']:,} bytes all-reduced per step")
    return [row]


# --- the machine ----------------------------------------------------------------------------------
def cpu_name():
    "The CPU's model name, family and model numbers, and the instruction set PyTorch's CPU kernels use (AVX2, AVX512...)."
    try: fields = dict(line.split(':', 1) for line in open('/proc/cpuinfo').read().split('\n\n')[0].splitlines() if ':' in line)
    except OSError: fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    numbers = ', '.join(f'{k} {fields[k]}' for k in ('cpu family', 'model') if k in fields)
    return (f"{fields.get('model name', platform.processor())} ({numbers + '; ' if numbers else ''}"
            f"PyTorch's CPU kernels: {torch.backends.cpu.get_cpu_capability()})")


def machine_info():
    cpu = cpu_name()
    def git(*args):
        try: return subprocess.run(['git', *args], cwd=BENCH.parent, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError): return ''
    return dict(cpu=cpu, cores=os.cpu_count(), usable_cores=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                device=str(DEVICE), commit=git('rev-parse', '--short', 'HEAD'),
                library_changed=bool(git('status', '--porcelain', '--', 'minifast', 'nbs')))


def load_average():
    with open('/proc/loadavg') as f: return [float(v) for v in f.read().split()[:3]]


# --- main -----------------------------------------------------------------------------------------
MEASURES = ('loop', 'stats', 'grads', 'norms', 'layer', 'amp', 'memory', 'profile', 'ddp')

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--quick', action='store_true', help='a smoke run: few batches per epoch (writes to bench/out/quick)')
    p.add_argument('--rounds', type=int, help=f"rounds per comparison (default {ROUNDS['full']}, quick {ROUNDS['quick']}; at least 5 for a figure)")
    p.add_argument('--only', help=f"comma-separated subset of {','.join(MEASURES)}")
    p.add_argument('--bs32-batches', type=int, help='training batches per epoch at batch size 32 (validation: a tenth as many, of 64 images)')
    p.add_argument('--bs2-images', type=int, help='training images per epoch at batch size 2 (validation: as many, in batches of 4)')
    p.add_argument('--out', type=Path, help='folder for RESULTS.md, results.png and results.json')
    p.add_argument('--replace-in', type=Path, help='a folder with a complete run: put this run\'s measures (--only) in place of its rows, '
                   'note it in its RESULTS.md, and write there')
    p.add_argument('--traces', action='store_true', help='also save each profile as a Chrome trace (tens of MB) under bench/out/traces')
    return p.parse_args(argv)


def replace_in(folder, results, only):
    "A complete run's results from `folder`, with the comparisons of the measures in `only` taken from `results`."
    if set(only) - {'loop', 'stats', 'grads', 'norms', 'layer', 'amp', 'ddp'}: sys.exit('--replace-in: only comparison measures can be replaced')
    base = json.loads((folder / 'results.json').read_text())
    kept = [c for c in base['comparisons'] if c['measure'] not in only and not (c['measure'] in ('rbn', 'lesson') and 'norms' in only)]
    base['comparisons'] = kept + results['comparisons']
    base['info'].setdefault('replaced', []).append(dict(measures=list(only), command=results['info']['command'],
                                                        date=results['info']['date'], commit=results['info']['machine']['commit'],
                                                        cpu=results['info']['machine']['cpu']))
    return base


def main(argv=None):
    args = parse_args(argv)
    mode = 'quick' if args.quick else 'full'
    sizes = dict(SIZES[mode])
    if args.bs32_batches: sizes[32] = (args.bs32_batches, max(1, args.bs32_batches // 10))
    if args.bs2_images: sizes[2] = (args.bs2_images // 2, max(1, args.bs2_images // 4))
    rounds = args.rounds or ROUNDS[mode]
    only = MEASURES if args.only is None else tuple(m.strip() for m in args.only.split(','))
    if unknown := set(only) - set(MEASURES): sys.exit(f'--only: unknown measures {sorted(unknown)}; choose from {MEASURES}')
    complete = mode == 'full' and set(only) == set(MEASURES) and not (args.bs32_batches or args.bs2_images or args.rounds)
    out = args.out or (BENCH if complete else BENCH / 'out' / ('quick' if args.quick else 'partial'))
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    log = lambda msg: print(f'[{time.perf_counter() - started:7.1f}s] {msg}', file=sys.stderr, flush=True)
    info = dict(mode=mode, rounds=rounds, sizes={bs: list(v) for bs, v in sizes.items()}, only=list(only),
                date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                command=' '.join(['python bench/run.py', *(argv if argv is not None else sys.argv[1:])]).strip(),
                machine=machine_info(), load_start=load_average())
    log(f"minifast bench ({mode}, {rounds} rounds) on {info['machine']['cpu']}, {THREADS} threads, "
        f"torch {torch.__version__}; load average {info['load_start']}; writing to {out}")
    if rounds < 5: log(f'warning: {rounds} rounds; the issue asks for at least 5 for a figure')
    data = load_data()

    comparisons, memory, profiles = [], None, []
    if 'loop' in only: comparisons += measure_loop(data, sizes, rounds, log)
    if 'stats' in only: comparisons += measure_stats(data, sizes, rounds, log)
    if 'grads' in only: comparisons += measure_grads(data, sizes, rounds, log)
    if 'norms' in only: comparisons += measure_norms(data, sizes, rounds, log)
    if 'layer' in only: comparisons += measure_layer(mode, rounds, log)
    if 'amp' in only: comparisons += measure_amp(data, sizes, rounds, log)
    if 'memory' in only: memory = measure_memory(data, sizes, MEMORY_FITS[mode], log)
    if 'profile' in only: profiles = measure_profiles(data, sizes, log, BENCH / 'out' / 'traces' if args.traces else None)
    if 'ddp' in only: comparisons += measure_ddp(data, mode, rounds, log)
    info.update(load_end=load_average(), duration_s=time.perf_counter() - started)

    results = dict(info=info, comparisons=comparisons, memory=memory, profiles=profiles)
    if args.replace_in: out, results = args.replace_in, replace_in(args.replace_in, results, only)
    (out / 'results.json').write_text(json.dumps(results, indent=1))
    report.write_markdown(results, out / 'RESULTS.md')
    report.plot(results, out / 'results.png')
    log(f"done in {info['duration_s'] / 60:.1f} min: {out / 'RESULTS.md'}, {out / 'results.png'}")
    for c in comparisons:
        verdict = '' if c['target'] is None else ('  meets' if c['median'] <= c['target'] else '  MISSES') + f" target {c['target']:.2f}"
        print(f"{c['measure']:6} bs{c['batch_size']:<4} {c['arm']:>22} / {c['reference']:<18} {c['median']:.3f}{verdict}")
    return results


if __name__ == '__main__': main()
