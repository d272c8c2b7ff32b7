"""The hive's HTTP routes: thin handlers over the supervisor, catalog, downloads and devices."""
