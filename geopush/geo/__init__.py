"""The pure geofence core: stores → index → transitions. No I/O beyond reading the stores file."""
