"""A standard household load profile, the forecaster's prior before a home has its own history.

Source: BDEW/VDEW standard load profile H25 (households, 2025 edition), as shipped in
demandlib 0.2.2 (``demandlib/bdew/bdew_data/h25.csv``, MIT licence). The 96 quarter-hours x
12 months x 3 day types were reduced here to hourly means averaged over the year (each month
weighted by its days), expressed relative to the annual mean power. "Weekend" is the mean of
H25's Saturday and Sunday/holiday columns. The months' levels differ by less than +-10 % and are
dropped: a home's own history sets the level as soon as it has any.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

# Hour 0..23 (value = mean over [h, h+1)), relative to the annual mean power.
# fmt: off
_WEEKDAY = (
    0.707, 0.611, 0.576, 0.572, 0.601, 0.691, 0.871, 0.931, 0.882, 0.861, 0.865, 0.945,
    0.986, 0.966, 0.937, 0.959, 1.057, 1.253, 1.436, 1.490, 1.419, 1.296, 1.138, 0.904,
)
_SATURDAY = (
    0.777, 0.662, 0.609, 0.592, 0.595, 0.617, 0.722, 0.923, 1.118, 1.224, 1.293, 1.390,
    1.376, 1.304, 1.264, 1.251, 1.284, 1.399, 1.494, 1.475, 1.383, 1.280, 1.172, 0.986,
)
_SUNDAY = (
    0.808, 0.693, 0.633, 0.607, 0.599, 0.616, 0.693, 0.872, 1.119, 1.312, 1.454, 1.613,
    1.547, 1.396, 1.299, 1.253, 1.277, 1.424, 1.541, 1.530, 1.431, 1.295, 1.128, 0.895,
)
# fmt: on

WEEKDAY = np.array(_WEEKDAY)
WEEKEND = (np.array(_SATURDAY) + np.array(_SUNDAY)) / 2.0


def prior_shape(weekend: bool, step_s: int) -> NDArray[np.float64]:
    """Relative load (annual mean = ~1) for each ``step_s`` slot of a day of the given type.

    Hourly means are interpolated linearly between hour centres (wrapping midnight), then
    rescaled so each hour's mean is preserved at any step.
    """
    hourly = WEEKEND if weekend else WEEKDAY
    n = 86400 // step_s
    t = (np.arange(n) + 0.5) * step_s / 3600.0
    xp = np.concatenate(([-0.5], np.arange(24) + 0.5, [24.5]))
    fp = np.concatenate(([hourly[-1]], hourly, [hourly[0]]))
    shape = np.interp(t, xp, fp)
    return shape * (hourly.mean() / shape.mean())
