"""Turns bench/run.py's results into RESULTS.md and results.png."""
import math
import random
import statistics
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt

# The peers' figures, measured on the same machine on 2026-11-24 (from the issue): (measure, arm, batch size) -> text, (low, high).
PEERS = {
    ('loop', 'Learner.fit', 512):              {'course-v3 (2019)': (1.05, 1.10), 'miniai (2022)': (1.06, 1.07)},
    ('loop', 'Learner.fit', 32):               {'course-v3 (2019)': (1.08, 1.14), 'miniai (2022)': (1.04, 1.19)},
    ('stats', 'with ActivationStats', 512):    {'course-v3 (2019)': (1.62, 1.63), 'miniai (2022)': (1.53, 1.53)},
    ('stats', 'with ActivationStats', 32):     {'course-v3 (2019)': (1.39, 1.49), 'miniai (2022)': (1.30, 1.42)},
    ('rbn', 'RunningBatchNorm', 512):          {'course-v3 (2019)': (1.1, 1.1)},
}
# Why a target can be missed on this machine, for the section that lists the misses; bench/README.md has the experiments.
WHY_MISSED = {
    ('stats', 'with ActivationStats', 32):
        'A training batch takes about 2 ms here, and every small op a hook runs costs 2 to 5% of it whatever its size '
        '(a cold start after the convolutions): a sum, a dot product and a sampled `histc` on each of four layers put the '
        'floor at about 1.10 to 1.12, and runs of the same code read 1.10 to 1.14. Profile: section 6, ActivationStats '
        'at batch size 32 (`aten::histc`, `aten::sum`, `aten::dot`).',
    ('rbn', 'RunningBatchNorm', 512):
        "Here the step's cost is its passes over the activations, not its calls: BatchNorm's backward kernel, given the "
        "batch's share, computes the gradient in one call, but one more pass (an `addcmul_`) adds the rest, and the forward "
        "pass runs the batch statistics and eval-mode BatchNorm as two kernels. "
        '`RunningBatchNorm(compiled=True)` comes closer (its row above; on the AMD machine of 2026-12-05 it met the target). '
        'Profile: section 6, norms at batch size 512.',
    ('rbn', 'RunningBatchNorm(compiled=True)', 512):
        "Compiled, the step's forward and backward passes are loops that inductor generates and fuses; on this machine they "
        "cost a few percent more than `nn.BatchNorm2d`'s kernels (on the AMD machine of 2026-12-05: 1.018, met). "
        'bench/README.md has the runs.',
    ('rbn', 'RunningBatchNorm', 2):
        'At batch size 2 the layer is all overhead: the `autograd.Function` and a dozen per-channel ops of 1 to 3 µs each, '
        'where `nn.BatchNorm2d` runs one fused kernel each way. Profile: section 6, norms at batch size 2; the layer alone: '
        'the `layer` rows.',
    ('layer', 'RunningBatchNorm, training step', 2):
        'Our step runs three fused kernels (the batch statistics, eval-mode BatchNorm, the training-mode backward) where '
        '`nn.BatchNorm2d` runs two, plus the `autograd.Function` and about ten per-channel ops of 1 to 3 µs each.',
    ('rbn', 'RunningBatchNorm(compiled=True)', 2):
        'Each call of a compiled function has a fixed cost, larger than what fusing saves on tiny tensors; '
        '`compiled=True` is for large batches, and the default is faster here.',
}
NOISY = ('Runs of the same code have read this row on both sides of the target (bench/README.md gives them), and the rounds '
         'of this run spread widely: at this precision the machine, not the code, decides the verdict. bench/README.md '
         'says what the row costs and what was tried.')
WHY_MISSED[('loop', 'Learner.fit', 32)] = (
    'At about 4 to 6 ms a batch, what the Learner does per batch beyond the loop shows: the event dispatch, the counters and '
    'the non-finite check (the row "no MetricsCallback"), and keeping the training loss and accuracy, whose batches wait '
    "and are computed in bursts, one `accuracy.per_batch` call each. Two runs of the same code read 1.041 and 1.024, and "
    "their rounds pooled 1.028: the target is at the edge of what this machine resolves. bench/README.md gives the runs.")
