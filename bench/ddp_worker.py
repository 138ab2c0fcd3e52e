"""One rank of bench/run.py's `ddp` measure: `torchrun --nproc_per_node=2 bench/ddp_worker.py DIR N_TRAIN ROUNDS`.

Trains the lesson's CNN data-parallel at a global batch of 512, one epoch per round, in step with the bench
process: round r starts when DIR/go<r> appears; rank 0 writes the epoch's seconds to DIR/done<r>.
Rank 0 also writes DIR/info.json: the bytes all-reduced per step and the validation loss of each round.
"""
import json, os, sys, time
from pathlib import Path

os.environ['MINIFAST_PROGRESS'] = '0'
import torch
import torch.distributed as dist
import torch.nn.functional as F
from minifast.data import DataLoader, DataLoaders, load_fashion_mnist, normalize_to_train
from minifast.foundations import set_seed
from minifast.hooks import BatchTransformXCallback, view_tfm
from minifast.learner import Learner
from minifast.losses import accuracy
from minifast.norms import get_norm_cnn
from minifast.distributed import DistributedCallback

def load_data():
    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    return x_train, y_train, x_valid, y_valid

def make_learner(data, n_train, n_valid=1024, batch_size=512, nfs=(8, 16, 32, 32), lr=0.1, cbs=()):
    "The bench's CNN, from the same initial weights every time, on DataLoaders (the callback shards a DataLoader)."
    x_train, y_train, x_valid, y_valid = data
    dls = DataLoaders(DataLoader(x_train[:n_train], y_train[:n_train], batch_size, shuffle=True,
                                 generator=torch.Generator().manual_seed(0)),
                      DataLoader(x_valid[:n_valid], y_valid[:n_valid], 2 * batch_size))
    set_seed(0)
    learn = Learner(get_norm_cnn(None, nfs=nfs), dls, F.cross_entropy, lr=lr, metrics=accuracy,
                    cbs=[BatchTransformXCallback(view_tfm(1, 28, 28)), *cbs])
    learn.metrics.printer = None
    return learn

def bytes_per_step(model):
    "What one training step all-reduces: DDP's gradients, the callback's two loss numbers, and the buffers DDP broadcasts."
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return dict(gradients=grads, loss=2 * 4, buffers_broadcast=buffers, total=grads + 8 + buffers)

def wait_for(path, timeout=600):
    start = time.monotonic()
    while not path.exists():
        if time.monotonic() - start > timeout: raise TimeoutError(f'bench ddp worker: no {path} after {timeout} s')
        time.sleep(0.01)

if __name__ == '__main__':
    folder, n_train, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    data = load_data()
    make_learner(data, 3 * 512, cbs=[DistributedCallback(seed=0)]).fit(1)   # untimed warm-up: joins the group, first calls
    rank, losses = dist.get_rank(), []
    for r in range(rounds):
        learn = make_learner(data, n_train, cbs=[DistributedCallback(seed=0)])
        wait_for(folder / f'go{r}')
        dist.barrier()
        start = time.perf_counter()
        learn.fit(1)
        dist.barrier()   # the epoch ends when the slower rank is done
        seconds = time.perf_counter() - start
        losses.append(learn.metrics.history[-1]['valid_loss'])
        if rank == 0:   # written whole, then renamed: the waiting process must never read a half-written file
            (folder / f'.done{r}').write_text(repr(seconds)); (folder / f'.done{r}').rename(folder / f'done{r}')
    if rank == 0: (folder / 'info.json').write_text(json.dumps(dict(bytes_per_step=bytes_per_step(learn.model), losses=losses)))
