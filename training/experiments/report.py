"""reports/nin-exercises/: runs.csv, the plots, and README.md with a table and a short answer
under each question, all made from the arms' JSON records (one section per budget, never mixed)."""

from __future__ import annotations

import csv
import io
import json
from statistics import mean, median
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from training.checkpoint import atomic_write
from training.config import FASHION_MNIST_CLASSES
from training.experiments.grid import BUDGETS, LN10, RECIPES
from training.plots import annotate, plt, save

# Columns that hold wall times or memory: they vary between runs; every other column of
# runs.csv is reproduced exactly by the same command (seeded).
WALL_COLUMNS = ("img_per_s", "peak_mem_mb", "ort_cpu_ms_b1")
CSV_COLUMNS = ("budget", "arm", "question", "preset", "lr", "num_1x1", "head_width", "image_size",
               "train_images", "test_images", "batch_size", "seed", "params", "macs", "epochs", "epoch",
               "train_loss", "train_acc", "test_loss", "test_acc", "stalled", "diverged", "hardware",
               *WALL_COLUMNS)
ARM_KEYS = ("question", "preset", "lr", "num_1x1", "head_width")  # the rest of a row: the record's, the epoch's
RUN_KEYS = ("image_size", "train_images", "test_images", "batch_size", "seed", "params", "macs")


def load_records(out: Path) -> dict[str, dict]:
    """{budget: {"arms": {name: record}, "ranges": {recipe: record}}} for every budget run."""
    found = {}
    for name in BUDGETS:
        folder = out / name / "arms"
        if not folder.is_dir():
            continue
        recs = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
        found[name] = {"budget": name, "ranges": {k.removeprefix("range-"): v for k, v in recs.items() if k.startswith("range-")},
                       "arms": {k: v for k, v in recs.items() if not k.startswith("range-")}}
    return found


def csv_rows(records: dict) -> list[dict]:
    rows = []
    for budget, rec in records.items():
        for name, r in sorted(rec["arms"].items()):
            for e in r["epochs"]:  # csv writes None as an empty cell
                rows.append({"budget": budget, "arm": name, **{k: r["arm"][k] for k in ARM_KEYS},
                             **{k: r[k] for k in RUN_KEYS}, "epochs": r["arm"]["epochs"], **e,
                             **{k: r[k] for k in ("stalled", "hardware", *WALL_COLUMNS)}, "diverged": bool(r["diverged"])})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def _save(fig, path: Path) -> str:
    save(fig, path, dpi=100)
    return path.name


def final(r: dict, key: str = "test_acc"):
    return r["epochs"][-1][key] if r["epochs"] else None


def best(r: dict) -> float | None:
    return max((e["test_acc"] for e in r["epochs"]), default=None)


def fmt(v, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def with_range(values: list[float], spec: str = ".4f") -> str:
    """One seed: the value; several: their mean and (min-max)."""
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(mean(values), spec)} ({format(min(values), spec)}-{format(max(values), spec)})"


def by_config(arms: list[dict], key) -> dict:
    """Records grouped by `key(record)` (the architecture), each group sorted by training seed."""
    groups: dict = {}
    for r in sorted(arms, key=lambda r: (key(r), r["seed"])):
        groups.setdefault(key(r), []).append(r)
    return groups


def finals(runs: list[dict]) -> list[float]:
    return [final(r) for r in runs if final(r) is not None]


def separated(a: list[float], b: list[float]) -> bool:
    """Whether two sets of per-seed results do not overlap: with a few seeds, the least one can
    ask before calling a difference more than seed-to-seed noise."""
    return min(a) > max(b) or min(b) > max(a)


def summed(matrices: list[list[list[int]]]) -> list[list[int]]:
    return np.sum(matrices, axis=0).tolist()


# -- the plots ---------------------------------------------------------------------------------

