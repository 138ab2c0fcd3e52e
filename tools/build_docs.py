"""Build the docs site from executed notebooks: nbdev processes them, Sphinx with myst-nb renders them.

    python tools/build_docs.py                        # nbs/ -> _docs/ (`make docs` runs `make course` first)
    python tools/build_docs.py --nbs _quick --site test-artifacts/site   # what tests/test_site.py does

The notebooks are not run here: their saved outputs (figures, tables, printed numbers) are the page.
1. nbdev's own docs step, `nbdev.serve.proc_nbs` (what `nbdev_proc_nbs` and `nbdev_docs` run
   before quarto), writes processed copies to _proc/: a `show_doc` cell, executed, after every
   exported symbol (signature, docstring, docments), exported code and `#| hide` cells dropped,
   the title cell turned into frontmatter, backticked names linked to their docs.
2. `to_myst` turns that quarto-flavoured notebook into one myst-nb renders as quarto would show
   it: the `show_doc` outputs become markdown cells, the `#|` options (echo, output, include)
   become cell tags, links to `NN_name.ipynb` or to the published site point at the pages, and
   the text after the title in the title cell, which nbdev drops, is kept. Into _proc/site/, one
   `name.ipynb` per page (`name.html`, nbdev's page names); the home page lists the others in
   course order (a hidden toctree), which is the site's navigation.
3. Sphinx (myst-nb, sphinx-book-theme; settings in tools/sphinx/conf.py) renders _proc/site/.
   Math becomes MathML at build time and search is Sphinx's own index, so the site loads
   nothing from other hosts.
4. Beside each `name.html`, `name.html.md`: the page as plain markdown, where the `Docs:` line
   nbdev writes into each module's docstring points (Quarto, nbdev's default, writes these too).
"""
import argparse, html, json, os, re, shutil, subprocess, sys
from pathlib import Path

import yaml
from nbdev.config import get_config, nbpath2html
from nbdev.doclinks import NbdevLookup, nbglob

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT/'tools/sphinx'
sys.path.insert(0, str(ROOT))   # document this checkout's minifast, as nbdev-test tests it
sys.path.insert(0, str(CONF_DIR))
from minifast_site import heading_slug   # the anchors Sphinx will give headings
IMAGE_SUFFIXES = {'.png', '.jpg', '.jpeg', '.gif', '.svg', '.webp'}


# --- which notebooks, in which order -----------------------------------------------------------
def course_notebooks(nbs: Path) -> list:
    "The notebooks nbdev would document, home page (index.ipynb) first, the rest by file name."
    found = sorted(nbglob(nbs, as_path=True), key=lambda p: p.name)
    return sorted(found, key=lambda p: p.name != 'index.ipynb')


def has_outputs(nb_path: Path) -> bool:
    "Whether any code cell of the notebook holds a saved output (i.e. it has been run)."
    cells = json.loads(nb_path.read_text(encoding='utf-8'))['cells']
    return any(c.get('outputs') for c in cells if c['cell_type'] == 'code')


# --- step 1: nbdev ------------------------------------------------------------------------------
def nbdev_process(nbs: Path) -> Path:
    "Run nbdev's docs processors on every notebook in `nbs`; the processed copies land in _proc/."
    from nbdev.serve import proc_nbs
    return Path(proc_nbs(str(nbs), n_workers=0, force=True))


