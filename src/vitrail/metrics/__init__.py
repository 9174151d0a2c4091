"""Evaluation modules in the format of the `evaluate` library, loadable offline with `evaluate.load(path)`.

Each module here is a single self-contained file: `evaluate.load` copies only that file into its module cache,
so a metric may import numpy, datasets and evaluate, but nothing from vitrail. Use
`vitrail.evaluation.load_classification_metric()` rather than spelling out the path.
"""
