"""Data-parallel training with `DistributedCallback`: two ranks on gloo against one process.

Each case runs `torchrun --standalone --nproc_per_node=2 tests/ddp_cases.py CASE DIR` as a subprocess in its own
process group (killed whole on timeout), with a port torchrun picks, one thread per process; the ranks write
their results to files under `tmp_path`, and `rank<r>.done` when they finished cleanly. The single-process
references run here, in the test process, from the same weights and global batches (`tests/ddp_cases.py`).
"""
import itertools, os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
import ddp_cases

def torchrun(case, out, timeout=120):
    "Run `case` on two ranks; (return code, seconds, output). The whole process group is killed on timeout."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(TESTS / 'ddp_cases.py'), case, str(out)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'IN_TEST': '1', 'PYTHONUNBUFFERED': '1'}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=TESTS.parent)
    try: output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun {case} did not finish within {timeout} s:\n{output[-3000:]}")
    return proc.returncode, time.monotonic() - start, output

# One torchrun for all of these (start-up is most of a run's time); 'consensus' ends with an error, so it is last.
CLEAN_CASES = ['plain32', 'plain64', 'norms', 'norms64', 'uneven', 'unsynced', 'resume', 'consensus']

@pytest.fixture(scope='module')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "`runs(case)`: (rank 0's results, rank 1's, the folder), from one torchrun of every clean case."
    out = tmp_path_factory.mktemp('ddp')
    rc, _, output = torchrun(','.join(CLEAN_CASES), out, timeout=150)
    done = [(out / f'rank{r}.done').exists() for r in range(2)]
    assert rc == 0 and all(done), f"torchrun: exit code {rc}, ranks finished {done}\n{output[-3000:]}"
    return lambda case: (*[torch.load(out / f'{case}_rank{r}.pt', weights_only=False) for r in range(2)], out)

@pytest.mark.parametrize('case', ['plain32', 'plain64', 'norms', 'norms64', 'uneven'])
def test_two_ranks_equal_one_process(case, runs, tmp_path, one_thread):
    "Parameters (and buffers, RunningBatchNorm's counts) after each of 10 steps, then validation loss and accuracy."
    rank0, rank1, _ = runs(case)
    ref = ddp_cases.run_case(case, tmp_path)
    assert torch.equal(rank0['states'], rank1['states'])   # the ranks agree bit for bit
    assert rank0['host_reads'] == rank1['host_reads'] == 0   # the synced RunningBatchNorm got the batch size from the callback
    assert rank0['host_traffic'] == rank1['host_traffic'] == []   # no tensor from host data, no host read, in any step
    assert rank0['states'].shape == (10, ref['states'].shape[1])
    tol = {'plain64': dict(rtol=1e-12, atol=1e-12), 'norms64': dict(rtol=1e-10, atol=1e-10)}.get(case, dict(rtol=1e-5, atol=1e-6))
    for step in range(10): torch.testing.assert_close(rank0['states'][step], ref['states'][step], **tol, msg=f'step {step + 1}')
    assert rank0['history'] == rank1['history']
    for key in ('valid_loss', 'valid_accuracy', 'train_loss', 'train_accuracy'):
        assert rank0['history'][0][key] == pytest.approx(ref['history'][0][key], rel=1e-6), key
    # ActivationStats, summed over the ranks at the end of the fit: every activation of the global batch counted once
    assert torch.equal(rank0['act_counts'], ref['act_counts']) and torch.equal(rank0['act_sums'], rank1['act_sums'])
    torch.testing.assert_close(rank0['act_sums'], ref['act_sums'], rtol=1e-4, atol=1e-2)
    # GradientStats too, once each rank's gradients (W times the one-process ones under DDP) are divided by W
    assert torch.equal(rank0['grad_counts'], ref['grad_counts']) and torch.equal(rank0['grad_squares'], rank1['grad_squares'])
    torch.testing.assert_close(rank0['grad_squares'], ref['grad_squares'], rtol=1e-3, atol=0)

