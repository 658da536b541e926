"""geopush: geofencing drive-to-store push notifications that are never pushy."""

__version__ = "0.1.0"