# --- step 2: from quarto's notebook to myst-nb's ---------------------------------------------
_directive = re.compile(r'^#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def split_directives(source: str):
    "The leading `#| key: value` lines of a code cell as a dict, and the code without them."
    lines, opts = source.splitlines(True), {}
    while lines and _directive.match(lines[0]):
        key, value = _directive.match(lines.pop(0)).groups()
        opts[key] = value.strip('\'"')
    return opts, ''.join(lines)


def _text(x) -> str: return ''.join(x) if isinstance(x, list) else (x or '')


def _attrs_to_html(attrs: str) -> str:
    "Pandoc link attributes `{.cls #id key=\"v\"}` as HTML attributes."
    out = [f'{k}="{html.escape(v)}"' for k, v in re.findall(r'([\w-]+)="([^"]*)"', attrs)]
    classes = re.findall(r'(?:^|\s)\.([\w-]+)', attrs)
    if classes: out.append(f'class="{" ".join(classes)}"')
    return ' '.join(out)


_attr_link = re.compile(r'\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}')


def page_anchors(nb: dict) -> set:
    "The heading anchors a processed notebook's page will have: its markdown headings and `show_doc` headings."
    texts = [_text(c.get('source')) for c in nb['cells'] if c['cell_type'] == 'markdown']
    texts += [_text(o.get('data', {}).get('text/markdown')) for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
    heads = re.findall(r'^#{1,6}\s+(.+?)\s*$', '\n'.join(texts), re.M)
    return {heading_slug(re.sub(r'`|\*\*', '', h)) for h in heads}


def relinker(site_url: str, pages: dict, anchors: dict):
    """A function that points `NN_x.ipynb` and links into the published site (`x.html#frag`) at the page `x.ipynb`,
    which myst resolves. nbdev links a method (`#learner.fit`) that has no heading of its own to its class's heading
    (`#learner`), as a reader would look for it, or else to the page."""
    sources = {f'{p}.html': p for p in pages.values()}
    def relink(target: str) -> str:
        if site_url and target.startswith(site_url): target = target[len(site_url):] or 'index.html'
        name, hash_, frag = target.removeprefix('./').partition('#')
        page = pages.get(name) or sources.get(name)
        if page is None: return target
        if frag and frag not in anchors.get(page, ()):
            owner = frag.split('.')[0]
            frag = owner if owner in anchors.get(page, ()) else ''
            hash_ = '#' if frag else ''
        return f'{page}.ipynb{hash_}{frag}'
    return relink


def convert_markdown(md: str, relink) -> str:
    "Quarto link attributes to HTML, link targets through `relink`."
    md = re.sub(r'(\]\()([^)\s]+)', lambda m: m[1] + relink(m[2]), md)
    return _attr_link.sub(lambda m: f'<a href="{html.escape(m[2])}" {_attrs_to_html(m[3])}>{m[1]}</a>', md)


def _md_cell(source: str) -> dict:
    "A markdown cell, with an id of its own (nbformat 4.5)."
    _md_cell.n = getattr(_md_cell, 'n', 0) + 1
    return dict(cell_type='markdown', id=f'site-md-{_md_cell.n}', metadata={}, source=source)


_fm_line = re.compile(r'^(#\s+\S.*|>\s+\S.*|-\s+\S.*:.*\S)\s*$')

def title_cell_rest(nb_path: Path) -> str:
    "The text nbdev's frontmatter step drops: what the title cell holds besides `# title`, `> description`, `- key: value`."
    for cell in json.loads(nb_path.read_text(encoding='utf-8'))['cells']:
        src = _text(cell.get('source'))
        if cell['cell_type'] == 'markdown' and re.search(r'^#\s+\S', src, re.M):
            return '\n'.join(l for l in src.splitlines() if not _fm_line.match(l)).strip()
    return ''


def to_myst(nb: dict, relink, intro: str = ''):
    "The frontmatter and the myst-nb notebook for an nbdev-processed notebook `nb`; `intro` follows the title."
    cells, fm = [], {}
    for cell in nb['cells']:
        src = _text(cell.get('source'))
        if cell['cell_type'] == 'raw' and src.startswith('---') and not fm:   # nbdev's frontmatter
            fm = yaml.safe_load(src.strip().strip('-')) or {}
            head = f"# {fm['title']}" if fm.get('title') else ''
            if fm.get('description'): head += f"\n\n> {fm['description']}"
            if head: cells.append(_md_cell(convert_markdown(head, relink)))
            if intro: cells.append(_md_cell(convert_markdown(intro, relink)))
            continue
        if cell['cell_type'] == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'): continue
            cells.append(dict(cell, source=convert_markdown(src, relink)))
            continue
        if cell['cell_type'] != 'code':
            cells.append(cell); continue
        opts, code = split_directives(src)
        opts = {k: v.lower() for k, v in opts.items() if k in ('include', 'echo', 'output')}
        if opts.get('include') == 'false': continue
        outputs = [] if opts.get('output') == 'false' else cell.get('outputs', [])
        meta = {k: v for k, v in cell.get('metadata', {}).items() if k not in ('execution', 'language')}
        if opts.get('echo') == 'false': meta['tags'] = meta.get('tags', []) + ['remove-input']
        if opts.get('output') == 'asis':   # show_doc: its markdown output is the page text
            if opts.get('echo') != 'false': cells.append(dict(cell, metadata=meta, source=code, outputs=[]))
            for o in outputs:
                md = _text(o.get('data', {}).get('text/markdown')) or _text(o.get('text'))
                md = re.sub(r'^---\s*\n', '', md.lstrip('\n'))   # nbdev's rule above each symbol; the heading separates it
                # a symbol's name is text, even `annealer.<locals>.make`
                md = re.sub(r'^#+ .*$', lambda m: m[0].replace('<', '&lt;').replace('>', '&gt;'), md, flags=re.M)
                if md.strip(): cells.append(_md_cell(convert_markdown(md, relink)))
            continue
        if not outputs and not code.strip(): continue
        cells.append(dict(cell, metadata=meta, source=code, outputs=outputs))
    return fm, dict(nb, cells=cells)


def page_markdown(page_nb: dict) -> str:
    "A page as plain markdown: what the `Docs:` line of each module's docstring links to (nbdev's `name.html.md`)."
    parts = []
    for cell in page_nb['cells']:
        src = _text(cell.get('source'))
        if cell['cell_type'] == 'markdown': parts.append(src); continue
        if cell['cell_type'] != 'code': continue
        if 'remove-input' not in cell.get('metadata', {}).get('tags', []) and src.strip(): parts.append(f'```python\n{src}\n```')
        for out in cell.get('outputs', []):
            text = _text(out.get('text')) or _text(out.get('data', {}).get('text/plain'))
            if text.strip(): parts.append(f'```\n{text.rstrip()}\n```')
    return '\n\n'.join(p.strip('\n') for p in parts if p.strip()) + '\n'


def toctree(names: list) -> str:
    "The home page's hidden toctree: the site's navigation, in course order."
    return '```{toctree}\n:hidden:\n:maxdepth: 1\n\n' + '\n'.join(names) + '\n```\n'


def home_page(pages: list, cfg) -> str:
    "A stand-in home page for a notebooks folder without index.ipynb."
    items = '\n'.join(f'- [{title}]({name}.ipynb)' for name, title, _ in pages)
    return f"# {cfg.get('title', 'minifast')}\n\n> {cfg.get('description', '')}\n\n{items}\n\n"


# --- step 3: Sphinx -------------------------------------------------------------------------------
def build(nbs: Path, site: Path, strict: bool = True) -> Path:
    cfg = get_config(nbs)
    notebooks = course_notebooks(nbs)
    if not notebooks: sys.exit(f'build_docs: no notebooks in {nbs}')
    unrun = [p.name for p in notebooks if not has_outputs(p)]
    if unrun: print(f'build_docs: warning: no saved outputs in {", ".join(unrun)}: run `make course` (or nbdev-test --save) first', file=sys.stderr)

    print(f'build_docs: nbdev processing {len(notebooks)} notebooks from {nbs}')
    try: proc = nbdev_process(nbs)
    except Exception as e:
        sys.exit(f'build_docs: {e}\n\nnbdev runs the exported cells and every cell that imports something, to render '
                 'show_doc; a cell that imports and also uses names from cells it does not run fails here (and in '
                 'nbdev-docs). Keep imports in cells of their own.')
    src_dir = proc/'site'
    shutil.rmtree(src_dir, ignore_errors=True); src_dir.mkdir(parents=True)
    site_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}".rstrip('/') + '/'
    names = {p.name: nbpath2html(p).stem for p in notebooks}   # as quarto links .ipynb to .html
    processed = {p.name: json.loads((proc/p.name).read_text(encoding='utf-8')) for p in notebooks}
    relink = relinker(site_url, names, {names[n]: page_anchors(nb) for n, nb in processed.items()})

    pages, kept = [], {}   # pages: (page name, title, notebook), in course order
    for src in notebooks:
        intro = title_cell_rest(src)
        if intro: intro = NbdevLookup().linkify(intro); kept[src.name] = intro   # as nbdev links the other cells
        fm, page_nb = to_myst(processed[src.name], relink, intro)
        name = Path(fm.get('output-file') or src.name).stem
        if any(name == p[0] for p in pages): sys.exit(f'build_docs: {src.name} and another notebook both make {name}.html')
        pages.append((name, fm.get('title') or src.stem, page_nb))
    if kept: print(f"build_docs: kept the text that follows the title in {', '.join(kept)} (nbdev's own docs "
                   "drop it; give it a markdown cell of its own)", file=sys.stderr)

    others = [name for name, *_ in pages if name != 'index']
    if not any(name == 'index' for name, *_ in pages):
        print(f'build_docs: warning: no {cfg.get("readme_nb", "index.ipynb")} in {nbs}; writing a stand-in home page', file=sys.stderr)
        (src_dir/'index.md').write_text(home_page(pages, cfg) + toctree(others), encoding='utf-8')
    for name, _, page_nb in pages:
        if name == 'index': page_nb['cells'].append(_md_cell(toctree(others)))
        (src_dir/f'{name}.ipynb').write_text(json.dumps(page_nb, indent=1, ensure_ascii=False), encoding='utf-8')
    for f in nbs.rglob('*'):   # pictures the notebooks' markdown shows, e.g. ![](images/x.png)
        rel = f.relative_to(nbs)
        if f.suffix.lower() in IMAGE_SUFFIXES and not any(p[0] in '_.' for p in rel.parts):
            (src_dir/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, src_dir/rel)

    print(f'build_docs: sphinx-build -> {site}')
    shutil.rmtree(site, ignore_errors=True)
    res = subprocess.run([sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-E', '-j', 'auto',
                          *(['-W', '--keep-going'] if strict else []), '-c', str(CONF_DIR),
                          '-d', str(proc/'doctrees'), str(src_dir), str(site.resolve())], cwd=ROOT)
    if res.returncode: sys.exit(f'build_docs: sphinx-build failed (exit {res.returncode})')
    shutil.rmtree(site/'.doctrees', ignore_errors=True)
    sources = site/'_sources'   # left empty: html_copy_source is off
    if sources.is_dir() and not any(sources.iterdir()): sources.rmdir()
    (site/'.nojekyll').touch()   # GitHub Pages: serve _static/ and _images/ as they are
    for name, _, page_nb in pages: (site/f'{name}.html.md').write_text(page_markdown(page_nb), encoding='utf-8')
    return site


def main():
    cfg = get_config(ROOT)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', type=Path, default=cfg.nbs_path, help='executed notebooks to build from (default: nbs/)')
    ap.add_argument('--site', type=Path, default=cfg.doc_path, help='where the site goes (default: _docs/)')
    ap.add_argument('--no-strict', action='store_true', help="don't turn Sphinx warnings into errors")
    args = ap.parse_args()
    site = build(args.nbs.resolve(), args.site, strict=not args.no_strict)
    print(f'build_docs: done; serve it with: python -m http.server -d {site}')


if __name__ == '__main__': main()
