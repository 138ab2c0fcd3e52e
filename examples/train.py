"""Train the lesson's CNN on Fashion-MNIST or MNIST in one process, with checkpoints a stopped run goes on from.

    python examples/train.py --epochs 3                                          # RunningBatchNorm, one-cycle
    python examples/train.py --epochs 3 --checkpoint runs/cnn.pt                 # saved after every epoch
    python examples/train.py --epochs 3 --checkpoint runs/cnn.pt --resume        # after a crash or Ctrl-C: on from it
    python examples/train.py --norm BatchNorm --precision bfloat16 --batch-size 512

This is the training of the README's ten lines (`fit_cnn`), on notebook 07's `get_norm_cnn` (five convs), with what a
run of your own adds: a choice of norm (quote those with parentheses: `--norm 'GroupNorm(4)'`) and of precision
(`MixedPrecision`, notebook 03), checkpoints replaced atomically (`SaveCheckpoint`), and a resumed fit that ends where the uninterrupted
one would have, to the bit: the checkpoint holds the model, the optimiser, the position in the schedule, the metrics so far
and the generators that shuffle the batches. The checkpoint also holds the run's arguments, and `--resume`
refuses others that would train another fit from it (a different `--lr`, say); without `--resume` or `--overwrite` an
existing checkpoint is never replaced. `main(argv)` returns the `Learner`, so a notebook or a test can call it too.
"""
import argparse
from pathlib import Path

import torch
from minifast.foundations import set_seed
from minifast.data import DataLoaders, load_dataset, normalize_to_train
from minifast.losses import accuracy, cross_entropy
from minifast.learner import Callback, Learner, MixedPrecision, SaveCheckpoint
from minifast.schedule import one_cycle
from minifast.hooks import BatchTransformXCallback, DeviceCallback, view_tfm
from minifast.norms import DEFAULT_NORMS, get_norm_cnn

PRECISIONS = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
FIT_ARGS = ('data', 'norm', 'epochs', 'batch_size', 'lr', 'precision', 'n_train', 'seed')   # what a resume must not change

class RunArguments(Callback):
    "Keeps the run's `FIT_ARGS` in every checkpoint, so that a resume with other ones is refused before anything changes."
    def __init__(self, args: argparse.Namespace): self.args = {k: getattr(args, k) for k in FIT_ARGS}
    def state_dict(self) -> dict: return dict(self.args)
    def load_state_dict(self, state: dict): pass   # nothing to restore: `state_problems` has checked them equal
    def state_problems(self, state: dict) -> list:
        return [f"--{k.replace('_', '-')} {state.get(k)} there, {v} here" for k, v in self.args.items() if state.get(k) != v]

def positive(kind):
    "An argparse type: a `kind` number above zero (and finite)."
    def parse(text):
        value = kind(text)
        if not 0 < value < float('inf'): raise argparse.ArgumentTypeError(f'must be a positive number, got {text}')
        return value
    parse.__name__ = kind.__name__   # argparse names it in its errors: "invalid int value"
    return parse

def seed(text) -> int:
    "An argparse type: a seed for `set_seed`, a whole number from 0 to 2**32 - 1."
    value = int(text)
    if not 0 <= value < 2**32: raise argparse.ArgumentTypeError(f'must be from 0 to 2**32 - 1, got {text}')
    return value

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', choices=('fashion_mnist', 'mnist'), default='fashion_mnist')
    p.add_argument('--norm', choices=list(DEFAULT_NORMS), default='RunningBatchNorm', help='the norm after each conv (InstanceNorm stays at chance here: the last conv\'s maps are 1×1, see notebook 07)')
    p.add_argument('--epochs', type=positive(int), default=1)
    p.add_argument('--batch-size', type=positive(int), default=256)
    p.add_argument('--lr', type=positive(float), default=0.4, help="the one-cycle schedule's peak learning rate")
    p.add_argument('--precision', choices=list(PRECISIONS), default='float32', help='bfloat16 or float16: mixed precision')
    p.add_argument('--n-train', type=positive(int), help='use only the first N training images')
    p.add_argument('--seed', type=seed, default=0, help='the initial weights and the order of the batches')
    p.add_argument('--checkpoint', type=Path, help='save the fit here after every epoch')
    p.add_argument('--save-every', type=positive(int), help='also save every N training batches (needs --checkpoint)')
    again = p.add_mutually_exclusive_group()
    again.add_argument('--resume', action='store_true', help='go on from --checkpoint, with the same other arguments')
    again.add_argument('--overwrite', action='store_true', help='start afresh, replacing the checkpoint at --checkpoint')
    args = p.parse_args(argv)
    if (args.resume or args.save_every) and args.checkpoint is None: p.error('--resume and --save-every need --checkpoint')
    if args.resume and not args.checkpoint.is_file(): p.error(f'--resume: there is no checkpoint at {args.checkpoint}')
    if args.checkpoint is not None and args.checkpoint.exists() and not (args.resume or args.overwrite):
        p.error(f'{args.checkpoint} exists: pass --resume to go on from it, or --overwrite to start again and replace it')
    return args

def make_learner(args: argparse.Namespace, cbs=()) -> Learner:
    "The data, the model and the `Learner` that `args` describe, with `cbs` added."
    x_train, y_train, x_valid, y_valid = load_dataset(args.data)
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    if args.n_train: x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    set_seed(args.seed)
    dls = DataLoaders.from_tensors(x_train, y_train, x_valid, y_valid, batch_size=args.batch_size)
    model = get_norm_cnn(DEFAULT_NORMS[args.norm])
    cbs = [DeviceCallback(), BatchTransformXCallback(view_tfm(1, 28, 28)), *one_cycle(args.lr, moms=None), *cbs]
    if PRECISIONS[args.precision] is not None: cbs.append(MixedPrecision(PRECISIONS[args.precision]))
    if args.checkpoint is not None: cbs += [RunArguments(args), SaveCheckpoint(args.checkpoint, every_n_batches=args.save_every)]
    return Learner(model, dls, cross_entropy, lr=args.lr, metrics=accuracy, cbs=cbs)

def main(argv=None, cbs=()) -> Learner:
    "Train as the command line `argv` says; `cbs`: extra callbacks (a test's, say)."
    args = parse_args(argv)
    learn = make_learner(args, cbs)
    learn.fit(args.epochs, resume_from=args.checkpoint if args.resume else None)
    last = learn.metrics.history[-1]
    print(f"after {last['epoch'] + 1} epoch(s): valid loss {last['valid_loss']:.4f}, valid accuracy {last['valid_accuracy']:.4f}")
    return learn

if __name__ == '__main__':
    main()
