"""Finding data sets (lookup order), reading idx files (errors that name the file and the mismatch),
and `load_dataset`'s consistency checks. No network: downloads are always off or never reached."""
import gzip, struct
from pathlib import Path

import pytest
import torch

from minifast.data import (DATASETS, DataFileError, cache_dir, candidate_dirs, find_data_dir, get_data_dir,
                           load_dataset, read_idx, write_idx)

NAME = 'fashion_mnist'
FILES = list(DATASETS[NAME]['sha256'])


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    "No real cache, no $MINIFAST_DATA, no real system copy, and no way to reach the network."
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'xdg-cache'))
    monkeypatch.delenv('MINIFAST_DATA', raising=False)
    monkeypatch.setitem(DATASETS[NAME], 'system_dirs', [str(tmp_path/'system')])
    monkeypatch.setitem(DATASETS[NAME], 'url', 'http://127.0.0.1:9/')   # never used: download=False throughout


def fill(folder: Path, files=FILES) -> Path:
    "Make `folder` hold (empty) files with the data set's names: enough for the lookup."
    folder.mkdir(parents=True, exist_ok=True)
    for f in files: (folder/f).write_bytes(b'')
    return folder


# ---------------------------------------------------------------- lookup order
def test_candidate_dirs_order(tmp_path, monkeypatch):
    explicit, env = tmp_path/'explicit', tmp_path/'env'
    cache = tmp_path/'xdg-cache'/'minifast'/NAME
    assert cache_dir(NAME) == cache
    assert candidate_dirs(NAME) == [cache, tmp_path/'system']
    assert candidate_dirs(NAME, explicit) == [explicit]          # an explicit path is the only place looked
    monkeypatch.setenv('MINIFAST_DATA', str(env))
    assert candidate_dirs(NAME) == [env/NAME, cache, tmp_path/'system']   # never `env` itself: MNIST's files have the same names
    assert candidate_dirs(NAME, explicit) == [explicit]
    monkeypatch.setenv('MINIFAST_DATA', '')                     # empty means unset
    assert candidate_dirs(NAME) == [cache, tmp_path/'system']


def test_cache_dir_defaults_to_home(tmp_path, monkeypatch):
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path/'home'))
    assert cache_dir(NAME) == tmp_path/'home'/'.cache'/'minifast'/NAME


def test_lookup_order(tmp_path, monkeypatch):
    "explicit path > $MINIFAST_DATA/name > cache > system dirs; each removal falls to the next."
    explicit, env = fill(tmp_path/'explicit'), tmp_path/'env'
    env_named, env_bare = fill(env/NAME), fill(env)
    cache, system = fill(cache_dir(NAME)), fill(tmp_path/'system')
    monkeypatch.setenv('MINIFAST_DATA', str(env))

    assert find_data_dir(NAME, explicit) == explicit
    assert get_data_dir(NAME, explicit, download=False) == explicit
    assert find_data_dir(NAME, str(explicit)) == explicit       # str paths too
    assert find_data_dir(NAME) == env_named
    for f in FILES: (env_named/f).unlink()
    assert find_data_dir(NAME) == cache            # the bare $MINIFAST_DATA folder holds the files, but is not named for the set
    monkeypatch.delenv('MINIFAST_DATA')
    assert find_data_dir(NAME) == cache
    assert get_data_dir(NAME, download=False) == cache
    for f in FILES: (cache/f).unlink()
    assert find_data_dir(NAME) == system
    assert get_data_dir(NAME, download=False) == system
    for f in FILES: (system/f).unlink()
    assert find_data_dir(NAME) is None


def test_incomplete_folders_are_skipped(tmp_path, monkeypatch):
    "A folder missing one file is not a copy: the search goes on to the next."
    env = tmp_path/'env'
    fill(env/NAME, FILES[:-1])
    cache = fill(cache_dir(NAME))
    monkeypatch.setenv('MINIFAST_DATA', str(env))
    assert find_data_dir(NAME) == cache
    (cache/FILES[0]).unlink(); (cache/FILES[0]).mkdir()          # a folder with a data file's name does not count
    assert find_data_dir(NAME) is None


def test_explicit_path_has_no_fallback(tmp_path):
    "find_data_dir with a path that lacks the files finds nothing, though the cache holds a copy."
    fill(cache_dir(NAME))
    assert find_data_dir(NAME) == cache_dir(NAME)
    assert find_data_dir(NAME, fill(tmp_path/'explicit', FILES[:2])) is None


