"""Load and PV forecasts for the planner: pure numpy functions of the store's history.

- ``forecast_load``: recency-weighted day-type profile with a standard-profile prior (load.py)
- ``forecast_pv``: clear-sky model x learned site scale x clear-sky index, or an external
  forecast (pv.py, solar.py)
- ``metrics``: MAE, RMSE, daily-energy error, skill, and the rolling-origin ``evaluate_load``
"""

from gateway.forecast.load import LoadConfig, LoadForecast, forecast_load
from gateway.forecast.pv import (
    ExternalForecast,
    ExternalForecastError,
    PvConfig,
    PvForecast,
    forecast_pv,
    load_external,
    parse_external,
)
from gateway.forecast.solar import PvArray, clear_sky_power

__all__ = [
    "ExternalForecast",
    "ExternalForecastError",
    "LoadConfig",
    "LoadForecast",
    "PvArray",
    "PvConfig",
    "PvForecast",
    "clear_sky_power",
    "forecast_load",
    "forecast_pv",
    "load_external",
    "parse_external",
]
