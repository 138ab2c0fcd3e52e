"""The runs that tests/test_distributed.py checks: each under `torchrun` (two ranks) and, for the references, alone.

`python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_cases.py CASES OUT_DIR` runs the
comma-separated CASES on every rank, in one process group; each rank writes its results under OUT_DIR, then
`rank<r>.done`. Alone (no torchrun), `run_case`
gives the single-process reference from the same weights and the same global batches.
"""
import contextlib, io, itertools, os, sys, time, warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from minifast.foundations import set_seed
from minifast.data import DataLoader, DataLoaders
from minifast.losses import accuracy, cross_entropy
from minifast.learner import CancelTrainException, Callback, Learner, NonFiniteLossError, SaveCheckpoint
from minifast.hooks import ActivationStats, BatchTransformXCallback, DeviceCallback, view_tfm
from minifast.lr_finder import EarlyStoppingCallback, lr_find
from minifast.gradients import GradientStats
from minifast.norms import BatchNorm, RunningBatchNorm, get_norm_cnn
from minifast import distributed
from minifast.distributed import DistributedCallback, sync_norms

IN_GROUP = 'WORLD_SIZE' in os.environ   # started by torchrun
DEVICE = os.environ.get('DDP_CASES_DEVICE', 'cpu')   # tools/gpu_check.py runs these on 'cuda' (nccl)
if DEVICE != 'cpu': torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

# name -> (norm layers, dtype, training items, global batch, validation items, validation batch)
CASES = {
    'plain32': (None, torch.float32, 640, 64, 100, 64),
    'plain64': (None, torch.float64, 640, 64, 100, 64),
    'norms': ('mixed', torch.float32, 640, 64, 100, 64),
    'norms64': ('mixed', torch.float64, 640, 64, 100, 64),
    'uneven': ('mixed', torch.float32, 9 * 63 + 21, 63, 101, 51),   # slices of 32/31, a last batch of 21 (11/10)
}

def make_data(n_train, n_valid, dtype, seed=1):
    "Random 28×28 images whose class is a function of the pixels (so that there is something to learn)."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, 784, generator=g, dtype=dtype)
    y = (x[:, :392].sum(1) > 0).long() + 2 * (x[:, 392:].sum(1) > 0).long()
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]

def mixed_norm():
    "A norm factory cycling through minifast's BatchNorm, nn.BatchNorm2d and RunningBatchNorm."
    kinds = itertools.cycle([BatchNorm, nn.BatchNorm2d, RunningBatchNorm])
    return lambda n_channels: next(kinds)(n_channels)

def make_model(norm, dtype):
    set_seed(0)
    model = get_norm_cnn(mixed_norm() if norm == 'mixed' else None, nfs=(8, 16, 32, 32), n_classes=4)
    return sync_norms(model).to(dtype)

def state_vector(model):
    "Parameters, buffers and RunningBatchNorm's counts, flattened, in float64."
    parts = [p.detach().reshape(-1).double().cpu() for p in model.parameters()]
    for m in model.modules():
        # RunningBatchNorm's count is a Python number, not a buffer: compare it with its running averages
        if isinstance(m, RunningBatchNorm): parts += [m.running.double().cpu().reshape(-1), torch.tensor([m.count], dtype=torch.float64)]
        else: parts += [b.detach().reshape(-1).double().cpu() for b in m.buffers(recurse=False)]
    return torch.cat(parts)

class StepRecorder(Callback):
    "The model's state after every optimiser step."
    def before_fit(self): self.states = []
    def after_step(self):
        model = self.learn.model
        self.states.append(state_vector(model.module if hasattr(model, 'module') else model))

def make_learner(case, cbs=(), nonfinite='raise', lr=0.1):
    norm, dtype, n_train, bs, n_valid, valid_bs = CASES[case]
    x_train, y_train, x_valid, y_valid = make_data(n_train, n_valid, dtype)
    # alone: the order of epoch 0 is the distributed one (a generator seeded with seed + epoch, seed = 0)
    train = DataLoader(x_train, y_train, bs, shuffle=True, generator=torch.Generator().manual_seed(0))
    dls = DataLoaders(train, DataLoader(x_valid, y_valid, valid_bs))
    extra = [DistributedCallback(seed=0, timeout=60)] if IN_GROUP else []
    if DEVICE != 'cpu': extra.append(DeviceCallback(DEVICE))
    return Learner(make_model(norm, dtype), dls, cross_entropy, lr=lr, metrics=accuracy, nonfinite=nonfinite,
                   opt_func=partial(torch.optim.SGD, momentum=0.9),
                   cbs=[BatchTransformXCallback(view_tfm(1, 28, 28))] + extra + list(cbs))

