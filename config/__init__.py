"""dockyard's configuration data: the default `dockyard.toml` and the image recipes."""
