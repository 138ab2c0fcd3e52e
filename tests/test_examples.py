"""examples/train.py, the single-process training script: a run stopped by an error goes on from its checkpoint and ends
where the uninterrupted run ends, bit for bit; a resume that does not fit leaves the checkpoint as it was."""
import importlib.util
from pathlib import Path

import pytest
import torch
from minifast.learner import Callback, CheckpointError, MixedPrecision

SCRIPT = Path(__file__).parent.parent / 'examples' / 'train.py'
spec = importlib.util.spec_from_file_location('train_example', SCRIPT)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

# 32 training batches of 64 a epoch, two epochs: small enough for a few seconds, long enough to stop in the middle
SMALL = ['--n-train', '2048', '--batch-size', '64', '--epochs', '2']

class Crash(Callback):
    "Fails the fit at training batch `iter` of epoch `epoch`, as a bug or a lost machine would."
    def __init__(self, epoch, iter): self.epoch_at, self.iter_at = epoch, iter
    def before_batch(self):
        if self.learn.in_train and (self.learn.epoch, self.learn.iter) == (self.epoch_at, self.iter_at):
            raise RuntimeError('the machine went away')

class CountTrainingBatches(Callback):
    n = 0
    def after_batch(self): self.n += self.learn.in_train

def same_state(a, b) -> bool:
    "Whether two state dicts hold equal tensors and equal extra state (RunningBatchNorm's counts), key by key."
    return a.keys() == b.keys() and all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())

def test_a_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    reference = train.main(SMALL)
    ckpt = tmp_path / 'cnn.pt'
    with pytest.raises(RuntimeError, match='went away'):
        train.main(SMALL + ['--checkpoint', str(ckpt), '--save-every', '10'], cbs=[Crash(epoch=1, iter=9)])
    # saved after training batches 10, 20, 30, the first epoch's 32 and 40: the last is at batch 8 of epoch 1
    counted = CountTrainingBatches()
    resumed = train.main(SMALL + ['--checkpoint', str(ckpt), '--save-every', '10', '--resume'], cbs=[counted])
    assert counted.n == 32 - 8   # it went on from the checkpoint rather than starting again
    assert len(resumed.metrics.history) == 2
    assert resumed.metrics.history == reference.metrics.history   # every loss and accuracy, exactly
    assert same_state(resumed.model.state_dict(), reference.model.state_dict())

def test_a_resume_that_does_not_fit_changes_nothing(tmp_path):
    ckpt = tmp_path / 'cnn.pt'
    train.main(['--n-train', '512', '--batch-size', '64', '--epochs', '1', '--checkpoint', str(ckpt)])
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError, match='cnn.pt') as refused:   # another batch size: refused before anything changes
        train.main(['--n-train', '512', '--batch-size', '32', '--epochs', '1', '--checkpoint', str(ckpt), '--resume'])
    assert '--batch-size 64 there, 32 here' in str(refused.value)   # the arguments in the checkpoint name it
    assert ckpt.read_bytes() == before

def test_a_resume_with_another_learning_rate_is_refused(tmp_path):
    ckpt = tmp_path / 'cnn.pt'
    argv = ['--n-train', '512', '--batch-size', '64', '--epochs', '1', '--checkpoint', str(ckpt)]
    train.main(argv)
    with pytest.raises(CheckpointError, match='--lr 0.4 there, 0.1 here'):   # the Learner alone could not tell: a schedule keeps no state
        train.main(argv + ['--resume', '--lr', '0.1'])

def test_an_existing_checkpoint_is_not_replaced_by_accident(tmp_path, capsys):
    ckpt = tmp_path / 'cnn.pt'
    argv = ['--n-train', '512', '--batch-size', '64', '--epochs', '1', '--checkpoint', str(ckpt)]
    train.main(argv)
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit): train.main(argv)   # the same command again, without --resume
    assert 'pass --resume to go on from it, or --overwrite' in capsys.readouterr().err and ckpt.read_bytes() == before
    train.main(argv + ['--overwrite', '--lr', '0.1'])
    assert ckpt.read_bytes() != before

@pytest.mark.parametrize('argv, message', [(['--resume'], '--resume and --save-every need --checkpoint'),
                                           (['--resume', '--checkpoint', 'no/such.pt'], 'there is no checkpoint at no/such.pt'),
                                           (['--norm', 'Dropout'], "invalid choice: 'Dropout'"),
                                           (['--epochs', '0'], 'must be a positive number, got 0'),
                                           (['--n-train', '-5'], 'must be a positive number, got -5'),
                                           (['--lr', 'nan'], 'must be a positive number, got nan'),
                                           (['--seed', '-1'], 'must be from 0 to 2**32 - 1, got -1'),
                                           (['--epochs', 'x'], "invalid int value: 'x'"),
                                           (['--resume', '--overwrite'], 'not allowed with argument')])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit: train.parse_args(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err

def test_bfloat16_trains_under_mixed_precision():
    learn = train.main(['--n-train', '512', '--batch-size', '64', '--precision', 'bfloat16', '--norm', 'BatchNorm'])
    assert [type(cb) for cb in learn.cbs].count(MixedPrecision) == 1
    assert learn.metrics.history[-1]['valid_accuracy'] > 0.3   # 8 batches of bfloat16: well above chance (0.1)