class HostTraffic(TorchDispatchMode):
    """Notes, during training batches, every tensor that code in minifast/distributed.py builds from Python data
    (`aten.lift_fresh`: on a GPU, a copy from the host that waits) or reads back (`aten._local_scalar_dense`, `.item()`)."""
    OPS = {torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default}
    FILE = str(Path(distributed.__file__).resolve())
    def __init__(self):
        super().__init__()
        self.in_batch, self.seen = False, []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_batch and func in self.OPS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename != self.FILE: frame = frame.f_back
            if frame is not None: self.seen.append(f'{func} in {frame.f_code.co_name}')
        return func(*args, **(kwargs or {}))

class WatchTrainingBatches(Callback):
    """Switches `HostTraffic` on for each training batch: from the first `before_batch` to the first `after_batch`
    (DistributedCallback has none). On CUDA (`tools/gpu_check.py`) it also turns on PyTorch's sync debug mode for the
    training batches after the first (DDP builds its buckets in the first), so that each synchronisation warns."""
    _order = -100
    def __init__(self, mode): self.mode = mode
    def before_batch(self):
        self.mode.in_batch = self.learn.in_train
        if DEVICE != 'cpu' and self.learn.in_train and self.learn.n_iter > 0: torch.cuda.set_sync_debug_mode('warn')
    def after_batch(self):
        self.mode.in_batch = False
        if DEVICE != 'cpu': torch.cuda.set_sync_debug_mode('default')

def run_equivalence(case, out):
    "10 steps (one epoch) and a validation pass; on `plain32` also a checkpoint and what each rank printed."
    recorder, stats, grads, traffic = StepRecorder(), ActivationStats(hist_sample=None), GradientStats(hist_sample=None), HostTraffic()
    learn = make_learner(case, cbs=[recorder, stats, grads, WatchTrainingBatches(traffic)])
    printed, host_reads = io.StringIO(), []
    read = distributed._read_batch_size   # the synced RunningBatchNorm's fallback when no callback noted the batch size
    distributed._read_batch_size = lambda *args: (host_reads.append(1), read(*args))[1]
    try:
        with contextlib.redirect_stdout(printed), traffic, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            learn.fit(1)
    finally: distributed._read_batch_size = read
    cuda_syncs = [str(w.message) for w in caught if 'synchroniz' in str(w.message)]   # on CUDA only: see WatchTrainingBatches
    result = dict(states=torch.stack(recorder.states), history=learn.metrics.history, printed=printed.getvalue(),
                  act_sums=stats._recorded()[0], act_counts=stats._recorded()[2], host_reads=len(host_reads),   # on the CPU
                  grad_squares=grads._recorded()[1], grad_counts=grads._recorded()[2],
                  host_traffic=traffic.seen, cuda_syncs=cuda_syncs)
    if case == 'plain32' and IN_GROUP:
        saves = []
        real_save = torch.save
        torch.save = lambda *a, **k: (saves.append(1), real_save(*a, **k))[1]
        try: learn.save(out / 'model.pth')
        finally: torch.save = real_save
        plain = make_model(None, torch.float32)
        plain.load_state_dict(torch.load(out / 'model.pth', weights_only=True)['model'])   # every rank, after the barrier
        result.update(n_saves=len(saves), loaded_equal=bool(torch.equal(state_vector(plain), state_vector(learn.model))))
    return result

class NaNOnRank(Callback):
    "Makes the inputs of training step `at_iter` NaN on rank `rank` only."
    _order = 5
    def __init__(self, rank, at_iter): self.rank, self.at_iter = rank, at_iter
    def before_batch(self):
        learn = self.learn
        if learn.in_train and learn.n_iter == self.at_iter and dist.get_rank() == self.rank:
            learn.xb = learn.xb * float('nan')

