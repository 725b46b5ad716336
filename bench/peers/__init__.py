"""Peer implementations the bridge is measured against."""