WHY_MISSED[('layer', 'RunningBatchNorm, eval mode', 1024)] = (
    "At this size both arms run the same fused eval-mode kernel, which takes almost all of the time; what differs is a "
    "microsecond or two of Python per call, less than the machine's spread from run to run (the run before read 0.986).")
for _key in [('loop', 'Learner.fit', 512), ('grads', 'with GradientStats', 32),
             ('grads', 'with UpdateStats', 32), ('grads', 'with UpdateStats', 512)]:
    WHY_MISSED.setdefault(_key, NOISY)
PEER_NAMES = ('course-v3 (2019)', 'miniai (2022)')
# The peers record no gradient statistics on every batch, so the grads rows have no peer figures; this says what they do.
GRADS_CONTEXT = ('**The cost of looking inside the backward pass, in context.** These rows have no peer figures. As issue 13 '
                 'notes, the course-v3 (2019) and miniai (2022) code record no gradient statistics, fastai v2 has none either (its '
                 '`ActivationStats` reads three numbers to the host per layer per batch), fastai v1 copied gradient norms to the CPU, '
                 'and `wandb.watch` syncs several times per tensor per logged step. The peers\' cost of looking inside the forward '
                 'pass alone is in the ActivationStats rows above.')
TITLES = {'loop': 'Learner.fit vs a hand-written loop', 'stats': 'ActivationStats on every GeneralRelu, every batch',
          'grads': 'GradientStats on every GeneralRelu, UpdateStats on every parameter, every batch',
          'norms': 'Norm layers vs nn.BatchNorm2d', 'rbn': 'RunningBatchNorm vs nn.BatchNorm2d',
          'lesson': "RunningBatchNorm vs the 2019 lesson's", 'layer': 'The norm layers alone',
          'amp': 'Mixed precision vs float32', 'ddp': 'Data parallel: 2 processes vs 1'}
ORDER = ('loop', 'stats', 'grads', 'norms', 'rbn', 'lesson', 'layer', 'amp', 'ddp')


def _peer(c, name):
    low_high = PEERS.get((c['measure'], c['arm'], c['batch_size']), {}).get(name)
    if low_high is None: return ''
    low, high = low_high
    return ('about ' if c['measure'] == 'rbn' else '') + (f'{low:.2f}' if low == high else f'{low:.2f}–{high:.2f}')


def median_interval(ratios, level=0.9, draws=2000):
    """How far the median could move if the rounds were run again: the middle `level` of the medians of `draws`
    resamplings of the rounds (a bootstrap), with a fixed seed so that the same results always print the same interval."""
    rng, n = random.Random(0), len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return medians[tail], medians[-1 - tail]


def _verdict(c):
    if c['target'] is None: return '(no target)'
    low, high = median_interval(c['ratios'])
    spans = ' (the interval spans it)' if low <= c['target'] < high else ''
    return f"≤ {c['target']:.2f}", ('meets' if c['median'] <= c['target'] else '**misses**') + spans


def _sorted(comparisons):
    return sorted(comparisons, key=lambda c: (ORDER.index(c['measure']), -c['batch_size']))


def summary_table(comparisons):
    lines = ['| measure | batch size | batches per epoch (train+valid) | ours: median ratio | median: 90% interval | rounds: min–max '
             '| target | | course-v3 (2019) | miniai (2022) | median seconds: ours / reference |',
             '|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|']
    for c in _sorted(comparisons):
        target, verdict = _verdict(c) if c['target'] is not None else ('–', '')
        low, high = median_interval(c['ratios'])
        lines.append(f"| {c['arm']} / {c['reference']} | {c['batch_size']} | {c['batches']} | **{c['median']:.3f}** "
                     f"| {low:.3f}–{high:.3f} | {min(c['ratios']):.3f}–{max(c['ratios']):.3f} | {target} | {verdict} "
                     f"| {_peer(c, PEER_NAMES[0])} | {_peer(c, PEER_NAMES[1])} "
                     f"| {_seconds(c)} |")
    return lines


def _seconds(c):
    "The median seconds of both arms; for the layers alone, microseconds per call."
    ours, ref = statistics.median(c['seconds']), statistics.median(c['ref_seconds'])
    return f'{ours * 1e6:.1f} / {ref * 1e6:.1f} µs' if c.get('unit') == 'µs per call' else f'{ours:.2f} / {ref:.2f}'


