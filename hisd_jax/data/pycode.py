"""Code search on real code that ships with the install: (docstring summary, function) pairs.

The corpus is built from the Python sources on the machine: the standard library of the running
interpreter and installed packages (default: scikit-learn, SciPy, NumPy, Matplotlib, all
dependencies of hisd_jax), skipping their test suites. Every
function or method with a docstring gives one pair:

  query   the docstring's summary: its first paragraph, whitespace collapsed (3-64 words);
  code    the function's source without its docstring (`ast.unparse` of the definition, so
          comments and formatting are normalised away).

Trivial pairs are dropped (a body of `pass`, `...`, a bare `raise`, or fewer than
`MIN_CODE_LINES` lines once the docstring is gone), and duplicates (the same code, or the same
query and code) keep their first occurrence in sorted file order. The split is by module: a
module's pairs all go to one split, chosen by a hash of its dotted name
(`split_of_module`), so no module and no file is in two splits.

Per pair the corpus also keeps two labels for sequence classification: `package` (the
top-level package: `stdlib` or the package's name; which one a function comes from) and
`returns` (whether the function's own body returns a value).

`build_corpus()` returns the pairs and a manifest naming the exact corpus: the Python version,
the package versions, the sha256 of every source file read, the builder's version, the pair
count per split, and `digest`, a sha256 over all of it. `load_corpus(data_dir)` caches the
corpus in `<data_dir>/pycode/corpus_<sources key>.json` (read back while the source files are
the same) and, trained on the training split only, a byte-level BPE tokenizer from HF
`tokenizers` in `<data_dir>/pycode/<digest prefix>_v<vocab>/`.

Follows the CodeSearchNet construction (Husain et al. 2019, arXiv 1909.09436): docstring
summary as the query, the function body as the document, deduplicated, split so that no
repository (here: module) spans two splits.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import sysconfig

BUILDER_VERSION = 1
PACKAGES = ("sklearn", "scipy", "numpy", "matplotlib")  # installed with hisd_jax
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test by module
MIN_QUERY_WORDS, MAX_QUERY_WORDS = 3, 64
MIN_CODE_LINES = 3
# Directories never read: test suites, demos, vendored or generated code, tooling.
SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
     "__pycache__", "tkinter", "_vendor", "externals", "__phello__", "pydoc_data"}
)  # fmt: skip
DISTRIBUTIONS = {"sklearn": "scikit-learn"}


def source_files(packages=PACKAGES) -> list[tuple[str, str, str]]:
    """(package, dotted module name, path) of every source file read, sorted: the standard
    library (package "stdlib") and each installed package in `packages`."""
    roots = [("stdlib", sysconfig.get_paths()["stdlib"], "")]
    for name in packages:
        module = importlib.import_module(name)
        roots.append((name, os.path.dirname(module.__file__), name))
    out = []
    for package, root, prefix in roots:
        for directory, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
            for file in sorted(files):
                if not file.endswith(".py") or file.startswith("test_"):
                    continue
                rel = os.path.relpath(os.path.join(directory, file), root)[: -len(".py")]
                parts = [p for p in rel.split(os.sep) if p != "__init__"]
                dotted = ".".join(([prefix] if prefix else []) + parts) or prefix
                out.append((package, dotted, os.path.join(directory, file)))
    return sorted(out, key=lambda t: (t[0], t[1]))


def split_of_module(module: str, fractions=FRACTIONS) -> str:
    """The split of every pair of `module`: a fixed function of its dotted name."""
    u = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big") / 2.0**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def summary(docstring: str) -> str:
    """The first paragraph of a docstring, whitespace collapsed to single spaces."""
    return " ".join(inspect.cleandoc(docstring).split("\n\n", 1)[0].split())


def _trivial(body: list[ast.stmt]) -> bool:
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, (ast.Pass, ast.Raise)):
        return True
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def returns_value(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the function's own body (not a nested function or class) returns a value."""
    stack = list(node.body)
    while stack:
        stmt = stack.pop()
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(stmt, ast.Return) and stmt.value is not None:
            if not (isinstance(stmt.value, ast.Constant) and stmt.value.value is None):
                return True
        stack.extend(ast.iter_child_nodes(stmt))
    return False


