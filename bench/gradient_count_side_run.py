"""Side run for bench/README.md's *A lookup instead of `bucketize`* and 08's prose: how long GradientStats takes to place
a batch's sampled gradient values among its histogram edges, with `torch.bucketize` and with the table lookup.

1. Inside a real `Learner.fit` (batch size 32, Fashion-MNIST, the lesson's CNN with four GeneralRelu layers, GradientStats
   with its defaults, on the CPU): `GradientStats._bins_of` is wrapped for the run, so on the very values it is handed in
   each training batch (the four layers' samples, concatenated and made absolute by `_count_samples`), it clocks
   `torch.bucketize(values, edges, out_int32=True)` and `count_edges_below(values, edge_lookup(edges))`, one
   `time.perf_counter` pair around each call, asserts that the two give the same counts, and returns them. The order
   alternates from batch to batch (even batches bucketize first, odd ones the lookup first), so drift favours neither,
   and the table shows each method when it ran first (the batch as training meets it) and when it ran second.
   Also per batch: the number of sampled values, and the sums and dot products of the four layers' gradients (the same
   `torch.sum(g, 0, out=...)` and `torch.dot(g, g, out=...)` that `_record_grad` makes, on the same gradient, clocked in
   the tensor hook just before GradientStats' own, into scratch tensors of ours: a copy of its calls, not its calls).
2. Outside training, on the values of one batch from the middle of the epoch: each method called again and again on the
   same values (blocks of calls, the methods' blocks alternating), where the processor learns bucketize's branches; and,
   as a control, bucketize called once on each batch's values in turn, which it cannot learn.

Medians and quartiles in µs. An untimed three-batch fit warms up first, as in bench/run.py. Run it on a quiet machine:
with 2 threads bucketize spreads 7,125 values over both, and where another process holds a core each call can wait for
a time slice (milliseconds instead of µs).

    python bench/gradient_count_side_run.py [--batches 300] [--threads 2] [--repeats 2000]   # under a minute
"""
import argparse, statistics, time

import torch

import run as B
from minifast.gradients import GradientStats, count_edges_below, edge_lookup

BATCH_SIZE = 32


def quartiles(us):
    "Median, first and third quartile of a list of µs."
    q1, median, q3 = statistics.quantiles(us, n=4, method='inclusive')
    return median, q1, q3


def row(what, us, note=''):
    median, q1, q3 = quartiles(us)
    print(f'{what:54s} {len(us):6d} {median:8.1f}   {q1:7.1f}–{q3:<7.1f} {note}')


def clock(fn, *args):
    "`fn(*args)` and the µs it took."
    start = time.perf_counter(); out = fn(*args); return out, (time.perf_counter() - start) * 1e6


def by_bucketize(gs, values): return torch.bucketize(values, gs._edge_tensor, out_int32=True)   # as `_bins_of`'s fallback
def by_lookup(gs, values): return count_edges_below(values, gs._lookup)                          # as `_bins_of` by default
METHODS = {'bucketize': by_bucketize, 'lookup': by_lookup}


