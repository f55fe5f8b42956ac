"""The small harness shared by ``examples/`` and ``benchmarks/`` (not the library).

* ``startup``: imports TensorFlow without its start-up notices (call first).
* ``wikitext``: WikiText-2 from the best source present, or the bundled sample.
* ``lm``: the word-level LSTM language model, its data arrays and one training run.
* ``harness``: optimizers by name, state bytes, step timing, tables, plots, results files.

It is a separate top-level package, installed by ``setup.py`` next to
``keras_sketch``, so that it can run before TensorFlow is imported (importing
``keras_sketch`` imports TensorFlow); nothing here imports TensorFlow at
import time.
"""
