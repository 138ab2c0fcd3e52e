"""Checkpoints you can trust: all or nothing, clear errors for bad files, writes that survive a kill, and a fit
that resumes exactly.

The exactness and crash tests run real subprocesses, which this file starts as `python tests/test_checkpoint.py
<role> ...` (see `main` at the end), each with one thread, and kill with SIGKILL. An uninterrupted 3-epoch fit and
fits killed after a checkpoint and resumed in a new process must end with bit-for-bit equal weights, optimiser state,
recorded losses, learning rates, momentums, metrics and activation statistics.

Everything is tiny (80 8x8 images, a CNN with a few hundred weights): the whole file runs in seconds.
"""
import copy, os, queue, random, signal, subprocess, sys, threading, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from state_checks import assert_state_equal
import minifast
from minifast.foundations import set_seed
from minifast.data import DataLoader, DataLoaders
from minifast.losses import cross_entropy
from minifast.learner import (CHECKPOINT_VERSION, Callback, CheckpointError, Learner, SaveCheckpoint, read_checkpoint)
from minifast.schedule import Recorder, one_cycle
from minifast.hooks import ActivationStats, BatchTransformXCallback, get_cnn_model, view_tfm
from minifast.norms import RunningBatchNorm
from minifast.gradients import GradientStats, UpdateStats

N_CLASSES, SIDE, N_EPOCHS = 3, 8, 3
TIMEOUT = 120   # seconds for any one subprocess; they take a few


# ---------------------------------------------------------------- the fit that is run, killed and resumed
def tiny_data(n_train=80, n_valid=16, seed=0):
    "Flat 8x8 'images' whose class sets one bright row: learnable, tiny."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, SIDE * SIDE, generator=g)
    y = torch.randint(0, N_CLASSES, (n_train + n_valid,), generator=g)
    x.view(-1, SIDE, SIDE)[torch.arange(len(x)), y * 2] += 2.
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class Jitter(Callback):
    "Adds noise scaled by draws from Python's `random` and NumPy, so that both generators matter to the result."
    def before_batch(self):
        if self.learn.in_train: self.learn.xb = self.learn.xb * (1 + 0.01 * random.random()) + 0.01 * float(np.random.rand())


