"""`make gpu-check`: the checks that need a GPU, in one script, with a short report.

1. every notebook at quick size on the GPU (their CUDA paths: `default_device()` is CUDA there);
2. a fit with ActivationStats, RunningBatchNorm and one-cycle under `torch.cuda.set_sync_debug_mode('error')`, with
   nonfinite='ignore' and with the default nonfinite='raise' (whose check runs on the device), so that any host sync
   in the training or validation batches raises;
3. the non-finite check on the device: a NaN loss at batch 2 stops the fit with an error naming it, with every weight
   finite, and the epoch time with the check on the device against the per-batch host read (`check_on_device=False`);
4. mixed precision: the lesson's CNN for an epoch in float32, bfloat16 and float16 (`MixedPrecision`), the epoch time
   and the speed-up over float32, and the accuracies;
5. the DDP equivalence of tests/test_distributed.py on nccl, one process per GPU, against one process on GPU 0.

Writes the report to bench/out/gpu_check.md (or --out) and prints it. Without a GPU it says so and exits 0.
"""
import argparse, os, shutil, subprocess, sys, tempfile, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MINIFAST_PROGRESS', '0')
import torch

def check_notebooks(log, timeout):
    "Run a copy of nbs/ at quick size; the committed notebooks are left as they are."
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / 'nbs'
        shutil.copytree(ROOT / 'nbs', copy)
        env = {**os.environ, 'MINIFAST_SIZE': 'quick'}
        proc = subprocess.run([str(Path(sys.executable).parent / 'nbdev-test'), str(copy), '--n-workers', '1', '--timing'],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    log(proc.stdout[-2000:] + proc.stderr[-2000:])
    return proc.returncode == 0, f'nbdev-test exit code {proc.returncode}'

def fashion_mnist_on(dev, n_train=50_000, n_valid=10_000):
    "Normalised Fashion-MNIST, `n_train` training and `n_valid` validation images, on `dev`."
    from minifast.data import load_fashion_mnist, normalize_to_train
    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    return [t.to(dev) for t in (x_train[:n_train], y_train[:n_train], x_valid[:n_valid], y_valid[:n_valid])]

def check_sync_free_fit(log, device='cuda', nonfinite='ignore'):
    "A short fit on CUDA where any host sync in the batches raises (the non-finite flag's read at the end of the training pass is allowed)."
    from minifast.foundations import set_seed
    from minifast.data import DataLoaders, load_fashion_mnist, normalize_to_train
    from minifast.losses import accuracy, cross_entropy
    from minifast.learner import Callback, Learner
    from minifast.schedule import one_cycle
    from minifast.hooks import ActivationStats, BatchTransformXCallback, DeviceCallback, view_tfm
    from minifast.norms import RunningBatchNorm, get_norm_cnn

    class NoSyncInEpochs(Callback):
        _order = 5   # MetricsCallback (10) reads its averages back in after_epoch, after this turns the check off
        def _mode(self, mode):
            if device == 'cuda': torch.cuda.set_sync_debug_mode(mode)
        def before_epoch(self): self._mode('error')
        def before_validate(self): self._mode('error')
        def after_epoch(self): self._mode('default')
        def after_fit(self): self._mode('default')

    class AllowTheFlagRead(NoSyncInEpochs):
        _order = 99  # last in the batch: the end of the training pass reads the non-finite flag, once per epoch
        before_epoch = before_validate = after_epoch = None
        def after_batch(self):
            if self.learn.in_train and self.learn.iter == self.learn.iters - 1: self._mode('default')

    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    dev = torch.device(device)
    dls = DataLoaders.from_tensors(x_train[:8192].to(dev), y_train[:8192].to(dev), x_valid[:2048].to(dev),
                                   y_valid[:2048].to(dev), batch_size=256)
    set_seed(0)
    stats = ActivationStats()
    learn = Learner(get_norm_cnn(RunningBatchNorm), dls, cross_entropy, lr=0.4, metrics=accuracy, nonfinite=nonfinite,
                    cbs=[DeviceCallback(dev), BatchTransformXCallback(view_tfm(1, 28, 28)), stats, NoSyncInEpochs(), AllowTheFlagRead()]
                    + one_cycle(0.4, moms=None))
    learn.metrics.printer = log
    learn.fit(2)
    acc = learn.metrics.history[-1]['valid_accuracy']
    sync = 'without a host sync' if device == 'cuda' else '(no sync check on the CPU)'
    on_device = learn._nonfinite_flag is not None
    return acc > 0.7 and (on_device == (nonfinite == 'raise' and device == 'cuda')), \
        (f"nonfinite={nonfinite!r}, check on the device {on_device}: 2 epochs {sync}; valid accuracy {acc:.4f}, "
         f"{stats.n_recorded} batches recorded")

def _cnn_learner(data, batch_size, cbs=(), **kwargs):
    "The lesson's CNN (BatchNorm) on `data` (on the device already), SGD at lr 0.4 with one-cycle, no printing."
    from minifast.data import DataLoaders
    from minifast.losses import accuracy, cross_entropy
    from minifast.learner import Learner
    from minifast.schedule import one_cycle
    from minifast.hooks import BatchTransformXCallback, DeviceCallback, view_tfm
    from minifast.norms import BatchNorm, get_norm_cnn
    dev = data[0].device
    dls = DataLoaders.from_tensors(*data, batch_size=batch_size, valid_batch_size=1024)
    learn = Learner(get_norm_cnn(BatchNorm), dls, cross_entropy, lr=0.4, metrics=accuracy,
                    cbs=[DeviceCallback(dev), BatchTransformXCallback(view_tfm(1, 28, 28))] + one_cycle(0.4, moms=None) + list(cbs),
                    **kwargs)
    learn.metrics.printer = None
    return learn

def _epoch_seconds(make_learner, rounds=3):
    "The median time of a 1-epoch fit (after one untimed fit to warm up), and the last fit's learner."
    times = []
    for i in range(rounds + 1):
        learn = make_learner()
        start = time.perf_counter()
        learn.fit(1)
        if torch.cuda.is_available(): torch.cuda.synchronize()
        if i: times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], learn

