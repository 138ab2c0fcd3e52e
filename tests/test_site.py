"""The docs site as a reader's browser sees it.

The site (Sphinx with myst-nb and sphinx-book-theme) is built (tools/build_docs.py) from the quick-size notebooks that `make nbtest` ran and
saved in _quick/ (stamped _quick/.executed), so the notebooks are not run a second time; if that
copy is missing, unstamped or no longer matches nbs/, this test runs them itself first. Each page
is then opened in headless Chromium (Debian's `chromium` with its `chromedriver`, set up by
tools/install_browser.sh) from a server on 127.0.0.1.

Markers the later notebooks must keep, so that their pages can be checked:
- 06: a heading containing "activation" (now "Looking at activations: the lesson's five lines"), with at least
  two figures after it.
- 07: an HTML table output with class "norm-comparison" (a header row and at least two rows), which fits
  the content column or scrolls inside it.
- any page with `$math$` in its markdown shows it as MathML, which the browser renders without a network.
"""
import functools, http.server, json, os, re, shutil, subprocess, sys, tempfile, threading, time
import urllib.error, urllib.parse, urllib.request
from pathlib import Path

import pytest
from nbdev.config import nbpath2html

ROOT = Path(__file__).resolve().parent.parent
NBS, QUICK_NBS = ROOT/'nbs', ROOT/'_quick'
ARTIFACTS = ROOT/'test-artifacts'
SITE = ARTIFACTS/'site'
CHROMIUM, CHROMEDRIVER = shutil.which('chromium') or '/usr/bin/chromium', shutil.which('chromedriver') or '/usr/bin/chromedriver'
IMAGE_MIMES = ('image/png', 'image/jpeg', 'image/gif', 'image/webp')
# the text of the page's headings, without Sphinx's permalink (`#` or a pilcrow) after each
HEADINGS_JS = ("return [...document.querySelectorAll('article h1, article h2, article h3, article h4, article h5, article h6')]"
               ".map(h => { const c = h.cloneNode(true); c.querySelectorAll('.headerlink').forEach(a => a.remove());"
               " return c.textContent.replace('¶', '').trim(); })")


# --- the quick-size notebooks and the site built from them ------------------------------------
def _cells(nb_path: Path) -> list:
    return [(c['cell_type'], ''.join(c['source'])) for c in json.loads(nb_path.read_text(encoding='utf-8'))['cells']]


def _stale(src: Path, copy: Path) -> bool:
    "Whether the copy was not run to the end (no stamp) or its notebooks are not those of nbs/ now."
    if not (copy/'.executed').exists(): return True
    sources = sorted(src.glob('[!_.]*.ipynb'))
    if {p.name for p in sources} != {p.name for p in copy.glob('[!_.]*.ipynb')}: return True
    return any(_cells(p) != _cells(copy/p.name) for p in sources)


def _run_quick_notebooks():
    "What `make nbtest` does: copy nbs/ to _quick/ and run it there at quick size, saving outputs."
    shutil.rmtree(QUICK_NBS, ignore_errors=True)
    shutil.copytree(NBS, QUICK_NBS)
    nbdev_test = Path(sys.executable).parent/'nbdev-test'
    subprocess.run([str(nbdev_test), str(QUICK_NBS), '--n-workers', '1', '--save'], cwd=ROOT, check=True,
                   env={**os.environ, 'MINIFAST_SIZE': 'quick'})
    (QUICK_NBS/'.executed').touch()


@pytest.fixture(scope='module')
def notebooks():
    "The executed quick-size notebooks, by page name ('index', 'data', ...), in course order."
    if not QUICK_NBS.exists() or _stale(NBS, QUICK_NBS):
        print('\n_quick/ is missing, not run to the end, or not what nbs/ holds now: running the notebooks at quick size first')
        _run_quick_notebooks()
    nbs = sorted(QUICK_NBS.glob('[!_.]*.ipynb'), key=lambda p: (p.name != 'index.ipynb', p.name))
    return {nbpath2html(p).stem: p for p in nbs}


@pytest.fixture(scope='module')
def site(notebooks):
    start = time.time()
    subprocess.run([sys.executable, str(ROOT/'tools/build_docs.py'), '--nbs', str(QUICK_NBS), '--site', str(SITE)],
                   cwd=ROOT, check=True)
    print(f'site built in {time.time() - start:.1f}s')
    return SITE