def make_learner(seed, checkpoints=None # a path prefix: save `<prefix>epoch.pth` each epoch, `<prefix>batches.pth` every 4 batches
                 ):
    """The fit under test: one-cycle with momentum, SGD with momentum, dropout, a shuffled loader with its own
    generator, `ActivationStats`, `GradientStats`, `UpdateStats`, a `Recorder`, the metrics, and noise from Python and NumPy."""
    set_seed(seed)
    x_train, y_train, x_valid, y_valid = tiny_data()
    train = DataLoader(x_train, y_train, 16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    dls = DataLoaders(train, DataLoader(x_valid, y_valid, 16))
    model = nn.Sequential(nn.Dropout(0.1), get_cnn_model(N_CLASSES, (4, 8), n_in=1, leak=0.1, sub=0.4))
    cbs = [BatchTransformXCallback(view_tfm(1, SIDE, SIDE)), Jitter(), ActivationStats(every=2), GradientStats(every=2),
           UpdateStats(every=3), Recorder(('lr', 'momentum'))] + one_cycle(0.3)
    if checkpoints is not None:
        cbs += [SaveCheckpoint(f'{checkpoints}epoch.pth'), SaveCheckpoint(f'{checkpoints}batches.pth', every_epoch=False, every_n_batches=4)]
    learn = Learner(model, dls, cross_entropy, lr=0.3, cbs=cbs,
                    opt_func=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
    learn.metrics.printer = None
    return learn


def outcome(learn) -> dict:
    "Everything that must be equal, bit for bit, between an uninterrupted and a resumed fit."
    stats, grads, updates = learn.activation_stats, learn.gradient_stats, learn.update_stats
    return dict(model=learn.model.state_dict(), opt=learn.opt.state_dict(), params=learn.recorder.params,
                losses=learn.recorder.losses, history=learn.metrics.history, stats=stats.stats[:, :stats.n_recorded],
                grad_stats=grads.stats[:, :grads.n_recorded], update_stats=updates.stats[:, :updates.n_recorded],
                n_epochs_done=learn.n_epochs_done, n_iter=learn.n_iter)


class PauseAt(Callback):
    "After training batch (`epoch`, `batch`) and any checkpoint written then, say so and wait to be killed."
    _order = 200
    def __init__(self, epoch, batch): self.at = (epoch, batch)
    def after_batch(self):
        if self.learn.in_train and (self.learn.epoch, self.learn.iter) == self.at:
            print('paused', flush=True)
            time.sleep(TIMEOUT)


def child_fit(folder, pause_epoch, pause_batch):
    "Fit with checkpoints in `folder`, pausing to be killed if asked; save the outcome."
    learn = make_learner(seed=0, checkpoints=f'{folder}/')
    learn.fit(N_EPOCHS, cbs=PauseAt(int(pause_epoch), int(pause_batch)) if int(pause_epoch) >= 0 else None)
    torch.save(outcome(learn), Path(folder) / 'outcome.pth')


def child_resume(folder):
    "Resume from each checkpoint in `folder`, with a differently initialised model; save each outcome."
    for seed, name in enumerate(CASES, 1):
        learn = make_learner(seed, checkpoints=f'{folder}/after-{name}-').fit(N_EPOCHS, resume_from=Path(folder) / f'{name}.pth')
        torch.save(outcome(learn), Path(folder) / f'outcome-{name}.pth')


def child_write(folder):
    """For each number read from stdin, fork a writer that saves a checkpoint again and again, numbered from there,
    every weight equal to the number, saying when each save starts and ends; wait for it to be killed, say so.
    Forking saves starting an interpreter (and importing torch) for each kill."""
    model = nn.Linear(2048, 1024)   # 8 MB of weights, and as much momentum: each save takes a while
    learn = Learner(model, None, cross_entropy, default_cbs=False, opt_func=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9))
    for p in model.parameters(): p.grad = torch.ones_like(p)
    learn.opt.step()                 # now there are momentum buffers to save
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:                 # the writer
            k = int(line)
            print(f'pid {os.getpid()}', flush=True)
            while True:
                k += 1
                with torch.no_grad():
                    for p in model.parameters(): p.fill_(k)
                start = time.perf_counter()
                print(f'writing {k}', flush=True)
                learn.save(Path(folder) / 'model.pth')
                print(f'saved {k} {time.perf_counter() - start:.6f}', flush=True)
        _, status = os.waitpid(pid, 0)
        print(f'ended {status}', flush=True)


# ---------------------------------------------------------------- running subprocesses
def child_env():
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'MINIFAST_PROGRESS': '0', 'IN_TEST': '1'}


def start(*args, stdin=None):
    "Run this file as a child with `args`; threads collect its output lines in `proc.lines` and its stderr in `proc.err`."
    proc = subprocess.Popen([sys.executable, __file__, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())
    proc.lines, proc.err = queue.Queue(), []
    def pump(stream, put):
        for line in stream: put(line)
        if stream is proc.stdout: proc.lines.put(None)      # the end of its output
    threading.Thread(target=pump, args=(proc.stdout, lambda line: proc.lines.put(line.strip())), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, proc.err.append), daemon=True).start()
    return proc


def stop(proc):
    "Wait for the child to end (kill it after `TIMEOUT`); its stderr."
    try: proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired: proc.kill(); proc.wait()
    time.sleep(0.05)   # let the threads read the last of its output
    return ''.join(proc.err)[-3000:]


def read_line(proc, deadline):
    "The child's next line of output, or a failure showing its stderr if it ends or takes too long."
    try: line = proc.lines.get(timeout=max(0., deadline - time.monotonic()))
    except queue.Empty: line = None
    if line is None:
        proc.kill()
        pytest.fail(f"the child ended or timed out before saying anything more; its stderr:\n{stop(proc)}")
    return line


