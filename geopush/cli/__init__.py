"""The `geopush` command line: serve, check, schema, replay."""