@pytest.fixture(scope='module')
def server(site):
    "The site over HTTP on 127.0.0.1 (a free port), as `python -m http.server -d _docs` serves it."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args): pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    httpd.shutdown(); httpd.server_close()


@pytest.fixture(scope='module')
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail('Chromium and chromedriver are needed: run tools/install_browser.sh (make test does)')
    os.environ.setdefault('SE_AVOID_STATS', 'true')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix='minifast-chromium-')
    for arg in ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                '--disable-component-update', '--no-first-run', '--disable-quic', '--disable-sync',
                f'--user-data-dir={profile}', '--window-size=1280,900', '--hide-scrollbars']:
        options.add_argument(arg)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try: yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- helpers ----------------------------------------------------------------------------------
def _shown(cell) -> bool:
    "Whether nbdev's docs show this code cell's outputs (not `#| hide`, `#| export`, `#| output: false`...)."
    src = ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']
    opts = ' '.join(re.findall(r'^#\|\s*(.*)$', src, re.M))
    return not re.search(r'\b(hide|export|exporti|include:\s*false|output:\s*false)\b', opts)


def output_images(nb_path: Path) -> int:
    "How many raster images the notebook's saved outputs hold (in the cells the docs show)."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    return sum(1 for c in cells if c['cell_type'] == 'code' and _shown(c) for o in c.get('outputs', [])
               for m in o.get('data', {}) if m in IMAGE_MIMES)


def markdown_headings(nb_path: Path) -> list:
    "The text of the headings in the notebook's markdown cells (those without math), as a page shows them."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    texts = [re.sub(r'```.*?```', '', ''.join(c['source']), flags=re.S) for c in cells if c['cell_type'] == 'markdown']
    heads = [m[1].strip() for t in texts for l in t.splitlines() if (m := re.match(r'^#{1,6}\s+(.*)$', l)) and '$' not in l]
    return [re.sub(r'`|\*\*', '', re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', h)) for h in heads]


def open_page(driver, url):
    "Load `url`, let its scripts settle, and return the console errors it logged."
    driver.get_log('browser')   # drop what the previous page left
    driver.get(url)
    for _ in range(50):
        if driver.execute_script('return document.readyState') == 'complete': break
        time.sleep(0.1)
    time.sleep(0.5)             # the search worker and late scripts
    return [e for e in driver.get_log('browser') if e['level'] == 'SEVERE']


@functools.lru_cache(maxsize=None)
def fetch(url):
    "Status and text of `url` on the local server."
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status, r.read().decode('utf-8', 'replace')
    except urllib.error.HTTPError as e: return e.code, ''


def has_anchor(page_html, fragment):
    frag = re.escape(urllib.parse.unquote(fragment))
    return re.search(rf'''\b(?:id|name)=["']?{frag}["'\s>]''', page_html) is not None


def screenshot(driver, name):
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS/name))


# --- the checks -------------------------------------------------------------------------------
def test_every_notebook_has_a_page(notebooks, site):
    assert 'index' in notebooks or (site/'index.html').exists()
    for name in notebooks: assert (site/f'{name}.html').exists(), f'no page for {notebooks[name].name}'
    index_js = (site/'searchindex.js').read_text(encoding='utf-8')   # Sphinx's: Search.setIndex({...})
    indexed = set(json.loads(index_js[index_js.index('(') + 1:index_js.rindex(')')])['docnames'])
    for name in notebooks: assert name in indexed, f'{name} is not in the search index'


def test_every_module_docs_link_has_its_page(site):
    "Each module's docstring ends with `Docs: <site>/<page>.html.md`; the build writes that page, as markdown."
    for module in sorted((ROOT/'minifast').glob('[!_]*.py')):
        link = re.search(r'^Docs: (\S+?\.html\.md)', module.read_text(encoding='utf-8'), re.M)
        assert link, f'{module.name}: no Docs line'
        page = site/link[1].rsplit('/', 1)[1]
        assert page.exists(), f'{module.name} links to {link[1]}, which the site does not have'
        assert page.read_text(encoding='utf-8').startswith('# '), f'{page.name} does not start with its title'