def check_nonfinite_on_device(log, device='cuda'):
    "A NaN loss at batch 2 stops a CUDA fit, naming the batch, with finite weights; the check's cost against the host read."
    from minifast.foundations import set_seed
    from minifast.learner import Callback, NonFiniteLossError
    dev = torch.device(device)
    data = fashion_mnist_on(dev, 50_000 if device == 'cuda' else 2_048, 10_000 if device == 'cuda' else 1_024)

    class PoisonAt2(Callback):
        def after_loss(self):
            if self.learn.in_train and self.learn.iter == 2: self.learn.loss = self.learn.loss * float('nan')
    set_seed(0)
    learn = _cnn_learner(data, 512, cbs=[PoisonAt2()])
    learn.check_on_device = True   # the default on CUDA; forced so that the CPU dry run takes the same path
    try:
        learn.fit(1)
        return False, 'a NaN loss at batch 2 did not stop the fit'
    except NonFiniteLossError as e: message = str(e)
    log(message)
    finite = all(torch.isfinite(t).all() for t in learn.model.state_dict().values() if torch.is_tensor(t) and t.is_floating_point())
    named = 'at epoch 0, batch 2; checked on the device' in message
    notes = [f"NaN at batch 2: error names it {named}, weights finite {finite} ({message.split(': the steps')[0].split('; ')[1]})"]
    for batch_size in (512, 64):
        seconds = {}
        for on_device in (False, True):
            def make():
                set_seed(0)
                learn = _cnn_learner(data, batch_size)
                learn.check_on_device = on_device
                return learn
            seconds[on_device], _ = _epoch_seconds(make)
        notes.append(f"bs {batch_size}: epoch {seconds[False]:.3f} s with the host read per batch, {seconds[True]:.3f} s on the device "
                     f"(ratio {seconds[True] / seconds[False]:.3f})")
    return named and finite, '; '.join(notes)

def check_mixed_precision(log, device='cuda'):
    "The lesson's CNN for an epoch in float32, bfloat16 and float16: epoch time (median of 3), speed-up over float32, accuracy."
    from minifast.foundations import set_seed
    from minifast.learner import MixedPrecision
    dev = torch.device(device)
    on_gpu = device == 'cuda'
    data = fashion_mnist_on(dev, 50_000 if on_gpu else 2_048, 10_000 if on_gpu else 1_024)
    notes, ok = [f"cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}"] if on_gpu else [], True
    for batch_size in ((512, 4096) if on_gpu else (512,)):
        results = {}
        for name, dtype in [('float32', None), ('bfloat16', torch.bfloat16), ('float16', torch.float16)]:
            def make():
                set_seed(0)
                return _cnn_learner(data, batch_size, cbs=[] if dtype is None else [MixedPrecision(dtype)])
            seconds, learn = _epoch_seconds(make, rounds=3 if on_gpu else 1)
            results[name] = (seconds, learn.metrics.history[-1]['valid_accuracy'])
        base, base_acc = results['float32']
        for name, (seconds, acc) in results.items():
            ok &= abs(acc - base_acc) < 0.02
            log(f'bs {batch_size} {name}: {seconds:.3f} s per epoch, valid accuracy {acc:.4f}')
        notes.append(f"bs {batch_size}: " + ', '.join(f"{name} {seconds:.3f} s (x{base / seconds:.2f}, acc {acc:.4f})"
                                                      for name, (seconds, acc) in results.items()))
    return ok, '; '.join(notes) + ' (xN: speed-up over float32; passes when every accuracy is within 0.02 of float32)'