def raw_tables(comparisons):
    "One table per interleaved group: seconds per round for every arm, and the valid loss each reached."
    groups = {}
    for c in comparisons:   # the rows against the lesson re-read rounds already shown; the layers have no losses
        if c['measure'] in ('lesson', 'layer'): continue
        groups.setdefault((c['measure'], c['batch_size'], c['reference'], c['batches'], c['note']), []).append(c)
    lines = []
    for (_, bs, reference, batches, _), cs in groups.items():
        arms = [reference] + [c['arm'] for c in cs]
        seconds = [cs[0]['ref_seconds']] + [c['seconds'] for c in cs]
        losses = [cs[0]['ref_losses']] + [c['losses'] for c in cs]
        warmups = [cs[0].get('ref_warmup_s')] + [c.get('warmup_s') for c in cs]
        lines += ['', f"**Batch size {bs}, reference {reference}** ({batches}); seconds per epoch, round by round, "
                  'the untimed warm-up on three training batches and one validation batch (first calls; compiling, '
                  'for compiled arms), and the validation loss each arm reached in every round:', '',
                  '| arm | ' + ' | '.join(f'round {r + 1}' for r in range(len(seconds[0]))) + ' | warm-up | valid loss |',
                  '|---|' + '---:|' * (len(seconds[0]) + 2)]
        for arm, secs, warmup, loss in zip(arms, seconds, warmups, losses):
            if all(math.isnan(v) for v in loss): loss_text = '– (not recorded)'
            else: loss_text = f'{loss[0]:.4f}' if max(loss) - min(loss) < 1e-6 else f'{min(loss):.4f}–{max(loss):.4f}'
            warmup_text = '' if warmup is None else f'{warmup:.2f}'
            lines.append(f'| {arm} | ' + ' | '.join(f'{s:.3f}' for s in secs) + f' | {warmup_text} | {loss_text} |')
    return lines


def amp_verdict(comparisons):
    "Says plainly whether bfloat16 mixed precision was faster or slower than float32 on this machine."
    rows = [c for c in comparisons if c['measure'] == 'amp']
    if not rows: return []
    said = '; '.join(f"at batch size {c['batch_size']} an epoch took {c['median']:.2f} times as long "
                     f"({'slower' if c['median'] > 1 else 'faster'})" for c in _sorted(rows))
    return ['', f"**Mixed precision on this machine ({rows[0].get('device', 'the CPU')}).** With `MixedPrecision(torch.bfloat16)`, {said} "
            'than in float32. Mixed precision is meant for GPUs, where 16-bit matrix arithmetic is several times faster; '
            '`make gpu-check` measures it there.']


def layer_tables(comparisons):
    "The layers alone: microseconds per call of every arm, round by round."
    rows = [c for c in comparisons if c['measure'] == 'layer']
    if not rows: return []
    lines = ['', "**The norm layers alone** (the four norm layers of the CNN on inputs of their shapes, one call running each once; "
             'eval mode under `no_grad`, a training step as forward and backward): microseconds per call, round by round:', '',
             '| arm | batch size | ' + ' | '.join(f'round {r + 1}' for r in range(len(rows[0]['seconds']))) + ' |',
             '|---|---:|' + '---:|' * len(rows[0]['seconds'])]
    shown = set()
    for c in rows:
        for arm, secs in ((c['reference'], c['ref_seconds']), (c['arm'], c['seconds'])):
            if (arm, c['batch_size']) in shown: continue
            shown.add((arm, c['batch_size']))
            lines.append(f"| {arm} | {c['batch_size']} | " + ' | '.join(f'{s * 1e6:.1f}' for s in secs) + ' |')
    return lines


