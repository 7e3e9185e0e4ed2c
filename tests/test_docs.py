"""The documentation: README.md, BENCHMARKS.md and docs/*.md.

Relative links resolve (files and #anchors); every python block compiles; every command in a
bash block names a module, config, script or file that exists, and each module it runs
answers --help. The python blocks of docs/extending.md are executed by
tests/test_docs_examples.py and tests/test_loss_registry_example.py.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(["README.md", "BENCHMARKS.md"] +
               [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _text(page):
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def _anchors(page):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", _text(page))
    out = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def _blocks(page, lang):
    return [body for kind, body in FENCE.findall(_text(page)) if kind == lang]


def test_docs_exist_and_readme_is_a_front_page():
    assert len([p for p in PAGES if p.startswith("docs")]) >= 6
    readme = _text("README.md")
    assert readme.count("\n") <= 320
    first = FENCE.search(readme)
    assert first.group(2).splitlines()[:2] == [
        "bash launch/quickstart.sh   # short SoftCon pretraining on built-in data -> PyTorch export",
        "bash tests/run.sh           # the whole test suite"]
    for page in PAGES:  # every page is reachable from the front page
        if page.startswith("docs"):
            assert f"]({page}" in readme, f"README.md does not link {page}"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    base = os.path.dirname(os.path.join(ROOT, page))
    bad = []
    for target in LINK.findall(FENCE.sub("", _text(page))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full):
            bad.append(f"{target}: no file {os.path.relpath(full, ROOT)}")
        elif anchor and full.endswith(".md"):
            if anchor not in _anchors(os.path.relpath(full, ROOT)):
                bad.append(f"{target}: no heading #{anchor} in {os.path.relpath(full, ROOT)}")
    assert not bad, f"{page}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_compile(page):
    for i, block in enumerate(_blocks(page, "python")):
        compile(block, f"{page}: python block {i + 1}", "exec")


def _commands(page):
    """The command lines of a page's bash blocks, continuation lines joined."""
    lines = []
    for block in _blocks(page, "bash"):
        block = re.sub(r"\\\n\s*", " ", block)
        lines += [ln.split("#")[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln]


MODULES = sorted({m for page in PAGES for cmd in _commands(page)
                  for m in re.findall(r"python\S* -m ([\w.]+)", cmd)} - {"venv", "pip"})


@pytest.mark.parametrize("page", PAGES)
def test_commands_name_what_exists(page):
    missing = []
    for cmd in _commands(page):
        for module in re.findall(r"python\S* -m ([\w.]+)", cmd):
            if module not in ("venv", "pip") and importlib.util.find_spec(module) is None:
                missing.append(f"module {module}")
        for path in re.findall(r"(?:^|\s)((?:configs|launch|benchmarks|tests|data_prep)/[\w./-]+)",
                               cmd):
            path = path.split(":")[0]
            if os.path.basename(path).startswith("my_"):  # a user's own file, as an example
                continue
            if not os.path.exists(os.path.join(ROOT, path)):
                missing.append(path)
    assert not missing, f"{page}: " + ", ".join(missing)


def test_documented_modules_answer_help():
    assert "softcon_jax.train" in MODULES and "data_prep.verify" in MODULES
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for module in MODULES:
        res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        out = res.stdout + res.stderr
        # argparse exits 0 after --help; absl's flag parser exits 1 after printing it.
        absl_help = res.returncode == 1 and "Try --helpfull" in out
        assert res.returncode == 0 or absl_help, f"python -m {module} --help: {out[-2000:]}"
        assert "Traceback" not in out and "--" in res.stdout, module