def check_ddp_nccl(log, timeout, device='cuda'):
    "tests/ddp_cases.py on nccl with one rank per GPU, against one process on the GPU."
    n = torch.cuda.device_count() if device == 'cuda' else 2
    cases = ['plain32', 'norms', 'norms64', 'uneven']
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, 'DDP_CASES_DEVICE': device, 'OMP_NUM_THREADS': '1'}
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
                               str(ROOT / 'tests' / 'ddp_cases.py'), ','.join(cases), d],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            log(proc.stdout[-3000:] + proc.stderr[-3000:])
            return False, f'torchrun exit code {proc.returncode}'
        os.environ['DDP_CASES_DEVICE'] = device
        sys.path.insert(0, str(ROOT / 'tests'))
        import ddp_cases
        notes, ok = [], True
        for case in cases:
            ranks = [torch.load(Path(d) / f'{case}_rank{r}.pt', weights_only=False) for r in range(n)]
            ref = ddp_cases.run_case(case, Path(d))
            same = all(torch.equal(ranks[0]['states'], r['states']) for r in ranks[1:])
            try:
                torch.testing.assert_close(ranks[0]['states'], ref['states'], rtol=1e-5, atol=1e-6)
                close = True
            except AssertionError as e: close, _ = False, log(f'{case}: {e}')
            worst = (ranks[0]['states'] - ref['states']).abs().max().item()
            quiet = all(r['host_traffic'] == [] for r in ranks)   # minifast/distributed.py: no tensor from Python data, no .item()
            syncs = max(len(r['cuda_syncs']) for r in ranks)       # any op, DDP's included: reported, not failed (not yet known)
            if syncs: log(f"{case}: synchronisations in training batches, rank 0's first: {ranks[0]['cuda_syncs'][:3]}")
            ok &= same and close and quiet
            notes.append(f'{case}: ranks equal {same}, within rtol 1e-5/atol 1e-6 {close} (largest difference {worst:.1e}), '
                         f'no host traffic from minifast {quiet}, CUDA syncs in training batches after the first {syncs}')
    return ok, f"{n} rank(s) on {'nccl' if device == 'cuda' else 'gloo'}; " + '; '.join(notes)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=ROOT / 'bench' / 'out' / 'gpu_check.md')
    p.add_argument('--skip-notebooks', action='store_true', help='only the fit and the DDP checks')
    p.add_argument('--cpu-dry-run', action='store_true',
                   help="run the fit and the DDP checks on the CPU (gloo, 2 ranks, no sync check): tests this script, not a GPU")
    args = p.parse_args()
    if args.cpu_dry_run:
        for name, check in [('fit', lambda log: check_sync_free_fit(log, 'cpu')),
                            ('fit, nonfinite=raise', lambda log: check_sync_free_fit(log, 'cpu', 'raise')),
                            ('non-finite check on the device', lambda log: check_nonfinite_on_device(log, 'cpu')),
                            ('mixed precision', lambda log: check_mixed_precision(log, 'cpu')),
                            ('DDP', lambda log: check_ddp_nccl(log, 240, 'cpu'))]:
            ok, note = check(print)
            print(f'cpu dry run: {"PASS" if ok else "FAIL"} {name}: {note}')
        return 0
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was checked.')
        return 0
    lines = [f'# gpu-check: {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, torch {torch.__version__}', '']
    details = []
    checks = [('CUDA fit without host syncs', check_sync_free_fit),
              ("CUDA fit without host syncs, nonfinite='raise' (the default)", lambda log: check_sync_free_fit(log, 'cuda', 'raise')),
              ('non-finite check on the device', check_nonfinite_on_device),
              ('mixed precision speed-up', check_mixed_precision),
              ('DDP equivalence on nccl', lambda log: check_ddp_nccl(log, 240))]
    if not args.skip_notebooks: checks.insert(0, ('notebooks at quick size', lambda log: check_notebooks(log, 300)))
    failed = False
    for name, check in checks:
        start = time.perf_counter()
        try: ok, note = check(lambda s: details.append(str(s)))
        except Exception as e:
            ok, note = False, f'{type(e).__name__}: {e}'
            details.append(traceback.format_exc())
        failed |= not ok
        lines.append(f'- {"PASS" if ok else "FAIL"} {name} ({time.perf_counter() - start:.0f} s): {note}')
    report = '\n'.join(lines + ['', '## Details', '', '```', *details, '```', ''])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print('\n'.join(lines)); print(f'report: {args.out}')
    return 1 if failed else 0

if __name__ == '__main__':
    sys.exit(main())
