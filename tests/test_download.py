"""Downloads against a loopback HTTP server: good files, bad bytes, dropped connections, HTTP errors,
timeouts, concurrent downloaders, and `get_data_dir` end to end.

Nothing here reaches beyond 127.0.0.1, and nothing touches the real cache: every test runs with
`XDG_CACHE_HOME` in a tmp dir, `MINIFAST_DATA` unset and proxies bypassed."""
import hashlib, http.server, multiprocessing as mp, os, socket, stat, threading, time
from pathlib import Path

import pytest
import torch

from minifast.data import (DATASETS, DownloadError, cache_dir, download_file, get_data_dir, load_dataset,
                           read_idx, write_idx)

STALL_S = 3.0      # how long a stalling handler waits at most (teardown releases it at once)
TIMEOUT_S = 0.5    # the client-side timeout used in the timeout tests


# ---------------------------------------------------------------- environment
@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    "No real cache, no $MINIFAST_DATA, no proxy between us and 127.0.0.1."
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path/'xdg-cache'))
    monkeypatch.delenv('MINIFAST_DATA', raising=False)
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('no_proxy', '*'); monkeypatch.setenv('NO_PROXY', '*')


def sha(b: bytes) -> str: return hashlib.sha256(b).hexdigest()


def idx_gz_bytes(tmp_path, t: torch.Tensor, name='payload.idx.gz') -> bytes:
    "The bytes of `t` written by `write_idx` as a gzipped idx file."
    src = tmp_path/'src'; src.mkdir(exist_ok=True)
    return write_idx(src/name, t).read_bytes()


