import atexit, datetime, gc, os, sys, warnings
from pathlib import Path
import torch
from torch import nn
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from fastcore.basics import patch
from minifast.data import DataLoader, DataLoaders
from minifast.learner import Callback, Learner, MetricsCallback
from minifast.hooks import ActivationStats
from minifast.norms import BatchNorm, RunningBatchNorm, factor_and_offset, running_moments, _check_input, _stats_input

#|export
def shard_bounds(n: int, # items in the global batch
                 rank: int, world_size: int) -> tuple:
    "Start and end of `rank`'s contiguous slice of `n` items; the sizes differ by at most one."
    return n * rank // world_size, n * (rank + 1) // world_size

def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    "The shuffled order of `n` items for `epoch`: the same on every rank, from a generator seeded with `seed + epoch`."
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))

#|export
class ShardedLoader:
    "Yields this rank's slice of each global batch of `dl`, in an order every rank agrees on."
    def __init__(self, dl: DataLoader, rank: int, world_size: int, seed: int = 0):
        if not isinstance(dl, DataLoader):
            raise TypeError(f"ShardedLoader needs a minifast DataLoader, got {type(dl).__name__}")
        self.dl, self.rank, self.world_size, self.seed, self.epoch = dl, rank, world_size, seed, 0
        sizes = {min(dl.batch_size, len(dl.x) - i * dl.batch_size) for i in range(len(dl))}
        if min(sizes) < world_size:
            raise ValueError(f"ShardedLoader: a global batch of {min(sizes)} items cannot give each of {world_size} "
                             f"ranks an item ({len(dl.x)} items in batches of {dl.batch_size}); "
                             "change the batch size or pass drop_last=True")

    def __len__(self): return len(self.dl)

    def __iter__(self):
        dl, bs = self.dl, self.dl.batch_size
        n = len(dl.x)
        order = epoch_order(n, self.seed, self.epoch).to(dl.x.device) if dl.shuffle else None
        for i in range(len(dl)):
            lo, hi = i * bs, min((i + 1) * bs, n)
            start, end = shard_bounds(hi - lo, self.rank, self.world_size)
            if order is None: yield dl.x[lo + start:lo + end], dl.y[lo + start:lo + end]
            else:
                idx = order[lo + start:lo + end]
                yield dl.x[idx], dl.y[idx]

#|export
class _GlobalLoss(torch.autograd.Function):
    "Forward: the global mean loss (the same on every rank). Backward: the local loss's gradient times `scale`."
    @staticmethod
    def forward(ctx, local, global_mean, scale: float):
        ctx.scale = scale
        return global_mean.clone()
    @staticmethod
    def backward(ctx, grad): return grad * ctx.scale, None, None

def unwrap(model: nn.Module) -> nn.Module:
    "The model inside a `DistributedDataParallel` wrapper, or `model` itself."
    return model.module if isinstance(model, DistributedDataParallel) else model

def is_distributed() -> bool:
    "True in a process group of more than one process."
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

#|export
_SYNCED = ()  # filled in below, once the synced layers are defined

def _batch_stat_layers(model):
    "Names and types of the layers that normalise with the statistics of the local batch in training."
    kinds = (nn.modules.batchnorm._BatchNorm, BatchNorm, RunningBatchNorm)
    return [f'{name} ({type(m).__name__})' for name, m in model.named_modules()
            if isinstance(m, kinds) and not isinstance(m, _SYNCED)]

def _teardown_group():
    if dist.is_initialized(): dist.destroy_process_group()

