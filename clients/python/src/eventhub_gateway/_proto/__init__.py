"""Stubs generated from the repository's proto/ by generate_stubs.py; do not edit."""
