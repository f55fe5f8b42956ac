"""WikiText-2 for the examples: a TFDS builder, with an offline path.

``load_wikitext2(split)`` returns the split's tokens and says where they came
from, in this order:

1. TFDS data already prepared in ``data_dir`` (``~/tensorflow_datasets`` by
   default) for the ``wikitext2_words`` builder below;
2. with ``download=True``: the builder downloads the official archive and
   prepares it (needs network; never attempted unless asked, because TFDS
   retries for minutes without one);
3. otherwise the builder prepares the splits found on disk in the manual
   directory (``../shared/data/wikitext-2`` by default: validation and test;
   the training split is not shipped there), and TFDS reads them;
4. if TFDS itself is unusable (not installed, import error), the text files are
   read directly.

The splits are the tokenized WikiText-2 text (Merity et al. 2016, CC BY-SA
3.0) with ``<unk>``; a line break ends a sentence (``<eos>``).
"""

import collections
import functools
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOCAL_DIR = Path(os.environ.get("KERAS_SKETCH_WIKITEXT_DIR", ROOT.parent / "shared" / "data" / "wikitext-2"))
FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
ARCHIVE_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"


def _tokens_of_lines(lines):
    tokens = []
    for line in lines:
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append("<eos>")
    return tokens


@functools.lru_cache(maxsize=None)
def _builder_class():
    import tensorflow_datasets as tfds

    class Wikitext2Words(tfds.core.GeneratorBasedBuilder):
        """WikiText-2 (word level), one example per line of text."""

        VERSION = tfds.core.Version("1.0.1")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train.txt / valid.txt / test.txt of WikiText-2 in the manual dir."

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="WikiText-2 word-level language modeling text (Merity et al. 2016).",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                citation="Merity, Xiong, Bradbury, Socher. Pointer Sentinel Mixture Models. 2016.",
                disable_shuffling=True,  # a language model reads the text in order
            )

        def _split_generators(self, dl_manager):
            manual = Path(dl_manager.manual_dir) if dl_manager.manual_dir else None
            if manual is not None and any((manual / f).exists() for f in FILES.values()):
                folder = manual
            else:
                folder = Path(dl_manager.download_and_extract(ARCHIVE_URL)) / "wikitext-2"
                rename = {"train.txt": "wiki.train.tokens", "valid.txt": "wiki.valid.tokens", "test.txt": "wiki.test.tokens"}
                return {s: self._generate_examples(folder / rename[f]) for s, f in FILES.items()}
            return {s: self._generate_examples(folder / f) for s, f in FILES.items() if (folder / f).exists()}

        def _generate_examples(self, path):
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    yield i, {"text": line}

    return Wikitext2Words


def load_wikitext2(split, data_dir=None, download=False, manual_dir=LOCAL_DIR):
    """``(tokens, source)`` for ``split`` in ``train``/``validation``/``test``."""
    if split not in FILES:
        raise ValueError(f"`split` must be one of {sorted(FILES)}, got {split!r}.")
    try:
        import tensorflow_datasets as tfds

        builder = _builder_class()(data_dir=data_dir)
        if not builder.is_prepared():
            if download:
                builder.download_and_prepare()
                how = "downloaded and prepared"
            else:
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
                )
                how = f"prepared from local files in {manual_dir}"
        else:
            how = f"already prepared in {builder.data_dir}"
        if split not in builder.info.splits:
            raise ValueError(
                f"WikiText-2 split {split!r} is not available offline (found {sorted(builder.info.splits)}); "
                "pass download=True on a machine with network access."
            )
        lines = (ex["text"].decode("utf-8") for ex in tfds.as_numpy(builder.as_dataset(split=split)))
        return _tokens_of_lines(lines), f"TFDS wikitext2_words/{split} ({how})"
    except ImportError as err:
        path = Path(manual_dir) / FILES[split]
        with open(path, encoding="utf-8") as fh:
            return _tokens_of_lines(fh), f"{path} (read directly: TFDS unusable: {err})"


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


def build_lm(vocab_size, embed_dim=128, hidden=128, layers=1, dropout=0.0, steps=35):
    """Word-level LSTM language model: Embedding -> LSTM x layers -> Dense(vocab)."""
    import keras

    import keras_sketch

    inputs = keras.Input((steps,), dtype="int32")
    # keras_sketch's Embedding gathers rows without reading the table whole (README, "Sparse training")
    h = keras_sketch.layers.Embedding(vocab_size, embed_dim, name="embedding")(inputs)
    for i in range(layers):
        h = keras.layers.Dropout(dropout)(h) if dropout else h
        h = keras.layers.LSTM(hidden, return_sequences=True, name=f"lstm_{i}")(h)
    h = keras.layers.Dropout(dropout)(h) if dropout else h
    logits = keras.layers.Dense(vocab_size, name="softmax")(h)
    return keras.Model(inputs, logits)


def lm_loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