def plot_one_by_one(groups: dict[int, list[dict]], path: Path) -> str:
    """Test accuracy and train loss per epoch: each seed a thin line, their mean bold, one colour
    per number of 1x1 convolutions."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for n, runs in groups.items():
        label = f"{n} per block" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")
        for ax, key in ((ax1, "test_acc"), (ax2, "train_loss")):
            curves = [[e[key] for e in r["epochs"]] for r in runs if r["epochs"]]
            length = min(len(c) for c in curves)
            epochs = list(range(1, length + 1))
            if len(curves) > 1:
                for c in curves:
                    ax.plot(epochs, c[:length], "-", lw=0.8, alpha=0.35, color=f"C{n}")
            ax.plot(epochs, [mean(c[i] for c in curves) for i in range(length)], "o-", color=f"C{n}", label=label)
    ax1.set(xlabel="epoch", ylabel="test accuracy", title="1x1 convolutions per block: test accuracy")
    ax2.set(xlabel="epoch", ylabel="train loss", title="train loss (thin: each seed; bold: their mean)")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_confusions(pairs: list[tuple[str, list]], path: Path) -> str:
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 6))
    short = [c.split("/")[0][:8] for c in FASHION_MNIST_CLASSES]
    for ax, (title, m) in zip(axes, pairs):
        ax.imshow(m, cmap="Blues")
        ax.set_xticks(range(10), short, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(10), short, fontsize=8)
        ax.set(xlabel="predicted", ylabel="true", title=title)
        annotate(ax, m, fontsize=6)
    return _save(fig, path)


def plot_ranges(ranges: dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for recipe, r in ranges.items():
        line, = ax.plot(r["lrs"], r["losses"], label=f"{recipe} recipe")
        ax.axvline(r["suggested_lr"], color=line.get_color(), ls="--", lw=1,
                   label=f"{recipe}: suggested {r['suggested_lr']:.3g}")
    ax.axhline(LN10, color="grey", ls=":", label="ln 10 = 2.3026 (uniform guess)")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed train loss", title="learning-rate range test")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sweep(sweep: dict[str, list[dict]], path: Path) -> str:
    fig, axes = plt.subplots(1, len(sweep), figsize=(5.5 * len(sweep), 4), sharey=True)
    for ax, (recipe, arms) in zip(axes, sweep.items()):
        for r in arms:
            ep = [e["epoch"] for e in r["epochs"]]
            mark = " (diverged)" if r["diverged"] else (" (stalled)" if r["stalled"] else "")
            ax.plot(ep, [e["train_loss"] for e in r["epochs"]], "o-", label=f"lr {r['arm']['lr']:g}{mark}")
        ax.axhline(LN10, color="grey", ls=":")
        ax.set(xlabel="epoch", ylabel="train loss", title=f"{recipe} recipe")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_floor(coverage, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    tail = coverage[200:, 200:]
    im = ax.imshow(tail, cmap="viridis", extent=(199.5, 223.5, 223.5, 199.5))
    ax.set(title="conv1 (11x11, stride 4) on 224x224:\noutputs reading each input pixel (rows/cols 200-223)",
           xlabel="input column", ylabel="input row")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


# -- the text ----------------------------------------------------------------------------------

def top_confusions(m: list[list[int]], n: int = 3) -> list[tuple[str, str, int]]:
    pairs = [(m[i][j], i, j) for i in range(10) for j in range(10) if i != j]
    return [(FASHION_MNIST_CLASSES[i], FASHION_MNIST_CLASSES[j], v) for v, i, j in sorted(pairs, reverse=True)[:n]]


def section_one_by_one(rec: dict, folder: Path, rel: str) -> list[str]:
    groups = by_config([r for r in rec["arms"].values() if r["arm"]["question"] == "1x1"], lambda r: r["arm"]["num_1x1"])
    groups = {n: runs for n, runs in groups.items() if finals(runs)}
    if not groups:
        return []
    plot = plot_one_by_one(groups, folder / "one_by_one.png")
    n_seeds = max(len(runs) for runs in groups.values())
    acc_head = "final test acc" + (", mean (min-max over seeds)" if n_seeds > 1 else "")
    m = " (mean)" if n_seeds > 1 else ""
    lines = ["### 1x1 convolutions per block: 0, 1, 2 (textbook), 3", "",
             f"| 1x1 per block | params | multiply-adds | seeds | {acc_head} | best test acc{m} | test images with all 10 scores = 0{m} | train img/s | ORT CPU ms/img (b1) | peak memory MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, runs in groups.items():
        r0 = runs[0]
        dead = [r["logits_end"]["dead"] for r in runs if r.get("logits_end")]
        ort = [r["ort_cpu_ms_b1"] for r in runs if r["ort_cpu_ms_b1"]]
        lines.append(f"| {n} | {r0['params']:,} | {r0['macs'] / 1e6:,.0f} M | {len(runs)} | {with_range(finals(runs))} "
                     f"| {fmt(mean([best(r) for r in runs]))} | {fmt(mean(dead) if dead else None, '.1%')} "
                     f"| {mean([r['img_per_s'] for r in runs]):.0f} | {fmt(median(ort) if ort else None, '.2f')} "
                     f"| {max(r['peak_mem_mb'] for r in runs):.0f} |")
    acc = {n: finals(runs) for n, runs in groups.items()}
    top = max(acc, key=lambda n: mean(acc[n]))
    several = n_seeds > 1
    word = "mean final test accuracy" if several else "final test accuracy"
    answer = f"**Answer ({rec['budget']} budget).** {top} per block reached the best {word}, {fmt(mean(acc[top]))}"
    if 2 in acc and top != 2:
        answer += f"; the textbook's 2 reached {fmt(mean(acc[2]))}"
    if 0 in acc:
        answer += f"; with none (plain k x k convolutions) {fmt(mean(acc[0]))}"
    if several:
        apart = [n for n in acc if n != top and separated(acc[top], acc[n])]
        close = [n for n in acc if n != top and not separated(acc[top], acc[n])]
        answer += (f". Over {n_seeds} training seeds each, {top} per block is ahead of "
                   + (" and ".join(str(n) for n in apart) + " on every seed (the seeds' ranges do not overlap)" if apart else "no arm on every seed")
                   + (f", and within seed-to-seed noise of {', '.join(str(n) for n in close)} (the ranges overlap: "
                      + "; ".join(f"{n}: {min(acc[n]):.4f}-{max(acc[n]):.4f}" for n in close)
                      + f", against {min(acc[top]):.4f}-{max(acc[top]):.4f})" if close else ""))
    by_n = {n: runs[0] for n, runs in groups.items()}
    if 0 in by_n and 3 in by_n:
        answer += (f". From 0 to 3 per block the parameters grow {by_n[3]['params'] / by_n[0]['params']:.2f}x and the "
                   f"multiply-adds {by_n[3]['macs'] / by_n[0]['macs']:.2f}x")
        if by_n[0]["ort_cpu_ms_b1"] and by_n[3]["ort_cpu_ms_b1"]:
            answer += (f"; one image on onnxruntime's CPU provider takes {by_n[0]['ort_cpu_ms_b1']:.2f} -> "
                       f"{by_n[3]['ort_cpu_ms_b1']:.2f} ms")
    dead = {n: mean([r["logits_end"]["dead"] for r in runs if r.get("logits_end")])
            for n, runs in groups.items() if any(r.get("logits_end") for r in runs)}
    dead = {n: d for n, d in dead.items() if d > 0.01}
    if dead:
        answer += ("; " + ", ".join(f"with {n} per block {d:.0%} of the test images"
                                    + (" (mean over seeds)" if several else "")
                                    + " end with all ten class scores at 0 (NiN's last ReLU: a tie the argmax breaks by index)"
                                    for n, d in sorted(dead.items())))
    answer += (". A 1x1 convolution is a per-pixel fully connected layer: it adds non-linearity across channels "
               "at a cost that does not grow with the kernel size.")
    answer += (f" {n_seeds} seeds are few: a difference the seeds' ranges do not separate is not evidence either way."
               if several else " Each arm is one seed: the report does not measure the seed-to-seed spread here, so "
               "small differences are not evidence.")
    return lines + ["", answer, "", f"![1x1 arms]({rel}/{plot})", ""]


def section_head(rec: dict, folder: Path, rel: str) -> list[str]:
    one = [r for r in rec["arms"].values() if r["arm"]["question"] == "1x1" and r["arm"]["num_1x1"] == 2 and r["confusion"]]
    two = [r for r in rec["arms"].values() if r["arm"]["question"] == "head" and r["confusion"]]
    if not one or not two:
        return []
    one, two = (sorted(runs, key=lambda r: r["seed"]) for runs in (one, two))
    size = rec_size(rec)
    width = two[0]["arm"]["head_width"]
    several = max(len(one), len(two)) > 1
    sums = {"one": summed([r["confusion"] for r in one]), "two": summed([r["confusion"] for r in two])}
    over = f", summed over {len(one)} seeds" if several else ""
    plot = plot_confusions([(f"one step 384->10 ({fmt(mean(finals(one)))}{over})", sums["one"]),
                            (f"two steps 384->{width}->10 ({fmt(mean(finals(two)))}{over})", sums["two"])],
                           folder / "head_confusion.png")
    acc_head = "final test acc" + (", mean (min-max over seeds)" if several else "")
    conf_head = "most confused (true -> predicted: count" + (", summed over seeds)" if several else ")")
    lines = [f"### The head: 384x{size}x{size} -> 10 in one NiN block (textbook) vs two steps", "",
             f"| head | params | seeds | {acc_head} | best test acc{' (mean)' if several else ''} | {conf_head} |", "|---|---|---|---|---|---|"]
    for label, runs, key in (("one step, 384 -> 10 (textbook)", one, "one"), (f"two steps, 384 -> {width} -> 10", two, "two")):
        conf = "; ".join(f"{a} -> {b}: {n}" for a, b, n in top_confusions(sums[key]))
        lines.append(f"| {label} | {runs[0]['params']:,} | {len(runs)} | {with_range(finals(runs))} "
                     f"| {fmt(mean([best(r) for r in runs]))} | {conf} |")
    delta = (mean(finals(two)) - mean(finals(one))) * 100

    def errors(m: list[list[int]], n: int) -> float:
        return (np.sum(m) - np.trace(m)) / n

    pairs_one = {(a, b) for a, b, _ in top_confusions(sums["one"])}
    pairs_two = {(a, b) for a, b, _ in top_confusions(sums["two"])}
    mean_word = "mean " if several else ""
    answer = (f"**Answer ({rec['budget']} budget).** The two-step head changes {mean_word}test accuracy by {delta:+.2f} points "
              f"({errors(sums['one'], len(one)):.0f} -> {errors(sums['two'], len(two)):.0f} errors{' per seed' if several else ''}) "
              f"for {two[0]['params'] - one[0]['params']:+,} parameters. ")
    if several:
        seed_one = {r["seed"]: final(r) for r in one}
        paired = [(final(r) - seed_one[r["seed"]]) * 100 for r in two if r["seed"] in seed_one]
        if paired:
            answer += "Seed by seed: " + ", ".join(f"{d:+.2f}" for d in paired) + " points. "
        answer += ("The seeds' ranges do not overlap: a difference beyond seed-to-seed noise. "
                   if separated(finals(one), finals(two)) else
                   "The seeds' ranges overlap: at this budget the two heads are not told apart. ")
    shared = sorted(pairs_one & pairs_two)
    if len(shared) == len(pairs_one):
        answer += ("Both heads confuse the same pairs most (" + "; ".join(f"{a} -> {b}" for a, b in shared) +
                   "): a wider head does not separate the garments the network mistakes for each other. ")
    elif shared:
        answer += ("Among their three most frequent confusions both heads have " +
                   "; ".join(f"{a} -> {b}" for a, b in shared) + ", the others differ (table). ")
    else:
        answer += "The pairs each head confuses most differ (table). "
    recall = {k: [m[i][i] / max(1, sum(m[i])) for i in range(10)] for k, m in sums.items()}
    moved = max(range(10), key=lambda i: abs(recall["two"][i] - recall["one"][i]))
    answer += (f"The class that moved most: {FASHION_MNIST_CLASSES[moved]}, recall {recall['one'][moved]:.2f} with one "
               f"step against {recall['two'][moved]:.2f} with two{' (over all seeds)' if several else ''}. ")
    answer += "Reducing 384 channels to 10 in one block did not stop the textbook's head from training at this budget"
    answer += "." if several else "; whether the two-step head's difference is more than one seed's noise is not measured here."
    return lines + ["", answer, "", f"![confusion matrices]({rel}/{plot})", ""]


def rec_size(rec: dict) -> int:
    """The head's input size (the last strided layer's output) at the record's image size."""
    from training.experiments.floor import nin_first_layers

    return nin_first_layers(next(iter(rec["arms"].values()))["image_size"])[-1]["output"]


