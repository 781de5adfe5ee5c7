"""The checks an exported model must pass. Pure numpy on logits; each returns a report dict."""

from __future__ import annotations

import numpy as np

# PyTorch's ONNX tutorial tolerance for fp32 parity.
RTOL, ATOL = 1e-3, 1e-5
MAX_ACCURACY_DROP_PP = 0.3


class CheckFailed(RuntimeError):
    pass


def parity(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray,
           rtol: float = RTOL, atol: float = ATOL) -> dict:
    """Compare two (N, C) logit arrays. Every image must get the same argmax, except where the
    reference's top two logits lie within the tolerance (a tie either answer may break)."""
    if reference.shape != candidate.shape:
        raise CheckFailed(f"parity: shapes differ, {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference - candidate)
    within = diff <= atol + rtol * np.abs(reference)
    top2 = np.sort(reference, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * (atol + rtol * np.abs(top2[:, 1]))
    disagree = reference.argmax(1) != candidate.argmax(1)
    return {
        "images": int(len(reference)),
        "max_abs_diff": float(diff.max(initial=0.0)),
        "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "within_tolerance": float(within.mean()) if within.size else 1.0,
        "rtol": rtol,
        "atol": atol,
        "argmax_agreement": float(1 - disagree.mean()) if len(disagree) else 1.0,
        "argmax_disagreements": int(disagree.sum()),
        "disagreements_outside_near_ties": int((disagree & ~near_tie).sum()),
        "reference_accuracy": accuracy(reference, labels),
        "candidate_accuracy": accuracy(candidate, labels),
    }


def assert_parity(report: dict) -> None:
    if report["disagreements_outside_near_ties"]:
        raise CheckFailed(
            f"parity: ONNX and PyTorch disagree on {report['disagreements_outside_near_ties']} of "
            f"{report['images']} images (max |dlogit| {report['max_abs_diff']:.3g}); the exported file "
            "does not compute what the checkpoint does"
        )
    if report["within_tolerance"] < 0.999:
        raise CheckFailed(
            f"parity: only {report['within_tolerance']:.2%} of logits within rtol {report['rtol']} / atol "
            f"{report['atol']} (max |dlogit| {report['max_abs_diff']:.3g})"
        )


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean()) if len(labels) else 0.0


def accuracy_gate(baseline: float, variant: float, max_drop_pp: float = MAX_ACCURACY_DROP_PP) -> tuple[bool, str]:
    """A variant passes when it loses at most `max_drop_pp` percentage points of accuracy."""
    drop = (baseline - variant) * 100
    if drop <= max_drop_pp + 1e-9:
        return True, f"accuracy {variant:.4f} vs fp32 {baseline:.4f} (drop {drop:+.2f} pp <= {max_drop_pp} pp)"
    return False, f"accuracy {variant:.4f} vs fp32 {baseline:.4f}: drop {drop:.2f} pp > {max_drop_pp} pp allowed"