def ddp_section(comparisons):
    "Samples per second and bytes per step of the `ddp` measure, and what they mean for N GPUs."
    rows = [c for c in comparisons if c['measure'] == 'ddp']
    if not rows: return []
    c = rows[0]
    rate, ref_rate = c['n_train'] / statistics.median(c['seconds']), c['n_train'] / statistics.median(c['ref_seconds'])
    b = c['bytes_per_step']
    return ['', '## Data parallel: 2 processes × 1 thread vs 1 process × 2 threads', '',
            f"One epoch of the lesson's CNN at a global batch of 512 ({c['batches']}; the small validation pass is inside the time), "
            '`DistributedCallback` on gloo with `torchrun --standalone --nproc_per_node=2` and `OMP_NUM_THREADS=1`, against a '
            'plain `Learner.fit` with 2 threads; interleaved round by round (bench/ddp_worker.py waits for a file per round).', '',
            f"- training samples per second (medians): **{rate:,.0f}** on 2 processes, **{ref_rate:,.0f}** on 1 process: "
            f"{rate / ref_rate:.2f} of the single process's (target: at least 0.80)",
            f"- all-reduced per step and rank: {b['gradients']:,} bytes of gradients (every parameter, float32, in DDP's buckets), "
            f"{b['loss']} bytes for the global loss and batch size, and {b['buffers_broadcast']:,} bytes of buffers that DDP broadcasts "
            '(none here: the CNN has no norm layer; synced norm layers add 2 × channels + 2 numbers per layer and step)',
            f"- for N GPUs: a ring all-reduce moves 2(N−1)/N × {b['total']:,} bytes per rank and step, under 2 × {b['total'] / 1e6:.2f} MB "
            'whatever N, which a PCIe or NVLink link moves in well under a millisecond: for a model this small each step is '
            'bound by latency (a few collectives per step), not bandwidth, and the speed-up comes from each GPU doing 1/N of '
            'the arithmetic. On 2 CPU cores both arms share the same 2 cores, so the aim here is to lose little, not to gain. '
            'Two threads on a busy machine can be several times slower than one (their OpenMP barriers wait for a descheduled '
            'thread): read this figure only from a quiet machine.']


def memory_section(memory):
    if memory is None: return []
    ok = lambda b: 'yes' if b else '**no**'
    lines = ['## 5. Memory of ActivationStats', '',
             f"{memory['n_fits']} fits of one epoch at batch size {memory['batch_size']} ({memory['batches']}), "
             'each recording every GeneralRelu on every training batch, done two ways: (a) the same callback attached '
             'to the Learner and fitted again, (b) a new callback passed to `fit(cbs=...)` each time and dropped. '
             'RSS is read from /proc/self/statm after `gc.collect()`; the bound is layers × recorded batches × (bins + 5): '
             'the sum, the sum of squares, the count, the bins and the counts below and above the range.', '',
             '| way | fit | RSS (MiB) | stats numel | bound | recorded batches | previous stats freed | forward hooks left |',
             '|---|---:|---:|---:|---:|---:|---|---:|']
    for key, label in (('same_callback', '(a) same callback'), ('new_callback', '(b) new callback')):
        for r in memory[key]:
            lines.append(f"| {label} | {r['fit']} | {r['rss_mib']:.1f} | {r['numel']:,} | {r['bound']:,} | {r['recorded']} "
                         f"| {'yes' if r['previous_freed'] else '**no**'} | {r['hooks_left']} |")
    g = memory['growth_mib']
    lines += ['', f"- stats tensor: {memory['stats_mib']:.3f} MiB per fit; numel within the bound in every fit: {ok(memory['numel_ok'])}",
              f"- RSS growth from fit 2 to fit {memory['n_fits']}: (a) {g['same_callback']:+.2f} MiB, (b) {g['new_callback']:+.2f} MiB "
              f"(a leak of one stats tensor per fit would add {memory['stats_mib'] * (memory['n_fits'] - 2):.2f} MiB); "
              f"flat: {ok(memory['rss_ok'])}",
              f"- the previous fit's stats tensor (and in (b) its callback) freed: {ok(memory['freed_ok'])}; "
              f"no forward hooks left on the model after a fit: {ok(memory['hooks_ok'])}", '']
    return lines