def finish(proc):
    "Wait for a child that must succeed."
    err = stop(proc)
    assert proc.returncode == 0, f"child failed with {proc.returncode}:\n{err}"


def kill_when_paused(proc):
    "Wait for the child to say it paused, then SIGKILL it."
    assert read_line(proc, time.monotonic() + TIMEOUT) == 'paused'
    os.kill(proc.pid, signal.SIGKILL)
    stop(proc)
    assert proc.returncode == -signal.SIGKILL




# ---------------------------------------------------------------- exactness after a real SIGKILL
PAUSE = (1, 4)   # 5 batches an epoch: killed after the 10th batch of the fit (epoch 1, batch 4)
CASES = {'epoch': (1, 0),     # the last checkpoint saved after an epoch: after the first
         'batches': (1, 3)}   # the last one saved every 4 batches: after the 8th (epoch 1, batch 2)


@pytest.fixture(scope='module')
def fits(tmp_path_factory):
    """The uninterrupted fit and the fit that is killed, side by side; then a new process that resumes from each of the
    killed fit's checkpoints in turn (the second in a process that has already run a fit, which is no easier)."""
    whole_dir, killed_dir = tmp_path_factory.mktemp('whole'), tmp_path_factory.mktemp('killed')
    whole, killed = start('fit', whole_dir, -1, -1), start('fit', killed_dir, *PAUSE)
    kill_when_paused(killed)
    assert not (killed_dir / 'outcome.pth').exists()
    positions = {name: read_checkpoint(killed_dir / f'{name}.pth')['fit'] for name in CASES}
    resumer = start('resume', killed_dir)
    finish(whole); finish(resumer)
    load = lambda path: torch.load(path, weights_only=True)
    return load(whole_dir / 'outcome.pth'), {name: load(killed_dir / f'outcome-{name}.pth') for name in CASES}, positions


@pytest.mark.parametrize('case', CASES)
def test_a_killed_fit_resumes_bit_for_bit(fits, case):
    whole, resumed, positions = fits
    assert (positions[case]['epoch'], positions[case]['batch']) == CASES[case]        # the kill did cost work...
    assert len(whole['losses']) == N_EPOCHS * 5 and len(whole['history']) == N_EPOCHS
    assert whole['stats'].shape[1] == N_EPOCHS * 5 // 2 + 1                            # ...which the resumed fit redid
    assert whole['grad_stats'].shape[1] == N_EPOCHS * 5 // 2 + 1 and whole['update_stats'].shape[1] == N_EPOCHS * 5 // 3
    assert_state_equal(resumed[case], whole, case)


def test_the_fit_under_test_depends_on_every_generator():
    "The exactness test is not vacuous: each generator a checkpoint restores changes the fit's losses if disturbed."
    reference = make_learner(0).fit(1)    # in this process: compare only with itself, not with the child's bits
    for disturb in [lambda: torch.rand(1), lambda: random.random(), lambda: np.random.rand(),
                    lambda learn: learn.dls.train.generator.seed()]:
        learn = make_learner(0)
        if disturb.__code__.co_argcount: disturb(learn)
        else: disturb()
        learn.fit(1)
        assert not torch.equal(learn.recorder.losses, reference.recorder.losses)


def test_a_resumed_fit_refuses_a_checkpoint_for_another_fit(tmp_path):
    path = tmp_path / 'epoch.pth'
    make_learner(0, checkpoints=f'{tmp_path}/').fit(1)
    with pytest.raises(CheckpointError, match='the fit was of 1 epochs, this one of 2'): make_learner(0).fit(2, resume_from=path)
    learn = make_learner(0)
    learn.remove_cbs(learn.activation_stats)
    with pytest.raises(CheckpointError, match=r"callbacks with state: \[.*'activation_stats'.*\] in the checkpoint"):
        learn.fit(1, resume_from=path)
    learn.save(tmp_path / 'plain.pth')
    with pytest.raises(CheckpointError, match='no fit in progress'): learn.fit(1, resume_from=tmp_path / 'plain.pth')


