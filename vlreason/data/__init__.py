"""Canonical dataset schema, safe image decoding, loading and collation."""
