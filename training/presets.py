"""Training recipes. A flag given on the command line overrides the preset's value."""

PRESETS: dict[str, dict] = {
    # The textbook (d2l 1st/2nd editions): plain SGD, lr 0.1, Xavier init, no BatchNorm.
    "d2l": dict(
        epochs=10,
        batch_size=128,
        lr=0.1,
        optimizer="sgd",
        momentum=0.0,
        nesterov=False,
        weight_decay=0.0,
        schedule="constant",
        warmup_epochs=0.0,
        label_smoothing=0.0,
        augment=False,
        batch_norm=False,
        init="xavier",
        dropout=0.5,
    ),
    # BatchNorm makes lr 0.1 safe (without it NiN can stall at loss ln 10 = 2.3026); one-cycle
    # with Nesterov momentum converges in few epochs, which matters on a CPU; label smoothing and
    # pad-2 crop + horizontal flip at 28x28 (garments are left-right symmetric, never upside down)
    # fight overfitting.
    "strong": dict(
        epochs=15,
        batch_size=128,
        lr=0.1,
        optimizer="sgd",
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="onecycle",
        warmup_epochs=0.0,
        label_smoothing=0.1,
        augment=True,
        batch_norm=True,
        init="kaiming",
        dropout=0.5,
    ),
}
