"""Image classification with CSRMSprop and CSAdam (the paper's Section 6.2 in miniature).

A small CNN trained with Keras RMSprop / Adam and their count-sketch versions.
Data, in this order:

1. the TFDS image set ``--dataset`` (default ``mnist``) when it is already
   prepared in ``--data-dir`` (``~/tensorflow_datasets``), or with
   ``--download`` (network);
2. otherwise scikit-learn's bundled 8x8 handwritten digits
   (``sklearn.datasets.load_digits``: 1,797 real scans from the UCI
   "Optical Recognition of Handwritten Digits" set, shipped inside the
   scikit-learn wheel, no download), split 80/20 with a fixed seed.

The script says which it used.  The CNN's variables are small, so the
sketches apply only to variables with at least ``--min-rows`` rows (default
512: the first Dense kernel); the paper's ResNet-18 had far larger ones.

    python examples/image_classification.py [--epochs 30] [--optimizers rmsprop,csrmsprop,adam,csadam]

Prints Keras progress bars, each optimizer's memory report and test accuracy,
and saves the loss curves to examples/output/image_classification.png.
"""

import argparse
import time
from pathlib import Path

OUTPUT_DIR = Path(__file__).resolve().parent / "output"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="rmsprop,csrmsprop,adam,csadam")
    p.add_argument("--dataset", default="mnist", help="TFDS image-classification dataset, used when prepared")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true", help="let TFDS download --dataset (network)")
    p.add_argument("--max-train", type=int, default=0, help="cap on training images (0: all)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--compression", type=float, default=0.2)
    p.add_argument("--min-rows", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1)
    p.add_argument("--output", default=str(OUTPUT_DIR / "image_classification"))
    return p.parse_args(argv)


def load_images(args):
    """``(x_train, y_train), (x_test, y_test), n_classes, description``."""
    import numpy as np

    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(args.dataset, data_dir=args.data_dir)
        if not builder.is_prepared():
            if not args.download:
                raise FileNotFoundError(f"TFDS {args.dataset} is not prepared in {builder.data_dir}")
            builder.download_and_prepare()
        splits = builder.info.splits
        test_split = "test" if "test" in splits else "validation"
        train = tfds.as_numpy(builder.as_dataset(split="train", as_supervised=True, batch_size=-1))
        test = tfds.as_numpy(builder.as_dataset(split=test_split, as_supervised=True, batch_size=-1))
        n_classes = builder.info.features["label"].num_classes
        x, y = train[0].astype("float32") / 255.0, train[1].astype("int32")
        tx, ty = test[0].astype("float32") / 255.0, test[1].astype("int32")
        desc = f"TFDS {args.dataset} (train / {test_split}) from {builder.data_dir}"
    except Exception as err:  # noqa: BLE001 - any TFDS failure falls back to real data on disk
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images / 16.0).astype("float32")[..., None]
        labels = digits.target.astype("int32")
        order = np.random.default_rng(args.seed).permutation(len(images))
        cut = int(0.8 * len(images))
        x, y = images[order[:cut]], labels[order[:cut]]
        tx, ty = images[order[cut:]], labels[order[cut:]]
        n_classes = 10
        desc = (f"scikit-learn load_digits (8x8 real digit scans bundled with scikit-learn, 80/20 split); "
                f"TFDS unavailable: {err}")
    if args.max_train:
        x, y = x[: args.max_train], y[: args.max_train]
    return (x, y), (tx, ty), n_classes, desc


def build_cnn(input_shape, n_classes):
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(2) if input_shape[0] > 8 else keras.layers.Identity(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(n_classes),
        ]
    )


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

    (x, y), (tx, ty), n_classes, desc = load_images(args)
    print(f"data: {desc}\n{len(x):,} training / {len(tx):,} test images of shape {x.shape[1:]}, {n_classes} classes")
    results, curves = [], {}
    for name in args.optimizers.split(","):
        keras.utils.set_random_seed(args.seed)
        model = build_cnn(x.shape[1:], n_classes)
        optimizer = make_optimizer(name, args.lr, compression=args.compression, min_rows=args.min_rows)
        model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        recorder = fit_callbacks()
        print(f"\n== {name} ==")
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, callbacks=[recorder],
                            verbose=args.verbose)
        seconds = time.perf_counter() - start
        test_loss, test_acc = model.evaluate(tx, ty, batch_size=256, verbose=0)
        nbytes = state_bytes(optimizer, verbose=True)
        results.append(dict(optimizer=name, train_loss=round(history.history["loss"][-1], 4),
                            test_loss=round(test_loss, 4), test_accuracy=round(test_acc, 4), state_bytes=nbytes,
                            seconds=round(seconds, 1)))
        curves[name] = recorder.losses
        print(f"{name}: test accuracy {test_acc:.4f}, optimizer state {nbytes:,} bytes, {seconds:.0f}s")
    print("\n== summary ==")
    print_table(results, ["optimizer", "train_loss", "test_loss", "test_accuracy", "state_bytes", "seconds"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(curves, out.with_suffix(".png"), "Image classification: " + desc.split(" (")[0],
                       bars={r["optimizer"]: r["state_bytes"] / 1e6 for r in results})
    print(f"plot: {plot}")
    save_json(out.with_suffix(".json"), {"args": vars(args), "data": desc, "results": results})
    return results


if __name__ == "__main__":
    main()
