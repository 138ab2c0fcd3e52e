"""minifast as a user installs it: the built wheel in a fresh virtual environment that already has torch.

`python -m build` makes the sdist and, from it, the wheel (so the sdist is checked too). A new venv gets
`torch` first (the pinned version, as the Makefile installs it), then the wheel with its dependencies.
Nothing comes from the network: the build uses this venv's setuptools (`--no-isolation`), and the installs
come from `.venv/wheelhouse`, which `make setup` fills with `pip download`. Then:
- the installed packages are the venv's own (pip), torch and its dependencies, minifast, and what
  minifast's `pyproject.toml` declares and those need: nothing else (fastprogress 1.1 would bring a
  web framework; see 03's "Progress");
- a short fit with `ActivationStats` runs from the installed wheel, not from this checkout.
"""
import json, os, re, subprocess, sys, tempfile, textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = re.search(r'torch==([\w.+]+)', (ROOT/'Makefile').read_text())[1]   # the version `make setup` installs
WHEELHOUSE = Path(sys.prefix) / 'wheelhouse'   # in the venv that runs the tests, filled by `make setup`
OFFLINE = ['--no-index', '--find-links', WHEELHOUSE]


def run(*cmd, **kwargs):
    "Run `cmd`, failing the test with its output if it fails."
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert res.returncode == 0, f'{" ".join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}'
    return res.stdout


@pytest.fixture(scope='module')
def work():
    with tempfile.TemporaryDirectory(prefix='minifast-package-') as d: yield Path(d)


@pytest.fixture(scope='module')
def dist(work):
    "The sdist and the wheel, built as a release builds them."
    out = work/'dist'
    run(sys.executable, '-m', 'build', '--no-isolation', '--outdir', out, ROOT, cwd=work)
    wheels, sdists = list(out.glob('minifast-*.whl')), list(out.glob('minifast-*.tar.gz'))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


@pytest.fixture(scope='module')
def venv(work, dist):
    "A fresh venv with torch, then the wheel; returns its python."
    if not WHEELHOUSE.is_dir(): pytest.fail(f'{WHEELHOUSE} is missing: `make setup` downloads what the wheel needs there')
    env_dir = work/'venv'
    run(sys.executable, '-m', 'venv', env_dir)
    py = env_dir/'bin/python'
    seed = {p['name'].lower() for p in json.loads(run(py, '-m', 'pip', 'list', '--format=json'))}
    run(py, '-m', 'pip', 'install', '-q', '--no-compile', *OFFLINE, f'torch=={TORCH_PIN}')   # no .pyc: torch has thousands of files
    run(py, '-m', 'pip', 'install', '-q', '--no-compile', *OFFLINE, dist[0])
    return py, seed


def test_sdist_holds_the_package_and_the_notebooks_are_not_needed(dist):
    import tarfile
    with tarfile.open(dist[1]) as t: names = t.getnames()
    assert any(n.endswith('minifast/learner.py') for n in names), names
    assert any(n.endswith('pyproject.toml') for n in names)


# Run inside the test venv: every distribution that minifast's and torch's requirements reach,
# following each installed distribution's own requirements (extras not asked for are left out).
CLOSURE = textwrap.dedent('''
    import json, re
    from importlib.metadata import distribution, PackageNotFoundError
    from pip._vendor.packaging.requirements import Requirement
    norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
    todo, seen = ['minifast', 'torch'], set()
    while todo:
        name = norm(todo.pop())
        if name in seen: continue
        seen.add(name)
        try: dist = distribution(name)
        except PackageNotFoundError: continue
        for r in dist.requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({'extra': ''}): todo.append(req.name)
    print(json.dumps(sorted(seen)))
''')


def test_installs_nothing_beyond_what_it_declares(venv, work):
    py, seed = venv
    norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
    installed = {norm(p['name']) for p in json.loads(run(py, '-m', 'pip', 'list', '--format=json'))}
    reached = set(json.loads(run(py, '-c', CLOSURE, cwd=work)))
    extra = installed - reached - {norm(s) for s in seed}
    assert not extra, f'installed but not required by minifast, torch or their dependencies: {sorted(extra)}'
    assert 'python-fasthtml' not in installed
    requires = json.loads(run(py, '-c', "import json; from importlib.metadata import requires; print(json.dumps(requires('minifast')))", cwd=work))
    declared = {norm(re.match(r'[\w.-]+', r)[0]) for r in requires if 'extra ==' not in r}
    assert declared == {'torch', 'matplotlib', 'fastcore', 'fastprogress'}, declared
    print(f'\n{len(installed)} packages in the venv: {len(seed)} its own, the rest torch, minifast and what they require')


def test_a_fit_with_activation_stats_runs_from_the_wheel(venv, work):
    py, _ = venv
    script = textwrap.dedent('''
        import minifast, torch
        from pathlib import Path
        from minifast.data import DataLoaders
        from minifast.hooks import get_cnn_model, init_cnn, ActivationStats, BatchTransformXCallback, view_tfm
        from minifast.learner import Learner
        from minifast.losses import cross_entropy, accuracy
        print(Path(minifast.__file__).resolve())
        torch.manual_seed(0)
        x, y = torch.randn(192, 784), torch.randint(0, 10, (192,))
        dls = DataLoaders.from_tensors(x[:128], y[:128], x[128:], y[128:], batch_size=32)
        model = init_cnn(get_cnn_model(10, leak=0.1, sub=0.4, maxv=6), leak=0.1)
        stats = ActivationStats()
        learn = Learner(model, dls, cross_entropy, lr=0.1, metrics=accuracy,
                        cbs=[BatchTransformXCallback(view_tfm(1, 28, 28)), stats])
        learn.fit(1)
        assert stats.means.shape == (4, len(dls.train)), stats.means.shape
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
        fig = stats.plot_stats()
        print('ok', len(learn.metrics.history))
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    out = run(py, '-c', script, cwd=work, env={**env, 'MPLBACKEND': 'Agg', 'MINIFAST_PROGRESS': '0'})
    location, *_, last = out.strip().splitlines()
    assert Path(location).is_relative_to(work/'venv'), f'minifast imported from {location}, not from the installed wheel'
    assert last == 'ok 1', out
