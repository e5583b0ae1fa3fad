"""Files copied verbatim into bundles (stdlib-only parsers the device runs). Never imported as plug-ins."""