def outcome(r: dict) -> str:
    """diverged (non-finite loss), stalled (train loss within 0.01 of ln 10: a uniform guess),
    learns (final test accuracy at least twice chance), or no better than chance."""
    if r["diverged"]:
        return "diverged"
    if r["stalled"]:
        return "stalled at ln 10"
    return "learns" if (final(r) or 0) >= 0.2 else "no better than chance"


def section_lr(rec: dict, folder: Path, rel: str) -> list[str]:
    ranges = rec["ranges"]
    sweep = {recipe: sorted((r for r in rec["arms"].values() if r["arm"]["question"] == "lr" and r["arm"]["preset"] == recipe),
                            key=lambda r: r["arm"]["lr"]) for recipe in RECIPES}
    if len(ranges) < len(RECIPES) or not all(sweep.values()):
        return []
    p1 = plot_ranges(ranges, folder / "lr_range.png")
    p2 = plot_sweep(sweep, folder / "lr_sweep.png")
    lines = ["### Learning rate: the range test, then a sweep around its suggestion", "",
             "| recipe | suggested lr | class-score spread at init (mean max - min) | images with all 10 scores = 0 at init |",
             "|---|---|---|---|"]
    for recipe in RECIPES:
        r = ranges[recipe]
        lines.append(f"| {recipe} | {r['suggested_lr']:.3g} | {r['logits_init']['spread']:.3g} | {r['logits_init']['dead']:.1%} |")
    lines += ["", "| recipe | lr | final train loss | final test acc | outcome | score spread at the end |",
              "|---|---|---|---|---|---|"]
    for recipe, arms in sweep.items():
        for r in arms:
            end = r["logits_end"]["spread"] if r["logits_end"] else None
            lines.append(f"| {recipe} | {r['arm']['lr']:g} | {fmt(final(r, 'train_loss'))} | {fmt(final(r))} | {outcome(r)} "
                         f"| {fmt(end, '.3g')} |")
    groups = {rc: {o: [a["arm"]["lr"] for a in arms if outcome(a) == o] for o in
                   ("stalled at ln 10", "learns", "diverged", "no better than chance")} for rc, arms in sweep.items()}
    best_arm = {rc: max(arms, key=lambda r: final(r) or 0) for rc, arms in sweep.items()}

    def lrs(v: list) -> str:
        return ", ".join(f"{x:g}" for x in v) or "none"

    def summary(rc: str) -> str:
        parts = [f"{o} at lr {lrs(v)}" for o, v in groups[rc].items() if v]
        return "; ".join(parts) + f" (best: lr {best_arm[rc]['arm']['lr']:g}, test accuracy {fmt(final(best_arm[rc]))})"

    d2l_spread, bn_spread = (ranges[rc]["logits_init"]["spread"] for rc in RECIPES)
    answer = (f"**Answer ({rec['budget']} budget).** Range test suggestions: {ranges['d2l']['suggested_lr']:.3g} for the "
              f"textbook recipe, {ranges['strong']['suggested_lr']:.3g} with BatchNorm. Textbook recipe (plain SGD, "
              f"Xavier, no BatchNorm): {summary('d2l')}. BatchNorm recipe: {summary('strong')}. ")
    for rc in RECIPES:
        losses = ranges[rc]["losses"]
        if losses and max(losses) - min(losses) < 0.01 and abs(min(losses) - LN10) < 0.01:
            answer += (f"The {rc} recipe's range test is flat at ln 10 over the whole range "
                       f"({ranges[rc]['lrs'][0]:.0e} to {ranges[rc]['lrs'][-1]:.2g}): the network is stalled from "
                       f"the first step, so its 'suggestion' is noise and no lr in the range test's reach moves "
                       f"the loss within {len(losses)} steps. ")
    if bn_spread > 0 and d2l_spread < bn_spread / 10:
        answer += (f"Why plain SGD stalls: at initialisation its ten class scores differ by {d2l_spread:.3g} on average "
                   f"(BatchNorm network: {bn_spread:.3g}) -- after twelve Xavier-initialised convolutions, each ReLU "
                   f"halving the signal's variance, the prediction is uniform, the loss is ln 10 = 2.3026 and the "
                   f"gradient reaching the early layers is as small as the signal. ")
        escaped = groups["d2l"]["learns"]
        answer += (f"In this budget plain SGD got out at lr {lrs(escaped)} only. " if escaped else
                   "No lr in the sweep got plain SGD out within this budget (the textbook trains 10 epochs on all "
                   "the data at 224 px: the GPU budget measures that). ")
        answer += ("BatchNorm rescales every layer's output to unit variance, so the scores start apart and the "
                   f"gradient flows: it learned at lr {lrs(groups['strong']['learns'])}. ")
    answer += ("To pick an lr: run the range test (`python -m training --lr-find`), start near its suggestion, "
               "and watch the first epoch's loss: flat at 2.3026 means stalled, not slow.")
    return lines + ["", answer, "", f"![range tests]({rel}/{p1})", "", f"![sweep]({rel}/{p2})", ""]


