"""Embedded workloads: data that ships in a package or is generated, never downloaded."""