def _op_table(arms, n_rows=12):
    "Top ops by self CPU time, one pair of columns per arm, plus each op's extra time over the first arm."
    names = list(arms)
    by_name = {arm: {o['name']: o for o in p['ops']} for arm, p in arms.items()}
    top = []
    for arm in names:
        for o in arms[arm]['ops'][:n_rows]:
            if o['name'] not in top: top.append(o['name'])
    first = names[0]
    top.sort(key=lambda n: -max(by_name[a].get(n, {'self_ms': 0})['self_ms'] for a in names))
    head = '| op | ' + ' | '.join(f'{a}: self ms (calls)' for a in names) + ''.join(f' | {a} − {first} (ms)' for a in names[1:]) + ' |'
    lines = [head, '|---|' + '---:|' * (2 * len(names) - 1)]
    for op in top[:n_rows + 4]:
        cells = []
        for a in names:
            o = by_name[a].get(op)
            cells.append('–' if o is None else f"{o['self_ms']:.1f} ({o['calls']:,})")
        diffs = [by_name[a].get(op, {'self_ms': 0})['self_ms'] - by_name[first].get(op, {'self_ms': 0})['self_ms'] for a in names[1:]]
        lines.append(f'| `{op}` | ' + ' | '.join(cells) + ''.join(f' | {d:+.1f}' for d in diffs) + ' |')
    lines.append('| all ops (sum of self CPU) | ' + ' | '.join(f"{arms[a]['ops_ms']:.0f}" for a in names)
                 + ''.join(f" | {arms[a]['ops_ms'] - arms[first]['ops_ms']:+.0f}" for a in names[1:]) + ' |')
    lines.append('| epoch under the profiler (wall ms) | ' + ' | '.join(f"{arms[a]['wall_s'] * 1e3:.0f}" for a in names)
                 + ''.join(f" | {(arms[a]['wall_s'] - arms[first]['wall_s']) * 1e3:+.0f}" for a in names[1:]) + ' |')
    lines.append('| epoch without the profiler (wall ms, best of 2) | ' + ' | '.join(f"{arms[a]['plain_s'] * 1e3:.0f}" for a in names)
                 + ''.join(f" | {(arms[a]['plain_s'] - arms[first]['plain_s']) * 1e3:+.0f}" for a in names[1:]) + ' |')
    return lines


def _differences(arms, n_ops=4):
    "A sentence per arm: how much longer its epoch took than the first arm's, and the ops that grew most."
    names = list(arms)
    first = {o['name']: o['self_ms'] for o in arms[names[0]]['ops']}
    lines = []
    for name in names[1:]:
        ops = {o['name']: o['self_ms'] for o in arms[name]['ops']}
        grew = sorted(set(ops) | set(first), key=lambda op: -(ops.get(op, 0) - first.get(op, 0)))[:n_ops]
        extra = (arms[name]['plain_s'] - arms[names[0]]['plain_s']) * 1e3
        lines.append(f"- {name}: {extra:+.0f} ms per epoch against {names[0]} (without the profiler, best of 2 epochs each); the ops that grew most: "
                     + ', '.join(f"`{op}` {ops.get(op, 0) - first.get(op, 0):+.1f} ms" for op in grew) + '.')
    return lines


def profile_section(profiles):
    if not profiles: return []
    lines = ['## 6. Profiles', '',
             'One epoch (train + valid) per arm under `torch.profiler` (CPU), after an untimed warm-up; ops sorted by '
             'self CPU time, the time each call took on the Python thread (an op\'s work on the second intra-op thread is inside '
             'its call, not added to it). The gap between "all ops" and the wall time is mostly Python: the loop, callbacks and '
             'hooks. One profile each, so differences of a few ms are noise. '
             'Add `--traces` to save each as a Chrome trace under `bench/out/traces/` (open in chrome://tracing or Perfetto).']
    for p in profiles:
        lines += ['', f"### {p['topic']}, batch size {p['batch_size']} ({p['batches']})", '']
        lines += _op_table(p['arms']) + [''] + _differences(p['arms'])
    return lines + ['']


def _replacements(replaced, cpu):
    "One line per later run whose rows are still in the results: a measure replaced twice names only its last run."
    lines = []
    for i, r in enumerate(replaced):
        later = {m for r2 in replaced[i + 1:] for m in r2['measures']}
        elsewhere = f", on another machine ({r['cpu']}: its rows compare arms timed there)" if r.get('cpu', cpu) != cpu else ''
        if kept := [m for m in r['measures'] if m not in later]:
            lines.append(f"- the rows of the measures {', '.join(kept)} come from a later run, `{r['command']}` on {r['date']} "
                         f"(commit {r['commit']}){elsewhere}, which replaced the complete run's")
    return lines