def section_floor(out: Path) -> list[str]:
    from training.experiments.floor import conv_probe, measured_coverage, nin_first_layers, rows_read

    coverage = measured_coverage(conv_probe(11, 4, 0), 224)
    plot = plot_floor(coverage.numpy(), out / "floor.png")
    lines = ["## Floor rounding: which rows are dropped, and which pixels each output reads", "",
             "| layer | input | out = floor((in + 2p - k)/s) + 1 | output | input rows never read |", "|---|---|---|---|---|"]
    for row in nin_first_layers(224):
        lines.append(f"| {row['layer']} | {row['input']} | {row['formula']} | {row['output']} | {row['unread']} |")
    unread = int((coverage.sum(dim=1) == 0).sum())
    conv1 = rows_read(224, 11, 4, 0)
    first = rows_read(26, 5, 1, 2)
    lines += ["", f"**Answer.** Nothing is cropped at random. conv1's windows start at rows {conv1[0][0]}, {conv1[1][0]}, ..., "
              f"{conv1[-1][0]} and the last ends at {conv1[-1][1]}: measured by perturbing each input row of a real `nn.Conv2d(1, 1, 11, stride=4)`, "
              f"{unread} row (and column) -- the last, index {223 - unread + 1} -- reaches no output, every time (the plot: its "
              f"coverage is 0). The .25 in (224 - 11)/4 + 1 = 54.25 is that leftover: (224 - 11) mod 4 = "
              f"{(224 - 11) % 4} row of the 4 a 55th window would need. With padding nothing is lost: conv 5x5 with padding 2 on the 26x26 map reads, "
              f"for output rows 0, 1, 2: input rows {first[0]}, {first[1]}, {first[2]} (the rest of each window is "
              f"zero padding), and for the last output row 25: rows {first[-1]}.", "",
              f"![floor]({plot})", ""]
    return lines


