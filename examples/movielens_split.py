"""Fixed time splits of MovieLens ml-latest-small for the recommendation recipes.

    python examples/movielens_split.py [--data ../shared/data/movielens_latest_small] [--out runs/movielens]

Ratings sorted by (timestamp, userId, movieId); the first 70% are the EARLY period, the rest the
LATER one (a model pretrained on the past, adapted to what came after):

    early_train.csv   95% of the early ratings (a fixed random 5% is early_val.csv)  -> pretraining
    later_train.csv   each user's first 60% of their later ratings                    -> adaptation
    later_val.csv     each user's next 20%                                            -> model choice
    later_test.csv    each user's last 20%                                            -> the report only

(Users with fewer than 5 later ratings: all of them in later_train.) Every split of the later
period respects time per user: a user's held-out ratings came after the ones trained on.

Held-out rows (early_val, later_val, later_test) keep only users and movies that have a rating
in a training file (early_train or later_train): a matrix-factorisation model has no row to rank
or rate for an id it never saw. Nothing is tuned on later_test.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

EARLY, LATER_TRAIN, LATER_VAL, MIN_HELD_OUT = 0.70, 0.60, 0.20, 5
COLUMNS = ("user", "item", "rating", "timestamp")


def read(path: Path) -> list[tuple[str, str, str, int]]:
    with open(path, newline="") as f:
        return [
            (r["userId"], r["movieId"], r["rating"], int(r["timestamp"])) for r in csv.DictReader(f)
        ]


def write(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(rows)
    tmp.replace(path)


def split(rows):
    rows = sorted(rows, key=lambda r: (r[3], int(r[0]), int(r[1])))
    cut = int(len(rows) * EARLY)
    early, later = rows[:cut], rows[cut:]
    order = list(range(len(early)))
    random.Random(0).shuffle(order)
    val_idx = set(order[: len(early) // 20])
    early_train = [r for i, r in enumerate(early) if i not in val_idx]
    early_val = [r for i, r in enumerate(early) if i in val_idx]
    by_user: dict[str, list] = {}
    for r in later:  # already in time order
        by_user.setdefault(r[0], []).append(r)
    later_train, later_val, later_test = [], [], []
    for user_rows in by_user.values():  # each user's later ratings, split in time order
        n = len(user_rows)
        a, b = round(n * LATER_TRAIN), round(n * (LATER_TRAIN + LATER_VAL))
        if n < MIN_HELD_OUT:
            a = b = n
        later_train += user_rows[:a]
        later_val += user_rows[a:b]
        later_test += user_rows[b:]
    users = {r[0] for r in early_train + later_train}
    items = {r[1] for r in early_train + later_train}
    known = lambda part: [r for r in part if r[0] in users and r[1] in items]  # noqa: E731
    return {
        "early_train": early_train,
        "early_val": known(early_val),
        "later_train": later_train,
        "later_val": known(later_val),
        "later_test": known(later_test),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/movielens_latest_small")
    ap.add_argument("--out", default="runs/movielens")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = split(read(Path(args.data) / "ratings.csv"))
    for name, rows in parts.items():
        write(out / f"{name}.csv", rows)
        print(f"{name:12s} {len(rows):7,d} ratings, {len({r[0] for r in rows}):4d} users")


if __name__ == "__main__":
    main()