def test_a_finished_fit_resumes_to_its_end(tmp_path):
    done = make_learner(0, checkpoints=f'{tmp_path}/').fit(1)
    again = make_learner(5).fit(1, resume_from=tmp_path / 'epoch.pth')
    assert_state_equal(outcome(again), outcome(done))


def test_checkpoints_work_the_same_once_minifast_distributed_is_imported(tmp_path):
    "minifast.distributed wraps Learner.save and Learner.load for process groups; outside one they take the same arguments."
    import minifast.distributed  # noqa: F401  (patches Learner.save and Learner.load)
    done = make_learner(0, checkpoints=f'{tmp_path}/').fit(1)           # SaveCheckpoint calls save(path, fit=...)
    again = make_learner(5).fit(1, resume_from=tmp_path / 'epoch.pth')
    assert_state_equal(outcome(again), outcome(done))
    saved = small_learner().save(tmp_path / 'three_classes.pth')
    with pytest.warns(UserWarning, match='skipped'): small_learner(n_out=5, seed=1).load(saved, strict=False)


def test_save_checkpoint_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match='never save'): SaveCheckpoint(tmp_path / 'x.pth', every_epoch=False)
    with pytest.raises(ValueError, match='at least 1'): SaveCheckpoint(tmp_path / 'x.pth', every_n_batches=0)


def test_a_checkpoint_records_its_format_and_versions(tmp_path):
    ckpt = read_checkpoint(make_learner(0).save(tmp_path / 'm.pth'))
    assert ckpt['version'] == CHECKPOINT_VERSION and ckpt['minifast'] == minifast.__version__
    assert ckpt['torch'] == torch.__version__ and isinstance(ckpt['torch'], str)


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_a_checkpoint_gets_the_permissions_of_a_new_file(tmp_path, umask):
    "mkstemp makes private files; the checkpoint renamed into place gets what the umask gives any new file."
    learn = Learner(nn.Linear(3, 2), None, cross_entropy, default_cbs=False)
    old = os.umask(umask)
    try: path = learn.save(tmp_path/'model.pth')
    finally: os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask


# ---------------------------------------------------------------- crash safety: SIGKILL while writing
def test_killing_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    "Kill the writer at different moments of a save, four times in a row: each time the file holds a whole checkpoint."
    path, left_a_temp_file = tmp_path / 'model.pth', 0
    proc, writer = start('write', tmp_path, stdin=subprocess.PIPE), None   # `writer`: the pid of a writer not known to be dead
    try:
        for round, fraction in enumerate([0.1, 0.4, 0.7, 0.95]):
            deadline = time.monotonic() + TIMEOUT
            proc.stdin.write(f'{round * 100}\n'); proc.stdin.flush()
            writer = int(read_line(proc, deadline).split()[1])
            assert read_line(proc, deadline) == f'writing {round * 100 + 1}'
            _, saved, seconds = read_line(proc, deadline).split()        # one whole save, to time it
            assert read_line(proc, deadline) == f'writing {round * 100 + 2}'
            time.sleep(fraction * float(seconds))
            os.kill(writer, signal.SIGKILL)
            last_saved = int(saved)
            while not (line := read_line(proc, deadline)).startswith('ended'):
                if line.startswith('saved'): last_saved = int(line.split()[1])
            assert int(line.split()[1]) == signal.SIGKILL          # the wait status of a process killed by SIGKILL
            writer = None
            left_a_temp_file += any(p.name.startswith('.model.pth.') for p in tmp_path.iterdir())
            for p in tmp_path.glob('.model.pth.*'): p.unlink()
            learn = Learner(nn.Linear(2048, 1024), None, cross_entropy, default_cbs=False,
                            opt_func=lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)).load(path)
            values = torch.cat([p.flatten() for p in learn.model.parameters()]).unique()
            assert len(values) == 1 and int(values) in (last_saved, last_saved + 1), (values, last_saved)
    finally:
        if writer is not None:                                  # a round failed: end its writer, which would write on
            try: os.kill(writer, signal.SIGKILL)
            except ProcessLookupError: pass
        proc.stdin.close()                                      # the pool ends when its input does
        finish(proc)
    assert left_a_temp_file >= 1   # at least one kill landed inside a save, which still left a whole checkpoint


