"""Build the local mesh's sample models from data that ships with scikit-learn.

Runs in the MLServer virtualenv (it needs scikit-learn, lightgbm and joblib, which the
control plane does not), so it imports nothing from modelxds:

    .venv-mlserver/bin/python modelxds/localmesh/train.py OUT_DIR [--generate N]

OUT_DIR/sklearn/mnist-svm.joblib   the seed's SVC on the bundled digits (predicts 8
                                   for the seed's input); mnist-svm-v2.joblib: C=10
OUT_DIR/lightgbm/digits-lgb.bst    a LightGBM booster on the same data: a second
                                   framework serving side by side
OUT_DIR/generated/model-NNNN.joblib  N distinct small logistic regressions, for scale runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SEED_INPUT = [0, 0, 1, 11, 14, 15, 3, 0, 0, 1, 13, 16, 12, 16, 8, 0, 0, 8, 16, 4, 6, 16, 5, 0,
              0, 5, 15, 11, 13, 14, 0, 0, 0, 0, 2, 12, 16, 13, 0, 0, 0, 0, 0, 13, 16, 16, 6, 0,
              0, 0, 0, 16, 16, 16, 7, 0, 0, 0, 0, 11, 13, 12, 1, 0]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--generate", type=int, default=0, help="also build N small models")
    args = p.parse_args(argv)

    import joblib
    import lightgbm
    import numpy as np
    from sklearn import datasets, linear_model, svm

    digits = datasets.load_digits()
    x, y = digits.data, digits.target

    # the seed's model, and a retrained one for the seed's model change
    for name, c in (("mnist-svm.joblib", 100.0), ("mnist-svm-v2.joblib", 10.0)):
        svc_path = args.out / "sklearn" / name
        if svc_path.exists():
            continue
        svc = svm.SVC(gamma=0.001, C=c).fit(x[:-1], y[:-1])
        got = int(svc.predict([SEED_INPUT])[0])
        if got != 8:
            print(f"error: {name} predicts {got} for the seed's input, not 8", file=sys.stderr)
            return 1
        svc_path.parent.mkdir(parents=True, exist_ok=True)
        joblib.dump(svc, svc_path)

    lgb_path = args.out / "lightgbm" / "digits-lgb.bst"
    if not lgb_path.exists():
        booster = lightgbm.train(
            {"objective": "multiclass", "num_class": 10, "verbose": -1, "num_threads": 1},
            lightgbm.Dataset(x, label=y),
            num_boost_round=20,
        )
        lgb_path.parent.mkdir(parents=True, exist_ok=True)
        booster.save_model(str(lgb_path))

    gen = args.out / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    rnd = np.random.default_rng(0)
    for i in range(args.generate):
        path = gen / f"model-{i:04d}.joblib"
        if path.exists():
            continue
        rows = rnd.choice(len(x), size=300, replace=False)  # distinct data -> distinct model
        model = linear_model.LogisticRegression(max_iter=200).fit(x[rows], y[rows])
        joblib.dump(model, path)
    print(f"sample models in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
