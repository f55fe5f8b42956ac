"""Extreme classification with a sampled softmax, where optimizer state dominates memory.

The setting of the paper's Sections 6.3-6.4 in miniature: sparse hashed
query features (about 30 non-zeros out of ``--features``) -> mean-pooled
feature embedding -> hidden layer -> an output layer over ``--classes``
classes trained with a sampled softmax (``tf.nn.sampled_softmax_loss`` in a
custom ``train_step``).  Both big variables (the feature embedding and the
output weights) get sparse row gradients, so the sketched optimizers update
only the touched rows; their *state*, not the compute, is what costs memory:
Adam keeps two full copies of every parameter.

Data: no extreme-classification set is on disk, so the script generates a
structured synthetic one (the same seed gives the same data): class
frequencies follow a Zipf law (class 0 most frequent, which the log-uniform
sampler of ``sampled_softmax_loss`` assumes), each class owns a few
"signature" features, and an example of class ``c`` draws each of its
features from ``c``'s signature with probability ``--signal`` and otherwise
from a Zipf law over all features (noise shared by all classes, like common
trigrams).

It reports top-1 accuracy and recall@10 over the full softmax on held-out
examples, each optimizer's memory report, and the *batch-size headroom*: under
a fixed memory budget (by default what Adam needs at ``--batch``), the largest
batch each optimizer can train with.  Parameter and optimizer-state bytes are
measured (the optimizers' memory reports); activation bytes per example are
computed from the tensor shapes of this model (see ``memory_model``).

    python examples/extreme_classification.py                       # ~5 min on 2 cores
    python examples/extreme_classification.py --classes 1000000 --epochs 1

Optimizer names: adam, csadam, csadam-mv, csadam-v0 (no 1st moment), csadagrad,
csrmsprop, adafactor; ``name@0.01`` sets that optimizer's compression.
"""

import argparse
import time
from pathlib import Path

