"""Pre-processing of the raw public downloads into the on-disk layout the loaders read.

``python -m data.preprocess chaos|sabs|cmr|generic --raw DIR --out DIR`` and
``python -m data.preprocess verify FOLDER``; see ``data/README.md``.
"""
