"""Launchers: place roles in processes (local, Ray, Slurm)."""
