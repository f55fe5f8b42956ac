"""WikiText-2 (word level) for the examples and benchmarks, from the best source present.

``load_wikitext2(splits)`` looks, in this order, for

1. a directory of text files named by the caller or by ``KERAS_SKETCH_WIKITEXT_DIR``
   (``valid.txt``/``test.txt``/``train.txt`` or the official ``wiki.*.tokens``),
   read directly: nothing is written anywhere;
2. the TFDS ``wikitext2_words`` data prepared earlier in the TFDS data directory
   (``tfds_dir``, else ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``); that
   directory outlives a clone, so the description says where it is and what
   it was prepared from;
3. ``../shared/data/wikitext-2`` beside the repository (validation and test
   splits): prepared once into the TFDS data directory (saying where), then read;
4. with ``download=True``: the official archive, downloaded and prepared by TFDS;
5. the small excerpt bundled in ``wikitext2_sample/`` (CC BY-SA 3.0, see its
   README), used only when nothing above is there, and said so.

Every problem ends in a ``DataError`` with a one-paragraph message (the
scripts print it and exit; no traceback).  The text is the tokenized
WikiText-2 of Merity et al. 2016 with ``<unk>``; a line break ends a sentence
(``<eos>``).
"""

import collections
import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_DIR = "KERAS_SKETCH_WIKITEXT_DIR"
SHARED_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext-2"
SAMPLE_DIR = Path(__file__).resolve().parent / "wikitext2_sample"
SPLITS = ("train", "validation", "test")
FILE_NAMES = {  # split -> (name in ../shared and the sample, name in the official archive)
    "train": ("train.txt", "wiki.train.tokens"),
    "validation": ("valid.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}
ARCHIVE_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"
SOURCE_NOTE = "keras_sketch_source.txt"  # written next to prepared TFDS data: where it came from


class DataError(Exception):
    """A data problem, explained in one paragraph (scripts print it and exit)."""


@dataclass
class WikiText:
    tokens: dict  # split -> list of tokens
    source: str  # one line: where the text came from
    sample: bool = False  # the bundled excerpt, not the full data


def tokens_of_lines(lines):
    tokens = []
    for line in lines:
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append("<eos>")
    return tokens


def _split_file(folder, split):
    for name in FILE_NAMES[split]:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def _read_dir(folder, splits):
    out = {}
    for split in splits:
        path = _split_file(folder, split)
        with open(path, encoding="utf-8") as fh:
            out[split] = tokens_of_lines(fh)
    return out


def _missing(folder, splits):
    return [s for s in splits if _split_file(folder, s) is None]


def _check_splits(splits):
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"WikiText-2 splits must be among {list(SPLITS)}, got {list(splits)!r}.")


def load_wikitext2(splits=("validation", "test"), text_dir=None, tfds_dir=None, download=False, sample=False):
    """``WikiText`` with the tokens of each of ``splits``; see the module doc for the order."""
    splits = tuple(splits)
    _check_splits(splits)
    if sample:
        return _from_sample(splits, "asked for with --sample")
    explicit = text_dir or os.environ.get(ENV_DIR)
    if explicit:
        how = "--data-dir" if text_dir else ENV_DIR
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise DataError(f"The WikiText-2 directory given by {how} ({folder}) does not exist. Point it at a folder "
                            "holding valid.txt and test.txt (and train.txt) of WikiText-2, or the official "
                            "wiki.*.tokens files; or unset it to use the other sources (see the README, 'Data').")
        missing = _missing(folder, splits)
        if missing:
            wanted = ", ".join(f"{FILE_NAMES[s][0]} (or {FILE_NAMES[s][1]})" for s in missing)
            raise DataError(f"The WikiText-2 directory given by {how} ({folder}) lacks the {', '.join(missing)} "
                            f"split(s): expected {wanted}. The training split is not part of ../shared; train on "
                            "the validation split instead, or use --download where there is network.")
        return WikiText(_read_dir(folder, splits), f"text files in {folder} (from {how}; read directly)")
    try:
        import tensorflow_datasets as tfds  # noqa: F401
    except ImportError as err:
        tfds = None
        tfds_problem = f"tensorflow_datasets cannot be imported ({err})"
    if tfds is not None:
        found = _from_tfds(splits, tfds_dir, download)
        if found is not None:
            return found
    elif download or not _missing(SHARED_DIR, splits):
        if not _missing(SHARED_DIR, splits):
            return WikiText(_read_dir(SHARED_DIR, splits), f"text files in {SHARED_DIR} (read directly: {tfds_problem})")
        raise DataError(f"--download needs TFDS, but {tfds_problem}. Install requirements-dev.txt "
                        "(bash scripts/setup_env.sh) or point KERAS_SKETCH_WIKITEXT_DIR at WikiText-2's text files.")
    return _from_sample(splits, "no full WikiText-2 found: no KERAS_SKETCH_WIKITEXT_DIR, no prepared TFDS data, "
                                f"no {SHARED_DIR}" + ("" if download else ", no --download"))


def _from_sample(splits, why):
    missing = _missing(SAMPLE_DIR, splits)
    if missing:
        raise DataError(f"The bundled WikiText-2 sample has only the validation and test splits, not "
                        f"{', '.join(missing)} ({why}). Train on the validation split, or give the full data "
                        f"with KERAS_SKETCH_WIKITEXT_DIR, ../shared/data/wikitext-2 or --download.")
    tokens = _read_dir(SAMPLE_DIR, splits)
    sizes = ", ".join(f"{s} {len(t):,} tokens" for s, t in tokens.items())
    return WikiText(tokens, f"the bundled WikiText-2 sample in {SAMPLE_DIR} ({sizes}; {why})", sample=True)


# --------------------------------------------------------------------------- TFDS
_BUILDER = None


def builder_class():
    """The TFDS builder ``wikitext2_words`` (one example per line of text)."""
    global _BUILDER
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds

    class Wikitext2Words(tfds.core.GeneratorBasedBuilder):
        """WikiText-2 (word level), one example per line of text.

        Prepared from ``self.source_dir`` when it is set (a folder of text
        files), otherwise from the official archive (download)."""

        VERSION = tfds.core.Version("1.0.1")
        source_dir = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="WikiText-2 word-level language modeling text (Merity et al. 2016, CC BY-SA 3.0).",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. arXiv:1609.07843, 2016.",
                disable_shuffling=True,  # a language model reads the text in order
            )

        def _split_generators(self, dl_manager):
            if self.source_dir is not None:
                folder = Path(self.source_dir)
            else:
                folder = Path(dl_manager.download_and_extract(ARCHIVE_URL)) / "wikitext-2"
            return {s: self._generate_examples(_split_file(folder, s)) for s in SPLITS if _split_file(folder, s)}

        def _generate_examples(self, path):
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    yield i, {"text": line}

    _BUILDER = Wikitext2Words
    return _BUILDER


