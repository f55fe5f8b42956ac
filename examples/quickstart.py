"""Quickstart: what keras_sketch buys, on a WikiText-2 LSTM language model.

Trains the same model (Embedding 128 -> LSTM 128 -> Dense(10,000 words))
three times, from the same seed, and compares the optimizers:

* Keras ``Adam`` (lr 0.016),
* ``keras_sketch.CSAdam()``: the default, which sketches only the embedding's
  2nd moment (lr 0.032),
* ``keras_sketch.CSAdam(state_budget=0.02)``: the compact configuration, at
  most 2% of Adam's optimizer state (lr 0.008).

Learning rates: benchmarks/defaults_study.py found 0.016 best for Adam and
0.032 for CSAdam() on this model and data; for the compact configuration a
check with this script (lr 0.004 / 0.008 / 0.016 / 0.032, docs/examples.md)
found 0.008 best.  WikiText-2's training split is not
on disk, so it trains on the validation split and evaluates perplexity on
the test split.  Prints a table (state bytes and test perplexity, each as a
ratio to Adam, time per step), the compact configuration's memory report, and
saves a plot of the loss curves and state sizes.  About 3-5 minutes on 2 CPU
cores with the full data; with the bundled sample (used when no full
WikiText-2 is found, and said so) far less, and the numbers are not comparable.

    python examples/quickstart.py [--epochs 2] [--max-tokens 120000] [--sample]
"""

