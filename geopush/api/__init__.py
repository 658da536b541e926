"""The aiohttp handlers of the HTTP API (contract §6); wired together in `geopush.app`."""
