"""Pick the next samples to label from your own model's outputs, with no dalbt model.

A scikit-learn classifier is trained on 100 labelled digits; dalbt's strategies then choose 20
of the remaining pool from its predicted probabilities (margin), from feature vectors (core-set,
here 16 PCA components) and from both plus the labelled set (DALBT's Weibull sampling).
Arrays may be numpy arrays or torch tensors. Run: ``python examples/select_from_arrays.py``.
"""

import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from dalbt import select

x, y = load_digits(return_X_y=True)
x = x / 16.0
rng = np.random.default_rng(0)
order = rng.permutation(len(x))
labelled, pool = order[:100], order[100:]

clf = LogisticRegression(max_iter=2000).fit(x[labelled], y[labelled])
probs = clf.predict_proba(x[pool])  # (N, 10), rows sum to 1
features = PCA(n_components=16, random_state=0).fit(x).transform(x)  # (all, 16)

# Uncertainty: the 20 pool images whose two most likely digits are closest.
margin = select("margin", 20, probs=probs, indices=pool)

# Diversity: greedy k-centre on the features, the labelled images as initial centres.
coreset = select("coreset", 20, embeddings=features[pool],
                 labelled_embeddings=features[labelled], indices=pool)

# DALBT's Weibull outlier sampling: needs the labelled set's outputs and labels as well.
weibull = select("weibull-balanced", 20, probs=probs, embeddings=features[pool],
                 labelled_embeddings=features[labelled],
                 labelled_probs=clf.predict_proba(x[labelled]), labelled_targets=y[labelled],
                 indices=pool)

if __name__ == "__main__":
    for name, picked in (("margin", margin), ("coreset", coreset), ("weibull", weibull)):
        print(f"{name:8s} dataset indices {picked.tolist()}")
