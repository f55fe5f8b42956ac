"""The word-level LSTM language model of the examples and benchmarks, its data and one run."""

import math
import time

from keras_sketch_harness.harness import state_bytes
from keras_sketch_harness.wikitext import Vocabulary, bptt_batches, load_wikitext2


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


def lm_data(max_train_tokens, max_test_tokens, vocab_size, batch, bptt, **sources):
    """Train on the WikiText-2 *validation* split, test on the *test* split (the
    training split is not on disk); returns arrays and a description.
    ``sources`` go to ``load_wikitext2`` (``text_dir``, ``tfds_dir``, ``sample``)."""
    text = load_wikitext2(("validation", "test"), **sources)
    train_tokens, test_tokens = text.tokens["validation"], text.tokens["test"]
    if max_train_tokens:
        train_tokens = train_tokens[:max_train_tokens]
    if max_test_tokens:
        test_tokens = test_tokens[:max_test_tokens]
    vocab = Vocabulary(train_tokens, vocab_size)
    x, y = bptt_batches(vocab.encode(train_tokens), batch, bptt)
    tx, ty = bptt_batches(vocab.encode(test_tokens), batch, bptt)
    desc = (
        f"{text.source}; training on its validation split ({len(train_tokens):,} tokens), testing on its test "
        f"split ({len(test_tokens):,} tokens); vocabulary {len(vocab):,}"
    )
    return dict(x=x, y=y, tx=tx, ty=ty, vocab=len(vocab), desc=desc, sample=text.sample)


def perplexity(loss):
    return math.exp(loss) if math.isfinite(loss) and loss < 50 else float("inf")


def train_lm(make_optimizer, data, embed=128, hidden=128, layers=1, dropout=0.0, batch=32, bptt=35, epochs=2,
             seed=0, verbose=0, max_steps=None, callbacks=()):
    """Trains a fresh LM with ``make_optimizer()`` (``callbacks``: extra Keras callbacks); returns a result dict."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_lm(data["vocab"], embed, hidden, layers=layers, dropout=dropout, steps=bptt)
    optimizer = make_optimizer()
    model.compile(optimizer=optimizer, loss=lm_loss())
    x, y = data["x"], data["y"]
    if max_steps:
        x, y = x[: max_steps * batch], y[: max_steps * batch]
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=verbose,
                        callbacks=list(callbacks))
    seconds = time.perf_counter() - start
    test_loss = model.evaluate(data["tx"], data["ty"], batch_size=batch, verbose=0)
    losses = [float(v) for v in history.history["loss"]]
    return dict(
        test_ppl=perplexity(test_loss),
        test_loss=float(test_loss),
        train_loss=losses,
        state_bytes=state_bytes(optimizer),
        seconds=seconds,
        steps=int(optimizer.iterations.numpy()),
    )
