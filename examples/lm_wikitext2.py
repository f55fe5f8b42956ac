"""WikiText-2 word-level LSTM language model, the paper's Table 4 setting.

The paper (Section 6.1, Table 4): 2-layer LSTM with 672 hidden units,
embeddings of the same size, BPTT 35, batch 20, dropout 0.5, Adam lr 1e-3
(betas 0.9/0.999) with gradient clipping 1, learning rate / 4 when the
validation loss plateaus, 40 epochs.  Those are the defaults here, except the
number of epochs; flags scale it down to run on 2 CPU cores, e.g.

    python examples/lm_wikitext2.py --hidden 200 --epochs 2 --max-tokens 60000

Data: ``keras_sketch_harness.wikitext`` (``--data-dir`` or
``KERAS_SKETCH_WIKITEXT_DIR``, prepared TFDS data, ``../shared/data/wikitext-2``,
or the bundled sample; it says which).  Only the validation and test splits
are on disk, so the model trains on the *validation* split (its last
``--holdout`` fraction is held out for the plateau schedule) and reports
perplexity on the *test* split; with ``--download`` on a machine with network
access it trains on the real training split instead.

Prints Keras progress bars, each optimizer's memory report and test
perplexity, and saves the loss curves to examples/output/lm_wikitext2.png.
"""

import argparse
import math
import time
from pathlib import Path

OUTPUT_DIR = Path(__file__).resolve().parent / "output"


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="adam,csadam,csadam-mv",
                   help="comma list of adam, csadam (sketched v), csadam-mv (sketched m and v), csadam-v0, "
                        "csrmsprop, csadagrad, rmsprop, adafactor")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=672)
    p.add_argument("--embed", type=int, default=0, help="embedding size (0: same as --hidden, as in the paper)")
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clipnorm", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--vocab", type=int, default=0, help="most frequent words kept (0: all)")
    p.add_argument("--max-tokens", type=int, default=0, help="cap on training and test tokens (0: all)")
    p.add_argument("--holdout", type=float, default=0.1, help="fraction of the training text for the plateau schedule")
    p.add_argument("--compression", type=float, default=0.2)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--min-rows", type=int, default=4096)
    p.add_argument("--data-dir", default=None, help="folder of WikiText-2 text files (else KERAS_SKETCH_WIKITEXT_DIR, "
                   "prepared TFDS data, ../shared/data/wikitext-2, the bundled sample)")
    p.add_argument("--tfds-dir", default=None, help="TFDS data directory (else TFDS_DATA_DIR, ~/tensorflow_datasets)")
    p.add_argument("--download", action="store_true", help="let TFDS download WikiText-2 (network)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1, help="Keras verbosity (1: progress bars)")
    p.add_argument("--output", default=str(OUTPUT_DIR / "lm_wikitext2"))
    return p.parse_args(argv)


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
    from keras_sketch_harness.lm import build_lm, lm_loss
    from keras_sketch_harness.wikitext import DataError, Vocabulary, bptt_batches, load_wikitext2

    train_split = "train" if args.download else "validation"
    try:
        text = load_wikitext2((train_split, "test"), text_dir=args.data_dir, tfds_dir=args.tfds_dir,
                              download=args.download)
    except DataError as err:
        raise SystemExit(f"lm_wikitext2: {err}") from None
    source = text.source
    train_tokens, test_tokens = text.tokens[train_split], text.tokens["test"]
    if args.max_tokens:
        train_tokens, test_tokens = train_tokens[: args.max_tokens], test_tokens[: args.max_tokens]
    print(f"data: {source}")
    print(f"training text: its {train_split} split ({len(train_tokens):,} tokens); test text: its test split "
          f"({len(test_tokens):,} tokens)")
    if train_split == "validation":
        print("(the WikiText-2 training split is not on disk: training on the validation split, testing on test)")
    if text.sample:
        print("NOTE: the small sample bundled with the repository, not the full WikiText-2: compare the optimizers "
              "only with each other.")
    vocab = Vocabulary(train_tokens, args.vocab or None)
    ids = vocab.encode(train_tokens)
    cut = int(len(ids) * (1 - args.holdout))
    x, y = bptt_batches(ids[:cut], args.batch, args.bptt)
    vx, vy = bptt_batches(ids[cut:], args.batch, args.bptt) if args.holdout else (None, None)
    tx, ty = bptt_batches(vocab.encode(test_tokens), args.batch, args.bptt)
    if len(x) == 0 or len(tx) == 0 or (vx is not None and len(vx) == 0):
        raise SystemExit("too few tokens for one batch: raise --max-tokens or lower --batch/--bptt/--holdout")
    embed = args.embed or args.hidden
    print(f"vocabulary {len(vocab):,}; model: Embedding {embed} -> {args.layers} x LSTM {args.hidden} -> "
          f"Dense({len(vocab):,}); {len(x) // args.batch} steps per epoch")

    sketch = dict(compression=args.compression, depth=args.depth, min_rows=args.min_rows)
    results, curves = [], {}
    for name in args.optimizers.split(","):
        keras.utils.set_random_seed(args.seed)
        model = build_lm(len(vocab), embed, args.hidden, layers=args.layers, dropout=args.dropout, steps=args.bptt)
        optimizer = make_optimizer(name, args.lr, args.clipnorm, **sketch)
        model.compile(optimizer=optimizer, loss=lm_loss())
        recorder = fit_callbacks()
        callbacks = [recorder]
        if vx is not None:  # the paper divides the learning rate by 4 when validation loss plateaus
            callbacks.append(keras.callbacks.ReduceLROnPlateau(factor=0.25, patience=0, min_lr=1e-6, verbose=1))
        print(f"\n== {name} ==")
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False, callbacks=callbacks,
                            validation_data=(vx, vy) if vx is not None else None, verbose=args.verbose)
        seconds = time.perf_counter() - start
        test_loss = model.evaluate(tx, ty, batch_size=args.batch, verbose=0)
        nbytes = state_bytes(optimizer, verbose=True)
        ppl = math.exp(min(test_loss, 50.0))
        results.append(dict(optimizer=name, train_loss=round(history.history["loss"][-1], 4),
                            test_ppl=round(ppl, 2), state_bytes=nbytes, seconds=round(seconds, 1)))
        curves[name] = recorder.losses
        print(f"{name}: test perplexity {ppl:.2f}, optimizer state {nbytes:,} bytes, {seconds:.0f}s")

    base = results[0]
    for r in results:
        r["state_vs_first"] = round(r["state_bytes"] / base["state_bytes"], 3)
        r["ppl_vs_first"] = round(r["test_ppl"] / base["test_ppl"], 3)
    print(f"\n== summary (ratios against {base['optimizer']}) ==")
    print_table(results, ["optimizer", "train_loss", "test_ppl", "ppl_vs_first", "state_bytes", "state_vs_first",
                          "seconds"])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(curves, out.with_suffix(".png"), f"WikiText-2 LSTM {args.layers}x{args.hidden}",
                       bars={r["optimizer"]: r["state_bytes"] / 1e6 for r in results})
    print(f"plot: {plot}")
    save_json(out.with_suffix(".json"), {"args": vars(args), "data": source, "results": results})
    return results


if __name__ == "__main__":
    main()
