"""Where an image is kept: the receive journal, its applier into the spool and the ledger,
series completion, and retention that deletes the files again.

Images come from :mod:`node.receive`; closed series go to the pipeline (:mod:`node.pipeline`),
whose reports :mod:`node.send` delivers.
"""
