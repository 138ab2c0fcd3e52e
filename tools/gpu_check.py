"""`make gpu-check`: the checks that need a GPU, in one script, with a short report.

1. every notebook at quick size on the GPU (their CUDA paths: `default_device()` is CUDA there);
2. a fit with ActivationStats, RunningBatchNorm and one-cycle under `torch.cuda.set_sync_debug_mode('error')`
   (nonfinite='ignore'), so that any host sync in the training or validation batches raises;
3. the DDP equivalence of tests/test_distributed.py on nccl, one process per GPU, against one process on GPU 0.

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

def check_sync_free_fit(log, device='cuda'):
    "A short fit on CUDA where any host sync between `before_epoch` and `after_epoch` raises."
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
        def after_epoch(self): self._mode('default')
        def after_fit(self): self._mode('default')

    x_train, y_train, x_valid, y_valid = load_fashion_mnist()
    x_train, x_valid = normalize_to_train(x_train, x_valid)
    dev = torch.device(device)
    dls = DataLoaders.from_tensors(x_train[:8192].to(dev), y_train[:8192].to(dev), x_valid[:2048].to(dev),
                                   y_valid[:2048].to(dev), batch_size=256)
    set_seed(0)
    stats = ActivationStats()
    learn = Learner(get_norm_cnn(RunningBatchNorm), dls, cross_entropy, lr=0.4, metrics=accuracy, nonfinite='ignore',
                    cbs=[DeviceCallback(dev), BatchTransformXCallback(view_tfm(1, 28, 28)), stats, NoSyncInEpochs()]
                    + one_cycle(0.4, moms=None))
    learn.metrics.printer = log
    learn.fit(2)
    acc = learn.metrics.history[-1]['valid_accuracy']
    sync = 'without a host sync' if device == 'cuda' else '(no sync check on the CPU)'
    return acc > 0.7, f'2 epochs {sync}; valid accuracy {acc:.4f}, {stats.n_recorded} batches recorded'

def check_ddp_nccl(log, timeout, device='cuda'):
    "tests/ddp_cases.py on nccl with one rank per GPU, against one process on the GPU."
    n = torch.cuda.device_count() if device == 'cuda' else 2
    cases = ['plain32', 'norms', 'uneven']
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
            ok &= same and close
            notes.append(f'{case}: ranks equal {same}, within rtol 1e-5/atol 1e-6 {close} (largest difference {worst:.1e})')
    return ok, f"{n} rank(s) on {'nccl' if device == 'cuda' else 'gloo'}; " + '; '.join(notes)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', type=Path, default=ROOT / 'bench' / 'out' / 'gpu_check.md')
    p.add_argument('--skip-notebooks', action='store_true', help='only the fit and the DDP checks')
    p.add_argument('--cpu-dry-run', action='store_true',
                   help="run the fit and the DDP checks on the CPU (gloo, 2 ranks, no sync check): tests this script, not a GPU")
    args = p.parse_args()
    if args.cpu_dry_run:
        for name, check in [('fit', lambda log: check_sync_free_fit(log, 'cpu')), ('DDP', lambda log: check_ddp_nccl(log, 240, 'cpu'))]:
            ok, note = check(print)
            print(f'cpu dry run: {"PASS" if ok else "FAIL"} {name}: {note}')
        return 0
    if not torch.cuda.is_available():
        print('gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was checked.')
        return 0
    lines = [f'# gpu-check: {torch.cuda.get_device_name(0)} × {torch.cuda.device_count()}, torch {torch.__version__}', '']
    details = []
    checks = [('CUDA fit without host syncs', check_sync_free_fit), ('DDP equivalence on nccl', lambda log: check_ddp_nccl(log, 240))]
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