import argparse
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "output" / "quickstart"
RUNS = {  # name -> (label, harness optimizer name, lr flag, keyword arguments)
    "adam": ("keras Adam", "adam", "lr_adam", {}),
    "csadam": ("CSAdam() default", "csadam", "lr_csadam", {}),
    "compact": ("CSAdam(state_budget=0.02)", "csadam", "lr_compact", {"state_budget": None}),
}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default="adam,csadam,compact", help="comma list of adam, csadam, compact")
    p.add_argument("--budget", type=float, default=0.02, help="state_budget of the compact configuration")
    p.add_argument("--lr-adam", type=float, default=0.016)
    p.add_argument("--lr-csadam", type=float, default=0.032)
    p.add_argument("--lr-compact", type=float, default=0.008)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--vocab", type=int, default=10000, help="most frequent words kept; others are <unk>")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--clipnorm", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=120_000, help="cap on training tokens (0: the whole split)")
    p.add_argument("--max-test-tokens", type=int, default=60_000, help="cap on test tokens (0: the whole split)")
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: all)")
    p.add_argument("--data-dir", default=None, help="folder of WikiText-2 text files (else KERAS_SKETCH_WIKITEXT_DIR, "
                   "prepared TFDS data, ../shared/data/wikitext-2, the bundled sample)")
    p.add_argument("--tfds-dir", default=None, help="TFDS data directory (else TFDS_DATA_DIR, ~/tensorflow_datasets)")
    p.add_argument("--download", action="store_true", help="let TFDS download WikiText-2 (network)")
    p.add_argument("--sample", action="store_true", help="use the bundled WikiText-2 sample even if more is present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(OUTPUT), help="path stem of the plot (.png) and results (.json)")
    args = p.parse_args(argv)
    names = args.optimizers.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        p.error(f"--optimizers: unknown {unknown}; choose from {', '.join(RUNS)}")
    return args


def main(argv=None):
    args = parse(argv)  # before TensorFlow loads: --help and bad flags answer at once
    from keras_sketch_harness import startup

    startup.import_tensorflow(announce=True)
    import keras_sketch
    from keras_sketch_harness.harness import (
        fit_callbacks,
        make_optimizer,
        plot_curves,
        print_table,
        save_json,
    )
    from keras_sketch_harness.lm import lm_data, train_lm
    from keras_sketch_harness.wikitext import DataError

    try:
        data = lm_data(args.max_tokens, args.max_test_tokens, args.vocab, args.batch, args.bptt,
                       text_dir=args.data_dir, tfds_dir=args.tfds_dir, download=args.download, sample=args.sample)
    except DataError as err:
        raise SystemExit(f"quickstart: {err}") from None
    print(f"data: {data['desc']}")
    print("(WikiText-2's training split is not on disk here: the validation split serves as training text)")
    if data["sample"]:
        print("NOTE: this is the small sample bundled with the repository, not the full WikiText-2: its perplexities "
              "are not comparable with full-data figures; compare the optimizers only with each other.")
    steps = len(data["x"]) // args.batch
    if args.max_steps:
        steps = min(steps, args.max_steps)
    if steps == 0 or len(data["tx"]) == 0:
        raise SystemExit("quickstart: too few tokens for one batch: raise --max-tokens or lower --batch/--bptt")
    print(f"model: Embedding {args.embed} -> LSTM {args.hidden} -> Dense({data['vocab']:,}); {steps} steps per "
          f"epoch x {args.epochs} epochs, batch {args.batch}, BPTT {args.bptt}, clipnorm {args.clipnorm}")

    rows, curves, reports = [], {}, {}
    for name in args.optimizers.split(","):
        label, kind, lr_flag, extra = RUNS[name]
        lr = getattr(args, lr_flag)
        extra = {k: args.budget for k in extra}  # the compact run's state_budget
        if extra:
            label = f"CSAdam(state_budget={args.budget:g})"
        made, recorder = [], fit_callbacks()

        def make(kind=kind, lr=lr, extra=extra, made=made):
            made.append(make_optimizer(kind, lr, clipnorm=args.clipnorm, **extra))
            return made[-1]

        print(f"\n== {label}, lr {lr:g} ==", flush=True)
        r = train_lm(make, data, args.embed, args.hidden, batch=args.batch, bptt=args.bptt, epochs=args.epochs,
                     seed=args.seed, verbose=2, max_steps=args.max_steps or None, callbacks=[recorder])
        optimizer = made[-1]
        if isinstance(optimizer, keras_sketch.SketchOptimizer):
            reports[label] = str(optimizer.memory_report())
        rows.append(dict(optimizer=label, lr=lr, state_bytes=r["state_bytes"], test_ppl=r["test_ppl"],
                         ms_per_step=1e3 * recorder.median_step(), seconds=r["seconds"]))
        curves[label] = recorder.losses

    base = next((r for r in rows if r["optimizer"] == RUNS["adam"][0]), rows[0])
    for r in rows:
        r["state_vs_adam"] = r["state_bytes"] / base["state_bytes"]
        r["ppl_vs_adam"] = r["test_ppl"] / base["test_ppl"]
    compact = [label for label in reports if "state_budget" in label]
    if compact:
        print(f"\n== memory report of {compact[0]} ==\n{reports[compact[0]]}")
    print(f"\n== summary: ratios against {base['optimizer']} in this run"
          + (" (bundled sample)" if data["sample"] else "") + " ==")
    print_table([dict(r, lr=f"{r['lr']:g}", state_bytes=f"{r['state_bytes']:,}", state_vs_adam=f"{r['state_vs_adam']:.3f}",
                      test_ppl=f"{r['test_ppl']:.1f}", ppl_vs_adam=f"{r['ppl_vs_adam']:.3f}",
                      ms_per_step=f"{r['ms_per_step']:.0f}") for r in rows],
                [("optimizer", "optimizer"), ("lr", "lr"), ("state_bytes", "state bytes"),
                 ("state_vs_adam", "vs Adam"), ("test_ppl", "test ppl"), ("ppl_vs_adam", "vs Adam"),
                 ("ms_per_step", "ms/step")])
    print("(ms/step: median wall time of a training step after the first 3; the machine may be shared)")
    out = Path(args.output)
    png, js = out.with_name(out.name + ".png"), out.with_name(out.name + ".json")  # the stem may contain dots
    title = "WikiText-2 LSTM LM" + (" (bundled sample)" if data["sample"] else "")
    plot = plot_curves(curves, png, title, bars={r["optimizer"]: r["state_bytes"] / 1e6 for r in rows})
    save_json(js, {"args": vars(args), "data": data["desc"], "sample": data["sample"],
                                         "results": rows, "memory_reports": reports})
    print(f"plot (loss curves, state bytes): {plot}")
    print(f"results: {js}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