def leftovers(folder: Path) -> list:
    "Everything in `folder` (which may not exist) as sorted names."
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- the loopback server
class _State:
    def __init__(self):
        self.files = {}          # URL path -> bytes
        self.mode = 'ok'         # default mode for every path
        self.path_modes = {}     # URL path -> mode, overriding `mode`
        self.hits = []           # URL paths requested, in order
        self.release = threading.Event()       # set at teardown: stalled handlers give up
        self.barrier = threading.Barrier(2, timeout=10)  # 'sync' mode: wait for 2 requests at once


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'   # one request per connection; closing ends the response
    def log_message(self, *args): pass

    def _head(self, length, status=200):
        self.send_response(status)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(length))
        self.end_headers()

    def do_GET(self):
        st: _State = self.server.state
        st.hits.append(self.path)
        mode = st.path_modes.get(self.path, st.mode)
        body = st.files.get(self.path)
        if mode.startswith('status:'): return self.send_error(int(mode.split(':')[1]))
        if body is None: return self.send_error(404)
        if mode == 'ok':
            self._head(len(body)); self.wfile.write(body)
        elif mode == 'corrupt':                      # same length, one byte flipped
            bad = bytearray(body); bad[len(bad) // 2] ^= 0xFF
            self._head(len(bad)); self.wfile.write(bytes(bad))
        elif mode == 'drop':                         # promise everything, send half, hang up
            self._head(len(body)); self.wfile.write(body[:len(body) // 2]); self.wfile.flush()
            self.close_connection = True
        elif mode == 'chunked_drop':                 # chunked transfer encoding, hang up mid-stream
            half = body[:len(body) // 2]
            self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n'
                             b'Transfer-Encoding: chunked\r\n\r\n' + b'%x\r\n' % len(half) + half + b'\r\n')
            self.wfile.flush(); self.close_connection = True
        elif mode == 'garbage':                      # not HTTP at all
            self.wfile.write(b'THIS IS NOT HTTP\r\n\r\n'); self.wfile.flush(); self.close_connection = True
        elif mode == 'stall_headers':                # say nothing for longer than the client's timeout
            st.release.wait(STALL_S)
            self._head(len(body)); self.wfile.write(body)
        elif mode == 'stall_body':                   # headers and half the body, then go quiet
            self._head(len(body)); self.wfile.write(body[:len(body) // 2]); self.wfile.flush()
            st.release.wait(STALL_S)
            self.wfile.write(body[len(body) // 2:])
        elif mode == 'sync':                         # only answer once two clients are connected
            st.barrier.wait()
            self._head(len(body))
            for i in range(0, len(body), 256): self.wfile.write(body[i:i + 256]); self.wfile.flush()
        else: raise AssertionError(f'unknown mode {mode!r}')


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address): pass   # clients hanging up on stalls are expected


@pytest.fixture
def server():
    "A threaded HTTP server on an ephemeral loopback port; `server.state` controls what it serves."
    srv = _Server(('127.0.0.1', 0), _Handler)
    srv.state = _State()
    srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
    thread = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    try: yield srv
    finally:
        srv.state.release.set(); srv.state.barrier.abort()
        srv.shutdown(); srv.server_close(); thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def payload(tmp_path, server):
    "A small idx.gz file served at `/files/img.gz`; returns (url, bytes, tensor)."
    t = (torch.arange(5 * 28 * 28) % 251).to(torch.uint8).reshape(5, 28, 28)
    body = idx_gz_bytes(tmp_path, t)
    server.state.files['/files/img.gz'] = body
    return server.url + '/files/img.gz', body, t


@pytest.fixture
def closed_port():
    "A loopback port nothing listens on."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


# ---------------------------------------------------------------- download_file
def test_good_download(tmp_path, payload):
    url, body, t = payload
    dest = tmp_path/'out'/'sub'/'img.gz'          # parent folders are created
    assert download_file(url, dest, sha(body), timeout=5) == dest
    assert dest.read_bytes() == body and sha(dest.read_bytes()) == sha(body)
    assert torch.equal(read_idx(dest), t)
    assert leftovers(dest.parent) == ['img.gz']    # no .part file left behind


@pytest.mark.parametrize('umask', [0o022, 0o077])
def test_a_download_gets_the_permissions_of_a_new_file(tmp_path, payload, umask):
    "mkstemp makes private files; the finished download gets what the umask gives any new file."
    url, body, _ = payload
    old = os.umask(umask)
    try: dest = download_file(url, tmp_path/'img.gz', sha(body), timeout=5)
    finally: os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask

def check_failure_then_retry(server, url, body, dest, match, timeout=5.0):
    "The download fails with a `DownloadError` matching `match`, leaves nothing, then succeeds once the server is good."
    with pytest.raises(DownloadError, match=match) as exc: download_file(url, dest, sha(body), timeout=timeout)
    assert url in str(exc.value)
    assert leftovers(dest.parent) == [], 'a failed download left files behind'
    server.state.mode, server.state.path_modes = 'ok', {}
    assert download_file(url, dest, sha(body), timeout=5) == dest
    assert dest.read_bytes() == body and leftovers(dest.parent) == [dest.name]
    return exc.value


def test_unwritable_destination_is_a_download_error(tmp_path, payload):
    "A cache folder that cannot be made (here: its parent is a file) fails as a DownloadError, so get_data_dir's advice is given."
    url, body, _ = payload
    (tmp_path/'a-file').write_text('')
    with pytest.raises(DownloadError, match='a-file') as exc: download_file(url, tmp_path/'a-file'/'img.gz', sha(body), timeout=5)
    assert url in str(exc.value) and isinstance(exc.value.__cause__, OSError)
    assert (tmp_path/'a-file').is_file() and not list(tmp_path.rglob('*img.gz*'))   # nothing made, nothing left


def test_checksum_mismatch(tmp_path, server, payload):
    url, body, _ = payload
    server.state.mode = 'corrupt'
    check_failure_then_retry(server, url, body, tmp_path/'dl'/'img.gz', match='sha256 mismatch')


def test_wrong_expected_checksum_leaves_nothing(tmp_path, payload):
    url, body, _ = payload
    dest = tmp_path/'dl'/'img.gz'
    with pytest.raises(DownloadError, match=sha(b'other')): download_file(url, dest, sha(b'other'), timeout=5)
    assert leftovers(dest.parent) == []


def test_connection_dropped_mid_file(tmp_path, server, payload):
    url, body, _ = payload
    server.state.mode = 'drop'
    err = check_failure_then_retry(server, url, body, tmp_path/'dl'/'img.gz', match='connection ended')
    assert f'{len(body) // 2:,} of {len(body):,} bytes' in str(err)


def test_chunked_connection_dropped_mid_file(tmp_path, server, payload):
    url, body, _ = payload
    server.state.mode = 'chunked_drop'
    dest = tmp_path/'dl'/'img.gz'
    try: download_file(url, dest, sha(body), timeout=5)
    except DownloadError: pass
    except Exception as e: raise AssertionError(f'expected DownloadError, got {type(e).__module__}.{type(e).__name__}: {e}')
    else: raise AssertionError('a chunked response cut short was accepted')
    finally: assert leftovers(dest.parent) == [], 'a failed download left files behind'


def test_not_http_response(tmp_path, server, payload):
    url, body, _ = payload
    server.state.mode = 'garbage'
    dest = tmp_path/'dl'/'img.gz'
    try: download_file(url, dest, sha(body), timeout=5)
    except DownloadError: pass
    except Exception as e: raise AssertionError(f'expected DownloadError, got {type(e).__module__}.{type(e).__name__}: {e}')
    else: raise AssertionError('a non-HTTP answer was accepted')
    finally: assert leftovers(dest.parent) == [], 'a failed download left files behind'


@pytest.mark.parametrize('code', [404, 500])
def test_http_error(tmp_path, server, payload, code):
    url, body, _ = payload
    server.state.mode = f'status:{code}'
    check_failure_then_retry(server, url, body, tmp_path/'dl'/'img.gz', match=str(code))


def test_missing_file_is_404(tmp_path, server, payload):
    url, body, _ = payload
    with pytest.raises(DownloadError, match='404'): download_file(url + '.nope', tmp_path/'dl'/'x', sha(body), timeout=5)
    assert leftovers(tmp_path/'dl') == []


@pytest.mark.parametrize('mode', ['stall_headers', 'stall_body'])
def test_timeout(tmp_path, server, payload, mode):
    url, body, _ = payload
    server.state.mode = mode
    start = time.monotonic()
    with pytest.raises(DownloadError, match='timed out'): download_file(url, tmp_path/'dl'/'img.gz', sha(body), timeout=TIMEOUT_S)
    assert time.monotonic() - start < STALL_S - 0.5, 'the timeout argument was not honoured'
    check_failure_then_retry(server, url, body, tmp_path/'dl'/'img.gz', match='timed out', timeout=TIMEOUT_S)


def test_connection_refused(tmp_path, closed_port):
    dest = tmp_path/'dl'/'img.gz'
    with pytest.raises(DownloadError, match='download failed'):
        download_file(f'http://127.0.0.1:{closed_port}/img.gz', dest, sha(b''), timeout=5)
    assert leftovers(dest.parent) == []


def test_replaces_stale_destination(tmp_path, payload):
    "A bad file already at `dest` is replaced atomically by the verified download."
    url, body, _ = payload
    dest = tmp_path/'dl'/'img.gz'; dest.parent.mkdir(); dest.write_bytes(b'stale')
    download_file(url, dest, sha(body), timeout=5)
    assert dest.read_bytes() == body and leftovers(dest.parent) == ['img.gz']


def _download_worker(url, dest, digest, q):
    try: download_file(url, dest, digest, timeout=10); q.put('ok')
    except BaseException as e: q.put(f'{type(e).__name__}: {e}')


def test_two_processes_download_same_file(tmp_path, server, payload):
    "Two processes fetching the same file into the same place at the same time both succeed; one good copy remains."
    url, body, _ = payload
    server.state.mode = 'sync'           # the server answers only once both requests are in flight
    dest = tmp_path/'dl'/'img.gz'
    ctx = mp.get_context('fork' if 'fork' in mp.get_all_start_methods() else 'spawn')
    q = ctx.Queue()
    procs = [ctx.Process(target=_download_worker, args=(url, str(dest), sha(body), q)) for _ in range(2)]
    for p in procs: p.start()
    for p in procs: p.join(20)
    alive = [p for p in procs if p.is_alive()]
    for p in alive: p.kill()
    assert not alive, 'a downloader hung'
    results = [q.get(timeout=5) for _ in procs]
    assert results == ['ok', 'ok'], results
    assert [p.exitcode for p in procs] == [0, 0]
    assert server.state.hits.count('/files/img.gz') == 2     # both really downloaded, concurrently
    assert leftovers(dest.parent) == ['img.gz'] and dest.read_bytes() == body


# ---------------------------------------------------------------- get_data_dir end to end
TINY_SHAPES = {'train-images-idx3-ubyte.gz': (6, 4, 4), 'train-labels-idx1-ubyte.gz': (6,),
               't10k-images-idx3-ubyte.gz': (3, 4, 4), 't10k-labels-idx1-ubyte.gz': (3,)}


@pytest.fixture
def tiny(tmp_path, server, monkeypatch):
    "A fake data set `tiny` served under /tiny/; returns {file name: bytes}."
    files = {}
    for i, (fname, shape) in enumerate(TINY_SHAPES.items()):
        t = (torch.arange(torch.Size(shape).numel()) * (i + 3) % (10 if len(shape) == 1 else 256)).reshape(shape)
        files[fname] = idx_gz_bytes(tmp_path, t, fname)
        server.state.files['/tiny/' + fname] = files[fname]
    monkeypatch.setitem(DATASETS, 'tiny', dict(url=server.url + '/tiny/', system_dirs=[str(tmp_path/'no-system-copy')],
                                               apt_package=None, sha256={f: sha(b) for f, b in files.items()}))
    return files


def test_get_data_dir_downloads_into_cache(tmp_path, server, tiny):
    d = get_data_dir('tiny', download=True, timeout=5)
    assert d == cache_dir('tiny') == tmp_path/'xdg-cache'/'minifast'/'tiny'
    assert leftovers(d) == sorted(tiny)
    for fname, body in tiny.items(): assert (d/fname).read_bytes() == body
    n_hits = len(server.state.hits)
    assert n_hits == 4
    assert get_data_dir('tiny', download=True, timeout=5) == d
    assert len(server.state.hits) == n_hits, 'files already in the cache were downloaded again'
    x_train, y_train, x_valid, y_valid = load_dataset('tiny', n_valid=2)
    assert x_train.shape == (4, 16) and y_train.shape == (4,) and x_valid.shape == (2, 16) and y_valid.shape == (2,)
    assert x_train.dtype == torch.float32 and 0 <= x_train.min() and x_train.max() <= 1


def test_get_data_dir_download_false_does_not_download(server, tiny):
    with pytest.raises(FileNotFoundError, match='No copy of tiny'): get_data_dir('tiny', download=False)
    assert server.state.hits == []
    assert not cache_dir('tiny').exists() or leftovers(cache_dir('tiny')) == []


def test_get_data_dir_partial_failure_then_retry(server, tiny):
    "One file fails: a FileNotFoundError, no unverified file left; the retry fetches only what is missing."
    server.state.path_modes['/tiny/train-labels-idx1-ubyte.gz'] = 'status:500'
    with pytest.raises(FileNotFoundError, match='500') as exc: get_data_dir('tiny', download=True, timeout=5)
    assert isinstance(exc.value.__cause__, DownloadError)
    assert leftovers(cache_dir('tiny')) == ['train-images-idx3-ubyte.gz']   # verified, so it may stay
    server.state.path_modes = {}; server.state.hits.clear()
    assert get_data_dir('tiny', download=True, timeout=5) == cache_dir('tiny')
    assert sorted(server.state.hits) == sorted('/tiny/' + f for f in tiny if f != 'train-images-idx3-ubyte.gz')
    assert leftovers(cache_dir('tiny')) == sorted(tiny)


def test_get_data_dir_bad_checksum_leaves_nothing(server, tiny):
    server.state.mode = 'corrupt'
    with pytest.raises(FileNotFoundError, match='sha256 mismatch'): get_data_dir('tiny', download=True, timeout=5)
    assert leftovers(cache_dir('tiny')) == []
    server.state.mode = 'ok'
    assert leftovers(get_data_dir('tiny', download=True, timeout=5)) == sorted(tiny)


def test_get_data_dir_timeout(server, tiny):
    server.state.mode = 'stall_headers'
    with pytest.raises(FileNotFoundError, match='timed out'): get_data_dir('tiny', download=True, timeout=TIMEOUT_S)
    assert leftovers(cache_dir('tiny')) == []


# ---------------------------------------------------------------- offline
@pytest.mark.parametrize('apt_package', ['minifast-tiny-data', None])
def test_offline_message(tmp_path, monkeypatch, closed_port, apt_package):
    url = f'http://127.0.0.1:{closed_port}/tiny/'
    files = {f: sha(f.encode()) for f in TINY_SHAPES}
    monkeypatch.setitem(DATASETS, 'tiny', dict(url=url, system_dirs=[str(tmp_path/'sys-copy')],
                                               apt_package=apt_package, sha256=files))
    with pytest.raises(FileNotFoundError) as exc: get_data_dir('tiny', download=True, timeout=5)
    msg = str(exc.value)
    assert isinstance(exc.value.__cause__, DownloadError)
    assert msg.startswith('No copy of tiny was found, and the download failed: ')   # why nothing came
    if apt_package: assert f'apt-get install {apt_package}' in msg
    else: assert 'apt' not in msg
    assert str(cache_dir('tiny')) in msg and '$MINIFAST_DATA/tiny' in msg      # where to put the files
    assert url in msg and all(f in msg for f in files)                    # where to get them, which ones
    assert str(tmp_path/'sys-copy') in msg                                # where we looked
    assert leftovers(cache_dir('tiny')) == []


def test_offline_message_fashion_mnist(tmp_path, monkeypatch, closed_port):
    "The real Fashion-MNIST entry names its Debian package."
    monkeypatch.setitem(DATASETS['fashion_mnist'], 'url', f'http://127.0.0.1:{closed_port}/')
    monkeypatch.setitem(DATASETS['fashion_mnist'], 'system_dirs', [str(tmp_path/'no-system-copy')])
    with pytest.raises(FileNotFoundError) as exc: get_data_dir('fashion_mnist', download=True, timeout=5)
    msg = str(exc.value)
    assert 'apt-get install dataset-fashion-mnist' in msg
    assert str(tmp_path/'xdg-cache'/'minifast'/'fashion_mnist') in msg
    assert 'train-images-idx3-ubyte.gz' in msg
    assert leftovers(cache_dir('fashion_mnist')) == []
