"""Quickstart: a WikiText-2 LSTM language model trained with CSAdam and with Adam.

Trains on the WikiText-2 validation split and reports perplexity on the test
split (the training split is not available offline), a few minutes on 2 CPU
cores.  Prints the optimizer-state memory of each optimizer.

    python examples/quickstart.py [--epochs 2] [--vocab 10000] [--hidden 128]
"""

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402

import keras_sketch  # noqa: E402
from keras_sketch.memory import keras_state_bytes  # noqa: E402
from lm_data import Vocabulary, bptt_batches, build_lm, lm_loss, load_wikitext2  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=10000, help="most frequent words kept; others are <unk>")
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-tokens", type=int, default=0, help="cap on training tokens (0: all)")
    parser.add_argument("--download", action="store_true", help="let TFDS download WikiText-2 if not prepared")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train_tokens, source = load_wikitext2("validation", download=args.download)
    test_tokens, _ = load_wikitext2("test", download=args.download)
    print(f"data: train = {source}, {len(train_tokens):,} tokens; test split {len(test_tokens):,} tokens")
    if args.max_tokens:
        train_tokens = train_tokens[: args.max_tokens]
        test_tokens = test_tokens[: args.max_tokens]
    vocab = Vocabulary(train_tokens, args.vocab)
    x, y = bptt_batches(vocab.encode(train_tokens), args.batch, args.bptt)
    tx, ty = bptt_batches(vocab.encode(test_tokens), args.batch, args.bptt)
    print(f"vocabulary {len(vocab):,} words; {len(x) // args.batch} steps per epoch")

    results = {}
    for name, make in [
        ("Adam", lambda: keras.optimizers.Adam(args.lr, clipnorm=1.0)),
        ("CSAdam", lambda: keras_sketch.CSAdam(args.lr, clipnorm=1.0)),
    ]:
        keras.utils.set_random_seed(args.seed)
        model = build_lm(len(vocab), args.embed, args.hidden, steps=args.bptt)
        optimizer = make()
        model.compile(optimizer=optimizer, loss=lm_loss())
        print(f"\n== {name} ==")
        start = time.perf_counter()
        history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, shuffle=False, verbose=2)
        seconds = time.perf_counter() - start
        test_loss = model.evaluate(tx, ty, batch_size=args.batch, verbose=0)
        if isinstance(optimizer, keras_sketch.SketchOptimizer):
            report = optimizer.memory_report()
            print(report)
            state = report.state_bytes
        else:
            state = keras_state_bytes(optimizer)
        results[name] = dict(loss=history.history["loss"][-1], ppl=math.exp(test_loss), state=state, seconds=seconds)

    base = results["Adam"]
    print("\n== summary ==")
    print(f"{'optimizer':<10} {'train loss':>10} {'test ppl':>10} {'state bytes':>14} {'state vs Adam':>14} {'train s':>8}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['loss']:>10.3f} {r['ppl']:>10.1f} {r['state']:>14,} {r['state'] / base['state']:>14.2f} "
            f"{r['seconds']:>8.1f}"
        )
    print(f"CSAdam / Adam test perplexity: {results['CSAdam']['ppl'] / base['ppl']:.3f}")
    return results


if __name__ == "__main__":
    main()
