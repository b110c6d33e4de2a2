"""TOFU: the benchmark's metrics, evaluation of a model, the Mini-TOFU data set and the demo.

    metrics.py   probability, truth ratio, ROUGE-L, forget quality, model utility
    evaluate.py  a model on the TOFU sets -> the report (per set and summary)
    minitofu.py  Mini-TOFU: a seeded TOFU look-alike, and `fastnpo prepare-tiny`
    demo.py      the TOFU unlearning study at laptop scale (`fastnpo demo`)
    plots.py     the demo's results table and figures
"""