def write_markdown(results, path):
    info, comparisons = results['info'], results['comparisons']
    m = info['machine']
    sizes = info['sizes']
    def size_text(bs):
        n_train, n_valid = sizes.get(bs, sizes.get(str(bs)))
        if n_train is None: return f'batch size {bs}: the whole 50,000 + 10,000 images'
        return f'batch size {bs}: the first {n_train} shuffled training batches and {n_valid} validation batches (a subset, for time)'
    met = [c for c in comparisons if c['target'] is not None]
    missed = [c for c in met if c['median'] > c['target']]
    lines = ['# minifast benchmarks', '',
             f"Written by `{info['command']}` (`make bench` runs it in full) on {info['date']}, in {info['duration_s'] / 60:.1f} minutes"
             + (' — **a smoke run (`--quick`): too few batches for the figures to mean much**' if info['mode'] == 'quick' else '') + '.', '',
             f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']} with "
             f"{m['torch_threads']} threads, Python {m['python']}, {m['platform']}, device `{m['device']}`",
             f"- code: minifast at commit {m['commit']}" + (' with uncommitted changes to minifast/ or nbs/' if m['library_changed'] else ''),
             f"- load average (1, 5, 15 min) at the start {info['load_start']}, at the end {info['load_end']} (which counts the "
             f"bench's own {m['torch_threads']} threads)"
             + (' — the machine was busy when the run started: the ratios absorb steady load, and the median drops the odd burst, '
                'but read them with care' if info['load_start'][0] > 0.5 * m['cores'] else ''),
             *_replacements(info.get('replaced', []), m['cpu']),
             f"- {len(met) - len(missed)} of {len(met)} targets met" + (': misses ' + ', '.join(f"{c['arm']} at {c['batch_size']}" for c in missed) if missed else ''), '',
             '## Method', '',
             '- Fashion-MNIST, normalised with the training set\'s mean and std (`normalize_to_train`); the lesson\'s CNN '
             '(`get_norm_cnn(norm, nfs=(8, 16, 32, 32))`: conv 5×5 then 3×3 stride-2 convs, GeneralRelu(leak=0.1, sub=0.4, maxv=6), '
             'Kaiming init with `init_cnn(..., leak=0.1)`), plain SGD, `F.cross_entropy`, CPU with `torch.set_num_threads(2)`.',
             '- Batches are made once by minifast\'s `DataLoader` (training shuffled with a fixed seed, validation in order at twice the '
             'batch size) and kept as lists, so every arm sees the same batches in the same order: ' + '; '.join(size_text(bs) for bs in (512, 32, 2)) + '.',
             '- An epoch is one training pass and one validation pass under `no_grad`, from the same initial weights every time. '
             '`Learner.fit(1)` runs with its default callbacks (TrainEvalCallback; MetricsCallback, averaging loss and accuracy '
             'over training and validation batches on the device, its two printed lines turned off; no progress bar: '
             '`MINIFAST_PROGRESS=0`), plus `DeviceCallback` and `BatchTransformXCallback(view_tfm(1, 28, 28))`. The hand-written loop does '
             'the same `.to(device)` and `.view`, and sums validation loss and accuracy on the device, but computes no training '
             'metrics. At batch size 32 two more arms say what those cost: "loss only" (`metrics=None`: `MetricsCallback` averages the '
             'loss alone) and "no MetricsCallback" (`default_cbs=False`; its validation loss is not recorded).',
             f"- Interleaved: in each of {info['rounds']} rounds every arm of a comparison trains one epoch, in an order that rotates "
             'from round to round (A, B then B, A), after one untimed warm-up on three batches. A figure is the **median over rounds '
             'of (arm seconds / reference seconds in the same round)**; the raw seconds are below. Its "90% interval" is where the '
             'median of the same number of rounds, resampled from these (a bootstrap with a fixed seed), falls nine times in ten: '
             'how far a rerun on an equally noisy machine could move it. A verdict whose interval spans the target says so.',
             '- The `loop` measure, whose targets (1.02 and 1.03) are finer than the machine\'s spread from one epoch to the next, '
             'times slices of the epoch: its batches are cut into consecutive slices (7 at batch size 512, 8 at 32), and in each '
             'round every arm runs a one-epoch fit over that round\'s slice. The arms of a round then run a second or two apart, and '
             'there are as many times more rounds (each batch is still trained once per arm per pass); its seconds are per slice.',
             '- The same initial weights and batches mean that arms doing the same arithmetic must reach the same validation loss: '
             'the last column of each raw table checks it (hand loop vs Learner, with vs without ActivationStats).',
             '- RunningBatchNorm at batch size 2 is also timed pass by pass: the training pass and the validation pass of the same '
             'epochs, each against `nn.BatchNorm2d`\'s (rows "…: training pass", "…: validation pass"); the validation pass is as large as '
             'the training pass. "RunningBatchNorm / course-v3 RunningBatchNorm" divides, round by round, our epoch by the 2019 '
             "lesson's (`bench/lesson_rbn.py`) from the same interleaved rounds.",
             '- The layers alone (measure `layer`): the four norm layers of the CNN on random inputs of their shapes, after 30 '
             'training calls for statistics; rounds of a few thousand calls, interleaved and rotated as above.', '',
             '## Results', '']
    lines += summary_table(comparisons)
    lines += ['', 'The peers\' figures (course-v3 2019 code, miniai 2022) were measured on this machine on 2026-11-24 by the same method; '
              'blank where the issue gives none. ![ratios](results.png)']
    if any(c['measure'] == 'grads' for c in comparisons):
        lines += ['', GRADS_CONTEXT]
    lines += amp_verdict(comparisons)
    lines += ['', '### Raw seconds']
    lines += raw_tables(comparisons) + layer_tables(comparisons) + ['']
    lines += ddp_section(comparisons)
    lines += memory_section(results['memory'])
    lines += profile_section(results['profiles'])
    lines += ['', '## 7. Reading the figures', '']
    lines += [f"- **{c['arm']} at batch size {c['batch_size']}, {c['median']:.3f} (target {c['target']:.2f}).** "
              + WHY_MISSED.get((c['measure'], c['arm'], c['batch_size']), 'Not yet explained.') for c in _sorted(missed)]
    lines += ['', 'The experiments behind these explanations, and what was tried to close each gap, are in '
              '[bench/README.md](README.md#reading-the-figures).']
    path.write_text('\n'.join(lines))


