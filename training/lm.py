"""Word n-gram language models for the beam-search decoder, built with KenLM's lmplz.

``build_language_model`` normalises text exactly like transcripts, picks the vocabulary, writes the
lexicon (word -> characters) that the decoder needs, and runs ``lmplz`` (and ``build_binary`` when
present) to produce the model. The result is a folder that ``asr.lm.LanguageModel.load`` reads.
"""

from __future__ import annotations

import collections
import gzip
import json
import lzma
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from asr.errors import CommandError
from asr.lm import CONFIG_FILE, LEXICON_FILE, PHONE_LEXICON_FILE, DecoderSettings, LanguageModel, LanguageModelError, spell, spell_phones
from asr.phones import ESPEAK_MISSING, Pronouncer, PronunciationError, PronunciationWarning
from asr.text import normalize_text

KENLM_INSTALL_HINT = (
    "KenLM's lmplz was not found. Install it with `asr lm install-kenlm` (needs cmake, a C++ compiler and "
    "Debian's libboost-program-options-dev libboost-system-dev libboost-thread-dev libboost-test-dev zlib1g-dev "
    "libbz2-dev liblzma-dev), or put lmplz on PATH, or set KENLM_BIN to the folder that holds it."
)


class LanguageModelBuildError(CommandError):
    """Raised when the language model cannot be built."""