def time_in_training(batches):
    "Fit one epoch with GradientStats, clocking both ways of counting on each training batch's samples."
    timed = {(m, pos): [] for m in METHODS for pos in ('first', 'second')}
    n_values, sums_us, kept, pending = [], [], [], []
    original_bins, original_grad = GradientStats._bins_of, GradientStats._record_grad

    def bins_of(self, values):
        if self._lookup is None: self._lookup = edge_lookup(self._edges, values.device) or False   # as `_bins_of`
        assert self._lookup is not False, 'the default edges should fit the table'
        order = list(METHODS) if len(n_values) % 2 == 0 else list(METHODS)[::-1]
        counts = {}
        for pos, method in zip(('first', 'second'), order):
            counts[method], us = clock(METHODS[method], self, values)
            timed[method, pos].append(us)
        assert torch.equal(counts['bucketize'], counts['lookup']), 'the lookup must give the counts bucketize gives'
        n_values.append(len(values)); kept.append(values.clone())
        sums_us.append(sum(pending)); pending.clear()
        return counts['lookup']

    total, squares = torch.zeros(()), torch.zeros(())
    def record_grad(self, layer, grad):
        g = grad.reshape(-1)   # float32 on the CPU here: no cast, no loss scale, one process
        start = time.perf_counter()
        torch.sum(g, 0, out=total); torch.dot(g, g, out=squares)
        pending.append((time.perf_counter() - start) * 1e6)
        return original_grad(self, layer, grad)

    GradientStats._bins_of, GradientStats._record_grad = bins_of, record_grad
    try:
        B.learner_arm(BATCH_SIZE, extra_cbs=lambda: [GradientStats()])(batches.head(3, 1))()   # untimed warm-up
        for record in (*timed.values(), n_values, sums_us, kept): record.clear()   # keep only the timed epoch's
        stats = GradientStats()
        B.learner_arm(BATCH_SIZE, extra_cbs=lambda: [stats])(batches)()
    finally: GradientStats._bins_of, GradientStats._record_grad = original_bins, original_grad
    assert len(n_values) == len(batches.train) and stats.n_recorded == len(batches.train), 'every training batch counted once'
    return timed, n_values, sums_us, kept, stats


def time_outside_training(stats, kept, repeats, block=200):
    "Each method again and again on one batch's values, in alternating blocks; and bucketize on each batch's values in turn."
    values = kept[len(kept) // 2]
    again = {m: [] for m in METHODS}
    for r in range(-(-repeats // block)):
        for method in (list(METHODS) if r % 2 == 0 else list(METHODS)[::-1]):
            for _ in range(block): again[method].append(clock(METHODS[method], stats, values)[1])
    in_turn = [clock(by_bucketize, stats, v)[1] for _ in range(max(1, repeats // len(kept))) for v in kept]
    return again, in_turn, len(values)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batches', type=int, default=300, help='training batches of 32 in the timed epoch (default 300)')
    p.add_argument('--threads', type=int, default=B.THREADS, help=f'torch threads (default {B.THREADS}, as bench/run.py)')
    p.add_argument('--repeats', type=int, default=2000, help='calls per method on the same values outside training (default 2000)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    B.DEVICE = torch.device('cpu')   # perf_counter around a call only clocks the call on the CPU
    print(f'{B.cpu_name()}; {torch.get_num_threads()} threads; torch {torch.__version__}; load average {B.load_average()}')
    batches = B.make_batches(B.load_data(), BATCH_SIZE, args.batches, 1)

    started = time.perf_counter()
    timed, n_values, sums_us, kept, stats = time_in_training(batches)
    again, in_turn, n_again = time_outside_training(stats, kept, args.repeats)
    print(f'{len(n_values)} training batches of {BATCH_SIZE}, {stats.bins} bins ({len(stats._edges)} edges); '
          f'{time.perf_counter() - started:.0f} s; load average {B.load_average()}\n')

    print(f"{'µs per call':54s} {'calls':>6s} {'median':>8s}   {'quartiles':15s}")
    for method in METHODS:
        row(f'{method}, in training, all batches', timed[method, 'first'] + timed[method, 'second'])
        for pos in ('first', 'second'): row(f'  ran {pos} in its batch', timed[method, pos])
    row('sums and dot products of the four layers, in training', sums_us, '(a copy of the calls, per batch)')
    for method in METHODS: row(f'{method}, again and again on the same values', again[method], f'({n_again:,} values)')
    row('bucketize, on each batch\'s values in turn', in_turn, '(outside training)')
    median_n = statistics.median(n_values)
    print(f'\nsampled values per batch (all layers): median {median_n:,.0f}, {min(n_values):,}–{max(n_values):,}; '
          f'counts identical on all {len(n_values)} batches')


if __name__ == '__main__': main()
