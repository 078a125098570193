"""The dorafs worker daemon: page cache, metadata cache and UFS fill for the paths it owns."""