# Full-protocol runs of the textbook recipe (10 epochs at 224, all 60,000 images), made by
# `python -m training --preset d2l` outside the grid: their metrics.csv, committed under runs/.
ROOT = Path(__file__).resolve().parents[2]
# d2l224-fp32-from3: d2l224 resumed from its epoch-3 checkpoint in fp32 (epochs 1-3 are the bf16 run's)
PROTOCOL_RUNS = (ROOT / "runs" / "d2l224", ROOT / "runs" / "d2l224-fp32-from3")
READERS = "0.84-0.86"  # test accuracy after 10 epochs that the book's readers report on GPUs


def number_formats(rows: list[dict]) -> str:
    """Each epoch's autocast dtype, as spans: "bfloat16" or "bfloat16 in epochs 1-3, float32 in 4-5"."""
    spans: list[list] = []
    for e, r in enumerate(rows, 1):
        amp = r.get("amp") if r.get("amp") not in (None, "", "None") else "float32"
        if spans and spans[-1][0] == amp:
            spans[-1][2] = e
        else:
            spans.append([amp, e, e])
    if len(spans) == 1:
        return spans[0][0]
    return ", ".join(f"{amp} in {'epochs ' if i == 0 else ''}{a}" + (f"-{b}" if b > a else "")
                     for i, (amp, a, b) in enumerate(spans))