def pairs_of_source(text: str, module: str, package: str) -> list[dict]:
    """The (query, code) pairs of one file's source `text` (see the module docstring); a file
    that does not parse gives none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        query = summary(doc)
        if not MIN_QUERY_WORDS <= len(query.split()) <= MAX_QUERY_WORDS:
            continue
        body = node.body[1:]  # without the docstring
        if not body or _trivial(body):
            continue
        stripped = type(node)(**{**{f: getattr(node, f) for f in node._fields}, "body": body})
        code = ast.unparse(ast.fix_missing_locations(stripped))
        if code.count("\n") + 1 < MIN_CODE_LINES:
            continue
        out.append({"query": query, "code": code, "module": module, "name": node.name,
                    "package": package, "returns": returns_value(node)})  # fmt: skip
    return out


def build_corpus(packages=PACKAGES, fractions=FRACTIONS) -> tuple[dict[str, list[dict]], dict]:
    """({split: pairs}, manifest) of the sources on this machine (see the module docstring).
    Built once per process and arguments (~12 s): the result is shared, do not modify it."""
    return _build_corpus(tuple(packages), tuple(fractions))


@functools.lru_cache(maxsize=2)
def _build_corpus(packages, fractions):
    files = source_files(packages)
    hashes, seen_code, seen_pair = {}, set(), set()
    splits = {s: [] for s in SPLITS}
    for package, module, path in files:
        with open(path, "rb") as f:
            raw = f.read()
        key = f"{package}:{module}"
        hashes[key] = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        split = split_of_module(module, fractions)
        for pair in pairs_of_source(text, module, package):
            code_key = hashlib.sha256(pair["code"].encode()).digest()
            pair_key = hashlib.sha256((pair["query"] + "\0" + pair["code"]).encode()).digest()
            if code_key in seen_code or pair_key in seen_pair:
                continue
            seen_code.add(code_key)
            seen_pair.add(pair_key)
            splits[split].append(pair)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "python": platform.python_version(),
        "packages": {
            name: importlib.metadata.version(DISTRIBUTIONS.get(name, name)) for name in packages
        },
        "fractions": list(fractions),
        "files": hashes,
        "pairs": {s: len(p) for s, p in splits.items()},
        "modules": {s: len({p["module"] for p in ps}) for s, ps in splits.items()},
    }
    manifest["digest"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return splits, manifest


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]")  # ids 0, 1, 2
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2


def train_tokenizer(pairs: list[dict], vocab_size: int = 8192):
    """A byte-level BPE tokenizer (HF `tokenizers`) trained on the queries and code of `pairs`
    (the training split only); `SPECIAL_TOKENS` take ids 0-2."""
    from hisd_jax.data.bpe import train_bpe  # noqa: PLC0415

    texts = (t for p in pairs for t in (p["query"], p["code"]))
    return train_bpe(
        texts, vocab_size, SPECIAL_TOKENS, add_prefix_space=False, length=2 * len(pairs)
    )


def encode(tokenizer, texts: list[str], max_len: int):
    """int32 [len(texts), max_len] token ids, each row [CLS] + the text's tokens, truncated to
    `max_len` and padded with PAD_ID (0)."""
    import numpy as np  # noqa: PLC0415

    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, enc in enumerate(tokenizer.encode_batch(list(texts), add_special_tokens=False)):
        ids = [CLS_ID, *enc.ids][:max_len]
        out[i, : len(ids)] = ids
    return out


def default_data_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "hisd_jax")


def load_corpus(data_dir: str | None = None, vocab_size: int = 8192, packages=PACKAGES):
    """(splits, manifest, tokenizer) of the corpus on this machine, cached in
    `<data_dir>/pycode/<digest[:16]>_v<vocab_size>/` (built, and the tokenizer trained on the
    training split, the first time; a cached copy is used only when the sources' digest is the
    same). `data_dir` defaults to ~/.cache/hisd_jax."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    from hisd_jax import jsonio  # noqa: PLC0415

    splits, manifest = _cached_corpus(data_dir or default_data_dir(), tuple(packages))
    directory = os.path.join(
        data_dir or default_data_dir(), "pycode", f"{manifest['digest'][:16]}_v{vocab_size}"
    )
    path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(path):
        tokenizer = Tokenizer.from_file(path)
    else:
        os.makedirs(directory, exist_ok=True)
        tokenizer = train_tokenizer(splits["train"], vocab_size)
        jsonio.write_text(path, tokenizer.to_str())
        jsonio.write_json(os.path.join(directory, "manifest.json"), manifest)
    return splits, manifest, tokenizer