class DistributedCallback(Callback):
    "Makes a fit data-parallel under `torchrun`: joins the group, shards every global batch, wraps the model in DDP."
    _order = -20   # before everything: the others see this rank's batch and the wrapped model
    def __init__(self, seed: int = 0, # the shuffled order of epoch `e` comes from `seed + e`, on every rank
                 backend: str = None, # default: 'nccl' if CUDA is available, else 'gloo'
                 timeout: float = 300.): # seconds a collective waits for the other ranks before failing
        self.seed, self.backend, self.timeout = seed, backend, timeout
        self.created_group = False

    def _join(self):
        "Join the process group `torchrun` describes in the environment, unless one exists."
        if dist.is_initialized(): return
        missing = [k for k in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if k not in os.environ]
        if missing: raise RuntimeError(f"DistributedCallback: no process group and no {', '.join(missing)} in the "
                                       "environment; start the script with torchrun (see nbs/09_distributed.ipynb)")
        backend = self.backend or ('nccl' if torch.cuda.is_available() else 'gloo')
        if backend == 'nccl': torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout))
        self.created_group = True
        atexit.register(_teardown_group)

    def before_fit(self):
        self._join()
        learn = self.learn
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl'
                       else next(learn.model.parameters()).device)
        unsynced = _batch_stat_layers(learn.model)
        if unsynced and self.world_size > 1:
            warnings.warn(f"DistributedCallback: {', '.join(unsynced)} normalise with this rank's share of the batch "
                          "only; call sync_norms(model) before the fit to use the statistics of the global batch")
        self.dls = learn.dls
        learn.dls = DataLoaders(ShardedLoader(self.dls.train, self.rank, self.world_size, self.seed),
                                ShardedLoader(self.dls.valid, self.rank, self.world_size, self.seed))
        self.printers = {}
        if self.rank != 0:   # one voice: only rank 0 prints
            for cb in learn.cbs:
                if isinstance(cb, MetricsCallback): self.printers[cb], cb.printer = cb.printer, None
        learn.model.to(self.device)
        device_ids = [self.device.index] if self.device.type == 'cuda' else None
        learn.model = DistributedDataParallel(learn.model, device_ids=device_ids)

    def before_epoch(self):
        for dl in (self.learn.dls.train, self.learn.dls.valid): dl.epoch = self.learn.epoch

    def before_batch(self):
        learn = self.learn
        if self.device.type != 'cpu': learn.xb, learn.yb = learn.xb.to(self.device), learn.yb.to(self.device)

    def after_loss(self):
        "Make `loss` the global batch's mean on every rank, with gradients that add up to the single-process ones."
        learn = self.learn
        if not learn.in_train: return
        local, n = learn.loss, len(learn.yb)
        dtype = torch.promote_types(local.dtype, torch.float32)
        totals = torch.stack([local.detach().to(dtype) * n, torch.tensor(n, dtype=dtype, device=local.device)])
        dist.all_reduce(totals)   # one tiny collective per step: the sum of the losses and the global batch size
        # DDP averages gradients over ranks; scaling this rank's by n·world/N makes that average Σ n_r·g_r / N
        learn.loss = _GlobalLoss.apply(local, (totals[0] / totals[1]).to(local.dtype), n * self.world_size / totals[1])

    def after_epoch(self):
        for cb in self.learn.cbs:
            if isinstance(cb, MetricsCallback): self._reduce_metrics(cb)

    def _reduce_metrics(self, cb):
        "Sum a `MetricsCallback`'s training and validation sums and counts over the ranks, in one collective."
        k = len(cb.metric_names)
        def pack(sums, count):
            sums = torch.zeros(k, dtype=torch.float64, device=self.device) if sums is None else sums.to(self.device, torch.float64)
            return torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=self.device)])
        train, valid = (getattr(cb, '_train_sums', None), getattr(cb, '_train_count', 0)), (cb._sums, cb._count)
        both = torch.cat([pack(*train), pack(*valid)])
        dist.all_reduce(both)
        dtype = next((s.dtype for s, _ in (train, valid) if s is not None), torch.float32)
        def unpack(t): return (None, 0) if t[-1] == 0 else (t[:-1].to(dtype), int(t[-1]))
        (cb._train_sums, cb._train_count), (cb._sums, cb._count) = unpack(both[:k + 1]), unpack(both[k + 1:])

    def _reduce_activation_stats(self):
        for cb in self.learn.cbs:
            if isinstance(cb, ActivationStats) and cb.stats is not None and cb.n_recorded:
                part = cb.stats[:, :cb.n_recorded].contiguous()
                dist.all_reduce(part)
                cb.stats[:, :cb.n_recorded] = part

    def after_fit(self):
        "Unwrap the model, put back the data and printers; sum statistics after a clean fit, tear down after an error."
        learn, failed = self.learn, sys.exc_info()[1] is not None
        learn.model = unwrap(learn.model)
        learn.dls = self.dls
        for cb, printer in self.printers.items(): cb.printer = printer
        if failed:   # another rank may be stuck in a collective or gone: no collective now, and no group to reuse
            gc.collect()   # the DDP wrapper holds the group's buffers: let it go first
            if self.created_group: dist.destroy_process_group()
        else: self._reduce_activation_stats()

#|export
_plain_save, _plain_load = getattr(Learner.save, 'plain', Learner.save), getattr(Learner.load, 'plain', Learner.load)