def find_kenlm_tool(name: str) -> str | None:
    """Path of a KenLM program: $KENLM_BIN/name, then PATH, then ~/.local/bin."""
    candidates = []
    if os.environ.get("KENLM_BIN"):
        candidates.append(Path(os.environ["KENLM_BIN"]) / name)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates.append(Path.home() / ".local" / "bin" / name)
    return next((str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def source_name(path: str | os.PathLike) -> str:
    """How a text source is named in a model's description: its file name (a manifest's with its folder)."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.name.endswith(".jsonl") else path.name


MAX_LINE_WORDS = 20_000  # a longer line is not a sentence or paragraph: a text without line ends


def read_sentences(path: str | os.PathLike) -> Iterator[str]:
    """Normalised lines of a text file (.txt, .gz, .xz) or the ``text`` fields of a JSONL manifest.

    A binary file, unreadable JSON, or a line of more than ``MAX_LINE_WORDS`` words raises ``LanguageModelBuildError``.
    """
    for number, line in numbered_lines(path):
        sentence = normalize_text(line)
        if sentence.count(" ") >= MAX_LINE_WORDS:
            raise LanguageModelBuildError(
                f"line {number} of {path} holds more than {MAX_LINE_WORDS} words: the text needs one sentence or paragraph a line"
            )
        if sentence:
            yield sentence


def read_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines (as written) of a text file (.txt, .gz, .xz), or the ``text`` fields of a JSONL manifest; blank ones skipped.

    A missing or binary file or unreadable JSON raises ``LanguageModelBuildError``.
    """
    return (line for _, line in numbered_lines(path))


def numbered_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """``read_lines`` with each line's number in the file."""
    path = Path(path)
    if not path.is_file():
        raise LanguageModelBuildError(f"text file not found: {path}")
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if "\x00" in line:
                    raise LanguageModelBuildError(f"{path} is a binary file, not text (a NUL byte on line {number})")
                if path.name.endswith(".jsonl"):
                    line = json.loads(line).get("text", "") if line.strip() else ""
                if line.strip():
                    yield number, line.strip()
    except (OSError, EOFError, lzma.LZMAError, json.JSONDecodeError, UnicodeError) as error:
        raise LanguageModelBuildError(f"cannot read {path}: {error}") from error


def build_language_model(
    sources: Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    order: int = 3,
    max_words: int = 60_000,
    min_count: int = 2,
    prune: tuple[int, ...] = (0, 0, 1),
    settings: DecoderSettings | None = None,
    phones: bool = False,
) -> Path:
    """Build ``output_dir`` with lm.bin (or lm.arpa), lexicon.txt and decoder.json; returns the folder.

    ``phones``: also the phone lexicon (``add_phone_lexicon``). The files are made in a staging folder beside
    ``output_dir`` and moved into it only once all are complete (decoder.json last), so a failed or interrupted build
    leaves a language model already there as it was.
    """
    lmplz = find_kenlm_tool("lmplz")
    if lmplz is None:
        raise LanguageModelBuildError(KENLM_INSTALL_HINT)
    if order < 2:
        raise LanguageModelBuildError("order must be at least 2")
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    sources = [str(s) for s in sources]
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            corpus, counts, sentences = _write_corpus(sources, Path(tmp))
            kept = [w for w, c in counts.most_common(max_words) if c >= min_count] or [w for w, _ in counts.most_common(max_words)]
            model_file = _estimate(lmplz, corpus, kept, order, prune, Path(tmp), staging)
        (staging / LEXICON_FILE).write_text("".join(f"{w}\t{spell(w)}\n" for w in kept), encoding="utf-8")
        config = {
            **(settings or DecoderSettings()).to_dict(),
            "lm": model_file.name,
            "lexicon": LEXICON_FILE,
            "order": order,
            "words": len(kept),
            "sentences": sentences,
            "sources": [source_name(s) for s in sources],
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if phones:
            add_phone_lexicon(staging)
        out.mkdir(exist_ok=True)
        for path in sorted(staging.iterdir(), key=lambda f: f.name == CONFIG_FILE):
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_corpus(sources: list[str], folder: Path) -> tuple[Path, collections.Counter[str], int]:
    """The sources' normalised sentences, one a line, in ``folder``: (the file, word counts, sentences)."""
    counts: collections.Counter[str] = collections.Counter()
    corpus, sentences = folder / "corpus.txt", 0
    with corpus.open("w", encoding="utf-8") as handle:
        for source in sources:
            for sentence in read_sentences(source):
                handle.write(sentence + "\n")
                counts.update(sentence.split())
                sentences += 1
    if not counts:
        raise LanguageModelBuildError("the text sources contain no words")
    return corpus, counts, sentences


def _estimate(lmplz: str, corpus: Path, words: list[str], order: int, prune: tuple[int, ...], tmp: Path, out: Path) -> Path:
    """KenLM's n-gram model of the corpus over ``words`` in ``out``: lm.bin (a quantised trie), or lm.arpa without
    build_binary."""
    vocab_file = tmp / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    arpa = out / "lm.arpa"
    prune_args = [str(p) for p in prune[:order]] + [str(prune[-1])] * max(0, order - len(prune))
    limits = ["--limit_vocab_file", str(vocab_file), "--discount_fallback", "-S", "20%", "-T", str(tmp)]
    _run([lmplz, "-o", str(order), "--prune", *prune_args, *limits, "--text", str(corpus), "--arpa", str(arpa)])
    build_binary = find_kenlm_tool("build_binary")
    if build_binary is None:
        return arpa
    model_file = out / "lm.bin"
    _run([build_binary, "-s", "trie", "-q", "8", "-b", "8", str(arpa), str(model_file)])
    arpa.unlink()
    return model_file


def word_counts(sources: Iterable[str | os.PathLike]) -> collections.Counter[str]:
    """How often each word occurs in the normalised sentences of the sources."""
    counts: collections.Counter[str] = collections.Counter()
    for source in sources:
        for sentence in read_sentences(source):
            counts.update(sentence.split())
    return counts


def oov_rates(counts: collections.Counter[str], manifests: Iterable[str | os.PathLike], sizes: Iterable[int]) -> list[dict]:
    """For each vocabulary size (the most frequent words of ``counts``): the share of each manifest's running words
    outside the vocabulary, in %."""
    ranked = [w for w, _ in counts.most_common()]
    dev = {str(m): [w for sentence in read_sentences(m) for w in sentence.split()] for m in manifests}
    rows = []
    for size in sizes:
        vocabulary = set(ranked[:size])
        row = {"words": min(size, len(ranked))}
        for name, words in dev.items():
            row[name] = round(100 * sum(w not in vocabulary for w in words) / max(len(words), 1), 2)
        rows.append(row)
    return rows


MAX_HOMOPHONES = 6  # words per pronunciation that the decoder's lexicon trie holds (flashlight drops, and warns about, more)


def add_phone_lexicon(folder: str | os.PathLike, pronouncer: Pronouncer | None = None) -> tuple[int, int]:
    """Write the phone lexicon of a language-model folder's words (every CMUdict pronunciation; espeak-ng's for the
    words CMUdict lacks) and name it in decoder.json. Returns (words, words spelled by espeak-ng). Beyond
    ``MAX_HOMOPHONES`` words with the same pronunciation, the rarer ones are left out; so is a word with no
    pronunciation at all (a ``PronunciationWarning`` names them), which the phone search then cannot produce.

    Until ``asr tune-decoder --units phones`` stores settings for phones, they start from the characters' settings.
    """
    try:
        lm = LanguageModel.load(folder)
    except LanguageModelError as error:
        raise LanguageModelBuildError(str(error)) from error
    words = [line.split("\t", 1)[0] for line in lm.lexicon_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    words = list(dict.fromkeys(words))
    try:
        pronouncer = pronouncer or Pronouncer()
    except PronunciationError as error:
        raise LanguageModelBuildError(str(error)) from error
    guessed = [w for w in words if not pronouncer.in_dictionary(w)]
    try:
        pronouncer.guess(guessed)  # all at once where it can (one espeak-ng process)
    except PronunciationError:
        pass  # word by word below, leaving out those that fail
    lines, homophones, unpronounced = [], collections.Counter(), []
    for word in words:  # most frequent first
        try:
            variants = pronouncer.variants(word)
        except PronunciationError:
            unpronounced.append(word)
            continue
        for pronunciation in variants:
            homophones[pronunciation] += 1
            if homophones[pronunciation] <= MAX_HOMOPHONES:
                lines.append(f"{word}\t{spell_phones(pronunciation)}\n")
    if unpronounced:
        shown = ", ".join(repr(w) for w in unpronounced[:5])
        warnings.warn(
            f"{len(unpronounced)} word(s) with no pronunciation left out of the phone lexicon ({shown}...): {ESPEAK_MISSING}",
            PronunciationWarning,
            stacklevel=2,
        )
    if not lines:
        raise LanguageModelBuildError("no word of the lexicon has a pronunciation")
    (lm.folder / PHONE_LEXICON_FILE).write_text("".join(lines), encoding="utf-8")
    config_path = lm.folder / CONFIG_FILE
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["phone_lexicon"] = PHONE_LEXICON_FILE
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return len(words), len(guessed)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LanguageModelBuildError(f"{Path(command[0]).name} failed ({result.returncode}): {result.stderr[-2000:]}")


def install_kenlm(prefix: str | os.PathLike, jobs: int = 2) -> list[Path]:
    """Download KenLM's source package from PyPI, build lmplz and build_binary with cmake, copy them to prefix/bin."""
    if shutil.which("cmake") is None:
        raise LanguageModelBuildError("cmake is required to build KenLM (apt-get install cmake g++)")
    bin_dir = Path(prefix) / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        import sys

        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "kenlm", "--no-build-isolation", "kenlm", "-d", tmp])
        archive = next(Path(tmp).glob("kenlm-*.tar.gz"))
        shutil.unpack_archive(str(archive), tmp)
        source = next(p for p in Path(tmp).iterdir() if p.is_dir() and p.name.startswith("kenlm-"))
        build = source / "build"
        build.mkdir()
        _run(["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
        _run(["cmake", "--build", str(build), "--target", "lmplz", "build_binary", "-j", str(jobs)])
        installed = []
        for name in ("lmplz", "build_binary"):
            target = bin_dir / name
            shutil.copy2(build / "bin" / name, target)
            installed.append(target)
    return installed