def test_explicit_path_missing_files(tmp_path):
    "An explicit path and no copy anywhere: the error names the path and the missing files."
    explicit = fill(tmp_path/'explicit', FILES[:2])
    with pytest.raises(FileNotFoundError) as exc: get_data_dir(NAME, explicit, download=False)
    msg = str(exc.value)
    assert str(explicit) in msg and all(f in msg for f in FILES[2:]) and not any(f in msg for f in FILES[:2])


def test_not_found_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as exc: get_data_dir(NAME, download=False)
    msg = str(exc.value)
    assert str(cache_dir(NAME)) in msg and str(tmp_path/'system') in msg
    assert 'apt-get install dataset-fashion-mnist' in msg
    assert not cache_dir(NAME).exists()                          # nothing was created


def test_unknown_dataset():
    with pytest.raises(KeyError, match='fashion_mnist'): candidate_dirs('no_such_data')


# ---------------------------------------------------------------- read_idx / write_idx
@pytest.mark.parametrize('suffix', ['.idx', '.idx.gz'])
@pytest.mark.parametrize('shape', [(7,), (3, 5), (2, 3, 4), (1, 2, 3, 4)])
def test_roundtrip(tmp_path, suffix, shape):
    t = (torch.arange(torch.Size(shape).numel()) * 7 % 256).to(torch.uint8).reshape(shape)
    out = read_idx(write_idx(tmp_path/f'a{suffix}', t))
    assert out.dtype == torch.uint8 and out.shape == shape and torch.equal(out, t)


def raw_idx(dims, n_data=None, magic=b'\x00\x00\x08') -> bytes:
    "idx bytes: `magic`, the number of dims, the dims, and `n_data` bytes of data (all of them by default)."
    n = n_data if n_data is not None else int(torch.Size(dims).numel())
    return magic + bytes([len(dims)]) + struct.pack(f'>{len(dims)}I', *dims) + bytes(n)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError): read_idx(tmp_path/'nope.gz')


@pytest.mark.parametrize('gz', [False, True])
def test_truncated_data(tmp_path, gz):
    p = tmp_path/('short.idx.gz' if gz else 'short.idx')
    payload = raw_idx((10, 28, 28), n_data=500)
    if gz: p.write_bytes(gzip.compress(payload))
    else: p.write_bytes(payload)
    with pytest.raises(DataFileError) as exc: read_idx(p)
    msg = str(exc.value)
    assert str(p) in msg and 'truncated' in msg
    assert '7,840' in msg and '500' in msg and '(10, 28, 28)' in msg


def test_extra_bytes(tmp_path):
    p = tmp_path/'long.idx'; p.write_bytes(raw_idx((4,), n_data=6))
    with pytest.raises(DataFileError, match='extra bytes') as exc: read_idx(p)
    assert str(p) in str(exc.value) and 'expected 4 bytes' in str(exc.value) and 'found 6' in str(exc.value)


def test_truncated_header(tmp_path):
    p = tmp_path/'hdr.idx'; p.write_bytes(raw_idx((10, 28, 28))[:9])
    with pytest.raises(DataFileError, match='truncated header') as exc: read_idx(p)
    assert str(p) in str(exc.value) and '9 bytes' in str(exc.value) and '16' in str(exc.value)


def test_too_short_for_header(tmp_path):
    p = tmp_path/'tiny.idx'; p.write_bytes(b'\x00\x00')
    with pytest.raises(DataFileError, match='too short') as exc: read_idx(p)
    assert str(p) in str(exc.value)


