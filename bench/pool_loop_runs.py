"""Pool the `loop` measure's rounds from several RESULTS.md files: `Learner.fit` over the hand-written loop, round by round.

    python bench/pool_loop_runs.py bench/history/2026-12-06-amd-epyc-loop-631f76b-first.md bench/RESULTS.md \
        bench/history/2026-12-07-amd-epyc-loop-5e73598.md

Each run's raw tables give every arm's seconds per round; a round's ratio is its `Learner.fit` seconds over its
hand-written loop's (the two ran a second or two apart). The ratios come from the tables' rounded seconds (three
decimals), so they differ from `results.json`'s in the last digit. Prints each run's median and the pooled one, each with
the bootstrap 90% interval that `report.py` gives.
"""
import statistics, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from report import median_interval

def round_ratios(path, batch_size: int, arm: str = 'Learner.fit') -> list:
    "The ratios `arm` / hand-written loop, one per round, from the raw table of `batch_size` in the RESULTS.md at `path`."
    text = Path(path).read_text()
    marker = f'**Batch size {batch_size}, reference hand-written loop**'
    if marker not in text: raise ValueError(f"{path}: no raw table for batch size {batch_size} (looked for {marker!r})")
    seconds = {}
    for line in text.split(marker)[1].splitlines()[1:]:
        if line.startswith('**'): break   # the next table
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if len(cells) > 3 and cells[0] in ('hand-written loop', arm):
            seconds[cells[0]] = [float(v) for v in cells[1:-2]]   # the last two columns: warm-up and validation losses
    if set(seconds) != {'hand-written loop', arm}: raise ValueError(f"{path}: no rows for {arm!r} and the hand-written loop at {batch_size}")
    return [mine / hand for hand, mine in zip(seconds['hand-written loop'], seconds[arm])]

def describe(ratios) -> str:
    low, high = median_interval(ratios)
    return f'{len(ratios):4} rounds: median {statistics.median(ratios):.3f} (90% interval {low:.3f}-{high:.3f})'

if __name__ == '__main__':
    paths = sys.argv[1:]
    if not paths: sys.exit(__doc__)
    for batch_size in (512, 32):
        runs = [round_ratios(p, batch_size) for p in paths]
        for path, ratios in zip(paths, runs): print(f'batch size {batch_size:3}, {Path(path).name}: {describe(ratios)}')
        print(f'batch size {batch_size:3}, pooled: {describe(sum(runs, []))}')
