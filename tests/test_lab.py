"""`make lab`: JupyterLab on nbs/, in the project's venv, with a kernel that has minifast.

Starts the server as `make lab` does (plus a token, a free port on 127.0.0.1 and no browser), opens
00_foundations through the REST API as JupyterLab does, starts a kernel for it, runs its first code
cells over the kernel's websocket and checks what they print; then stops the server by its PID.
"""
import json, os, shutil, socket, subprocess, sys, tempfile, time, urllib.error, urllib.request, uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = '00_foundations.ipynb'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Lab:
    "A running `jupyter lab` and the few REST calls the test needs."
    def __init__(self, port, token, proc): self.base, self.token, self.proc = f'http://127.0.0.1:{port}', token, proc

    def api(self, method, path, body=None):
        req = urllib.request.Request(self.base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={'Authorization': f'token {self.token}', 'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read()
            return json.loads(text) if text else None


@pytest.fixture(scope='module')
def lab():
    port, token = _free_port(), uuid.uuid4().hex
    home = Path(tempfile.mkdtemp(prefix='minifast-lab-'))   # its own config and runtime files, not ~/.jupyter's
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(home/'config'), 'JUPYTER_RUNTIME_DIR': str(home/'runtime'),
           'MINIFAST_SIZE': 'quick'}
    jupyter = Path(sys.executable).parent/'jupyter'
    cmd = [str(jupyter), 'lab', str(ROOT/'nbs'), '--no-browser', '--ip=127.0.0.1', f'--port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}']
    if os.geteuid() == 0: cmd.append('--allow-root')
    log = open(home/'server.log', 'w')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Lab(port, token, proc)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None: pytest.fail(f'jupyter lab exited with {proc.returncode}:\n{(home/"server.log").read_text()}')
            try:
                server.api('GET', '/api/status'); break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline: pytest.fail(f'jupyter lab did not answer in 90s:\n{(home/"server.log").read_text()}')
                time.sleep(0.5)
        yield server
    finally:
        proc.terminate()   # by its PID: SIGTERM, and the server shuts its kernels down
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def execute(ws, session, code, timeout=120):
    "Run `code` on the kernel behind websocket `ws`; return (printed text, result text, error)."
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({'header': {'msg_id': msg_id, 'username': 'test', 'session': session, 'msg_type': 'execute_request',
                                   'version': '5.3', 'date': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())},
                        'parent_header': {}, 'metadata': {}, 'channel': 'shell', 'buffers': [],
                        'content': {'code': code, 'silent': False, 'store_history': True, 'user_expressions': {},
                                    'allow_stdin': False, 'stop_on_error': True}}))
    printed, result, error = '', '', None
    deadline = time.time() + timeout
    while time.time() < deadline:
        ws.settimeout(max(1, deadline - time.time()))
        msg = json.loads(ws.recv())
        if msg.get('parent_header', {}).get('msg_id') != msg_id or msg.get('channel') != 'iopub': continue
        kind, content = msg['msg_type'], msg['content']
        if kind == 'stream': printed += content['text']
        elif kind == 'execute_result': result += content['data'].get('text/plain', '')
        elif kind == 'error': error = f"{content['ename']}: {content['evalue']}"
        elif kind == 'status' and content['execution_state'] == 'idle': return printed, result, error
    raise TimeoutError(f'no reply in {timeout}s to:\n{code}')


def test_lab_runs_the_first_notebook(lab):
    # what JupyterLab does when a notebook is opened: read it, then start a session (a kernel) for it
    model = lab.api('GET', f'/api/contents/{NOTEBOOK}?content=1')
    assert model['type'] == 'notebook'
    cells = [''.join(c['source']) for c in model['content']['cells'] if c['cell_type'] == 'code']
    kernel_name = model['content']['metadata']['kernelspec']['name']
    specs = lab.api('GET', '/api/kernelspecs')['kernelspecs']
    assert kernel_name in specs, f'the notebook wants kernel {kernel_name!r}; the server has {list(specs)}'
    session = lab.api('POST', '/api/sessions', {'path': NOTEBOOK, 'type': 'notebook', 'name': NOTEBOOK,
                                                'kernel': {'name': kernel_name}})
    kernel_id = session['kernel']['id']

    import websocket   # websocket-client
    ws = websocket.create_connection(f'ws://127.0.0.1:{lab.base.rsplit(":", 1)[1]}/api/kernels/{kernel_id}/channels',
                                     header=[f'Authorization: token {lab.token}'], timeout=60)
    try:
        ws_session = uuid.uuid4().hex
        # the first code cells, up to the one that prints the course size
        upto = next(i for i, c in enumerate(cells) if "print('this run is'" in c)
        outputs = []
        for code in cells[:upto + 1]:
            printed, result, error = execute(ws, ws_session, code)
            assert error is None, f'{NOTEBOOK} cell failed in the lab kernel: {error}\n{code}'
            outputs.append(printed)
        assert outputs[-1].strip() == 'this run is quick', outputs[-1]   # the server's MINIFAST_SIZE reached the kernel

        # the kernel is the project's venv, and minifast is installed there (not found through nbs/)
        printed, _, error = execute(ws, ws_session, 'import sys, minifast, minifast.foundations as f\n'
                                                    'print(sys.prefix); print(minifast.__file__); print(f.course_size())')
        assert error is None, error
        prefix, module_file, size = printed.split()
        assert Path(prefix).resolve() == Path(sys.prefix).resolve()
        assert Path(module_file).resolve().is_relative_to(ROOT/'minifast') and size == 'quick'
    finally:
        ws.close()
        lab.api('DELETE', f'/api/sessions/{session["id"]}')
