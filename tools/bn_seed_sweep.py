"""The BatchNorm target of nbs/07_batchnorm.ipynb over many seeds: the figures its prose quotes for 80 seeds.

    .venv/bin/python tools/bn_seed_sweep.py --recipe nadam-smoothing --seeds 0-39

Each run is 07's target run (BatchNorm CNN, batch size 512, one-cycle to `--lr`, three epochs on the first 50,000
training images, validated on the last 10,000), with the seed set as the notebook sets it. About 6 s a run on two
CPU cores. Recipes: `adamw` (07's earlier recipe), `adamw-smoothing`, `nadam`, `nadam-smoothing` (07's recipe), and
`sgd` (plain SGD, as in 07's comparison grid; 07 quotes `--seeds 0-2` at `--lr` 1, 2, 3 and 5)."""
import argparse
from functools import partial

import torch
import torch.nn.functional as F

from minifast.data import load_fashion_mnist, normalize_to_train
from minifast.foundations import set_seed
from minifast.losses import cross_entropy
from minifast.norms import BatchNorm, fit_cnn, get_norm_cnn

OPTIMISERS = {
    'adamw': partial(torch.optim.AdamW, weight_decay=1e-2, eps=1e-5, betas=(0.9, 0.99)),
    'nadam': partial(torch.optim.NAdam, weight_decay=1e-2, decoupled_weight_decay=True, eps=1e-5, betas=(0.9, 0.99)),
}
RECIPES = {name + suffix: (opt, loss) for name, opt in OPTIMISERS.items()
           for suffix, loss in [('', cross_entropy), ('-smoothing', partial(F.cross_entropy, label_smoothing=0.1))]}
RECIPES['sgd'] = (torch.optim.SGD, cross_entropy)


def seed_range(text):
    "'0-39' or '3' -> the seeds it names."
    first, _, last = text.partition('-')
    return range(int(first), int(last or first) + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--recipe', choices=RECIPES, default='nadam-smoothing')
    parser.add_argument('--seeds', type=seed_range, default=seed_range('0-9'))
    parser.add_argument('--lr', type=float, default=0.03)
    args = parser.parse_args()
    opt_func, loss_func = RECIPES[args.recipe]
    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    data = (x_train, y_train, x_valid, y_valid)
    accs = []
    for seed in args.seeds:
        set_seed(seed)
        learn = fit_cnn(get_norm_cnn(BatchNorm), data, batch_size=512, lr=args.lr, n_epochs=3, opt_func=opt_func,
                        loss_func=loss_func, printer=None)
        accs.append(learn.metrics.history[-1]['valid_accuracy'])
        print(f'seed {seed}: {accs[-1]:.4f}', flush=True)
    print(f'{args.recipe}, lr {args.lr}, seeds {args.seeds.start}-{args.seeds.stop - 1}: mean {sum(accs) / len(accs):.4f}, '
          f'{sum(a >= 0.9 for a in accs)} of {len(accs)} reach 0.90')


if __name__ == '__main__': main()