# ---------------------------------------------------------------- all or nothing
def small_learner(n_out=N_CLASSES, seed=0, opt_func=None, splitter=None):
    set_seed(seed)
    model = nn.Sequential(nn.Linear(SIDE * SIDE, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_out))
    dls = DataLoaders.from_tensors(*tiny_data(), batch_size=16)
    learn = Learner(model, dls, cross_entropy, lr=0.1, default_cbs=False, splitter=splitter,
                    opt_func=opt_func or (lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)))
    return learn.fit(1)


def everything(learn): return copy.deepcopy((learn.model.state_dict(), learn.opt.state_dict()))


@pytest.fixture
def saved(tmp_path): return small_learner().save(tmp_path / 'three_classes.pth')


def test_a_different_head_changes_nothing(saved):
    learn = small_learner(n_out=5, seed=1)
    before = everything(learn)
    with pytest.raises(CheckpointError) as info: learn.load(saved)
    message = str(info.value)
    assert str(saved) in message and 'nothing was changed' in message
    assert '3.weight: checkpoint (3, 16) float32, model (5, 16) float32' in message and '3.bias: checkpoint (3,)' in message
    assert_state_equal(everything(learn), before)


def test_an_optimiser_that_does_not_fit_changes_nothing(saved):
    "The model fits but the optimiser does not (two param groups, or Adam's settings): the model is not loaded either."
    two_groups = lambda m: [m[:3].parameters(), m[3].parameters()]
    for learn, says in [(small_learner(seed=1, splitter=two_groups), '1 param groups in the checkpoint, 2 here'),
                        (small_learner(seed=1, opt_func=torch.optim.Adam), 'another optimiser')]:
        before = everything(learn)
        with pytest.raises(CheckpointError, match=says): learn.load(saved)
        assert_state_equal(everything(learn), before)


def test_parameters_in_another_order_are_refused(saved):
    reversed_order = lambda m: [reversed(list(m.parameters()))]
    learn = small_learner(seed=1, splitter=reversed_order)
    with pytest.raises(CheckpointError, match="parameter 0 is 0.weight in the checkpoint, 3.bias here"): learn.load(saved)


def test_not_strict_loads_what_fits_and_says_what_it_skipped(saved):
    learn, source = small_learner(n_out=5, seed=1), small_learner()
    before = everything(learn)
    with pytest.warns(UserWarning, match=r'loaded 7 of the model.s entries; skipped 2 entries and the optimiser state') as caught: learn.load(saved, strict=False)
    assert '3.weight: checkpoint (3, 16)' in str(caught[0].message) and str(saved) in str(caught[0].message)
    for key in ['0.weight', '1.running_mean', '1.num_batches_tracked']:
        assert torch.equal(learn.model.state_dict()[key], source.model.state_dict()[key])
    for key in ['3.weight', '3.bias']: assert torch.equal(learn.model.state_dict()[key], before[0][key])
    assert_state_equal(learn.opt.state_dict(), before[1])


def test_a_matching_checkpoint_loads_everything(saved):
    learn, source = small_learner(seed=1), small_learner()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.load(saved)
    assert_state_equal(everything(learn), everything(source))


def test_a_checkpoint_from_before_versions_still_loads(saved, tmp_path):
    old = {k: v for k, v in torch.load(saved, weights_only=True).items() if k in ('model', 'opt')}
    torch.save(old, tmp_path / 'old.pth')
    learn = small_learner(seed=1).load(tmp_path / 'old.pth')
    assert_state_equal(everything(learn), everything(small_learner()))



