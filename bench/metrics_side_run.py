"""Side run for bench/README.md's "Learner.fit" paragraph: what `accuracy.per_batch` saves at batch size 32.

1. `Learner.fit` against the hand-written loop, with `accuracy` (waiting batches computed in one `per_batch` call per
   burst) and with a copy of it marked pure but without `per_batch` (they wait, then are computed one at a time), in the
   same interleaved rounds as the `loop` measure.
2. Inside a fit: the seconds `MetricsCallback.after_batch` takes a batch, with the accuracy and with the loss alone.

    python bench/metrics_side_run.py [passes]     # 12 passes of 8 slices by default: about 4 minutes
"""
import statistics, sys, time

import torch

import run as B
from minifast.learner import MetricsCallback, pure_metric
from minifast.losses import accuracy

BATCH_SIZE = 32


def interval(values):
    "The median and its bootstrap 90% interval, as bench/report.py computes them."
    low, high = B.report.median_interval(values)
    return f'{statistics.median(values):.3f} ({low:.3f}–{high:.3f})'


def compare_per_batch(batches, passes):
    one_at_a_time = pure_metric(lambda pred, yb: accuracy(pred, yb))   # the same numbers, without `per_batch`
    one_at_a_time.__name__ = 'accuracy'
    arms = {'hand-written loop': B.loop_arm(BATCH_SIZE), 'with per_batch': B.learner_arm(BATCH_SIZE),
            'one at a time': B.learner_arm(BATCH_SIZE, metrics=one_at_a_time)}
    rows = B.compare('loop', BATCH_SIZE, arms, 'hand-written loop', batches, passes, lambda msg: None, slices=8)
    for row in rows: print(f"{row['arm']} / hand-written loop: {interval(row['ratios'])}, {row['rounds']} rounds")
    with_per_batch, without = rows
    by_round = [a / b for a, b in zip(with_per_batch['seconds'], without['seconds'])]
    print(f'with per_batch / one at a time, round by round: {interval(by_round)}')
    assert with_per_batch['losses'] == without['losses'], 'the two arms must compute the same valid losses'


def time_after_batch(batches):
    original, spent = MetricsCallback.after_batch, []
    def timed(self):
        start = time.perf_counter(); original(self); spent.append(time.perf_counter() - start)
    MetricsCallback.after_batch = timed
    try:
        for metrics in (accuracy, None, accuracy, None):
            spent.clear()
            run = B.learner_arm(BATCH_SIZE, metrics=metrics)(batches)
            start = time.perf_counter(); run(); seconds = time.perf_counter() - start
            n = len(batches.train) + len(batches.valid)
            print(f"{'loss and accuracy' if metrics else 'loss only':17s}: MetricsCallback.after_batch {sum(spent) / n * 1e6:.1f} µs "
                  f"a batch on average, of {seconds / n * 1e3:.2f} ms a batch")
    finally: MetricsCallback.after_batch = original


if __name__ == '__main__':
    torch.set_num_threads(B.THREADS)
    passes = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    data = B.load_data()
    compare_per_batch(B.make_batches(data, BATCH_SIZE, *B.SIZES['full'][BATCH_SIZE]), passes)
    time_after_batch(B.make_batches(data, BATCH_SIZE, 400, 40))