def sources_key(packages=PACKAGES, fractions=FRACTIONS) -> str:
    """sha256 of what the corpus is built from (builder version, Python, the fractions and every
    source file's bytes): reading and hashing the files is fast, parsing them is not."""
    h = hashlib.sha256(f"{BUILDER_VERSION}|{platform.python_version()}|{fractions}".encode())
    for package, module, path in source_files(packages):
        with open(path, "rb") as f:
            h.update(f"{package}:{module}:".encode() + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _cached_corpus(data_dir: str, packages) -> tuple[dict, dict]:
    """`build_corpus`, kept in `<data_dir>/pycode/corpus_<sources key>.json`: a later process
    reads it back (~0.3 s instead of ~12 s) while the sources are the same; an unreadable copy
    is rebuilt."""
    from hisd_jax import jsonio  # noqa: PLC0415

    path = os.path.join(data_dir, "pycode", f"corpus_{sources_key(packages)[:16]}.json")
    try:
        with open(path) as f:
            stored = json.load(f)
        return stored["splits"], stored["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    splits, manifest = build_corpus(packages)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    jsonio.write_json(path, {"splits": splits, "manifest": manifest})
    return splits, manifest


PACKAGE_CLASSES = ("stdlib", *PACKAGES)  # the `package` task's class ids, in this order


def pycode(
    seed: int = 0,
    *,
    data_dir: str | None = None,
    max_len: int = 128,
    vocab_size: int = 8192,
    num_train: int | None = None,
):
    """The corpus's functions as a sequence classification `Dataset` ("pycode").

    Input 'tokens' int32 [max_len]: [CLS] and the function's code (docstring removed), BPE ids,
    padded with 0. Tasks: `package` (which of `PACKAGE_CLASSES` the function comes from) and
    `returns` (1 if its own body returns a value). 'index' is the pair's row in its split of the
    corpus (`load_corpus`, cached in `data_dir`). `num_train` keeps that many training rows,
    drawn by `seed` (default all); validation and test are whole.
    """
    return _dataset("pycode", seed, data_dir, max_len, vocab_size, num_train, pairs=False)


def pycode_search(
    seed: int = 0,
    *,
    data_dir: str | None = None,
    max_len: int = 128,
    vocab_size: int = 8192,
    num_train: int | None = None,
):
    """The corpus as a code-search `Dataset` ("pycode_search"): `pycode`'s tasks plus `search`.

    Input 'tokens' int32 [2, max_len]: row 0 the query ([CLS] and the docstring's summary), row
    1 its function's code, as in `pycode`. Tasks: `search` (retrieval: each query against the
    documents; the MRR of its test split ranks each query's code among 999 distractors, the
    CodeSearchNet protocol), and `package` and `returns` of the code. Other arguments as
    `pycode`.
    """
    return _dataset("pycode_search", seed, data_dir, max_len, vocab_size, num_train, pairs=True)


def _dataset(name, seed, data_dir, max_len, vocab_size, num_train, *, pairs: bool):
    import numpy as np  # noqa: PLC0415

    from hisd_jax.data import Dataset, TaskInfo  # noqa: PLC0415
    from hisd_jax.data.embedded import ArraySource  # noqa: PLC0415

    if not 2 <= int(max_len) <= 4096:
        raise ValueError(f"max_len={max_len} must be in [2, 4096]")
    splits, manifest, tokenizer = load_corpus(data_dir, vocab_size)
    sources = {}
    for split, rows_of_split in splits.items():
        rows = np.arange(len(rows_of_split))
        if split == "train" and num_train is not None:
            if not 1 <= num_train <= len(rows_of_split):
                raise ValueError(f"num_train={num_train} must be in [1, {len(rows_of_split)}]")
            rows = np.sort(np.random.default_rng(seed).choice(len(rows_of_split), num_train, False))
        chosen = [rows_of_split[i] for i in rows]
        tokens = encode(tokenizer, [p["code"] for p in chosen], max_len)
        if pairs:
            queries = encode(tokenizer, [p["query"] for p in chosen], max_len)
            tokens = np.stack([queries, tokens], axis=1)  # [N, 2, max_len]
        sources[split] = ArraySource({
            "tokens": tokens,
            "index": rows.astype(np.int32),
            "package": np.array([PACKAGE_CLASSES.index(p["package"]) for p in chosen], np.int32),
            "returns": np.array([int(p["returns"]) for p in chosen], np.int32),
        })  # fmt: skip
    tasks = {
        "package": TaskInfo("package", "classification", len(PACKAGE_CLASSES), "package"),
        "returns": TaskInfo("returns", "classification", 2, "returns"),
    }
    if pairs:  # a retrieval task's label field is unused: its positive is the pair's other row
        tasks = {"search": TaskInfo("search", "retrieval", 0, "index"), **tasks}
    return Dataset(
        name,
        sources,
        (2, int(max_len)) if pairs else (int(max_len),),
        tasks,
        input_key="tokens",
        input_dtype="int32",
        vocab_size=tokenizer.get_vocab_size(),
        metadata={"manifest": manifest},  # the exact corpus
    )
