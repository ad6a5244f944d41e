"""Which weights are the run's result: raw or EMA each epoch, the best epoch by a metric, the best k kept.

Plain functions over plain data (the `best` dict lives in every checkpoint), so train.py's end of epoch
reads as a sequence of decisions and each decision can be tested alone.
"""

from __future__ import annotations


def pick_weights(results: dict[str, dict], metric: str) -> str:
    """The key ('ema' or 'raw') of the better validation result by `metric`. Ties go to the first key
    given (train.py passes EMA first: on equal scores the smoother weights win)."""
    return max(results, key=lambda which: results[which][metric])


def no_best(metric: str) -> dict:
    """The `best` record before the first validation: any score beats it."""
    return {"metric": metric, "value": float("-inf"), "epoch": -1, "kept": []}


def update_best(best: dict, value: float, epoch: int, keep_best: int) -> tuple[dict, bool, list[list]]:
    """(new best dict, whether this epoch is the new best, [[value, epoch], ...] whose files to delete).

    `best` holds {"metric", "value", "epoch", "kept"}; "kept" lists the best k epochs as [value, epoch],
    best first, ties to the earlier epoch. With keep_best <= 1 nothing is kept besides best.pt."""
    improved = value > best["value"]
    if improved:
        best = {**best, "value": value, "epoch": epoch}
    ranked = sorted([*best["kept"], [value, epoch]], key=lambda ve: (-ve[0], ve[1]))
    kept, dropped = (ranked[:keep_best], ranked[keep_best:]) if keep_best > 1 else ([], [])
    return {**best, "kept": kept}, improved, dropped
