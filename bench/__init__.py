"""The load benchmark of otp-server: one command, ``python -m bench`` (see bench/README.md)."""
