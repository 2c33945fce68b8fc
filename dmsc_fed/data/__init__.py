"""Site data: bundled and synthetic datasets, a site's own CSV file, partitioning and splits."""

from dmsc_fed.data.scaling import FeatureStats, Scaler, fit_scaler
from dmsc_fed.data.site import (
    SiteData,
    SiteSummary,
    dataset_tasks,
    describe_site,
    load_site_data,
    pooled_data,
    site_task,
)

__all__ = [
    "FeatureStats",
    "Scaler",
    "SiteData",
    "SiteSummary",
    "dataset_tasks",
    "describe_site",
    "fit_scaler",
    "load_site_data",
    "pooled_data",
    "site_task",
]
