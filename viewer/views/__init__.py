"""The viewer's views, one module per tab (runs, questions, results, experiments, early_exit), over the shared
helpers of common.py."""
