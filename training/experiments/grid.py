"""The declared grid: budgets and arms. Pure data, no torch.

Every arm of a budget sees the same data (one seeded, class-balanced subset), the same input
size and batch size; arms of one question differ in the one thing the question asks about. The
structural arms run once per training seed of the budget (initialisation, shuffling,
augmentation), so the report can tell a difference between architectures from seed-to-seed noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

LN10 = math.log(10)  # the loss of a network that predicts 1/10 for every class: 2.3026


@dataclass(frozen=True)
class Budget:
    name: str
    image_size: int
    train_images: int | None  # None = all 60,000
    test_images: int | None  # None = all 10,000
    epochs: int  # structural arms (1x1 convolutions, head)
    sweep_epochs: int  # learning-rate sweep arms
    batch_size: int
    range_steps: int  # steps of each learning-rate range test
    ort_runs: int  # timed onnxruntime batch-1 runs per arm (0: none while training; --retime times 20)
    hardware_hint: str
    seed: int = 0  # the data subset's seed, and the training seed of the range tests and the sweep
    seeds: tuple[int, ...] = (0,)  # training seeds of each structural arm

    def describe(self) -> str:
        train = f"a class-balanced subset of {self.train_images:,}" if self.train_images else "all 60,000"
        test = f"the first {self.test_images:,}" if self.test_images else "all 10,000"
        return (f"`--budget {self.name}`: {self.image_size}x{self.image_size} inputs, {train} training images, "
                f"{test} test images, batch {self.batch_size}, {self.epochs} epochs per structural arm, "
                f"{self.sweep_epochs} per learning-rate arm, {self.range_steps}-step range tests, "
                f"{seeds_phrase(self.seeds)} per structural arm, data subset seed {self.seed}")


def seeds_phrase(seeds: tuple[int, ...]) -> str:
    return f"training seed {seeds[0]}" if len(seeds) == 1 else f"training seeds {', '.join(map(str, seeds))}"


BUDGETS = {
    # What 2 CPU cores do in the background in a few hours: 112x112 keeps the head's question
    # (a 384-channel map, 2x2 here, 5x5 at 224) and costs 4x less than 224; every epoch is
    # evaluated on all 10,000 test images; three training seeds per structural arm.
    "cpu": Budget("cpu", image_size=112, train_images=8_000, test_images=None, epochs=3, sweep_epochs=2,
                  batch_size=128, range_steps=100, ort_runs=200, hardware_hint="2-core CPU", seeds=(0, 1, 2)),
    # The textbook's protocol: 224x224, all the data, 10 epochs per arm; one seed, to fit the GPU
    # proof's minutes (its grid stage).
    "gpu": Budget("gpu", image_size=224, train_images=None, test_images=None, epochs=10, sweep_epochs=10,
                  batch_size=128, range_steps=200, ort_runs=200, hardware_hint="one GPU"),
    # The plumbing only: a few steps per arm (the test suite and the GPU proof's dry run).
    "smoke": Budget("smoke", image_size=72, train_images=320, test_images=200, epochs=2, sweep_epochs=1,
                    batch_size=32, range_steps=12, ort_runs=0, hardware_hint="any", seeds=(0, 1)),
}

# The two recipes the readers compare: the textbook's (plain SGD, no BatchNorm, Xavier) and
# the project's BatchNorm recipe (training/presets.py "strong").
RECIPES = ("d2l", "strong")


@dataclass(frozen=True)
class Arm:
    name: str
    question: str  # "1x1", "head", "lr"
    preset: str
    lr: float
    epochs: int
    num_1x1: int = 2
    head_width: int = 0
    overrides: dict = field(default_factory=dict)  # recipe values that differ from the preset
    seed: int = 0  # training seed: initialisation, shuffling, augmentation

    def to_dict(self) -> dict:
        return asdict(self)


def structural_arms(budget: Budget) -> list[Arm]:
    """1x1 convolutions per block 0-3 (2 is the textbook's) and the two-step head, all on the
    BatchNorm recipe at lr 0.1: without BatchNorm most of these arms would not train at all in
    a short budget (the learning-rate question shows why), and the question is the architecture.
    One arm per training seed of the budget: seed 0 is named plainly ("1x1-2"), seed s "1x1-2-s{s}"."""
    arms = []
    for seed in budget.seeds:
        tail = f"-s{seed}" if seed else ""
        arms += [Arm(f"1x1-{n}{tail}", "1x1", "strong", 0.1, budget.epochs, num_1x1=n, seed=seed) for n in range(4)]
        arms.append(Arm(f"head-two-step{tail}", "head", "strong", 0.1, budget.epochs, head_width=96, seed=seed))
    return arms


def series(i: int) -> float:
    """The 1-3 series of learning rates: i = 0 -> 1, -1 -> 0.3, -2 -> 0.1, -3 -> 0.03, ..."""
    return round((1 if i % 2 == 0 else 3) * 10 ** (i // 2 if i % 2 == 0 else (i - 1) // 2), 10)


def series_index(lr: float) -> int:
    """The nearest point of the 1-3 series (in log space) to `lr`."""
    return min(range(-12, 6), key=lambda i: abs(math.log(series(i)) - math.log(lr)))


def sweep_lrs(suggestion: float, textbook_lr: float = 0.1) -> list[float]:
    """Four learning rates around a range test's suggestion (two below, the nearest, one above,
    on the 1-3 series), plus the textbook's 0.1 where they miss it."""
    i = series_index(suggestion)
    lrs = {series(j) for j in (i - 2, i - 1, i, i + 1)}
    lrs.add(textbook_lr)
    return sorted(lrs)


def sweep_arms(budget: Budget, suggestions: dict[str, float]) -> list[Arm]:
    """For each recipe, the sweep around its range test's suggestion, each with a constant
    learning rate for the textbook recipe (as in d2l) and one-cycle for the BatchNorm recipe."""
    arms = []
    for recipe in RECIPES:
        for lr in sweep_lrs(suggestions[recipe]):
            arms.append(Arm(f"lr-{recipe}-{lr:g}", "lr", recipe, lr, budget.sweep_epochs, seed=budget.seed))
    return arms