OUTPUT_DIR = Path(__file__).resolve().parent / "output"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="adam,csadam,csadam-v0@0.01")
    p.add_argument("--classes", type=int, default=100_000)
    p.add_argument("--features", type=int, default=50_000)
    p.add_argument("--nnz", type=int, default=30, help="features per example")
    p.add_argument("--signature", type=int, default=8, help="signature features per class")
    p.add_argument("--signal", type=float, default=0.6, help="probability a feature comes from the class signature")
    p.add_argument("--dim", type=int, default=64, help="feature-embedding and hidden size")
    p.add_argument("--num-sampled", type=int, default=512)
    p.add_argument("--train-examples", type=int, default=100_000)
    p.add_argument("--test-examples", type=int, default=2_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--compression", type=float, default=0.2)
    p.add_argument("--min-rows", type=int, default=4096)
    p.add_argument("--budget-mb", type=float, default=0.0,
                   help="memory budget for the headroom table (0: what the first optimizer needs at --batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    p.add_argument("--output", default=str(OUTPUT_DIR / "extreme_classification"))
    return p.parse_args(argv)


def make_data(args):
    """Structured synthetic extreme-classification data (see the module doc)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n = args.train_examples + args.test_examples
    class_p = 1.0 / np.arange(1, args.classes + 1) ** 1.05
    labels = rng.choice(args.classes, size=n, p=class_p / class_p.sum())
    # Feature 0 is padding; signatures and noise use 1..features-1.
    signatures = rng.integers(1, args.features, size=(args.classes, args.signature))
    feat_p = 1.0 / np.arange(1, args.features) ** 1.0
    noise = rng.choice(np.arange(1, args.features), size=(n, args.nnz), p=feat_p / feat_p.sum())
    pick = signatures[labels[:, None], rng.integers(0, args.signature, size=(n, args.nnz))]
    use_signal = rng.random((n, args.nnz)) < args.signal
    x = np.where(use_signal, pick, noise).astype("int32")
    y = labels.astype("int32")
    k = args.train_examples
    return (x[:k], y[:k]), (x[k:], y[k:])


def build_model(args):
    import keras
    import tensorflow as tf

    import keras_sketch

    class SampledSoftmaxClassifier(keras.Model):
        """Features -> hidden -> classes; sampled-softmax loss in ``train_step``."""

        def __init__(self, **kw):
            super().__init__(**kw)
            # keras_sketch's Embedding gathers rows without reading the table whole (README, "Sparse training")
            self.features = keras_sketch.layers.Embedding(args.features, args.dim, name="features")
            self.hidden = keras.layers.Dense(args.dim, activation="relu", name="hidden")
            self.loss_tracker = keras.metrics.Mean(name="loss")

        def build(self, input_shape):
            self.features.build(input_shape)
            self.hidden.build((None, args.dim))
            self.out_w = self.add_weight(shape=(args.classes, args.dim), initializer="glorot_uniform",
                                         name="class_weights")
            self.out_b = self.add_weight(shape=(args.classes,), initializer="zeros", name="class_bias")

        def encode(self, ids, training=False):
            mask = tf.cast(ids > 0, "float32")[..., None]
            e = self.features(ids) * mask
            pooled = tf.reduce_sum(e, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            return self.hidden(pooled, training=training)

        def call(self, ids, training=False):
            """Full-softmax logits (evaluation only: ``[batch, classes]``)."""
            return tf.matmul(self.encode(ids, training), self.out_w, transpose_b=True) + self.out_b

        def train_step(self, data):
            ids, labels = data
            with tf.GradientTape() as tape:
                h = self.encode(ids, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sampled_softmax_loss(
                        weights=self.out_w.value, biases=self.out_b.value,
                        labels=tf.cast(tf.reshape(labels, (-1, 1)), "int64"), inputs=h,
                        num_sampled=args.num_sampled, num_classes=args.classes,
                    )
                )
            variables = self.trainable_variables
            grads = tape.gradient(loss, [v.value for v in variables])
            self.optimizer.apply(grads, variables)
            self.loss_tracker.update_state(loss)
            return {"loss": self.loss_tracker.result()}

        @property
        def metrics(self):
            return [self.loss_tracker]

    model = SampledSoftmaxClassifier()
    model.build((None, args.nnz))
    return model


def evaluate(model, x, y, batch=500):
    import tensorflow as tf

    top1 = top10 = 0
    for i in range(0, len(x), batch):
        logits = model(tf.constant(x[i : i + batch]))
        top = tf.math.top_k(logits, 10).indices.numpy()
        yy = y[i : i + batch, None]
        top1 += int((top[:, :1] == yy).sum())
        top10 += int((top == yy).any(axis=1).sum())
    return top1 / len(x), top10 / len(x)


def memory_model(args, param_bytes, opt_state_bytes):
    """Training memory = fixed + per_example * batch (float32), for this model.

    fixed: parameters, optimizer state (measured), the sampled classes'
    weights and their gradient rows (``num_sampled x dim`` twice).
    per example: the ``nnz x dim`` gathered feature rows, their gradient rows,
    the pooled vector and hidden activations with their gradients
    (``4 x dim``), the true-class weight row and its gradient (``2 x dim``),
    sampled logits and their gradients (``2 x (num_sampled + 1)``), ids and label.
    """
    f = 4
    fixed = param_bytes + opt_state_bytes + 2 * args.num_sampled * args.dim * f
    per_example = f * (2 * args.nnz * args.dim + 4 * args.dim + 2 * args.dim + 2 * (args.num_sampled + 1)) + 4 * (
        args.nnz + 1
    )
    return fixed, per_example


def main(argv=None):
    args = parse(argv)  # before TensorFlow loads: --help answers at once
    from keras_sketch_harness import startup

    startup.import_tensorflow(announce=True)
    import keras

    from keras_sketch_harness.harness import (
        fit_callbacks,
        make_optimizer,
        plot_curves,
        print_table,
        save_json,
        state_bytes,
    )

    (x, y), (tx, ty) = make_data(args)
    print(f"data: structured synthetic (seed {args.seed}): {len(x):,} training / {len(tx):,} test examples, "
          f"{args.classes:,} classes, {args.features:,} features ({args.nnz} per example)")
    results, curves = [], {}
    for spec in args.optimizers.split(","):
        name, _, comp = spec.partition("@")
        keras.utils.set_random_seed(args.seed)
        model = build_model(args)
        optimizer = make_optimizer(name, args.lr, compression=float(comp or args.compression), min_rows=args.min_rows)
        model.compile(optimizer=optimizer)
        recorder = fit_callbacks()
        print(f"\n== {spec} ==")
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, callbacks=[recorder],
                            verbose=args.verbose)
        seconds = time.perf_counter() - start
        acc, recall10 = evaluate(model, tx, ty)
        nbytes = state_bytes(optimizer, verbose=True)
        param_bytes = sum(int(v.numpy().nbytes) for v in model.trainable_variables)
        results.append(dict(optimizer=spec, train_loss=round(history.history["loss"][-1], 4), top1=round(acc, 4),
                            recall10=round(recall10, 4), param_bytes=param_bytes, state_bytes=nbytes,
                            seconds=round(seconds, 1)))
        curves[spec] = recorder.losses
        print(f"{spec}: top-1 {acc:.4f}, recall@10 {recall10:.4f}, optimizer state {nbytes:,} bytes, {seconds:.0f}s")

    base = results[0]
    fixed0, per_example = memory_model(args, base["param_bytes"], base["state_bytes"])
    budget = args.budget_mb * 2**20 if args.budget_mb else fixed0 + per_example * args.batch
    for r in results:
        fixed, _ = memory_model(args, r["param_bytes"], r["state_bytes"])
        r["state_vs_first"] = round(r["state_bytes"] / base["state_bytes"], 3)
        r["train_MB_at_batch"] = round((fixed + per_example * args.batch) / 2**20, 1)
        r["max_batch_in_budget"] = max(0, int((budget - fixed) // per_example))
        r["batch_headroom"] = round(r["max_batch_in_budget"] / max(1, args.batch), 2)
    print(f"\n== summary (ratios against {base['optimizer']}) ==")
    print_table(results, ["optimizer", "train_loss", "top1", "recall10", "state_bytes", "state_vs_first", "seconds"])
    print(f"\n== batch-size headroom under a {budget / 2**20:.1f} MB training-memory budget "
          f"({'--budget-mb' if args.budget_mb else base['optimizer'] + ' at batch ' + str(args.batch)}; "
          f"{per_example:,} activation bytes per example) ==")
    print_table(results, ["optimizer", "param_bytes", "state_bytes", "train_MB_at_batch", "max_batch_in_budget",
                          "batch_headroom"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(curves, out.with_suffix(".png"), f"Sampled softmax, {args.classes:,} classes",
                       bars={r["optimizer"]: r["state_bytes"] / 1e6 for r in results})
    print(f"plot: {plot}")
    save_json(out.with_suffix(".json"), {"args": vars(args), "budget_bytes": budget,
                                         "per_example_bytes": per_example, "results": results})
    return results


if __name__ == "__main__":
    main()