def _middle(ratios):
    "The range of the rounds without the fastest and the slowest (all of them when there are fewer than 5)."
    r = sorted(ratios)
    return (r[1], r[-2]) if len(r) >= 5 else (r[0], r[-1])


def plot(results, path):
    "One row per comparison: our median ratio (bar), the middle rounds' range (whisker), the target (|) and the peers' ranges."
    cs = _sorted(results['comparisons'])
    if not cs: return None
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(cs) + 1.6))
    ys = list(range(len(cs)))[::-1]
    right = max([c['median'] for c in cs] + [c['target'] or 1 for c in cs]
                + [hi for peers in PEERS.values() for _, hi in peers.values()]) * 1.12
    for y, c in zip(ys, cs):
        colour = 'tab:blue' if c['target'] is None or c['median'] <= c['target'] else 'tab:red'
        ax.barh(y, c['median'] - 1, left=1, height=0.5, color=colour, alpha=0.8)
        low, high = _middle(c['ratios'])
        ax.plot([low, min(high, right)], [y, y], color='k', lw=1)
        ax.text(min(c['median'], right) + 0.01, y - 0.1, f"{c['median']:.2f}", fontsize=7, va='top')
        if c['target'] is not None: ax.plot([c['target']] * 2, [y - 0.35, y + 0.35], color='k', lw=2)
        for k, name in enumerate(PEER_NAMES):
            low_high = PEERS.get((c['measure'], c['arm'], c['batch_size']), {}).get(name)
            if low_high:
                label = name if name not in ax.get_legend_handles_labels()[1] else None
                ax.plot(low_high, [y + 0.3 + 0.13 * k] * 2, color=('tab:orange', 'tab:green')[k], lw=3,
                        solid_capstyle='butt', marker='|', label=label)
    ax.axvline(1, color='grey', lw=0.8)
    ax.set_xlim(min(0.9, min(_middle(c['ratios'])[0] for c in cs) - 0.02), right)
    ax.set_yticks(ys, [f"{c['arm']} / {c['reference']}, bs {c['batch_size']}" for c in cs], fontsize=8)
    ax.set_xlabel('epoch time ratio: median of per-round ratios (bar, red if it misses its target), '
                  'target (black |),\nrange of the rounds without the fastest and slowest (whisker), peers (coloured)', fontsize=8)
    ax.set_title(f"minifast benchmarks, {results['info']['date'][:10]}" + (' (smoke run)' if results['info']['mode'] == 'quick' else ''), fontsize=10)
    if ax.get_legend_handles_labels()[1]: ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
