"""Training side of fmh-engine (imports torch): clip datasets and donor splits
(:mod:`train.data`), the training recipe (:mod:`train.loop`), evaluation
(:mod:`train.evaluate`), Grad-CAM (:mod:`train.gradcam`), the single-frame baseline
(:mod:`train.baselines`) and labelled synthetic clip stores (:mod:`train.synth`).
"""