def _prepared_note(builder):
    note = Path(builder.data_dir) / SOURCE_NOTE
    try:
        return note.read_text().strip()
    except OSError:
        return "source not recorded"


def _prepare(builder, source_dir):
    """Prepares ``builder`` from ``source_dir`` (None: download); records the source."""
    import tensorflow_datasets as tfds

    from keras_sketch_harness.startup import quiet_progress_bars

    quiet_progress_bars()
    builder.source_dir = source_dir
    what = f"{source_dir}" if source_dir else f"a download of {ARCHIVE_URL}"
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as err:  # noqa: BLE001 - every failure becomes one message
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        hint = ("Without network, drop --download: the scripts then use ../shared/data/wikitext-2 or the bundled "
                "sample." if source_dir is None else "Check that the text files are readable WikiText-2 splits.")
        raise DataError(f"Preparing TFDS wikitext2_words from {what} into {builder.data_dir} failed: "
                        f"{type(err).__name__}: {first}. {hint}") from None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (Path(builder.data_dir) / SOURCE_NOTE).write_text(f"prepared from {what} on {stamp}\n")


def _from_tfds(splits, tfds_dir, download):
    import tensorflow_datasets as tfds

    # TFDS reads TFDS_DATA_DIR once, when imported; read it here at each call.
    data_dir = tfds_dir or os.environ.get("TFDS_DATA_DIR") or None
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # not "Variant folder ... has no dataset_info.json" when nothing is prepared
    try:
        builder = builder_class()(data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl.setLevel(level)
    chosen = "--tfds-dir" if tfds_dir else ("TFDS_DATA_DIR" if os.environ.get("TFDS_DATA_DIR") else "TFDS's default")
    where = f"data directory from {chosen}; choose it with --tfds-dir or TFDS_DATA_DIR"
    if prepared:
        origin = f"prepared by an earlier run, perhaps of another clone: {_prepared_note(builder)}"
    elif not _missing(SHARED_DIR, splits):
        print(f"writing prepared WikiText-2 (TFDS wikitext2_words) to {builder.data_dir} ({where})", flush=True)
        _prepare(builder, SHARED_DIR)
        origin = f"prepared now from {SHARED_DIR}"
    elif download:
        print(f"downloading WikiText-2 and writing it to {builder.data_dir} ({where})", flush=True)
        _prepare(builder, None)
        origin = f"downloaded now from {ARCHIVE_URL}"
    else:
        return None
    available = sorted(builder.info.splits)
    missing = [s for s in splits if s not in available]
    if missing:
        raise DataError(f"The TFDS wikitext2_words data in {builder.data_dir} ({origin}) has the splits {available}, "
                        f"not {missing}. The training split exists only in the official archive: remove that "
                        "directory (or use another --tfds-dir / TFDS_DATA_DIR) and run with --download where there "
                        "is network, or train on the validation split.")
    tokens = {}
    try:
        for split in splits:
            lines = (ex["text"].decode("utf-8") for ex in tfds.as_numpy(builder.as_dataset(split=split)))
            tokens[split] = tokens_of_lines(lines)
    except Exception as err:  # noqa: BLE001 - e.g. a damaged or half-written directory
        raise DataError(f"Reading the TFDS wikitext2_words data in {builder.data_dir} ({origin}) failed: "
                        f"{type(err).__name__}: {str(err).strip()[:300]}. Remove that directory to prepare it "
                        "again, or choose another one with --tfds-dir or TFDS_DATA_DIR.") from None
    source = f"TFDS wikitext2_words in {builder.data_dir} ({origin}; {where})"
    return WikiText(tokens, source)


# --------------------------------------------------------------------------- vocabulary and batches
class Vocabulary:
    """Words of a training text by frequency; the rest map to ``<unk>``."""

    def __init__(self, tokens, max_size=None):
        counts = collections.Counter(tokens)
        words = ["<unk>"] + [w for w, _ in counts.most_common() if w != "<unk>"]
        self.words = words[:max_size] if max_size else words
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, tokens):
        return np.array([self.index.get(t, 0) for t in tokens], np.int32)


def bptt_batches(ids, batch_size, steps):
    """``(x, y)`` arrays ``[n, steps]``: contiguous streams cut into windows.

    The corpus is split into ``batch_size`` streams (as in the paper's
    language-model setting), and each stream into windows of ``steps``; the
    windows are ordered so consecutive batches continue each stream.
    """
    n_windows = (len(ids) - 1) // (batch_size * steps)
    usable = n_windows * batch_size * steps
    x = ids[:usable].reshape(batch_size, n_windows, steps)
    y = ids[1 : usable + 1].reshape(batch_size, n_windows, steps)
    x = x.transpose(1, 0, 2).reshape(-1, steps)
    y = y.transpose(1, 0, 2).reshape(-1, steps)
    return x, y