@patch
def save(self: Learner, path):
    "Save the model (unwrapped from DDP) and optimiser atomically; in a process group only rank 0 writes, then all wait."
    if not (dist.is_available() and dist.is_initialized()): return _plain_save(self, path)
    model, self.model = self.model, unwrap(self.model)
    try:
        if dist.get_rank() == 0: _plain_save(self, path)
    finally: self.model = model
    dist.barrier()   # nobody loads it before it is there
    return Path(path)

@patch
def load(self: Learner, path):
    "Load a checkpoint written by `save` into the model (unwrapped from DDP) and the optimiser."
    model, self.model = self.model, unwrap(self.model)
    try: _plain_load(self, path)
    finally: self.model = model
    return self

Learner.save.plain, Learner.load.plain = _plain_save, _plain_load

#|export
class AllReduceSum(torch.autograd.Function):
    "Sum a tensor over the ranks; its gradient is the sum of the ranks' gradients, because every rank's loss used the sum."
    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t
    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad

def _global_sums(x):
    "Per-channel sums and sums of squares of `x`, then its batch size and items per channel, summed over the ranks (differentiable)."
    xf = _stats_input(x)
    sizes = xf.new_tensor([x.shape[0], x.numel() // x.shape[1]])
    return AllReduceSum.apply(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), sizes]))

def _synced_batch_norm(x, weight, bias, running_mean, running_var, mom, eps: float):
    "Batch norm in training with the global batch's statistics; updates the running ones in place."
    C = x.shape[1]
    stats = _global_sums(x)
    n = stats[2 * C + 1]
    mean = stats[:C] / n
    var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)     # biased, as for normalising
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), mom)
            running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), mom)   # unbiased, as PyTorch keeps it
    scale = torch.rsqrt(var + eps)
    if weight is not None: scale = scale * weight
    shift = -mean * scale
    if bias is not None: shift = shift + bias
    return (_stats_input(x) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)

class SyncedBatchNorm(BatchNorm):
    "minifast's `BatchNorm` with the statistics of the global batch when training in a process group."
    def forward(self, x):
        if not (self.training and is_distributed()): return super().forward(x)
        _check_input(self, x, self.n_channels)
        return _synced_batch_norm(x, self.mults.view(-1), self.adds.view(-1), self.means, self.vars, self.mom, self.eps)

class SyncedBatchNorm2d(nn.BatchNorm2d):
    "`nn.BatchNorm2d` with the statistics of the global batch when training in a process group, on any device."
    def forward(self, x):
        if not (self.training and is_distributed()): return super().forward(x)
        _check_input(self, x, self.num_features)
        mom, track = self.momentum, self.track_running_stats
        if track:
            self.num_batches_tracked.add_(1)
            if mom is None: mom = 1. / self.num_batches_tracked   # a cumulative average, as in PyTorch
        return _synced_batch_norm(x, self.weight, self.bias, self.running_mean if track else None,
                                  self.running_var if track else None, mom, self.eps)

class SyncedRunningBatchNorm(RunningBatchNorm):
    "`RunningBatchNorm` folding the global batch into its running statistics; momentum and count from the global batch size."
    def forward(self, x):
        if not (self.training and is_distributed()): return super().forward(x)
        _check_input(self, x, self.n_channels)
        C = self.n_channels
        stats = _global_sums(x)
        batch_size, items = stats[2 * C:].tolist()   # one host read per layer and step: count and momentum are Python numbers
        mom1 = self.count_batch(round(batch_size), items)
        new = torch.lerp(self.running.float(), stats[:2 * C].view(2, C), mom1)
        self.running.copy_(new.detach())
        factor, offset = factor_and_offset(*running_moments(new, self.count), self.mults.float(), self.adds.float(),
                                           self.min_var, self.eps)
        return (_stats_input(x) * factor + offset).to(x.dtype)

_SYNCED = (SyncedBatchNorm, SyncedBatchNorm2d, SyncedRunningBatchNorm)
_SYNCED_VERSION = {BatchNorm: SyncedBatchNorm, nn.BatchNorm2d: SyncedBatchNorm2d, RunningBatchNorm: SyncedRunningBatchNorm}

def sync_norms(model: nn.Module) -> nn.Module:
    "`model`, its `BatchNorm`, `RunningBatchNorm` and `nn.BatchNorm2d` layers made to sync their statistics across ranks."
    for m in model.modules():
        synced = _SYNCED_VERSION.get(type(m))
        if synced is not None: m.__class__ = synced   # same parameters, buffers and state: only `forward` changes
    return model