def run_consensus(out):
    "The LR finder, early stopping and a NaN on one rank: what every rank decided."
    result = {}
    learn = make_learner('plain32')
    before = state_vector(learn.model)
    found = lr_find(learn, min_lr=1e-3, max_lr=1e3, max_iter=30)
    result.update(lrf_losses=found.losses, lrf_stopped=found.stopped_early,
                  lrf_restored=bool(torch.equal(before, state_vector(learn.model))))
    stopper = EarlyStoppingCallback(patience=1)
    learn = make_learner('plain32', cbs=[stopper], lr=0.3)
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(8)
    result.update(stopped_epoch=stopper.stopped_epoch, es_history=learn.metrics.history)
    learn = make_learner('plain32', cbs=[NaNOnRank(1, 3)], nonfinite='skip')
    with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)
    result.update(skipped=learn.n_skipped_batches, skip_state=state_vector(learn.model))
    learn = make_learner('plain32', cbs=[NaNOnRank(1, 3)], nonfinite='raise')   # last: an error ends the group
    try:
        with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)
        result['raised'] = None
    except NonFiniteLossError as e: result['raised'] = f'{type(e).__name__} at iter {learn.n_iter}'
    return result

class RaiseOnRank(Callback):
    "Rank 1 raises at step 3, after writing down when."
    def __init__(self, out): self.out = out
    def before_batch(self):
        if self.learn.n_iter == 3 and dist.get_rank() == 1:
            (self.out / 'raised_at').write_text(repr(time.time()))
            raise RuntimeError('rank 1 fails on purpose')

def run_raise(out):
    learn = make_learner('plain32', cbs=[RaiseOnRank(out)])
    learn.fit(50)
    return {}

def run_unsynced(out):
    "A model with unsynced BatchNorm layers: the warnings the fit gave."
    learn = make_learner('plain32')
    set_seed(0)
    learn.model = get_norm_cnn(nn.BatchNorm2d, nfs=(8, 16, 32, 32), n_classes=4)
    learn.opt = torch.optim.SGD(learn.model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('always')
        learn.fit(1)
    return dict(warnings=[str(w.message) for w in caught if 'DistributedCallback' in str(w.message)])

class StopAfter(Callback):
    "Stops the fit cleanly after training batch `n_iter` (and the checkpoint written then), on every rank."
    _order = 200
    def __init__(self, n_iter): self.n_iter = n_iter
    def after_batch(self):
        if self.learn.in_train and self.learn.n_iter == self.n_iter: raise CancelTrainException()

def run_resume(out):
    """Two epochs of 10 steps uninterrupted, and the same fit stopped after step 14 and resumed from its checkpoint
    after step 12 (epoch 1, batch 2), in new learners and by the stopped learner itself: what each ended with."""
    def fit(path, *extra, resume_from=None):
        learn = make_learner('norms', cbs=[ActivationStats(hist_sample=None), GradientStats(hist_sample=None),
                                            SaveCheckpoint(path, every_n_batches=4), *extra])
        with contextlib.redirect_stdout(io.StringIO()): learn.fit(2, resume_from=resume_from)
        return learn
    whole = fit(out / 'whole.pth')
    stopped = fit(out / 'stopped.pth', StopAfter(14))
    resumed = fit(out / 'resumed.pth', resume_from=out / 'stopped.pth')
    ends = lambda learn: dict(state=state_vector(learn.model), history=learn.metrics.history,
                              act=learn.activation_stats.stats.clone(), grads=learn.gradient_stats.stats.clone())
    result = dict(whole=ends(whole), resumed=ends(resumed))
    # the stopped learner itself, whose DistributedCallback has counted the stopped fit's epochs since
    stopped.remove_cbs(stopped.stop_after)
    with contextlib.redirect_stdout(io.StringIO()): stopped.fit(2, resume_from=out / 'stopped.pth')
    return dict(result, resumed_by_itself=ends(stopped))

def run_case(name, out):
    out = Path(out)
    if name in CASES: return run_equivalence(name, out)
    return {'consensus': run_consensus, 'raise': run_raise, 'unsynced': run_unsynced, 'resume': run_resume}[name](out)

if __name__ == '__main__':   # CASE may be several, comma-separated: one start-up for all of them
    torch.set_num_threads(1)
    names, out = sys.argv[1].split(','), Path(sys.argv[2])
    rank = int(os.environ.get('RANK', 0))
    for name in names: torch.save(run_case(name, out), out / f'{name}_rank{rank}.pt')
    (out / f'rank{rank}.done').write_text('ok')