def section_protocol(runs: tuple[Path, ...] = PROTOCOL_RUNS) -> list[str]:
    done = {}
    for run in runs:
        if (run / "metrics.csv").is_file():
            with open(run / "metrics.csv") as f:
                done[run] = list(csv.DictReader(f))
    if not done:
        return []
    lines = ["## The textbook's recipe at its own protocol: 10 epochs at 224 on all 60,000 images", "",
             "Made by `python -m training --preset d2l` (plain SGD at lr 0.1, batch 128, Xavier, no BatchNorm), "
             "every epoch evaluated on all 10,000 test images; " + "; ".join(
                 f"`runs/{run.name}`: {rows[0]['hardware']}, {number_formats(rows)}" for run, rows in done.items()) + ".", "",
             "| epoch | " + " | ".join(f"{run.name}: train loss / test loss / test acc" for run in done) + " |",
             "|---|" + "---|" * len(done)]
    for e in range(max(len(rows) for rows in done.values())):
        cells = [f"{float(r[e]['train_loss']):.4f} / {float(r[e]['test_loss']):.4f} / {float(r[e]['test_acc']):.4f}"
                 if e < len(r) else "" for r in done.values()]
        lines.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    answers = []
    for run, rows in done.items():
        accs = [float(r["test_acc"]) for r in rows]
        at_ln10 = [i + 1 for i, r in enumerate(rows) if abs(float(r["test_loss"]) - LN10) < 1e-3]
        best_i = max(range(len(accs)), key=accs.__getitem__)
        dead_from = next((e for e in at_ln10 if e > best_i + 1 and set(range(e, len(rows) + 1)) <= set(at_ln10)), None)
        text = (f"`{run.name}` ({len(rows)} of 10 epochs): epoch 1's mean train loss {float(rows[0]['train_loss']):.4f} "
                f"against ln 10 = {LN10:.4f} (the stall at the start); best {accs[best_i]:.4f} at epoch {best_i + 1}, last {accs[-1]:.4f}; "
                + (f"test loss at ln 10 (every image one class) in epochs {', '.join(map(str, at_ln10))}" if at_ln10
                   else "test loss never at ln 10 (no collapse to one class)"))
        if dead_from:
            text += f": it learned, then collapsed back to ln 10 in epoch {dead_from} and stayed there"
        answers.append(text + ".")
    lines += ["", f"**Answer.** Readers report {READERS} after 10 epochs. " + " ".join(answers)
              + " Why it collapses and stays, and what avoids it: docs/training.md.", ""]
    return lines


