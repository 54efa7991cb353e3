"""systemd units and their end-to-end test under a real systemd in a systemd-nspawn container."""