def test_a_running_batch_norm_checkpoint_with_the_old_sums_loads_as_averages(tmp_path):
    "Before its buffer held running averages, RunningBatchNorm saved the lesson's sums; such a checkpoint loads to the same layer."
    def rbn_learner(seed):
        set_seed(seed)
        model = nn.Sequential(nn.Linear(SIDE * SIDE, 8), nn.Unflatten(1, (8, 1, 1)), RunningBatchNorm(8), nn.Flatten(),
                              nn.Linear(8, N_CLASSES))
        learn = Learner(model, DataLoaders.from_tensors(*tiny_data(), batch_size=16), cross_entropy, lr=0.1, default_cbs=False)
        return learn.fit(1)
    source = rbn_learner(0)
    ckpt = torch.load(source.save(tmp_path / 'new.pth'), weights_only=True)
    rbn = source.model[2]
    assert ckpt['model']['2._extra_state']['running'] == 'averages'
    ckpt['model']['2.running'] = rbn.running * rbn.count                  # what the layer saved before
    del ckpt['model']['2._extra_state']['running']
    torch.save(ckpt, tmp_path / 'old.pth')
    learn = rbn_learner(1).load(tmp_path / 'old.pth')
    torch.testing.assert_close(learn.model[2].running, rbn.running)
    assert learn.model[2].get_extra_state() == rbn.get_extra_state()
    x = tiny_data()[2]
    learn.model.eval(); source.model.eval()
    with torch.no_grad(): torch.testing.assert_close(learn.model(x), source.model(x))


# ---------------------------------------------------------------- bad files
def write_bad(path, kind, good: Path):
    data = good.read_bytes()
    if kind == 'empty': path.write_bytes(b'')
    elif kind.startswith('cut'): path.write_bytes(data[:int(len(data) * float(kind[4:]))])
    elif kind == 'text': path.write_text('epoch 3: loss 0.41\n')
    elif kind == 'newer': torch.save({**torch.load(good, weights_only=True), 'version': CHECKPOINT_VERSION + 1}, path)
    elif kind == 'tensor': torch.save(torch.zeros(3), path)
    elif kind == 'code': torch.save({'model': {}, 'opt': {}, 'hook': Jitter()}, path)


BAD = {'empty': 'the file is empty', 'cut-0.01': 'incomplete or damaged', 'cut-0.5': 'incomplete or damaged',
       'cut-0.99': 'incomplete or damaged', 'text': 'not a checkpoint', 'newer': 'Upgrade minifast',
       'tensor': 'not a minifast checkpoint', 'code': 'never runs code'}


@pytest.mark.parametrize('kind', BAD)
def test_a_bad_file_gets_an_error_naming_it_and_changes_nothing(saved, tmp_path, kind):
    path = tmp_path / f'{kind}.pth'
    write_bad(path, kind, saved)
    learn = small_learner(seed=1)
    before = everything(learn)
    with pytest.raises(CheckpointError) as info: learn.load(path)
    assert str(path) in str(info.value) and BAD[kind] in str(info.value), str(info.value)
    with pytest.raises(CheckpointError, match=BAD[kind]): learn.fit(1, resume_from=path)
    assert_state_equal(everything(learn), before)


def test_a_newer_checkpoint_says_which_versions(saved, tmp_path):
    write_bad(tmp_path / 'newer.pth', 'newer', saved)
    with pytest.raises(CheckpointError, match=f'format {CHECKPOINT_VERSION + 1}, written by minifast {minifast.__version__}'):
        read_checkpoint(tmp_path / 'newer.pth')


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pth'): small_learner().load(tmp_path / 'nowhere.pth')


# ---------------------------------------------------------------- the subprocesses' entry point
def main(role, *args):
    torch.set_num_threads(1)
    {'fit': child_fit, 'resume': child_resume, 'write': child_write}[role](*args)


if __name__ == '__main__': main(*sys.argv[1:])