def test_nav_is_in_course_order(notebooks, server, browser):
    assert not open_page(browser, server + 'index.html')
    # the site's title leads home, then the sidebar lists the notebooks
    links = browser.execute_script(
        "return [...document.querySelectorAll('a.navbar-brand, nav.bd-docs-nav li.toctree-l1 > a')].map(a => a.getAttribute('href'))")
    pages = [urllib.parse.urlsplit(h).path.rsplit('/', 1)[-1] or 'index.html' for h in links]
    expected = [f'{name}.html' for name in _page_names(QUICK_NBS)]
    assert [p for p in pages if p in expected] == expected
    screenshot(browser, 'site-home.png')


def _page_names(folder=NBS):
    "Page names in course order: the home page, then one per notebook (read from nbs/ when collecting)."
    nbs = sorted(folder.glob('[!_.]*.ipynb'), key=lambda p: (p.name != 'index.ipynb', p.name))
    names = [nbpath2html(p).stem for p in nbs]
    return names if 'index' in names else ['index'] + names   # build_docs stands in a home page


@pytest.mark.parametrize('name', _page_names())
def test_page(name, notebooks, server, browser):
    "The page loads with no console errors, its internal links resolve and its figures decode."
    names = _page_names(QUICK_NBS)
    page_index = names.index(name)
    url = server + f'{name}.html'
    errors = open_page(browser, url)
    assert not errors, f'{name}.html logged console errors: {errors}'
    assert browser.execute_script("return document.querySelector('article h1') !== null"), f'{name}.html has no title'

    # every image on the page is there and decodes; and each of the notebook's figures is on it
    images = browser.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src').slice(0, 80), i.complete, i.naturalWidth])")
    broken = [src for src, complete, width in images if not (complete and width > 0)]
    assert not broken, f'{name}.html has images that do not load or decode: {broken}'
    n_figures = browser.execute_script("return document.querySelectorAll('div.cell_output img').length")
    expected = output_images(notebooks[name]) if name in notebooks else 0
    assert n_figures >= expected, f'{name}.html shows {n_figures} of the notebook\'s {expected} images'

    # the prose is there: every heading the notebook's markdown has is a heading on the page
    if name in notebooks:
        page_headings = set(browser.execute_script(HEADINGS_JS))
        missing = [h for h in markdown_headings(notebooks[name]) if h not in page_headings]
        assert not missing, f'{name}.html lacks these headings of {notebooks[name].name}: {missing}'

    # every internal link resolves, fragments included
    hrefs = browser.execute_script("return [...document.querySelectorAll('a[href]')].map(a => a.href)")
    bad = []
    for href in sorted(set(hrefs)):
        parts = urllib.parse.urlsplit(href)
        if not href.startswith(server): continue   # external: GitHub, other libraries' docs
        target = urllib.parse.urlunsplit(parts._replace(fragment=''))
        status, text = fetch(target)
        if status != 200: bad.append(f'{href} ({status})')
        elif parts.fragment and not has_anchor(text, parts.fragment): bad.append(f'{href} (no such anchor)')
    assert not bad, f'{name}.html has broken internal links: {bad}'

    # navigation: every page but the last links on to the next one in course order
    if page_index + 1 < len(names):
        nxt = browser.execute_script("const a = document.querySelector('a.right-next'); return a && a.href")
        assert nxt and nxt.split('#')[0].endswith(f'{names[page_index + 1]}.html'), f'{name}.html: next is {nxt}'
    screenshot(browser, f'site-{name}.png')


def _page_named(notebooks, prefix):
    return next((name for name, p in notebooks.items() if p.name.startswith(prefix)), None)


def test_activation_stats_page_shows_its_figures(notebooks, server, browser):
    name = _page_named(notebooks, '06_')
    if name is None: pytest.skip('no 06 notebook yet')
    assert not open_page(browser, server + f'{name}.html')
    n_after = browser.execute_script(r"""
        const h = [...document.querySelectorAll('article h1, article h2, article h3')]
                  .find(h => /activation/i.test(h.textContent));
        if (!h) return -1;
        return [...document.querySelectorAll('div.cell_output img')]
               .filter(i => h.compareDocumentPosition(i) & Node.DOCUMENT_POSITION_FOLLOWING && i.naturalWidth > 0).length""")
    assert n_after != -1, f'{name}.html has no heading that mentions activations'
    assert n_after >= 2, f'{name}.html shows {n_after} figures after its first heading on activations, expected at least 2'