def test_a_resumed_fit_ends_as_the_uninterrupted_one(runs):
    "Stopped after step 14, resumed from the checkpoint after step 12, by new learners and by the stopped one (whose "
    "callback counted the stopped fit's epochs: the orders must still be the interrupted fit's): the model, the history (the "
    "training sums of the resumed epoch carried over from every rank) and the activation and gradient statistics."
    for rank, again in itertools.product(runs('resume')[:2], ('resumed', 'resumed_by_itself')):
        whole, resumed = rank['whole'], rank[again]
        assert torch.equal(resumed['state'], whole['state']), again
        assert torch.equal(resumed['act'], whole['act']) and torch.equal(resumed['grads'], whole['grads'])
        assert resumed['history'][0] == whole['history'][0]
        for key, value in whole['history'][1].items(): assert resumed['history'][1][key] == pytest.approx(value, rel=1e-6), key

def test_uneven_validation_counts_each_item_once(runs):
    "101 validation items in batches of 51 (26/25, then 25/25): the accuracy is a whole number of items out of 101."
    rank0, _, _ = runs('uneven')
    correct = rank0['history'][0]['valid_accuracy'] * 101
    assert abs(correct - round(correct)) < 1e-4

def test_checkpoint_once_and_only_rank0_prints(runs):
    rank0, rank1, tmp_path = runs('plain32')
    assert (rank0['n_saves'], rank1['n_saves']) == (1, 0)
    assert rank0['loaded_equal'] and rank1['loaded_equal']   # both ranks loaded it after the barrier
    assert sorted(p.name for p in tmp_path.iterdir() if 'model' in p.name) == ['model.pth']   # no temporary left
    plain = ddp_cases.make_model(None, torch.float32)
    plain.load_state_dict(torch.load(tmp_path / 'model.pth', weights_only=True)['model'])   # no 'module.' prefix
    torch.testing.assert_close(ddp_cases.state_vector(plain), rank0['states'][-1], rtol=0, atol=0)
    assert rank0['printed'].startswith('epoch train_loss') and len(rank0['printed'].splitlines()) == 2
    assert rank1['printed'] == ''

def test_same_decisions_on_every_rank(runs):
    "The LR finder, early stopping, and a NaN loss on rank 1 only, with nonfinite='skip' and 'raise'."
    rank0, rank1, _ = runs('consensus')
    assert rank0['lrf_losses'] == rank1['lrf_losses'] and rank0['lrf_stopped'] and rank1['lrf_stopped']
    assert rank0['lrf_restored'] and rank1['lrf_restored']
    assert rank0['stopped_epoch'] is not None and rank0['stopped_epoch'] == rank1['stopped_epoch']
    assert rank0['es_history'] == rank1['es_history']
    assert rank0['skipped'] == rank1['skipped'] == 1
    assert torch.equal(rank0['skip_state'], rank1['skip_state'])
    assert rank0['raised'] == rank1['raised'] == 'NonFiniteLossError at iter 3'

def test_unsynced_norms_are_named(runs):
    for rank in runs('unsynced')[:2]:
        [message] = rank['warnings']
        assert all(f'{i}.1 (BatchNorm2d)' in message for i in range(4)) and 'sync_norms(model)' in message, message

@pytest.mark.parametrize('attempt', range(3))
def test_one_rank_raising_ends_the_run(attempt, tmp_path):
    rc, _, output = torchrun('raise', tmp_path, timeout=120)
    ended = time.time()
    assert rc != 0, f"exit code {rc}"
    seconds = ended - float((tmp_path / 'raised_at').read_text())   # from the raise to the end of the whole run
    assert seconds < 60, f"the run took {seconds:.0f} s to end after rank 1 raised"
    assert 'rank 1 fails on purpose' in output
    assert not (tmp_path / 'rank0.done').exists() and not (tmp_path / 'rank1.done').exists()

def test_progress_bars_only_on_rank0(monkeypatch):
    from minifast.learner import progress_wanted
    monkeypatch.delenv('IN_TEST', raising=False)
    monkeypatch.delenv('MINIFAST_PROGRESS', raising=False)
    monkeypatch.setenv('RANK', '1')
    assert not progress_wanted()
    monkeypatch.setenv('MINIFAST_PROGRESS', '1')   # forcing it still wins
    assert progress_wanted()