def test_truncated_gzip_stream(tmp_path):
    "A .gz file cut short (an interrupted copy): gzip itself fails, and the error names the file."
    good = write_idx(tmp_path/'good.idx.gz', torch.arange(2000).reshape(20, 100) % 251).read_bytes()
    p = tmp_path/'cut.idx.gz'; p.write_bytes(good[:len(good) // 2])
    with pytest.raises(DataFileError) as exc: read_idx(p)
    assert str(p) in str(exc.value) and 'gzip' in str(exc.value)


@pytest.mark.parametrize('magic', [b'\x00\x00\x0d\x03',   # float32 type code: not supported
                                   b'\x01\x00\x08\x03',   # non-zero leading bytes
                                   b'\x00\x00\x08\x00',   # zero dimensions
                                   b'\x00\x00\x08\x09',   # too many dimensions
                                   b'\x1f\x8b\x08\x00'])  # a gzip header, i.e. a .gz file without the suffix
def test_wrong_magic(tmp_path, magic):
    p = tmp_path/'bad.idx'; p.write_bytes(magic + bytes(64))
    with pytest.raises(DataFileError) as exc: read_idx(p)
    msg = str(exc.value)
    assert str(p) in msg and 'magic' in msg and magic.hex() in msg


def test_wrong_magic_gz(tmp_path):
    p = tmp_path/'bad.idx.gz'; p.write_bytes(gzip.compress(b'\x00\x00\x0d\x01' + bytes(8)))
    with pytest.raises(DataFileError, match='magic') as exc: read_idx(p)
    assert str(p) in str(exc.value) and '00000d01' in str(exc.value)


def test_not_gzip_with_gz_suffix(tmp_path):
    p = tmp_path/'plain.idx.gz'; p.write_bytes(raw_idx((3,)))
    with pytest.raises(DataFileError) as exc: read_idx(p)
    assert str(p) in str(exc.value) and 'gzip' in str(exc.value)


def test_corrupt_gzip_stream(tmp_path):
    "A gzip header followed by a deflate block of the reserved type 3: zlib rejects it."
    p = tmp_path/'corrupt.idx.gz'
    p.write_bytes(b'\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03' + b'\x07' + bytes(16))
    try: read_idx(p)
    except DataFileError as e: assert str(p) in str(e) and 'gzip' in str(e)
    except Exception as e: raise AssertionError(f'expected DataFileError, got {type(e).__module__}.{type(e).__name__}: {e}')
    else: raise AssertionError('a corrupt gzip file was read')


# ---------------------------------------------------------------- load_dataset
def make_dataset(folder: Path, n_images=6, n_labels=6, side=4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder/'train-images-idx3-ubyte.gz', torch.arange(n_images * side * side).reshape(n_images, side, side) % 256)
    write_idx(folder/'train-labels-idx1-ubyte.gz', torch.arange(n_labels) % 10)
    write_idx(folder/'t10k-images-idx3-ubyte.gz', torch.zeros(2, side, side))
    write_idx(folder/'t10k-labels-idx1-ubyte.gz', torch.zeros(2))
    return folder


def test_load_dataset(tmp_path):
    x_train, y_train, x_valid, y_valid = load_dataset(NAME, make_dataset(tmp_path/'d'), n_valid=2, download=False)
    assert x_train.shape == (4, 16) and x_valid.shape == (2, 16) and y_train.shape == (4,) and y_valid.shape == (2,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0 <= x_train.min() and x_valid.max() <= 1
    assert torch.equal(torch.cat([y_train, y_valid]), torch.arange(6) % 10)
    assert torch.allclose(x_valid[-1] * 255, torch.arange(80, 96).float())    # the last images are the validation set


def test_load_dataset_label_count_mismatch(tmp_path):
    folder = make_dataset(tmp_path/'d', n_images=6, n_labels=5)
    with pytest.raises(DataFileError) as exc: load_dataset(NAME, folder, n_valid=2, download=False)
    msg = str(exc.value)
    assert str(folder/'train-labels-idx1-ubyte.gz') in msg and str(folder/'train-images-idx3-ubyte.gz') in msg
    assert '5 labels' in msg and '6 images' in msg


def test_load_dataset_wrong_rank(tmp_path):
    folder = make_dataset(tmp_path/'d')
    write_idx(folder/'train-labels-idx1-ubyte.gz', torch.zeros(6, 2))
    with pytest.raises(DataFileError, match=r'\(6, 2\)'): load_dataset(NAME, folder, n_valid=2, download=False)


@pytest.mark.parametrize('n_valid', [0, 6, 7])
def test_load_dataset_bad_n_valid(tmp_path, n_valid):
    with pytest.raises(ValueError, match='n_valid'): load_dataset(NAME, make_dataset(tmp_path/'d'), n_valid=n_valid, download=False)


def test_load_dataset_uses_env_folder(tmp_path, monkeypatch):
    "With no path, $MINIFAST_DATA/<name> is found before the cache."
    fill(cache_dir(NAME))                                   # empty files: would fail to read if chosen
    make_dataset(tmp_path/'env'/NAME)
    monkeypatch.setenv('MINIFAST_DATA', str(tmp_path/'env'))
    x_train, *_ = load_dataset(NAME, n_valid=2, download=False)
    assert x_train.shape == (4, 16)