def write_report(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(out)
    write_csv(csv_rows(records), out / "runs.csv")
    lines = ["# NiN exercises (d2l.ai 8.3), answered with measurements", "",
             "Made by `python -m training.experiments --budget cpu|gpu` (training/experiments/); every table and "
             "answer below is generated from the runs in `runs.csv` and `BUDGET/arms/*.json`. Budgets are never "
             "mixed in one table.", ""]
    for name, rec in records.items():
        if not rec["arms"] and not rec["ranges"]:
            continue
        budget = BUDGETS[name]
        hardware = sorted({r["hardware"] for r in [*rec["arms"].values(), *rec["ranges"].values()]})
        data = sorted({r.get("data", "?") for r in rec["arms"].values()})
        retimed = all(r.get("ort_retimed") for r in rec["arms"].values() if not r.get("diverged"))
        lines += [f"## Budget `{name}` on {', '.join(hardware)}", "", budget.describe() + f"; data: {', '.join(data)}.", "",
                  "Wall times: *train img/s* was measured while each arm trained at `nice 19` beside other work on "
                  "the same cores, so it is noisy; *ORT CPU ms/img* is the median of "
                  f"{budget.ort_runs} batch-1 runs of the arm's ONNX export"
                  + (", re-timed one arm after another on a quiet machine (`--retime`; it depends on the "
                     "architecture, not the weights)." if retimed else ", timed right after the arm trained.")
                  + " *Peak memory* is the arm's whole process (torch, the data, the model). Params and "
                  "multiply-adds are exact (training/resources.py).", ""]
        folder = out / name
        for section in (section_one_by_one, section_head, section_lr):
            lines += section(rec, folder, name)
    lines += section_protocol()
    lines += section_floor(out)
    path = out / "README.md"
    atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines)))
    return path
