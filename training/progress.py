"""Progress bars of training and evaluation. A bar is drawn only when stderr is a terminal (tqdm's
`disable=None`) and the training log is at INFO: `vaeserve train --quiet`, and callers that raise
the `vaeserve.training` logger to WARNING (the anomaly benchmark), get none."""

import logging

from tqdm import tqdm

LOGGER = "vaeserve.training"  # the parent of every training module's logger


def bar(iterable=None, **kwargs) -> tqdm:
    shown = logging.getLogger(LOGGER).isEnabledFor(logging.INFO)
    return tqdm(iterable, disable=None if shown else True, dynamic_ncols=True, **kwargs)