def test_norm_comparison_page_shows_its_table(notebooks, server, browser):
    name = _page_named(notebooks, '07_')
    if name is None: pytest.skip('no 07 notebook yet')
    assert not open_page(browser, server + f'{name}.html')
    table = browser.execute_script("""
        const t = document.querySelector('table.norm-comparison');
        if (!t) return null;
        t.scrollIntoView({block: 'start'}); window.scrollBy(0, -80);   // the caption below the header bar
        // the content column, and whether the table fits it or a box between them scrolls sideways
        const column = t.closest('article').getBoundingClientRect();
        const box = t.getBoundingClientRect();
        let scroller = null;
        for (let e = t.parentElement; e && e.tagName !== 'ARTICLE'; e = e.parentElement)
            if (['auto', 'scroll'].includes(getComputedStyle(e).overflowX)) { scroller = e; break; }
        const inside = scroller && scroller.getBoundingClientRect();
        return {header: t.querySelectorAll('thead th, tr:first-child th').length,
                rows: t.querySelectorAll('tbody tr').length, height: t.offsetHeight,
                fits: box.left >= column.left - 1 && box.right <= column.right + 1,
                scrolls: !!scroller && inside.left >= column.left - 1 && inside.right <= column.right + 1}""")
    assert table is not None, f'{name}.html has no table.norm-comparison'
    assert table['header'] > 0 and table['rows'] >= 2 and table['height'] > 0, f'{name}.html: the norm table looks empty: {table}'
    assert table['fits'] or table['scrolls'], f'{name}.html: the norm table spills out of the content column: {table}'
    time.sleep(0.2)
    screenshot(browser, 'site-07.png')


@pytest.mark.parametrize('query,page', [('RunningBatchNorm', 'batchnorm.html'), ('course_size', 'foundations.html')])
def test_search_finds_an_exported_symbol(server, browser, query, page):
    "Sphinx's search runs in the page on its own index (searchindex.js): the search box submits to search.html."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    assert not open_page(browser, server + 'search.html')
    box = browser.find_element(By.CSS_SELECTOR, '.bd-search-container form.bd-search input[name=q]')
    box.send_keys(query, Keys.ENTER)
    WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, '#search-results ul.search li a'))
    results = browser.execute_script("return [...document.querySelectorAll('#search-results ul.search li a')].map(a => a.href)")
    assert any(page in r for r in results), results
    assert not [e for e in browser.get_log('browser') if e['level'] == 'SEVERE']


def _has_math(nb_path: Path) -> bool:
    "Whether the notebook's markdown holds `$...$` math (outside code)."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    text = ' '.join(re.sub(r'```.*?```|`[^`]*`', '', ''.join(c['source']), flags=re.S) for c in cells if c['cell_type'] == 'markdown')
    return re.search(r'\$[^$\s][^$]*\$', text) is not None


@pytest.mark.parametrize('name', _page_names())
def test_page_needs_no_network(name, notebooks, server, browser):
    "Everything a page loads comes from the site itself, and its math is MathML the browser lays out, no MathJax."
    assert not open_page(browser, server + f'{name}.html')
    sources = browser.execute_script(
        "return [...document.querySelectorAll('script[src], link[href][rel~=stylesheet], link[href][rel~=preload], img[src], iframe[src]')]"
        ".map(e => e.src || e.href)")
    foreign = [s for s in sources if not s.startswith(server) and not s.startswith('data:')]
    assert not foreign, f'{name}.html loads from other hosts: {foreign}'
    assert not browser.execute_script("return !!window.MathJax"), f'{name}.html loads MathJax'
    if name in notebooks and _has_math(notebooks[name]):
        sizes = browser.execute_script(
            "return [...document.querySelectorAll('article math')].map(m => { const r = m.getBoundingClientRect(); return [r.width, r.height]; })")
        assert sizes, f'{notebooks[name].name} has $math$ but {name}.html shows no MathML'
        assert all(w > 0 and h > 0 for w, h in sizes), f'{name}.html has MathML that takes no space: {sizes}'
