"""Train the lesson's CNN with synced RunningBatchNorm on Fashion-MNIST, data-parallel.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --epochs 1      # or: make ddp

Every rank runs this same script; `DistributedCallback` joins the process group torchrun describes,
gives each rank its share of every global batch and averages the gradients. Only rank 0 prints and
writes the trained model (`--save`). Started without torchrun, it trains in one process.
"""
import argparse, os, time
from functools import partial
from pathlib import Path

import torch
from minifast.foundations import set_seed
from minifast.data import DataLoaders, load_fashion_mnist, normalize_to_train
from minifast.losses import accuracy, cross_entropy
from minifast.learner import Learner
from minifast.schedule import one_cycle
from minifast.hooks import BatchTransformXCallback, DeviceCallback, view_tfm
from minifast.norms import RunningBatchNorm, get_norm_cnn
from minifast.distributed import DistributedCallback, sync_norms

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--batch-size', type=int, default=256, help='the global batch, shared by all ranks')
    p.add_argument('--lr', type=float, default=0.4)
    p.add_argument('--n-train', type=int, default=None, help='use only the first N training images')
    p.add_argument('--save', type=Path, default=None, help='write the trained model here (rank 0 only)')
    args = p.parse_args()

    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    if args.n_train: x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    dls = DataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, batch_size=args.batch_size)
    set_seed(0)   # the same initial weights on every rank
    model = sync_norms(get_norm_cnn(RunningBatchNorm))
    cbs = [DeviceCallback(), BatchTransformXCallback(view_tfm(1, 28, 28))] + one_cycle(args.lr, moms=None)
    if 'WORLD_SIZE' in os.environ: cbs.append(DistributedCallback(seed=0))
    learn = Learner(model, dls, cross_entropy, lr=args.lr, metrics=accuracy, cbs=cbs,
                    opt_func=partial(torch.optim.SGD, momentum=0.9))
    start = time.perf_counter()
    learn.fit(args.epochs)
    if int(os.environ.get('RANK', 0)) == 0:
        world = int(os.environ.get('WORLD_SIZE', 1))
        print(f'{world} process(es): {time.perf_counter() - start:.1f} s for {args.epochs} epoch(s)')
    if args.save: learn.save(args.save)

if __name__ == '__main__':
    main()
